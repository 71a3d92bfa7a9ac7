"""``file:///path``: read-only, precomputed offline features, one file per sample.

Files are safetensors (``*.safetensors``, read zero-copy through a private mapping) or
SpecForge-style ``*.ckpt`` (or gzip-compressed ``*.ckpt.gz``) dicts of tensors, loaded with ``torch.load(weights_only=True)`` only:
a file that needs anything beyond plain tensors and containers to unpickle is refused, never
executed. :func:`import_ckpt` converts such a file to safetensors once.

Guarantees:
- **Read-only.** ``put`` is refused (``InvalidInputError``) and nothing ever deletes or writes a
  file: ``release`` keeps samples (re-iterable epochs) and ``abort`` only drops a sample from this
  store's view, so a later ``get`` of it fails clearly until it is enumerated again.
- **Refs from a directory.** :meth:`FileFeatureStore.refs` enumerates every feature file under
  the root (sorted, so every rank sees the same order) into refs with full specs read from the
  headers. The sample id is the file's path relative to the root without its suffix, ``/``
  written ``:`` (``rows_0/data_7.ckpt`` -> ``rows_0:data_7``), stable when files are added;
  a file whose name cannot be an id is refused by name.
- **No escape.** A ref's ``metadata["path"]`` must resolve (symlinks included) inside the root.
- A ref whose specs disagree with the file raises ``SchemaMismatchError``.

Options: ``retain_on_release`` must stay True; ``budget_bytes`` and ``max_age_s`` do not apply.
"""

from __future__ import annotations

import gzip
import io
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from dataflow.contracts import (
    CorruptRecordError,
    FeatureHandle,
    FeatureSpec,
    InvalidInputError,
    NotFoundError,
    SampleRef,
    SchemaMismatchError,
)
from dataflow.contracts.ids import validate_sample_id
from dataflow.contracts.uris import ParsedURI
from dataflow.store.base import BookkeepingStore, Generation
from dataflow.store.segments import map_sample, read_layout
from dataflow.store.tensors import PreparedSample, describe, spec_of

SUFFIXES = (".safetensors", ".ckpt", ".ckpt.gz")
CKPT_SUFFIXES = (".ckpt", ".ckpt.gz")
MAX_GZIP_BYTES = 16 << 30  # a decompression bomb stops here


def list_feature_files(root: str | Path) -> list[Path]:
    """Every feature file under ``root`` (a file or a directory), absolute and sorted."""
    base = Path(root)
    if base.is_file():
        return [base.resolve()]
    return sorted(p.resolve() for p in base.rglob("*") if p.is_file() and p.name.endswith(SUFFIXES))


