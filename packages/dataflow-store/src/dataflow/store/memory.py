"""``memory://``: features held in this process's memory, handed out without copies.

Guarantees: ``get`` returns the very tensors ``put`` stored (zero copy; producers must not
mutate a tensor after putting it); every lifetime rule comes from
:class:`~dataflow.store.base.BookkeepingStore`. Nothing is visible to other processes.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

import torch

from dataflow.contracts import FeatureSpec, NotFoundError, SchemaMismatchError
from dataflow.contracts.uris import ParsedURI
from dataflow.store.base import BookkeepingStore, Generation
from dataflow.store.tensors import PreparedSample, describe


class MemoryFeatureStore(BookkeepingStore):
    """In-process feature store (``memory://name``)."""

    backend = "memory"

    def __init__(self, parsed: ParsedURI, **options: Any) -> None:
        super().__init__(parsed, **options)
        self._data: dict[tuple[str, int], PreparedSample] = {}
        self._data_lock = threading.Lock()

    def _write(self, sample_id: str, generation: int, sample: PreparedSample) -> None:
        with self._data_lock:
            self._data[(sample_id, generation)] = sample

    def _read(
        self, sample_id: str, generation: int, wanted: Mapping[str, FeatureSpec]
    ) -> dict[str, torch.Tensor]:
        with self._data_lock:
            sample = self._data.get((sample_id, generation))
        if sample is None:
            raise NotFoundError(
                f"{self.uri}: sample {sample_id!r} generation {generation} is not stored here"
            )
        for name, spec in wanted.items():
            stored = sample.specs.get(name)
            if stored is None:
                raise SchemaMismatchError(
                    f"{self.uri}: the ref names feature {name!r} but sample {sample_id!r} "
                    f"has only {sorted(sample.specs)}"
                )
            if stored is not spec and stored != spec:  # a ref made here holds the same spec
                raise SchemaMismatchError(
                    f"{self.uri}: feature {name!r} of {sample_id!r} is {describe(stored)} but the "
                    f"ref says {describe(spec)}; refusing to reinterpret it"
                )
        return {name: sample.tensors[name] for name in wanted}

    def _delete(self, stored: Generation) -> None:
        with self._data_lock:
            self._data.pop((stored.sample_id, stored.generation), None)

    def _close_backend(self) -> None:
        with self._data_lock:
            self._data.clear()
