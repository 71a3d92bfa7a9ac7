"""Argument validation shared by every ledger backend, so backends cannot disagree on input.

Each check raises ``InvalidInputError`` naming the argument (and index) at fault; the tensor
check raises ``TypeError`` naming the path of the tensor, as ``assert_no_tensors`` does.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from types import MappingProxyType
from typing import Any, TypeVar

from dataflow.contracts import FrozenDict
from dataflow.contracts.checks import is_int
from dataflow.contracts.errors import InvalidInputError, LedgerConflictError
from dataflow.contracts.features import FeatureSpec, SampleRef
from dataflow.contracts.ids import validate_id
from dataflow.contracts.no_tensors import assert_no_tensors
from dataflow.contracts.prompt import PromptTask
from dataflow.contracts.states import MAX_REASON_LENGTH
from dataflow.contracts.weights import WeightVersion

E = TypeVar("E", bound=enum.Enum)

_SCALARS = frozenset({str, int, float, bool, type(None)})
_SHOWN = 5


def _plain(value: Any) -> bool:
    """True when ``value`` is built only of JSON scalars, tuples, read-only maps and specs."""
    # Plain loops, not all(<generator>): this runs on every committed ref.
    kind = type(value)
    if kind in _SCALARS:
        return True
    if kind is tuple:
        for item in value:  # noqa: SIM110 - see above
            if type(item) not in _SCALARS and not _plain(item):
                return False
        return True
    if kind is FrozenDict or kind is dict or kind is MappingProxyType:
        for key, item in value.items():
            if type(key) is not str or (type(item) not in _SCALARS and not _plain(item)):
                return False
        return True
    if kind is FeatureSpec:
        if type(value.name) is not str or type(value.dtype) is not str:
            return False
        shape = value.shape
        if type(shape) is not tuple:
            return False
        for dim in shape:  # noqa: SIM110 - see above
            if type(dim) is not int:
                return False
        return True
    return False


def check_no_tensors(record: Any, path: str) -> None:
    """``assert_no_tensors`` with a fast path for records made only of plain values.

    A record whose every field is a JSON scalar, tuple, read-only mapping or FeatureSpec cannot
    hold a tensor; anything else gets the full walk, which raises naming the tensor's path.
    """
    for value in vars(record).values():
        if type(value) not in _SCALARS and not _plain(value):
            assert_no_tensors(record, path)
            return


def _sequence(value: Any, what: str) -> Sequence[Any]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise InvalidInputError(f"{what} must be a list or tuple, got {type(value).__name__}")
    return value


def check_refs(refs: Any) -> list[SampleRef]:
    """Every item a SampleRef without tensors inside; the error names ``refs[i]…``."""
    items = _sequence(refs, "refs")
    for i, ref in enumerate(items):
        if not isinstance(ref, SampleRef):
            raise InvalidInputError(f"refs[{i}] must be a SampleRef, got {type(ref).__name__}")
        check_no_tensors(ref, f"refs[{i}]")
    return list(items)


def check_tasks(tasks: Any) -> list[PromptTask]:
    """Every item a PromptTask without tensors inside; the error names ``tasks[i]…``."""
    items = _sequence(tasks, "tasks")
    for i, task in enumerate(items):
        if not isinstance(task, PromptTask):
            raise InvalidInputError(f"tasks[{i}] must be a PromptTask, got {type(task).__name__}")
        assert_no_tensors(task, f"tasks[{i}]")
    return list(items)


def check_weight(version: Any) -> WeightVersion:
    """A WeightVersion without tensors inside."""
    if not isinstance(version, WeightVersion):
        raise InvalidInputError(f"version must be a WeightVersion, got {type(version).__name__}")
    assert_no_tensors(version, "version")
    return version


def check_ids(ids: Any, what: str = "sample id") -> list[str]:
    """Valid ids, each once, in first-seen order (repeats, e.g. from SP replicas, collapse)."""
    items = _sequence(ids, f"{what}s")
    seen: dict[str, None] = {}
    for i, value in enumerate(items):
        if type(value) is not str or value not in seen:
            try:
                validate_id(value, what)
            except InvalidInputError as exc:
                raise InvalidInputError(f"{what}s[{i}]: {exc}") from None
            seen[value] = None
    return list(seen)


def check_int(value: Any, name: str, minimum: int) -> int:
    """An ``int`` (never a ``bool``) ≥ ``minimum``."""
    if not is_int(value) or value < minimum:
        raise InvalidInputError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def check_reason(reason: Any, *, required: bool = True) -> str:
    """A short printable reason (empty only when not required)."""
    if not isinstance(reason, str):
        raise InvalidInputError(f"reason must be a str, got {type(reason).__name__}")
    if required and not reason.strip():
        raise InvalidInputError("reason must not be empty")
    if len(reason) > MAX_REASON_LENGTH:
        raise InvalidInputError(
            f"reason is {len(reason)} characters long; the limit is {MAX_REASON_LENGTH}"
        )
    if not reason.isprintable():
        raise InvalidInputError(f"reason {reason!r} contains a non-printable character")
    return reason


def check_drift(mean_lag: Any, max_lag: Any) -> tuple[float, int]:
    """A finite mean lag >= 0 and an int max lag >= 0."""
    if (
        isinstance(mean_lag, bool)
        or not isinstance(mean_lag, int | float)
        or not math.isfinite(mean_lag)
        or mean_lag < 0
    ):
        raise InvalidInputError(f"mean draft lag must be a finite number >= 0, got {mean_lag!r}")
    return float(mean_lag), check_int(max_lag, "max draft lag", 0)


def check_target_version(version: Any) -> str:
    """A non-empty printable target version of at most ``MAX_REASON_LENGTH`` characters."""
    if not isinstance(version, str) or not version.strip():
        raise InvalidInputError(f"target version must be a non-empty str, got {version!r}")
    if len(version) > MAX_REASON_LENGTH or not version.isprintable():
        raise InvalidInputError(
            f"target version {version[:80]!r} must be printable and at most "
            f"{MAX_REASON_LENGTH} characters"
        )
    return version


def check_state(kind: type[E], value: Any) -> E:
    """A member of ``kind`` (its value is accepted too)."""
    try:
        return kind(value)
    except ValueError:
        raise InvalidInputError(
            f"{kind.__name__} must be one of {[s.value for s in kind]}, got {value!r}"
        ) from None


def check_lease(limit: Any, lease_s: Any) -> tuple[int, float]:
    """A lease request: ``limit`` ≥ 0 tasks for a finite ``lease_s`` > 0 seconds."""
    check_int(limit, "limit", 0)
    if (
        isinstance(lease_s, bool)
        or not isinstance(lease_s, (int, float))
        or not math.isfinite(lease_s)
        or lease_s <= 0
    ):
        raise InvalidInputError(f"lease_s must be a finite number > 0, got {lease_s!r}")
    return limit, float(lease_s)


def check_window_shape(dp_size: Any, per_rank: Any, quantum: int) -> None:
    """dp_size * per_rank must be the run's quantum (which must be set)."""
    check_int(dp_size, "dp_size", 1)
    check_int(per_rank, "per_rank", 1)
    if quantum <= 0:
        raise LedgerConflictError(
            "the run's quantum is not set: call open_run(run_id, quantum, ...) first"
        )
    if dp_size * per_rank != quantum:
        raise InvalidInputError(
            f"dp_size * per_rank = {dp_size} * {per_rank} = {dp_size * per_rank} differs from "
            f"the run's quantum {quantum}"
        )


def check_dp_size(dp_size: Any, quantum: int) -> int:
    """A dp_size that divides the run's quantum (when set), so whole windows can be re-cut."""
    check_int(dp_size, "dp_size", 1)
    if quantum > 0 and quantum % dp_size:
        raise InvalidInputError(
            f"dp_size {dp_size} does not divide the run's quantum {quantum}: windows could "
            "not be cut evenly across ranks"
        )
    return dp_size


def conflict(operation: str, problems: Sequence[str]) -> LedgerConflictError:
    """One error listing the first few problems of a refused transition and how many in all."""
    shown = "; ".join(problems[:_SHOWN])
    more = f" (and {len(problems) - _SHOWN} more)" if len(problems) > _SHOWN else ""
    return LedgerConflictError(f"{operation} refused, nothing changed: {shown}{more}")
