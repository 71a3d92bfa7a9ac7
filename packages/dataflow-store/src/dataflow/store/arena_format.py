"""The on-disk format of a ``shm://`` arena file (:mod:`dataflow.store.arena`), without torch.

A header page (:data:`GEOMETRY`: magic, slab bytes, slab count, table offset, data offset), the
slab table (one :data:`RECORD` per slab; a run's head row holds its state, span, generation,
sample id hash, sample bytes and owner (a ``STAGED`` run: its steward), the rest of the run are ``CONT`` rows), then the slabs.
Kept apart so the status reader (:mod:`dataflow.store.usage`) does not import the arena itself
(this module and that one import no torch; the package ``__init__`` still does).
"""

from __future__ import annotations

import hashlib
import struct

import numpy as np

MAGIC = b"dataflow-arena\x00\x02"
GEOMETRY = struct.Struct("<16sQQQQ")  # magic, slab_bytes, nslabs, table_offset, data_offset

FREE, WRITING, LIVE, CONT, STAGED = 0, 1, 2, 3, 4
"""STAGED: a foreign writer's complete run, owned by its steward, invisible to get until adopted."""
RECORD = np.dtype(
    [
        ("state", "<u4"),
        ("span", "<u4"),
        ("tag", "<u8"),
        ("idhash", "<u8"),
        ("nbytes", "<u8"),  # the sample's bytes in the run (head row)
        ("owner", "S48"),
    ]
)


def id_hash(sample_id: str) -> int:
    """The 64-bit tag of a sample id in the slab table (collisions are checked in the header)."""
    return int.from_bytes(hashlib.blake2b(sample_id.encode(), digest_size=8).digest(), "little")
