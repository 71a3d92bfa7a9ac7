"""file:// passes the read-side conformance cases; read-only, enumeration, .ckpt safety, no escape."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from conformance import StoreConformance, baseline, eagle_sample, same_bits
from procs import expected_digest, run_child
from safetensors.torch import save_file

from dataflow.contracts import (
    CorruptRecordError,
    FeatureStore,
    InvalidInputError,
    NotFoundError,
    SampleRef,
    SchemaMismatchError,
)
from dataflow.contracts.codec import dumps, loads
from dataflow.store import open_store
from dataflow.store.file import FileFeatureStore, import_ckpt, list_feature_files


def file_store(root: Path, **options: Any) -> FileFeatureStore:
    store = open_store(f"file://{root}", **options)
    assert isinstance(store, FileFeatureStore)
    return store


class TestFileConformance(StoreConformance):
    read_only = True

    def open(self, tmp_path: Path, **options: Any) -> FeatureStore:
        (tmp_path / "features").mkdir(exist_ok=True)
        return open_store(f"file://{tmp_path}/features", **options)

    def put(
        self, store: FeatureStore, sample_id: str, tensors: dict[str, torch.Tensor]
    ) -> SampleRef:
        assert isinstance(store, FileFeatureStore)
        root = Path(store.uri.removeprefix("file://"))
        save_file(
            {k: v.contiguous() for k, v in tensors.items()}, str(root / f"{sample_id}.safetensors")
        )
        return store.ref_for(f"{sample_id}.safetensors")


def test_puts_are_refused_and_write_nothing(tmp_path: Path) -> None:
    store = file_store(tmp_path)
    before = store.health()
    with pytest.raises(InvalidInputError, match="is read-only"):
        store.put("x", eagle_sample(0))
    assert store.health() == before and list(tmp_path.iterdir()) == []


def test_write_side_options_are_refused(tmp_path: Path) -> None:
    for options, message in (
        ({"retain_on_release": False}, "retain_on_release must be True"),
        ({"budget_bytes": 10}, "budget_bytes does not apply"),
        ({"max_age_s": 1.0}, "max_age_s does not apply"),
    ):
        with pytest.raises(InvalidInputError, match=message):
            open_store(f"file://{tmp_path}", **options)
    with pytest.raises(NotFoundError, match="does not exist"):
        open_store(f"file://{tmp_path}/missing")


def test_directory_enumerates_into_sorted_refs_with_full_specs(tmp_path: Path) -> None:
    (tmp_path / "rows_1").mkdir()
    (tmp_path / "rows_0").mkdir()
    samples = {
        "rows_1/data_0.safetensors": eagle_sample(0, tokens=12),
        "rows_0/data_1.safetensors": eagle_sample(1, tokens=10),
        "rows_0/data_0.safetensors": eagle_sample(2, tokens=11),
    }
    for rel, tensors in samples.items():
        save_file(tensors, str(tmp_path / rel))
    (tmp_path / "notes.txt").write_text("ignored")
    store = file_store(tmp_path)
    refs = store.refs()
    assert [r.sample_id for r in refs] == ["rows_0:data_0", "rows_0:data_1", "rows_1:data_0"]
    assert [r.num_tokens for r in refs] == [11, 10, 12]
    assert refs[0].feature_specs["hidden_state"].shape == (1, 11, 8)
    assert refs[0].estimated_bytes == sum(
        t.numel() * t.element_size() for t in samples["rows_0/data_0.safetensors"].values()
    )
    for ref in refs:
        got, handle = store.get(ref)
        want = samples[str(ref.metadata["path"])]
        assert all(same_bits(got[k], v) for k, v in want.items())
        store.release(handle)
    assert store.health().resident_samples == 3  # retained: a second epoch can read them again
    assert list_feature_files(tmp_path)[0] == (tmp_path / "rows_0/data_0.safetensors").resolve()


def test_file_name_that_cannot_be_an_id_is_refused_by_name(tmp_path: Path) -> None:
    save_file(eagle_sample(0), str(tmp_path / "has space.safetensors"))
    store = file_store(tmp_path)
    with pytest.raises(
        InvalidInputError, match="file 'has space.safetensors' cannot name a sample"
    ):
        store.refs()


def test_specforge_ckpt_is_read_with_weights_only(tmp_path: Path) -> None:
    tensors = eagle_sample(3)
    torch.save({**tensors, "note": 3}, tmp_path / "data_0.ckpt")
    store = file_store(tmp_path)
    (ref,) = store.refs()
    assert sorted(ref.feature_specs) == sorted(tensors)  # the non-tensor value is dropped
    got, handle = store.get(ref, names=["aux_hidden_state"])
    assert same_bits(got["aux_hidden_state"], tensors["aux_hidden_state"])
    store.release(handle)
    out = import_ckpt(tmp_path / "data_0.ckpt", tmp_path / "data_1.safetensors")
    converted = store.ref_for(out.name)
    got, handle = store.get(converted)
    assert all(same_bits(got[k], v) for k, v in tensors.items())
    store.release(handle)
    lying = dataclasses.replace(
        ref,
        feature_specs={
            **ref.feature_specs,
            "input_ids": dataclasses.replace(ref.feature_specs["input_ids"], dtype="float64"),
        },
    )
    with pytest.raises(SchemaMismatchError, match=r"input_ids.*int64\[16\].*float64\[16\]"):
        store.get(lying)


class _Payload:
    """Unpickling this would create a file: proof that full unpickling happened."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.marker), "w"))


