"""The ``hf`` engine: the target runs in-process under transformers (CPU or GPU).

Aux layers are captured with forward hooks on the decoder layers themselves (layer k's output,
whatever a model's ``hidden_states`` tuple convention), and the last hidden state is the base
model's ``last_hidden_state``, which is post-final-norm. Prompts are batched with right padding;
causal attention keeps every real position independent of the padding after it. Features are
bit-reproducible for the same batch composition (different batch shapes can change the last
bits of float results, so equivalence runs use a fixed batch size).

With a :class:`Regeneration` the payload is the prompt only: the target first writes its
response to each prompt (:mod:`dataflow.launch.engines.generate`, one task at a time), then one
forward over prompt + response captures the features, exactly as for a prompt from the data;
the loss mask is the payload's followed by 1 on every generated token.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from dataflow.contracts import FeatureSpec, InvalidInputError, PromptTask
from dataflow.launch.config import TargetSection
from dataflow.launch.engines.base import CapturedSample, Regeneration, TargetHead, TargetInfo
from dataflow.launch.engines.features import (
    batch_finite,
    checked_sample,
    eagle3_feature_specs,
    torch_dtype_name,
)
from dataflow.launch.engines.generate import eos_token_ids, generate_tokens, task_seed
from dataflow.launch.engines.layers import resolve_aux_layer_ids
from dataflow.launch.engines.payload import encode_payload
from dataflow.launch.extras import require

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _base_model(model: Any) -> Any:
    base = getattr(model, "model", None)
    if base is None or not hasattr(base, "layers"):
        raise InvalidInputError(
            f"{type(model).__name__} has no `.model.layers` decoder stack; the hf engine "
            "supports LLaMA-style causal LMs"
        )
    return base


def resolve_device(name: str) -> torch.device:
    """``name`` as a torch device, refusing an accelerator that is not present."""
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InvalidInputError(f"target.device {name!r}: CUDA is not available on this machine")
    if name == "mps" and not torch.backends.mps.is_available():
        raise InvalidInputError("target.device 'mps': MPS is not available on this machine")
    return torch.device(name)


class HFTargetEngine:
    """A transformers causal LM captured in-process; implements :class:`TargetEngine`.

    Guarantees: one sample per task in task order; every sample checked against
    :meth:`feature_specs` before it is returned; tensors on CPU, detached, each owning its own
    storage; a bad payload raises before any forward pass. Safe to share between threads
    (captures are serialised). With ``regeneration``, each sample is the prompt plus the
    target's own response (greedy: deterministic; sampled: reproducible for the same
    ``regeneration.seed`` and task id), loss mask 1 on the response only.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        aux_layer_ids: Sequence[int] | None = None,
        device: str = "cpu",
        batch_size: int = 4,
        version: str = "unknown",
        regeneration: Regeneration | None = None,
    ) -> None:
        self._regeneration = regeneration
        self._device = resolve_device(device)
        self._model = model.to(self._device).eval()
        self._base = _base_model(self._model)
        self._tokenizer = tokenizer
        self._batch_size = batch_size
        config = self._model.config
        num_layers = int(config.num_hidden_layers)
        dtype = next(self._model.parameters()).dtype
        pad = config.pad_token_id if config.pad_token_id is not None else 0
        self._info = TargetInfo(
            hidden_size=int(config.hidden_size),
            vocab_size=int(config.vocab_size),
            num_layers=num_layers,
            aux_layer_ids=resolve_aux_layer_ids(num_layers, aux_layer_ids),
            dtype=torch_dtype_name(dtype),
            version=version,
            pad_token_id=int(pad),
        )
        self._lock = threading.Lock()
        self._eos = eos_token_ids(self._model, tokenizer)

    @property
    def info(self) -> TargetInfo:
        return self._info

    @property
    def regeneration(self) -> Regeneration | None:
        """How the target writes the responses, or None when it only reads the data's."""
        return self._regeneration

    @property
    def model(self) -> Any:
        """The underlying transformers model (eval mode; do not train it)."""
        return self._model

    @property
    def tokenizer(self) -> Any:
        """The target's tokenizer (renders chat prompts)."""
        return self._tokenizer

    def feature_specs(self, num_tokens: int) -> dict[str, FeatureSpec]:
        return eagle3_feature_specs(self._info, num_tokens)

    def target_head(self) -> TargetHead:
        embed = self._model.get_input_embeddings().weight
        head = self._model.get_output_embeddings().weight
        return TargetHead(
            info=self._info,
            embed_weight=embed.detach().to("cpu", copy=True),
            lm_head_weight=head.detach().to("cpu", copy=True),
            model_config=json.loads(self._model.config.to_json_string(use_diff=False)),
        )

    def capture(self, tasks: Sequence[PromptTask]) -> list[CapturedSample]:
        prompt_only = self._regeneration is not None
        encoded = [
            encode_payload(t, self._tokenizer, self._info.vocab_size, prompt_only=prompt_only)
            for t in tasks
        ]
        samples: list[CapturedSample] = []
        with self._lock:
            if self._regeneration is not None:
                encoded = [
                    self._respond(task, ids, mask, self._regeneration)
                    for task, (ids, mask) in zip(tasks, encoded, strict=True)
                ]
            for start in range(0, len(tasks), self._batch_size):
                chunk = range(start, min(start + self._batch_size, len(tasks)))
                samples.extend(
                    self._capture_batch([tasks[i] for i in chunk], [encoded[i] for i in chunk])
                )
        return samples

    def _respond(
        self, task: PromptTask, ids: list[int], mask: list[int], regen: Regeneration
    ) -> tuple[list[int], list[int]]:
        new = generate_tokens(
            self._model,
            ids,
            max_new_tokens=min(regen.max_new_tokens, task.max_length - len(ids)),
            temperature=regen.temperature,
            seed=task_seed(regen.seed, task.task_id),
            eos=self._eos,
        )
        return ids + new, mask + [1] * len(new)

    @torch.no_grad()
    def _capture_batch(
        self, tasks: list[PromptTask], encoded: list[tuple[list[int], list[int]]]
    ) -> list[CapturedSample]:
        longest = max(len(ids) for ids, _ in encoded)
        ids = torch.full((len(tasks), longest), self._info.pad_token_id, dtype=torch.int64)
        attention = torch.zeros((len(tasks), longest), dtype=torch.int64)
        for row, (tokens, _) in enumerate(encoded):
            ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.int64)
            attention[row, : len(tokens)] = 1
        captured: dict[int, torch.Tensor] = {}
        hooks = [
            self._base.layers[layer].register_forward_hook(self._recorder(captured, layer))
            for layer in self._info.aux_layer_ids
        ]
        try:
            out = self._base(
                input_ids=ids.to(self._device),
                attention_mask=attention.to(self._device),
                use_cache=False,
            )
        finally:
            for hook in hooks:
                hook.remove()
        last = out.last_hidden_state.to("cpu")
        aux = torch.cat([captured[k].to("cpu") for k in self._info.aux_layer_ids], dim=-1)
        # One finiteness reduction per batch (padding included: finite there too, or each
        # sample is scanned on its own below) instead of one scan per sample and feature.
        finite = batch_finite(last, aux)
        samples = []
        for row, (task, (tokens, mask)) in enumerate(zip(tasks, encoded, strict=True)):
            n = len(tokens)
            tensors = {
                "input_ids": torch.tensor([tokens], dtype=torch.int64),
                "loss_mask": torch.tensor([mask], dtype=torch.int64),
                "hidden_state": last[row : row + 1, :n].clone(),
                "aux_hidden_state": aux[row : row + 1, :n].clone(),
            }
            samples.append(checked_sample(task.task_id, tensors, self._info, known_finite=finite))
        return samples

    @staticmethod
    def _recorder(store: dict[int, torch.Tensor], layer: int) -> Any:
        def hook(_module: Any, _inputs: Any, output: Any) -> None:
            store[layer] = output[0] if isinstance(output, tuple) else output

        return hook

    def close(self) -> None:
        self._model = None
        self._base = None


