"""EAGLE3 feature specs and the check every captured sample passes before it is put."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from dataflow.contracts import FeatureSpec, SchemaMismatchError
from dataflow.launch.engines.base import FEATURE_NAMES, CapturedSample, TargetInfo


def eagle3_feature_specs(info: TargetInfo, num_tokens: int) -> dict[str, FeatureSpec]:
    """The four feature specs of a ``num_tokens``-token sample of this target."""
    h = info.hidden_size
    return {
        "input_ids": FeatureSpec("input_ids", (1, num_tokens), "int64"),
        "loss_mask": FeatureSpec("loss_mask", (1, num_tokens), "int64"),
        "hidden_state": FeatureSpec("hidden_state", (1, num_tokens, h), info.dtype),
        "aux_hidden_state": FeatureSpec("aux_hidden_state", (1, num_tokens, 3 * h), info.dtype),
    }


def torch_dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` → ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


def check_features(
    task_id: str,
    tensors: Mapping[str, torch.Tensor],
    specs: Mapping[str, FeatureSpec],
    *,
    known_finite: bool = False,
) -> None:
    """Raise :class:`SchemaMismatchError` naming the task and feature unless ``tensors`` has
    exactly the spec'd names, shapes and dtypes, a 0/1 loss mask and finite hidden states.

    ``known_finite``: the caller already proved every floating tensor finite (for a whole batch
    at once, :func:`batch_finite`); the NaN/inf scan is then skipped, every other check runs.
    """
    if set(tensors) != set(specs):
        raise SchemaMismatchError(
            f"task {task_id!r}: captured features {sorted(tensors)} != expected {sorted(specs)}"
        )
    for name, spec in specs.items():
        tensor = tensors[name]
        got_dtype = torch_dtype_name(tensor.dtype)
        if tuple(tensor.shape) != spec.shape or got_dtype != spec.dtype:
            raise SchemaMismatchError(
                f"task {task_id!r}: feature {name!r} is {got_dtype}{list(tensor.shape)}, "
                f"expected {spec.dtype}{list(spec.shape)}"
            )
    if known_finite:
        tensors = {k: v for k, v in tensors.items() if not v.is_floating_point()}
    problem = value_problem(tensors)
    if problem is not None:
        raise BadFeatureValuesError(f"task {task_id!r}: {problem}")


def batch_finite(*tensors: torch.Tensor) -> bool:
    """Whether every element of ``tensors`` is finite, read with one reduction per tensor (a
    whole engine batch at once). ``True`` is certain (a NaN or inf makes the sum non-finite);
    ``False`` may be a false alarm (a finite sum that overflowed): check each sample then.
    """
    from dataflow.train.sample_checks import values_surely_fine

    return values_surely_fine({f"t{i}": t for i, t in enumerate(tensors)})


class BadFeatureValuesError(SchemaMismatchError):
    """A captured sample's values must never train (NaN/inf hidden states, no tokens, too long,
    a loss mask not 0/1). The prompt is at fault, not the worker: it fails for good.
    """


def value_problem(tensors: Mapping[str, torch.Tensor], max_length: int | None = None) -> str | None:
    """Why a sample's values must not train (``bad_features: …``), or ``None``.

    The one definition shared by every engine (through :func:`check_features`), the producer
    worker (with the run's ``max_length``) and the trainer's loader.
    """
    from dataflow.train.sample_checks import sample_problem

    return sample_problem(tensors, max_length)


def length_problem(tensors: Mapping[str, torch.Tensor], max_length: int | None) -> str | None:
    """The checks of :func:`value_problem` that read only shapes (no token, no tensor value)."""
    from dataflow.train.sample_checks import length_problem as shapes_only

    return shapes_only(tensors, max_length)


def checked_sample(
    task_id: str,
    tensors: Mapping[str, torch.Tensor],
    info: TargetInfo,
    *,
    known_finite: bool = False,
) -> CapturedSample:
    """A :class:`CapturedSample` after :func:`check_features` against this target's specs
    (``known_finite`` as there), marked ``values_checked``.
    """
    num_tokens = int(tensors["input_ids"].shape[-1]) if "input_ids" in tensors else 0
    check_features(
        task_id, tensors, eagle3_feature_specs(info, num_tokens), known_finite=known_finite
    )
    return CapturedSample(
        task_id, {name: tensors[name] for name in FEATURE_NAMES}, values_checked=True
    )