def load_ckpt(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a SpecForge-style ``.ckpt`` dict with ``torch.load(weights_only=True)``.

    Raises ``CorruptRecordError`` when the file is not loadable under ``weights_only`` (it would
    need arbitrary code to unpickle) or is not a mapping of names to tensors; non-tensor values
    are dropped.
    """
    source: Any = path
    if str(path).endswith(".gz"):
        source = io.BytesIO(_gunzip(Path(path)))
    try:
        loaded = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError, RuntimeError, EOFError...: all mean "refused"
        raise CorruptRecordError(
            f"{path}: refused to load with torch.load(weights_only=True): {exc}"
        ) from None
    if not isinstance(loaded, Mapping):
        raise CorruptRecordError(f"{path}: expected a dict of tensors, got {type(loaded).__name__}")
    return {str(k): v for k, v in loaded.items() if isinstance(v, torch.Tensor)}


def _gunzip(path: Path) -> bytes:
    with gzip.open(path, "rb") as f:
        data = f.read(MAX_GZIP_BYTES + 1)
    if len(data) > MAX_GZIP_BYTES:
        raise CorruptRecordError(f"{path}: decompresses to more than {MAX_GZIP_BYTES} bytes")
    return data


def import_ckpt(source: str | Path, target: str | Path) -> Path:
    """Convert one ``.ckpt`` dict file to a safetensors file (written atomically)."""
    from safetensors.torch import save_file

    tensors = {k: v.contiguous() for k, v in load_ckpt(source).items()}
    if not tensors:
        raise CorruptRecordError(f"{source}: holds no tensors")
    out = Path(target)
    temp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    save_file(tensors, str(temp))
    os.replace(temp, out)
    return out


class FileFeatureStore(BookkeepingStore):
    """Read-only store over a directory (or one file) of precomputed features."""

    backend = "file"
    shared = True  # refs come from enumeration, not from this instance's puts

    def __init__(self, parsed: ParsedURI, **options: Any) -> None:
        if options.get("retain_on_release", True) is not True:
            raise InvalidInputError("file:// stores are read-only: retain_on_release must be True")
        for name in ("budget_bytes", "max_age_s"):
            if options.get(name) is not None:
                raise InvalidInputError(f"file:// stores are read-only: {name} does not apply")
        options["retain_on_release"] = True
        super().__init__(parsed, **options)
        root = Path(parsed.location)
        if not root.exists():
            raise NotFoundError(f"{self.uri}: {root} does not exist")
        self._root = root.resolve()
        self._base = self._root if self._root.is_dir() else self._root.parent
        self._paths: dict[str, Path] = {}

    # ------------------------------------------------------------------ enumeration

    def refs(self, require: Sequence[str] = ()) -> list[SampleRef]:
        """One ref per feature file under the root, in sorted path order.

        ``require`` names features every file must hold (e.g. the EAGLE3 four); a file lacking
        one raises ``SchemaMismatchError`` naming the file and what is missing.
        """
        described = [self._describe(path, require) for path in list_feature_files(self._root)]
        for ref, resolved in described:  # all or nothing: register only once every file passed
            self._register(ref, resolved)
        return [ref for ref, _ in described]

    def ref_for(self, path: str | Path, require: Sequence[str] = ()) -> SampleRef:
        """The ref of one feature file (relative to the root, or absolute inside it)."""
        ref, resolved = self._describe(path, require)
        self._register(ref, resolved)
        return ref

    def _describe(self, path: str | Path, require: Sequence[str]) -> tuple[SampleRef, Path]:
        resolved = self._inside((self._base / path).resolve(), str(path))
        rel = resolved.relative_to(self._base).as_posix()
        stem = rel
        for suffix in SUFFIXES:
            stem = stem.removesuffix(suffix)
        try:
            sample_id = validate_sample_id(stem.replace("/", ":"))
        except InvalidInputError as exc:
            raise InvalidInputError(
                f"{self.uri}: file {rel!r} cannot name a sample: {exc}"
            ) from None
        specs = self._specs_of(resolved)
        missing = sorted(set(require) - set(specs))
        if missing:
            raise SchemaMismatchError(
                f"{self.uri}: file {rel!r} lacks required feature(s) {missing}; it has {sorted(specs)}"
            )
        num_tokens = specs["input_ids"].numel if "input_ids" in specs else 0
        ref = SampleRef(
            sample_id=sample_id,
            store_uri=self.uri,
            feature_keys={n: f"{rel}#{n}" for n in specs},
            feature_specs=specs,
            generation=0,
            estimated_bytes=sum(s.nbytes for s in specs.values()),
            num_tokens=num_tokens,
            metadata={"path": rel, "format": "offline_eagle3"},
        )
        return ref, resolved

    def _register(self, ref: SampleRef, resolved: Path) -> None:
        with self._lock:
            self._paths[ref.sample_id] = resolved
            if ref.sample_id not in self._resident:
                self._resident[ref.sample_id] = Generation(
                    ref.sample_id, 0, ref.estimated_bytes, tuple(ref.feature_specs), self._clock()
                )

    # ------------------------------------------------------------------ contract

    def put(
        self,
        sample_id: str,
        tensors: Mapping[str, Any],
        metadata: Mapping[str, Any] | None = None,
    ) -> SampleRef:
        """Always refused: file:// stores are read-only."""
        self._enter()
        raise InvalidInputError(
            f"{self.uri} is read-only: precomputed features are written by other tools; "
            "use ref_for()/refs() to serve them"
        )

    def get(
        self, ref: SampleRef, names: Sequence[str] | None = None
    ) -> tuple[dict[str, Any], FeatureHandle]:
        """Serve a file ref (its ``metadata['path']`` names the file, inside the root)."""
        self._enter()
        self._wanted(ref, names)  # the ref must be this store's before its path means anything
        rel = ref.metadata.get("path")
        if not isinstance(rel, str) or not rel:
            raise InvalidInputError(
                f"ref {ref.sample_id!r} has no metadata['path'] naming its file"
            )
        resolved = self._inside((self._base / rel).resolve(), rel)
        with self._lock:
            known = self._paths.setdefault(ref.sample_id, resolved)
        if known != resolved:
            raise InvalidInputError(
                f"ref {ref.sample_id!r} names {rel!r} but that sample id is served from "
                f"{known.relative_to(self._base).as_posix()!r}"
            )
        return super().get(ref, names)

    # ------------------------------------------------------------------ hooks

    def _inside(self, resolved: Path, shown: str) -> Path:
        # A store over one file serves that file only; over a directory, anything below it.
        inside = (
            resolved == self._root if self._root.is_file() else resolved.is_relative_to(self._root)
        )
        if not inside:
            raise InvalidInputError(f"{self.uri}: path {shown!r} escapes the store root")
        return resolved

    def _specs_of(self, path: Path) -> dict[str, FeatureSpec]:
        where = f"{self.uri}: {path.name}"
        if path.name.endswith(CKPT_SUFFIXES):
            return {n: spec_of(n, t) for n, t in load_ckpt(path).items()}
        return _layout_specs(path, where)

    def _write(self, sample_id: str, generation: int, sample: PreparedSample) -> None:
        raise InvalidInputError(f"{self.uri} is read-only")

    def _read(
        self, sample_id: str, generation: int, wanted: Mapping[str, FeatureSpec]
    ) -> dict[str, torch.Tensor]:
        with self._lock:
            path = self._paths.get(sample_id)
        where = f"{self.uri}: sample {sample_id!r}"
        if path is None or not path.exists():
            raise NotFoundError(f"{where} has no file (moved or deleted?)")
        if path.name.endswith(CKPT_SUFFIXES):
            return _check_ckpt(load_ckpt(path), wanted, where)
        tensors, _ = map_sample(str(path), wanted, where)
        return tensors

    def _delete(self, stored: Generation) -> None:
        with self._lock:  # read-only: forget the file, never touch it
            self._paths.pop(stored.sample_id, None)

    def _exists(self, sample_id: str, generation: int) -> bool:
        with self._lock:
            path = self._paths.get(sample_id)
        return path is not None and path.exists()


def _layout_specs(path: Path, where: str) -> dict[str, FeatureSpec]:
    return {name: entry.spec for name, entry in read_layout(str(path), where).entries.items()}


def _check_ckpt(
    tensors: Mapping[str, torch.Tensor], wanted: Mapping[str, FeatureSpec], where: str
) -> dict[str, torch.Tensor]:
    out = {}
    for name, spec in wanted.items():
        tensor = tensors.get(name)
        if tensor is None:
            raise SchemaMismatchError(
                f"{where}: the ref names feature {name!r} but the file has only {sorted(tensors)}"
            )
        stored = spec_of(name, tensor)
        if stored != spec:
            raise SchemaMismatchError(
                f"{where}: feature {name!r} is {describe(stored)} in the stored bytes but the "
                f"ref says {describe(spec)}; refusing to reinterpret them"
            )
        out[name] = tensor
    return out


__all__ = ["FileFeatureStore", "import_ckpt", "list_feature_files", "load_ckpt"]