def _check_model_dir(model_dir: str) -> Path:
    path = Path(model_dir)
    if not path.is_dir():
        raise InvalidInputError(f"target.model_dir {model_dir!r} does not exist")
    if not (path / "config.json").is_file():
        raise InvalidInputError(
            f"target.model_dir {model_dir!r} is not a model directory: it has no config.json"
        )
    return path


def load_model_dir(model_dir: str, dtype: str) -> tuple[Any, Any]:
    """``(model, tokenizer)`` from a local transformers directory; never downloads."""
    transformers = require("transformers")
    path = _check_model_dir(model_dir)
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise InvalidInputError(
            f"target.model_dir {model_dir!r}: cannot load its tokenizer ({exc})"
        ) from None
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path), dtype=_DTYPES[dtype], local_files_only=True
    )
    return model, tokenizer


def open_hf_engine(
    target: TargetSection, *, regeneration: Regeneration | None = None
) -> HFTargetEngine:
    """The ``hf`` engine for ``target``: the model directory, or the built-in small target;
    with ``regeneration`` the target writes each response itself. ``target.dtype: auto`` is
    resolved by :func:`dataflow.launch.precision.choose_dtype`.
    """
    from dataflow.launch.precision import choose_dtype

    dtype = choose_dtype(target.dtype, target.device).dtype
    if target.model_dir is not None:
        model, tokenizer = load_model_dir(target.model_dir, dtype)
        version = target.version or Path(target.model_dir).resolve().name
    else:
        from dataflow.launch.builtin.target import build_builtin_target, builtin_version

        assert target.builtin is not None  # the config guarantees one of the two
        model, tokenizer = build_builtin_target(target.builtin, _DTYPES[dtype])
        version = target.version or builtin_version(target.builtin)
    return HFTargetEngine(
        model,
        tokenizer,
        aux_layer_ids=target.aux_layer_ids,
        device=target.device,
        batch_size=target.batch_size,
        version=version,
        regeneration=regeneration,
    )
