"""dir:// passes the conformance suite; atomic publish, auth, traversal, cross-process."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from conformance import StoreConformance, eagle_sample, same_bits
from procs import DEAD, FULL_DISK_PUT, expected_digest, run_child

from dataflow.contracts import (
    CorruptRecordError,
    FeatureStore,
    InvalidInputError,
    NotFoundError,
    SampleRef,
    StaleGenerationError,
    UnauthorizedError,
)
from dataflow.contracts.codec import loads
from dataflow.store import open_store
from dataflow.store.shared_dir import MARKER

TOKEN = "correct horse battery"


def files(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


def samples(root: Path) -> list[str]:
    """Sample files and leftover sample directories under ``root`` (``sid/gen.safetensors``)."""
    return sorted(
        p.relative_to(root).as_posix()
        for p in root.glob("*/*")
        if not p.parent.name.startswith(".")
    ) + sorted(p.name + "/" for p in root.iterdir() if p.is_dir() and not any(p.iterdir()))


class TestSharedDirConformance(StoreConformance):
    def open(self, tmp_path: Path, **options: Any) -> FeatureStore:
        return open_store(f"dir://{tmp_path}/store", **options)


class TestSharedDirWithTokenConformance(StoreConformance):
    def open(self, tmp_path: Path, **options: Any) -> FeatureStore:
        return open_store(f"dir://{tmp_path}/store", token=TOKEN, **options)


def test_each_generation_is_its_own_file_and_publish_leaves_no_temporaries(tmp_path: Path) -> None:
    store = open_store(f"dir://{tmp_path}")
    first = store.put("s", eagle_sample(0))
    assert samples(tmp_path) == [f"s/{first.generation}.safetensors"]
    second = store.put("s", eagle_sample(1))
    assert samples(tmp_path) == [f"s/{second.generation}.safetensors"]
    assert [n for n in files(tmp_path) if n.startswith(".tmp")] == []
    store.abort("s", "done")
    assert samples(tmp_path) == []


def test_files_are_plain_safetensors(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    store = open_store(f"dir://{tmp_path}")
    tensors = eagle_sample(2)
    ref = store.put("st", tensors)
    loaded = load_file(str(tmp_path / f"st/{ref.generation}.safetensors"))
    assert all(same_bits(loaded[k], v) for k, v in tensors.items())
    store.abort("st", "done")


def test_producer_process_puts_consumer_process_gets(tmp_path: Path) -> None:
    uri = f"dir://{tmp_path}/shared"
    ref_json = run_child(
        """
        store = open_store(sys.argv[1], token=sys.argv[2])
        print(dumps(store.put("xp", sample(9))))
        """,
        uri,
        TOKEN,
    )
    out = run_child(
        """
        import json
        store = open_store(sys.argv[1], token=sys.argv[2])
        tensors, handle = store.get(loads(sys.argv[3], SampleRef))
        print(json.dumps(digest(tensors)))
        store.release(handle)
        """,
        uri,
        TOKEN,
        ref_json,
    )
    assert json.loads(out) == expected_digest(9)
    assert samples(tmp_path / "shared") == []  # the consumer's release deleted it


def test_generations_increase_across_processes(tmp_path: Path) -> None:
    uri = f"dir://{tmp_path}"
    mine = open_store(uri)
    first = mine.put("g", eagle_sample(3))
    other = loads(
        run_child("print(dumps(open_store(sys.argv[1]).put('g', sample(1))))", uri), SampleRef
    )
    assert other.generation > first.generation
    third = mine.put("h", eagle_sample(4))
    assert third.generation > other.generation
    mine.abort("g", "done")
    mine.abort("h", "done")
    assert samples(tmp_path) == []


class TestAuth:
    def test_missing_token_is_refused_at_open(self, tmp_path: Path) -> None:
        open_store(f"dir://{tmp_path}", token=TOKEN).close()
        before = files(tmp_path)
        with pytest.raises(UnauthorizedError, match="requires a token and none was presented"):
            open_store(f"dir://{tmp_path}")
        assert files(tmp_path) == before

    def test_wrong_token_is_refused_at_open(self, tmp_path: Path) -> None:
        open_store(f"dir://{tmp_path}", token=TOKEN).close()
        before = files(tmp_path)
        with pytest.raises(UnauthorizedError, match="the presented token is wrong"):
            open_store(f"dir://{tmp_path}", token="wrong horse battery")
        assert files(tmp_path) == before

    def test_every_operation_rechecks_the_token(self, tmp_path: Path) -> None:
        store = open_store(f"dir://{tmp_path}", token=TOKEN)
        ref = store.put("a", eagle_sample(5))
        _, handle = store.get(ref)
        marker = tmp_path / MARKER
        original = marker.read_bytes()
        body = json.loads(original)
        body["salt"] = "rotated"  # the token was rotated by the store's owner
        marker.write_text(json.dumps(body))
        before = files(tmp_path)
        operations = [
            lambda: store.put("b", eagle_sample(6)),
            lambda: store.get(ref),
            lambda: store.release(handle),
            lambda: store.abort("a", "x"),
            store.gc,
            store.health,
        ]
        for operation in operations:
            with pytest.raises(UnauthorizedError, match="the presented token is wrong"):
                operation()
        assert files(tmp_path) == before
        marker.write_bytes(original)
        assert store.health().active_leases == 1  # nothing changed meanwhile
        store.release(handle)
        assert samples(tmp_path) == []

    def test_token_for_a_tokenless_store_is_refused(self, tmp_path: Path) -> None:
        open_store(f"dir://{tmp_path}").close()
        with pytest.raises(
            InvalidInputError, match="created without a token, but one was presented"
        ):
            open_store(f"dir://{tmp_path}", token=TOKEN)

    def test_short_token_is_refused_and_creates_nothing(self, tmp_path: Path) -> None:
        with pytest.raises(InvalidInputError, match="at least 8 characters"):
            open_store(f"dir://{tmp_path}", token="short")
        with pytest.raises(InvalidInputError, match="at least 8 characters"):
            open_store(f"dir://{tmp_path}/new/root", token="short")
        assert files(tmp_path) == []

    def test_marker_holds_no_token(self, tmp_path: Path) -> None:
        open_store(f"dir://{tmp_path}", token=TOKEN).close()
        assert TOKEN not in (tmp_path / MARKER).read_text()


class TestPaths:
    def test_traversing_sample_ids_are_refused_and_write_nothing(self, tmp_path: Path) -> None:
        root = tmp_path / "root"
        store = open_store(f"dir://{root}")
        before = files(root)
        for bad in ("../escape", "a/b", "..", ".hidden", "x\\y", "nul\0"):
            with pytest.raises(InvalidInputError, match="sample id"):
                store.put(bad, eagle_sample(0))
            with pytest.raises(InvalidInputError, match="sample id"):
                store.abort(bad, "x")
        assert files(root) == before
        assert files(tmp_path) == ["root"]

    def test_planted_symlink_is_refused_not_followed(self, tmp_path: Path) -> None:
        root = tmp_path / "root"
        store = open_store(f"dir://{root}")
        ref = store.put("s", eagle_sample(0))
        target = tmp_path / "secret"
        target.write_bytes(b"secret")
        path = root / f"s/{ref.generation}.safetensors"
        path.unlink()
        path.symlink_to(target)
        with pytest.raises(CorruptRecordError, match="is a symlink; refusing to follow it"):
            store.get(ref)
        assert store.health().active_leases == 0
        assert target.read_bytes() == b"secret"
        path.unlink()
        store.abort("s", "done")

    def test_sample_directory_planted_as_a_symlink_is_refused(self, tmp_path: Path) -> None:
        root = tmp_path / "root"
        store = open_store(f"dir://{root}")
        ref = store.put("s", eagle_sample(0))
        outside = tmp_path / "outside"
        (root / "s").rename(outside)  # the attacker's copy, reachable only through the link
        (root / "s").symlink_to(outside)
        with pytest.raises(CorruptRecordError, match="is not a plain directory"):
            store.get(ref)
        store.abort("s", "drop")  # refuses to unlink through the link: parked, not done
        assert store.health().pending_frees == 1
        assert (outside / f"{ref.generation}.safetensors").exists()
        (root / "s").unlink()
        assert store.gc().freed_samples == 1

    def test_relative_root_and_foreign_directory_are_refused(self, tmp_path: Path) -> None:
        with pytest.raises(InvalidInputError, match="must be absolute"):
            open_store("dir://relative/path")
        (tmp_path / "precious.txt").write_text("x")
        with pytest.raises(InvalidInputError, match="is not empty and is not a dataflow store"):
            open_store(f"dir://{tmp_path}")
        assert files(tmp_path) == ["precious.txt"]
        with pytest.raises(NotFoundError, match="does not exist"):
            open_store(f"dir://{tmp_path}/missing", create=False)


def test_corrupt_file_is_refused(tmp_path: Path) -> None:
    store = open_store(f"dir://{tmp_path}")
    ref = store.put("c", eagle_sample(0))
    path = tmp_path / f"c/{ref.generation}.safetensors"
    path.write_bytes(b"\xff" * 64)
    with pytest.raises(CorruptRecordError, match="header length"):
        store.get(ref)
    assert store.health().active_leases == 0
    store.abort("c", "done")
    assert samples(tmp_path) == []


def test_gc_removes_temporaries_of_dead_writers_on_this_host(tmp_path: Path) -> None:
    import socket

    store = open_store(f"dir://{tmp_path}")
    host = socket.gethostname()
    dead = tmp_path / f".tmp~{host}~{DEAD}~s~7"
    dead.write_bytes(b"\0" * 100)
    other_host = tmp_path / f".tmp~elsewhere~{DEAD}~s~8"
    other_host.write_bytes(b"\0" * 100)
    report = store.gc()
    assert report.freed_bytes == 100
    assert not dead.exists() and other_host.exists()
    other_host.unlink()
    assert os.listdir(tmp_path) and samples(tmp_path) == []


def test_gc_retries_a_free_that_really_failed(tmp_path: Path) -> None:
    """A real OS failure (no fault hook): the file's name is taken by a non-empty directory."""
    store = open_store(f"dir://{tmp_path}")
    ref = store.put("f", eagle_sample(0))
    _, handle = store.get(ref)
    path = tmp_path / f"f/{ref.generation}.safetensors"
    path.unlink()
    path.mkdir()
    (path / "blocker").write_text("x")
    store.release(handle)  # unlink fails (EISDIR): parked, still counted
    assert store.health().pending_frees == 1
    with pytest.raises(NotFoundError, match="released or aborted"):
        store.get(ref)
    report = store.gc()
    assert (report.retried_frees, report.failed_frees) == (1, 1)
    (path / "blocker").unlink()
    path.rmdir()
    report = store.gc()
    assert (report.retried_frees, report.failed_frees, report.freed_samples) == (1, 0, 1)
    health = store.health()
    assert (health.pending_frees, health.resident_samples, health.resident_bytes) == (0, 0, 0)


