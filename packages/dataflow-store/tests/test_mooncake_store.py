"""mooncake:// against a real mooncake_master: the conformance suite and Mooncake's own cases.

Conformance stores borrow one client (connecting costs a handshake probe, closing ~1 s); the
tests of connecting, closing and cross-process use stores that own their client.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from conformance import StoreConformance
from dataflow_testing.mooncake import MooncakeMaster

from dataflow.contracts import (
    FeatureStore,
)
from dataflow.store import mooncake_wire as wire
from dataflow.store import open_store
from dataflow.store.mooncake_client import MooncakeClient, ObjectIO, Region
from dataflow.store.mooncake_settings import settings_from_uri

pytestmark = pytest.mark.mooncake


def connect(master: MooncakeMaster, segment: str = "256MiB") -> MooncakeClient:
    return MooncakeClient.connect(
        settings_from_uri(master.uri, {"segment": segment, "buffer": "16MiB"})
    )


@pytest.fixture(scope="module")
def client(mooncake_master: MooncakeMaster) -> Iterator[MooncakeClient]:
    """The client conformance stores borrow; it mounts the segment their objects live in."""
    shared = connect(mooncake_master)
    yield shared
    shared.close()


@pytest.fixture(scope="module")
def reader(mooncake_master: MooncakeMaster) -> Iterator[MooncakeClient]:
    """A second Mooncake client: another reader, as a consumer process would be."""
    other = connect(mooncake_master, segment="0")
    yield other
    other.close()


def mooncake_store(master: MooncakeMaster, client: MooncakeClient, **options: Any) -> Any:
    return open_store(master.uri, client=client, **options)


def keys_of(store: Any, ref: Any) -> list[str]:
    return [wire.manifest_key(ref.sample_id, ref.generation)] + [
        wire.feature_key(ref.sample_id, ref.generation, n) for n in ref.feature_specs
    ]


def read_like_another_process(reader: MooncakeClient, ref: Any, name: str) -> torch.Tensor:
    """Read one feature object with a different client: Mooncake gives it a read lease."""
    spec = ref.feature_specs[name]
    header = torch.empty(
        len(wire.feature_header(ref.sample_id, ref.generation, spec)), dtype=torch.uint8
    )
    out = torch.empty(spec.shape, dtype=getattr(torch, spec.dtype))
    key = wire.feature_key(ref.sample_id, ref.generation, name)
    reader.get(
        [
            ObjectIO(
                key,
                (Region(header.data_ptr(), header.numel()), Region(out.data_ptr(), spec.nbytes)),
            )
        ]
    )
    return out


class TestMooncakeConformance(StoreConformance):
    @pytest.fixture(autouse=True)
    def _cluster(self, mooncake_master: MooncakeMaster, client: MooncakeClient) -> None:
        self.master = mooncake_master
        self.client = client

    def open(self, tmp_path: Path, **options: Any) -> FeatureStore:
        return mooncake_store(self.master, self.client, **options)
