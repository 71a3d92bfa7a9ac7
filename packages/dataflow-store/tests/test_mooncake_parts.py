"""The mooncake:// backend's pure parts: settings, status codes, keys and object headers.

No master is needed here; everything that talks to Mooncake is in test_mooncake_store.py.
"""

from __future__ import annotations

import re

import pytest

from dataflow.contracts import (
    BackendUnavailableError,
    CapacityExceededError,
    CorruptRecordError,
    DataflowError,
    FeatureSpec,
    InvalidInputError,
    NotFoundError,
    SchemaMismatchError,
)
from dataflow.store import mooncake_codes as codes
from dataflow.store import mooncake_wire as wire
from dataflow.store.mooncake_client import RemoveReport
from dataflow.store.mooncake_settings import GiB, MiB, parse_size, settings_from_uri


def test_settings_defaults_and_overrides() -> None:
    plain = settings_from_uri("mooncake://127.0.0.1:50051")
    assert plain.setup_args() == (
        "127.0.0.1",
        "P2PHANDSHAKE",
        GiB,
        64 * MiB,
        "tcp",
        "",
        "127.0.0.1:50051",
    )
    assert (plain.hard_pin, plain.replicas, plain.handshake_probe) == (True, 1, True)
    tuned = settings_from_uri(
        "mooncake://10.0.0.5:6000?segment=2GiB&protocol=rdma&hard_pin=false",
        {"local_hostname": "10.0.0.7", "segment": "512MiB", "connect_timeout_s": "2.5"},
    )
    assert tuned.segment_bytes == 512 * MiB  # keywords win over the query string
    assert (tuned.protocol, tuned.hard_pin, tuned.connect_timeout_s) == ("rdma", False, 2.5)
    assert tuned.local_hostname == "10.0.0.7" and tuned.master_address == "10.0.0.5:6000"


@pytest.mark.parametrize(
    ("text", "expected"),
    [(4096, 4096), ("4096", 4096), ("64MiB", 64 * MiB), ("1g", GiB), ("16 KiB", 16384), ("0", 0)],
)
def test_sizes(text: object, expected: int) -> None:
    assert parse_size(text, "segment") == expected


@pytest.mark.parametrize("bad", ["-1", "1.5GiB", "lots", True, "64 TiB"])
def test_bad_sizes_are_refused_by_name(bad: object) -> None:
    with pytest.raises(InvalidInputError, match="mooncake option 'segment' must be"):
        parse_size(bad, "segment")


def test_uri_must_be_mooncake() -> None:
    with pytest.raises(InvalidInputError, match="not a mooncake:// URI"):
        settings_from_uri("memory://x")


@pytest.mark.parametrize(
    ("code", "kind", "name"),
    [
        (-704, NotFoundError, "OBJECT_NOT_FOUND"),
        (-200, CapacityExceededError, "NO_AVAILABLE_HANDLE"),
        (-900, BackendUnavailableError, "RPC_FAIL"),
        (-800, BackendUnavailableError, "TRANSFER_FAIL"),
        (-400, InvalidInputError, "INVALID_KEY"),
        (-1, DataflowError, "INTERNAL_ERROR"),
        (-4242, DataflowError, "UNKNOWN"),
    ],
)
def test_status_codes_become_dataflow_errors_naming_key_and_code(
    code: int, kind: type, name: str
) -> None:
    error = codes.error_for(code, "get", "dataflow/s/g1/x")
    assert type(error) is kind
    assert f"Mooncake get of 'dataflow/s/g1/x' failed: {code} {name}" in str(error)


def test_sample_pattern_matches_every_generation_of_one_sample_only() -> None:
    sid = "run-1:task.7+a=b@c_d"
    pattern = re.compile(wire.sample_pattern(sid))
    assert pattern.fullmatch(wire.manifest_key(sid, 12))
    assert pattern.fullmatch(wire.feature_key(sid, 345, "hidden_state"))
    for other in ("run-1:task.7+a=b@c_dX", "run-1:task-7+a=b@c_d", "xrun-1:task.7+a=b@c_d"):
        assert not pattern.fullmatch(wire.feature_key(other, 12, "x")), other
    assert not pattern.fullmatch(f"dataflow/{sid}/gX/x")


def test_feature_headers_carry_spec_and_identity() -> None:
    spec = FeatureSpec("hidden_state", (1, 16, 8), "bfloat16")
    header = wire.feature_header("s", 7, spec)
    assert len(header) % 64 == 0
    assert header != wire.feature_header("s", 8, spec)
    size = len(header) + spec.nbytes
    other_shape = FeatureSpec("hidden_state", (1, 8, 16), "bfloat16")
    with pytest.raises(SchemaMismatchError, match=r"bfloat16\[1, 16, 8\].*bfloat16\[1, 8, 16\]"):
        wire.explain_mismatch(header, size, "s", 7, other_shape, "here")
    with pytest.raises(CorruptRecordError, match="belongs to .*'s'.*not sample 't'"):
        wire.explain_mismatch(header, size, "t", 7, spec, "here")
    with pytest.raises(CorruptRecordError, match="too short"):
        wire.explain_mismatch(b"\x01", 1, "s", 7, spec, "here")


def test_manifest_round_trip_and_refusal() -> None:
    blob = wire.manifest_bytes("s", 3, ["b", "a"])
    assert wire.manifest_names(blob, "m") == ("a", "b")
    with pytest.raises(CorruptRecordError, match="m: manifest"):
        wire.manifest_names(b"{}", "m")


def test_remove_report_summary() -> None:
    report = RemoveReport(removed=("a",), absent=("b",), leased=("c",), failed={"d": -900})
    assert not report.complete
    assert report.describe() == "2 gone; 1 under read lease; 1 failed ('d': -900 RPC_FAIL)"
    assert RemoveReport(removed=("a",)).complete


def test_only_zero_copy_calls_reach_the_binding_and_nothing_is_pickled() -> None:
    """No serialising put/get/put_tensor of Mooncake's, no pickle, anywhere in the backend."""
    import ast
    from pathlib import Path

    import dataflow.store as package

    folder = Path(package.__file__).parent
    allowed = {
        "MooncakeDistributedStore",  # the module's constructors
        "ReplicateConfig",
        "setup",
        "close",
        "health_check",
        "register_buffer",
        "unregister_buffer",
        "batch_put_from_multi_buffers",
        "batch_get_into_multi_buffers",
        "batch_remove",
        "batch_is_exist",
        "get_size",
        "get_into",
        "remove_by_regex",
    }
    called: set[str] = set()
    for path in sorted(folder.glob("mooncake*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", "") or ""]
                assert not any(n.split(".")[0] in ("pickle", "dill") for n in names), path
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and isinstance(node.func.value, (ast.Name, ast.Attribute))
            ):
                target = node.func.value
                owner = target.id if isinstance(target, ast.Name) else target.attr
                if owner in ("store", "_store", "binding"):
                    called.add(node.func.attr)
    assert called, "found no calls on the Mooncake binding"
    assert called <= allowed, called - allowed
