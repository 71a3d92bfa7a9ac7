"""Records that describe features without carrying them: FeatureSpec, SampleRef, FeatureHandle."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any, TypeVar

from dataflow.contracts.checks import check_non_negative, check_text, check_type, is_int
from dataflow.contracts.errors import InvalidInputError
from dataflow.contracts.frozen import FrozenDict, JsonMap, freeze_map, frozen_dict
from dataflow.contracts.ids import validate_id, validate_sample_id, validate_task_id

DTYPE_ITEMSIZE: Mapping[str, int] = MappingProxyType(
    {
        "bool": 1,
        "uint8": 1,
        "int8": 1,
        "int16": 2,
        "int32": 4,
        "int64": 8,
        "float16": 2,
        "bfloat16": 2,
        "float32": 4,
        "float64": 8,
    }
)
"""Supported feature dtypes (torch names without the ``torch.`` prefix) and their byte sizes."""

FEATURE_SCHEMA_VERSION = 1
"""Version of the per-strategy feature layout stamped on every SampleRef."""

STRATEGIES = ("eagle3",)
"""Draft-training strategies whose features this runtime knows."""


_R = TypeVar("_R")


def _assemble(
    cls: type[_R],
    required: frozenset[str],
    defaults: dict[str, Any],
    values: dict[str, Any],
    every: frozenset[str] = frozenset(),
) -> _R:
    """A ``cls`` record holding ``defaults`` updated with ``values``, without ``__post_init__``.

    Unknown or missing required field names raise ``TypeError`` (as the constructor would);
    no value is validated. ``every`` (all field names) lets a call naming every field skip the
    defaults (one set comparison instead of three set operations: decoders name them all).
    """
    if every and values.keys() == every:
        record = object.__new__(cls)
        record.__dict__.update(values)
        return record
    if not required.issubset(values) or not defaults.keys() >= values.keys() - required:
        unknown = sorted(values.keys() - required - defaults.keys())
        missing = sorted(required - values.keys())
        raise TypeError(f"{cls.__name__}: unknown field(s) {unknown}, missing field(s) {missing}")
    record = object.__new__(cls)
    record.__dict__.update(defaults)
    record.__dict__.update(values)
    return record


@dataclass(frozen=True)
class FeatureSpec:
    """Name, shape and dtype of one feature tensor; never the tensor itself."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    def __post_init__(self) -> None:
        validate_id(self.name, "feature name")
        if isinstance(self.shape, list):
            object.__setattr__(self, "shape", tuple(self.shape))
        check_type("FeatureSpec", "shape", self.shape, tuple)
        for i, dim in enumerate(self.shape):
            if not is_int(dim) or dim < 0:
                raise InvalidInputError(
                    f"FeatureSpec.shape[{i}] of {self.name!r} must be an int >= 0, got {dim!r}"
                )
        if self.dtype not in DTYPE_ITEMSIZE:
            raise InvalidInputError(
                f"FeatureSpec.dtype {self.dtype!r} of {self.name!r} is not supported; "
                f"expected one of {', '.join(DTYPE_ITEMSIZE)}"
            )

    @classmethod
    def from_validated(cls, name: str, shape: tuple[int, ...], dtype: str) -> FeatureSpec:
        """A spec built from values the caller has already checked, skipping the checks.

        For a trusted producer on its hot path only (a store describing a tensor it validated:
        ``name`` passed :func:`~dataflow.contracts.ids.validate_id`, ``shape`` is a tuple of ints
        >= 0 such as a ``torch.Size``'s, ``dtype`` is a key of :data:`DTYPE_ITEMSIZE`). The
        result equals ``FeatureSpec(name, shape, dtype)``; anything unchecked breaks the
        record's guarantees, so untrusted values go through the constructor.
        """
        record = object.__new__(cls)
        record.__dict__.update(name=name, shape=shape, dtype=dtype)
        return record

    @property
    def numel(self) -> int:
        """Number of elements."""
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Size of the tensor's raw bytes."""
        return self.numel * DTYPE_ITEMSIZE[self.dtype]


def _freeze_specs(value: Any) -> Mapping[str, FeatureSpec]:
    if not isinstance(value, Mapping):
        raise InvalidInputError(
            f"SampleRef.feature_specs must be a mapping, got {type(value).__name__}"
        )
    for key, spec in value.items():
        if not isinstance(spec, FeatureSpec):
            raise InvalidInputError(
                f"SampleRef.feature_specs[{key!r}] must be a FeatureSpec, got {type(spec).__name__}"
            )
        if spec.name != key:
            raise InvalidInputError(
                f"SampleRef.feature_specs[{key!r}] describes a feature named {spec.name!r}"
            )
    return frozen_dict(value)


def _freeze_keys(value: Any) -> Mapping[str, str]:
    if not isinstance(value, Mapping):
        raise InvalidInputError(
            f"SampleRef.feature_keys must be a mapping, got {type(value).__name__}"
        )
    for name, key in value.items():
        validate_id(name, "feature name")
        if not isinstance(key, str) or not key:
            raise InvalidInputError(f"SampleRef.feature_keys[{name!r}] must be a non-empty str")
    return frozen_dict(value)


