"""The topologies as data: one record per topology says everything that differs between them.

A topology fixes where a run's refs come from, which stores and default URIs it takes, and its
process layout (one process, or a producer and a consumer role sharing a ledger). The config
rules, the CLI commands and the builders read these records instead of testing the topology's
name, so adding a topology is one entry in :data:`TOPOLOGIES` (plus its builder functions).

This module imports nothing heavy: builders are named as ``"module:function"`` and imported only
when :meth:`TopologySpec.entry` is called.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal

RefSource = Literal["queue", "manifest", "files"]
"""``queue``: produced while training, leased from the ledger into per-rank queues;
``manifest``: a retained feature set the producer role captured and listed in the run
directory's manifest; ``files``: feature files under a ``file://`` store, captured in the same
process first when missing."""

Role = Literal["run", "produce", "consume"]

SHARED_STORES = ("shm", "dir", "mooncake")
"""Stores two processes of one host (or hosts) can both read."""


@dataclass(frozen=True)
class TopologySpec:
    """What one topology is, as data; frozen.

    Guarantees: ``entries`` names a builder for every role the layout runs (``run`` for a
    one-process topology; ``produce`` and ``consume`` when the roles are separate processes),
    ``stores`` is not empty and holds the scheme of ``default_store``.
    """

    name: str
    ref_source: RefSource
    separate_roles: bool
    """True: a producer process and a consumer process (``dataflow-launch produce`` /
    ``consume``, or both supervised by ``run``) share a durable ledger; False: one process."""
    stores: tuple[str, ...]
    """Store schemes the topology accepts."""
    default_store: str
    """The store URI when the config sets none; ``{out_dir}``, ``{abs_out_dir}`` and
    ``{run_id}`` are filled in."""
    entries: Mapping[str, str]
    """Role → ``"module:function"`` of its builder, called as
    ``fn(config, run_dir, resume=..., progress=...)``."""

    def __post_init__(self) -> None:
        wanted = {"produce", "consume"} if self.separate_roles else {"run"}
        if set(self.entries) != wanted:
            raise ValueError(f"topology {self.name}: entries {sorted(self.entries)} != {wanted}")
        scheme = self.default_store.split("://", 1)[0]
        if scheme not in self.stores:
            raise ValueError(
                f"topology {self.name}: default store {scheme}:// not in {self.stores}"
            )

    @property
    def online(self) -> bool:
        """Features are produced while the trainer trains (the ledger leases prompts)."""
        return self.ref_source == "queue"

    @property
    def default_mode(self) -> str:
        """The deployment mode when the config sets none."""
        return "disaggregated" if self.separate_roles else "local_colocated"

    def default_store_uri(self, run_id: str, out_dir: str) -> str:
        """``default_store`` for one run (``dir://`` paths made absolute: two processes resolve
        them).
        """
        base = out_dir.rstrip("/")
        return self.default_store.format(
            out_dir=base, abs_out_dir=os.path.abspath(base), run_id=run_id
        )

    def entry(self, role: Role) -> Callable[..., Any]:
        """The builder function of ``role``; ``KeyError`` names the roles this layout runs."""
        try:
            target = self.entries[role]
        except KeyError:
            raise KeyError(
                f"topology {self.name} has no {role!r} role (roles: {sorted(self.entries)})"
            ) from None
        module, _, function = target.partition(":")
        fn: Callable[..., Any] = getattr(importlib.import_module(module), function)
        return fn


def _entries(**roles: str) -> Mapping[str, str]:
    return MappingProxyType({role: f"dataflow.launch.builders.{t}" for role, t in roles.items()})


TOPOLOGIES: Mapping[str, TopologySpec] = MappingProxyType(
    {
        spec.name: spec
        for spec in (
            TopologySpec(
                name="colocated_offline",
                ref_source="files",
                separate_roles=False,
                stores=("file",),
                default_store="file://{out_dir}/features",
                entries=_entries(run="offline:run_colocated_offline"),
            ),
            TopologySpec(
                name="colocated_online",
                ref_source="queue",
                separate_roles=False,
                stores=("memory", *SHARED_STORES),
                default_store="memory://",
                entries=_entries(run="online:run_colocated_online"),
            ),
            TopologySpec(
                name="disaggregated_offline",
                ref_source="manifest",
                separate_roles=True,
                stores=SHARED_STORES,
                default_store="dir://{abs_out_dir}/store",
                entries=_entries(
                    produce="offline:produce_offline", consume="offline:consume_offline"
                ),
            ),
            TopologySpec(
                name="disaggregated_online",
                ref_source="queue",
                separate_roles=True,
                stores=SHARED_STORES,
                default_store="shm://{run_id}",
                entries=_entries(produce="online:produce_online", consume="online:consume_online"),
            ),
        )
    }
)
"""Every topology ``run.topology`` accepts, by name."""


def topology(name: str) -> TopologySpec:
    """The record of ``name``; ``KeyError`` lists the known topologies."""
    try:
        return TOPOLOGIES[name]
    except KeyError:
        raise KeyError(f"unknown topology {name!r}; known: {sorted(TOPOLOGIES)}") from None