def test_ckpt_needing_arbitrary_unpickling_is_refused_and_never_executed(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    torch.save({"input_ids": torch.arange(4), "evil": _Payload(marker)}, tmp_path / "bad.ckpt")
    store = file_store(tmp_path)
    with pytest.raises(
        CorruptRecordError, match=r"bad.ckpt: refused to load with torch.load\(weights_only=True\)"
    ):
        store.refs()
    assert not marker.exists()
    assert store.health().resident_samples == 0


def test_paths_never_escape_the_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    save_file(eagle_sample(0), str(tmp_path / "outside.safetensors"))
    save_file(eagle_sample(0), str(root / "inside.safetensors"))
    store = file_store(root)
    ref = store.ref_for("inside.safetensors")
    escaping = dataclasses.replace(ref, metadata={"path": "../outside.safetensors"})
    before = store.health()
    with pytest.raises(
        InvalidInputError, match="path '../outside.safetensors' escapes the store root"
    ):
        store.get(escaping)
    with pytest.raises(InvalidInputError, match="escapes the store root"):
        store.ref_for(tmp_path / "outside.safetensors")
    os.symlink(tmp_path / "outside.safetensors", root / "link.safetensors")
    with pytest.raises(InvalidInputError, match="escapes the store root"):
        store.ref_for("link.safetensors")
    with pytest.raises(InvalidInputError, match="has no metadata\\['path'\\]"):
        store.get(dataclasses.replace(ref, metadata={}))
    assert baseline(store.health()) == baseline(before)


def test_precomputing_process_writes_consumer_process_gets(tmp_path: Path) -> None:
    ref_json = run_child(
        """
        from safetensors.torch import save_file
        save_file(sample(5), sys.argv[1] + "/s5.safetensors")
        print(dumps(open_store("file://" + sys.argv[1]).refs()[0]))
        """,
        str(tmp_path),
    )
    out = run_child(
        """
        import json
        store = open_store("file://" + sys.argv[1])
        tensors, handle = store.get(loads(sys.argv[2], SampleRef))
        print(json.dumps(digest(tensors)))
        store.release(handle)
        """,
        str(tmp_path),
        ref_json,
    )
    assert json.loads(out) == expected_digest(5)
    assert loads(ref_json, SampleRef).sample_id == "s5" and dumps(loads(ref_json, SampleRef))


def test_a_store_over_one_file_serves_that_file_only(tmp_path: Path) -> None:
    tensors = eagle_sample(6)
    save_file(tensors, str(tmp_path / "only.safetensors"))
    save_file(eagle_sample(7), str(tmp_path / "sibling.safetensors"))
    store = file_store(tmp_path / "only.safetensors")
    (ref,) = store.refs()
    got, handle = store.get(ref)
    assert all(same_bits(got[k], v) for k, v in tensors.items())
    store.release(handle)
    with pytest.raises(
        InvalidInputError, match="path 'sibling.safetensors' escapes the store root"
    ):
        store.ref_for("sibling.safetensors")
    sibling = dataclasses.replace(
        ref, sample_id="sibling", metadata={"path": "sibling.safetensors"}
    )
    with pytest.raises(InvalidInputError, match="escapes the store root"):
        store.get(sibling)


def test_gzip_ckpt_and_required_features(tmp_path: Path) -> None:
    import gzip
    import io

    tensors = eagle_sample(8)
    buffer = io.BytesIO()
    torch.save(tensors, buffer)
    (tmp_path / "rows").mkdir()
    (tmp_path / "rows" / "z.ckpt.gz").write_bytes(gzip.compress(buffer.getvalue()))
    store = file_store(tmp_path)
    (ref,) = store.refs(require=("input_ids", "hidden_state"))
    assert ref.sample_id == "rows:z"
    got, handle = store.get(ref)
    assert all(same_bits(got[k], v) for k, v in tensors.items())
    store.release(handle)
    store.abort(ref.sample_id, "start over")
    save_file({"input_ids": torch.arange(3)}, str(tmp_path / "zz_partial.safetensors"))
    before = store.health()
    with pytest.raises(
        SchemaMismatchError,
        match=r"file 'zz_partial.safetensors' lacks required feature\(s\) \['hidden_state'\]",
    ):
        store.refs(require=("input_ids", "hidden_state"))
    assert baseline(store.health()) == baseline(before)  # rows:z, listed first, was not registered