def test_a_write_the_filesystem_refuses_is_a_capacity_error_and_leaves_nothing(
    tmp_path: Path,
) -> None:
    out = run_child(FULL_DISK_PUT, f"dir://{tmp_path}")
    assert "refused:" in out and "no room for" in out and "File too large" in out
    assert [
        n for n in files(tmp_path) if not n.startswith(".dataflow") and n != ".generation"
    ] == []


def test_a_put_retires_older_generations_another_producer_left(tmp_path: Path) -> None:
    other = open_store(f"dir://{tmp_path}")
    old = other.put("g", eagle_sample(1))
    mine = open_store(f"dir://{tmp_path}")
    new = mine.put("g", eagle_sample(2))
    assert samples(tmp_path) == [f"g/{new.generation}.safetensors"]
    with pytest.raises(StaleGenerationError, match="replaced it"):
        open_store(f"dir://{tmp_path}").get(old)
    mine.abort("g", "done")
    assert samples(tmp_path) == []


@pytest.mark.parametrize("huge_min", [0, 1 << 40], ids=["huge-page-buffer", "torch-empty"])
def test_a_get_reads_into_private_writable_memory_that_outlives_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, huge_min: int
) -> None:
    from dataflow.store import segments

    monkeypatch.setattr(segments, "HUGE_BUFFER_MIN", huge_min)  # both buffer kinds, small data
    store = open_store(f"dir://{tmp_path}/s", fsync=False, retain_on_release=True)
    tensors = eagle_sample(3)
    ref = store.put("big", tensors)
    got, handle = store.get(ref)
    again, handle2 = store.get(ref)
    store.release(handle)
    store.release(handle2)
    store.abort("big", "done")  # the file is gone; the tensors are private copies
    assert samples(tmp_path / "s") == []
    assert all(same_bits(got[n], tensors[n]) for n in tensors)
    got["hidden_state"].add_(1)  # writable, and not shared with another get
    assert same_bits(again["hidden_state"], tensors["hidden_state"])
