"""Features written by another process into a generation the producer reserved, then adopted.

The protocol (one mechanism for every shared backend: ``shm://``, ``dir://``, ``mooncake://``):

1. the producer reserves a generation of a sample (``store.reserve(sample_id)``: by the store's
   own rule, greater than any generation of that sample any process handed out) and names itself
   as the **steward** (:func:`steward`: host + process identity, see
   :mod:`dataflow.store.owner`);
2. a foreign process (e.g. a capture server's connector), with its own instance of the same
   store opened by URI, writes the sample there (``store.stage(sample_id, generation, tensors,
   steward=...)``): the bytes land in a *staged* place that ``get`` never reads, published
   atomically (a reader sees a whole staged sample or none);
3. the producer checks what was staged (``store.staged_tensors`` for small features it wants to
   compare, e.g. token ids) and adopts it (``store.adopt(sample_id, generation, specs,
   metadata)``): the staged specs must equal the expected ones, then the generation is moved to
   its final place and lives by every rule of a put (leases, consume-once, abort, gc, budget).

A writer that builds the features itself can write them in place instead
(``store.stage_writer(...)``: writable tensors of the expected specs, then ``publish()``,
:class:`StagedWrite`): on ``shm://`` they view the staged segment's memory, so each byte is
written once, straight where the sample lives.

Crash rules: a writer killed mid-write leaves a temporary named after the writer, reclaimed by
``gc`` once the writer is dead (as a put's temporary); a staged sample never adopted carries the
steward's identity and is reclaimed by ``gc`` in any process once the steward is dead, and
``abort(sample_id)`` removes it at once. ``mooncake://`` has no process owners: staged objects
live in the writer's segment and go with it; an unadopted one is removed by ``abort``.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Callable, Mapping
from typing import Any

import torch

from dataflow.contracts import FeatureSpec, InvalidInputError, NotFoundError, SchemaMismatchError
from dataflow.contracts.checks import is_int
from dataflow.store.owner import current_owner
from dataflow.store.segments import read_layout, read_sample
from dataflow.store.tensors import describe

_STEWARD = re.compile(r"^(?P<host>[A-Za-z0-9._-]{1,64})@(?P<owner>\d{10}\.\d{20}\.\d{12})$")


def this_host() -> str:
    """The name of this host as it appears in staged names (``[A-Za-z0-9._-]``, at most 64)."""
    name = re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname())[:64]
    return name or "host"


def steward() -> str:
    """The calling process as a steward of staged samples: ``<host>@<owner identity>``."""
    return f"{this_host()}@{current_owner()}"


def parse_steward(value: object) -> tuple[str, str]:
    """``(host, owner)`` of a steward string; ``InvalidInputError`` naming a malformed one."""
    match = _STEWARD.match(value) if isinstance(value, str) else None
    if match is None:
        raise InvalidInputError(
            f"steward must be '<host>@<owner identity>' (dataflow.store.staging.steward()), "
            f"got {value!r}"
        )
    return match["host"], match["owner"]


def check_generation(sample_id: str, generation: object, what: str) -> int:
    """``generation`` as an int >= 1, else ``InvalidInputError`` naming ``what``."""
    if not is_int(generation) or generation < 1:
        raise InvalidInputError(
            f"{what} of {sample_id!r}: generation must be an int >= 1, got {generation!r}"
        )
    return generation


def same_specs(stored: Mapping[str, Any], specs: Mapping[str, FeatureSpec], where: str) -> None:
    """``SchemaMismatchError`` unless the staged entries are exactly ``specs`` (names and specs)."""
    if set(stored) != set(specs):
        raise SchemaMismatchError(
            f"{where}: the staged sample holds {sorted(stored)}, expected {sorted(specs)}"
        )
    for name, spec in specs.items():
        if stored[name].spec != spec:
            raise SchemaMismatchError(
                f"{where}: feature {name!r} was staged as {describe(stored[name].spec)}, "
                f"expected {describe(spec)}"
            )


def check_staged_file(path: str, specs: Mapping[str, FeatureSpec], where: str) -> None:
    """A staged segment file at ``path`` holds exactly ``specs``: ``NotFoundError`` when nothing
    is staged there, ``SchemaMismatchError`` naming the difference (file-backed stores:
    ``shm://``, ``dir://``).
    """
    where = f"{where} (staged)"
    try:
        layout = read_layout(path, where)
    except NotFoundError:
        raise NotFoundError(
            f"{where}: nothing is staged there (wrong generation or sample, never written, "
            "already adopted or aborted)"
        ) from None
    same_specs(layout.entries, specs, where)


def read_staged_file(
    path: str, wanted: Mapping[str, FeatureSpec], where: str
) -> dict[str, torch.Tensor]:
    """The ``wanted`` tensors of the staged segment file at ``path`` (private copies)."""
    tensors, _ = read_sample(path, wanted, f"{where} (staged)")
    return tensors


def checked_specs(
    sample_id: str, specs: Mapping[str, FeatureSpec], what: str
) -> dict[str, FeatureSpec]:
    """``specs`` as a plain dict after checking it is a non-empty name → FeatureSpec mapping;
    ``InvalidInputError`` naming ``what`` (the operation) and the sample otherwise.
    """
    if not isinstance(specs, Mapping) or not specs:
        raise InvalidInputError(
            f"{what} of {sample_id!r}: specs must be a non-empty mapping of FeatureSpec"
        )
    out: dict[str, FeatureSpec] = {}
    for name, spec in specs.items():
        if not isinstance(spec, FeatureSpec) or spec.name != name:
            raise InvalidInputError(
                f"{what} of {sample_id!r}: specs[{name!r}] must be a FeatureSpec named "
                f"{name!r}, got {spec!r}"
            )
        out[name] = spec
    return out


class StagedWrite:
    """Writable tensors of one staged sample (``store.stage_writer``), uninitialised.

    ``publish()`` makes what was written the staged generation, atomically and at most once (as
    ``stage`` does: a reader sees the whole sample or none); ``discard()`` (idempotent; a no-op
    once published) removes what was written and stages nothing. As a context manager: publish
    on a clean exit, discard on an exception. The tensors must not be written after either
    call (on ``shm://`` they view the staged segment itself).
    """

    def __init__(
        self,
        tensors: dict[str, torch.Tensor],
        publish: Callable[[], None],
        discard: Callable[[], None],
    ) -> None:
        self.tensors = tensors
        self._publish: Callable[[], None] | None = publish
        self._discard = discard

    def publish(self) -> None:
        """Stage what was written (``CorruptRecordError`` if that generation is already staged)."""
        publish = self._publish
        if publish is None:
            raise InvalidInputError("this staged write was already published or discarded")
        self._publish = None
        try:
            publish()
        finally:
            self._discard()

    def discard(self) -> None:
        """Stage nothing and free what was written (idempotent)."""
        self._publish = None
        self._discard()

    def __enter__(self) -> StagedWrite:
        return self

    def __exit__(self, kind: object, *rest: object) -> None:
        if kind is None and self._publish is not None:
            self.publish()
        else:
            self.discard()