@dataclass(frozen=True)
class SampleRef:
    """A pointer to one sample's features in one store, at one generation.

    Guarantees: ``sample_id`` is a safe id; every spec in ``feature_specs`` has a key in
    ``feature_keys`` under its own name; mappings are read-only. ``generation`` identifies the
    put that produced the ref: a store refuses a ref to an older generation.
    """

    sample_id: str
    store_uri: str
    feature_keys: Mapping[str, str] = field(hash=False)
    feature_specs: Mapping[str, FeatureSpec] = field(hash=False)
    generation: int = 0
    source_task_id: str | None = None
    run_id: str = ""
    strategy: str = "eagle3"
    schema_version: int = FEATURE_SCHEMA_VERSION
    estimated_bytes: int = 0
    num_tokens: int = 0
    target_version: str = "unknown"
    draft_weight_version: str | None = None
    metadata: JsonMap = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        validate_sample_id(self.sample_id)
        check_text("SampleRef", "store_uri", self.store_uri, allow_empty=False)
        object.__setattr__(self, "feature_keys", _freeze_keys(self.feature_keys))
        object.__setattr__(self, "feature_specs", _freeze_specs(self.feature_specs))
        missing = sorted(set(self.feature_specs) - set(self.feature_keys))
        if missing:
            raise InvalidInputError(f"SampleRef {self.sample_id!r}: specs without keys: {missing}")
        check_non_negative("SampleRef", "generation", self.generation)
        if self.source_task_id is not None:
            validate_task_id(self.source_task_id)
        check_text("SampleRef", "run_id", self.run_id)
        if self.strategy not in STRATEGIES:
            raise InvalidInputError(
                f"SampleRef.strategy {self.strategy!r} is unknown; expected one of {STRATEGIES}"
            )
        check_non_negative("SampleRef", "schema_version", self.schema_version)
        check_non_negative("SampleRef", "estimated_bytes", self.estimated_bytes)
        check_non_negative("SampleRef", "num_tokens", self.num_tokens)
        check_text("SampleRef", "target_version", self.target_version)
        if self.draft_weight_version is not None:
            check_text("SampleRef", "draft_weight_version", self.draft_weight_version)
        object.__setattr__(self, "metadata", freeze_map(self.metadata, "SampleRef.metadata"))

    @classmethod
    def from_validated(cls, **values: Any) -> SampleRef:
        """A ref built from fields the caller has already checked, skipping ``__post_init__``.

        For a trusted producer of refs on its hot path only (a store's ``put``, which validated
        the sample id, the feature names and dtypes and the metadata where they entered, and
        made every other field itself). The caller guarantees what ``__post_init__`` would:
        ``feature_keys``, ``feature_specs`` and ``metadata`` are already
        :class:`~dataflow.contracts.FrozenDict` s of valid entries (``metadata`` deep-frozen by
        :func:`~dataflow.contracts.freeze_map`), every other field valid. The result equals
        ``SampleRef(**values)``. Refs from anywhere else (decoded JSON, user code) go through
        the constructor.
        """
        return _assemble(cls, _REF_REQUIRED, _REF_DEFAULTS, values, _REF_FIELDS)

    @property
    def spec_bytes(self) -> int:
        """Total raw bytes of the described features (0 when specs are not known yet)."""
        return sum(spec.nbytes for spec in self.feature_specs.values())


_REF_REQUIRED = frozenset(("sample_id", "store_uri", "feature_keys", "feature_specs"))
_REF_DEFAULTS: dict[str, Any] = {  # private: never mutated
    f.name: (FrozenDict() if f.name == "metadata" else f.default)
    for f in fields(SampleRef)
    if f.name not in _REF_REQUIRED
}
_REF_FIELDS = _REF_REQUIRED | _REF_DEFAULTS.keys()


@dataclass(frozen=True)
class FeatureHandle:
    """The lease a store hands out with each ``get``; give it back with ``release``.

    ``token`` is unique per ``get``; releasing a handle whose ``generation`` is older than the
    stored one is a no-op that never frees newer data.
    """

    sample_id: str
    generation: int
    token: str

    def __post_init__(self) -> None:
        validate_sample_id(self.sample_id)
        check_non_negative("FeatureHandle", "generation", self.generation)
        check_text("FeatureHandle", "token", self.token, allow_empty=False)

    @classmethod
    def from_validated(cls, sample_id: str, generation: int, token: str) -> FeatureHandle:
        """A handle from values the caller has already checked (a store's ``get``: the id and
        generation of a validated ref, a token it made), skipping the checks; equals
        ``FeatureHandle(sample_id, generation, token)``.
        """
        record = object.__new__(cls)
        record.__dict__.update(sample_id=sample_id, generation=generation, token=token)
        return record
