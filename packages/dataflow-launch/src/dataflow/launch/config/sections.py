"""The sections of the launch config; each is strict, closed (``extra="forbid"``) and frozen."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator, model_validator

from dataflow.contracts.ids import validate_id
from dataflow.contracts.uris import parse_ledger_uri, parse_store_uri

Topology = Literal[
    "colocated_offline", "colocated_online", "disaggregated_offline", "disaggregated_online"
]
Mode = Literal["local_colocated", "dataflow_colocated", "disaggregated"]
Dtype = Literal["auto", "bfloat16", "float16", "float32"]
"""``auto``: chosen by the machine's capability (``dataflow.launch.precision``)."""

_DEVICE = re.compile(r"cpu|cuda(:\d+)?|mps")


class Section(BaseModel):
    """Base of every config section: unknown keys refused, values type-strict, immutable."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)


class RunSection(Section):
    """Identity and shape of a run."""

    id: str = "dataflow-run"
    out_dir: str = "runs/dataflow-run"
    seed: int = Field(default=0, ge=0)
    topology: Topology = "disaggregated_online"
    deployment_mode: Mode | None = None
    """None → derived from the topology (colocated → local_colocated, else disaggregated)."""

    @field_validator("id")
    @classmethod
    def _safe_id(cls, value: str) -> str:
        return validate_id(value, "run id")


TRAINED_BUILTIN_SHAPE = {
    "hidden_size": 128,
    "num_layers": 8,
    "num_heads": 2,
    "num_kv_heads": 1,
    "intermediate_size": 256,
}
"""The shape of the shipped trained built-in target (``weights: trained``)."""


RANDOM_BUILTIN_SHAPE: dict[str, int] = {
    "hidden_size": 256,
    "num_layers": 8,
    "num_heads": 4,
    "num_kv_heads": 2,
    "intermediate_size": 512,
}
"""The default shape of the random built-in target (``weights: random``, the default)."""


class BuiltinTargetSection(Section):
    """The built-in small target over the shipped tokenizer: a random LLaMA of any shape fixed by
    ``seed`` (``weights: random``, the default) or the shipped *trained* LLaMA (``weights:
    trained``, opt-in; its shape is fixed and its defaults follow it).
    """

    weights: Literal["trained", "random"] = "random"
    hidden_size: int = Field(default=RANDOM_BUILTIN_SHAPE["hidden_size"], ge=8)
    num_layers: int = Field(default=RANDOM_BUILTIN_SHAPE["num_layers"], ge=1)
    num_heads: int = Field(default=RANDOM_BUILTIN_SHAPE["num_heads"], ge=1)
    num_kv_heads: int = Field(default=RANDOM_BUILTIN_SHAPE["num_kv_heads"], ge=1)
    intermediate_size: int = Field(default=RANDOM_BUILTIN_SHAPE["intermediate_size"], ge=1)
    seed: int = Field(default=0, ge=0)
    logit_std: float = Field(default=5.0, gt=0)
    """Spread of the target's logits (the LM head is drawn with std ``logit_std / sqrt(H)``):
    large enough that the target's next-token choice is sharp."""

    @model_validator(mode="before")
    @classmethod
    def _trained_shape_defaults(cls, data: Any) -> Any:
        """With ``weights: trained`` the shape fields left unset take the trained shape."""
        if isinstance(data, dict) and data.get("weights") == "trained":
            return {**TRAINED_BUILTIN_SHAPE, **data}
        return data

    @model_validator(mode="after")
    def _heads_divide(self) -> BuiltinTargetSection:
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size: {self.hidden_size} must be a multiple of num_heads {self.num_heads}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads: {self.num_heads} must be a multiple of num_kv_heads {self.num_kv_heads}"
            )
        if self.weights == "trained":
            wrong = {
                name: getattr(self, name)
                for name, value in TRAINED_BUILTIN_SHAPE.items()
                if getattr(self, name) != value
            }
            if wrong:
                raise ValueError(
                    f"weights: the trained built-in target has shape {TRAINED_BUILTIN_SHAPE}, "
                    f"not {wrong}; set weights: random for a random target of another shape"
                )
        return self


class VLLMServerSection(Section):
    """The ``vllm`` engine's server: how a managed one is started (``target.server_url`` unset),
    and where captures are written (a directory the server and the producer both see).
    """

    python: str | None = None
    """Python of the environment with vLLM installed; None → the producer's own interpreter."""
    host: str = "127.0.0.1"
    port: int = Field(default=0, ge=0, le=65535)
    """0 → a free port chosen at start."""
    capture_mode: Literal["file", "store"] = "file"
    """How captures reach the producer. ``file`` (default: works with every store, including
    the in-process ``memory://`` of colocated runs): the stock connector file under
    ``capture_dir``, read and removed by the producer, which then puts the features.
    ``store``: the connector stages each sample's features straight into the run's feature
    store from the server process (``shm://``, ``dir://`` or ``mooncake://``; no intermediate
    file) and the producer adopts them; the server and the producer must both reach the store."""
    capture_dir: str | None = None
    """The connector's ``shared_storage_path``; None → a fresh temporary directory (managed
    server) or ``<tmp>/dataflow-vllm-captures`` (printed command)."""
    enforce_eager: bool = True
    """``--enforce-eager`` (required on CPU builds to start in seconds, not minutes)."""
    max_model_len: int | None = Field(default=None, ge=2)
    kv_cache_gib: float = Field(default=1.0, gt=0)
    """``VLLM_CPU_KVCACHE_SPACE`` of a managed server on a CPU build."""
    startup_timeout_s: float = Field(default=600.0, gt=0)
    extra_args: tuple[str, ...] = Field(default=(), strict=False)
    """More server flags, appended as given."""


class TargetSection(Section):
    """Which target model captures features, and how."""

    engine: Literal["hf", "sglang", "vllm"] = "hf"
    model_dir: str | None = None
    builtin: BuiltinTargetSection | None = None
    """Set (or defaulted) exactly when ``model_dir`` is not."""
    dtype: Dtype = "auto"
    """auto → bf16 where the device computes it natively, else fp32 (see precision.py)."""
    device: str = "cpu"
    batch_size: int = Field(default=4, ge=1)
    # Lax container (a YAML list is accepted) with strict elements ("1" is still refused).
    aux_layer_ids: tuple[StrictInt, StrictInt, StrictInt] | None = Field(default=None, strict=False)
    """None → the rule [1, N//2 - 1, N - 4] for an N-layer target."""
    server_url: str | None = None
    """sglang: the plain server (post-norm last hidden state); vllm: a running server (None →
    the producer starts and supervises one, see ``vllm``)."""
    aux_server_url: str | None = None
    """sglang: the EAGLE3 server over the same weights (the three aux layers)."""
    capture: Literal["response", "mooncake"] = "response"
    """sglang: ``response`` — two stock servers answer JSON hidden states; ``mooncake`` — one
    SpecForge-patched server (``--enable-spec-capture``) writes the features straight into the
    run's ``mooncake://`` store and answers only their shapes and dtypes."""
    request_timeout_s: float = Field(default=300.0, gt=0)
    version: str | None = None
    """Target version stamped on refs; None → derived from the model."""
    vllm: VLLMServerSection = VLLMServerSection()
    """vllm engine: the managed server's settings and the capture directory."""

    @model_validator(mode="before")
    @classmethod
    def _default_builtin(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("model_dir") is None and "builtin" not in data:
            return {**data, "builtin": {}}
        return data

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        if not _DEVICE.fullmatch(value):
            raise ValueError(f"unknown device {value!r}; expected cpu, cuda, cuda:N or mps")
        return value

    @model_validator(mode="after")
    def _one_model(self) -> TargetSection:
        if self.model_dir is not None and self.builtin is not None:
            raise ValueError("model_dir: set either model_dir or builtin, not both")
        if self.model_dir is None and self.builtin is None:
            raise ValueError("model_dir: set model_dir or builtin")
        if self.engine == "sglang":
            if self.server_url is None:
                raise ValueError("server_url: required by the sglang engine")
            if self.aux_server_url is None and self.capture == "response":
                raise ValueError(
                    "aux_server_url: required by the sglang engine (a stock SGLang server returns "
                    "the aux layers only when it runs EAGLE3, and then not the last hidden state)"
                )
            if self.model_dir is None:
                raise ValueError(
                    "model_dir: required by the sglang engine (the directory the server loaded: "
                    "tokenizer, embedding and LM head come from it)"
                )
        if self.capture == "mooncake" and self.engine != "sglang":
            raise ValueError("capture: 'mooncake' needs engine 'sglang' (a spec-capture server)")
        if self.engine == "vllm" and self.model_dir is None:
            raise ValueError(
                "model_dir: required by the vllm engine (the directory the server loads; the "
                "tokenizer, final norm, embedding and LM head come from it)"
            )
        return self

    @field_validator("aux_layer_ids")
    @classmethod
    def _distinct_layers(cls, value: tuple[int, int, int] | None) -> tuple[int, int, int] | None:
        if value is not None and (len(set(value)) != 3 or min(value) < 0):
            raise ValueError("must be three distinct non-negative layer ids")
        return value


class DataSection(Section):
    """Where prompts come from and how they are cut into tasks."""

    path: str | None = None
    """Prompt JSONL; None → the shipped demo prompts (sharegpt format)."""
    format: Literal["sharegpt", "token_ids"] = "sharegpt"
    max_length: int = Field(default=512, ge=2)
    passes: int = Field(default=1, ge=1)
    max_malformed_lines: int = Field(default=0, ge=0)
    """More malformed lines than this fail the load (naming the lines)."""
    max_prompts: int | None = Field(default=None, ge=1)
    shuffle: bool = False
    """Shuffle each pass with ``Random(run.seed + pass)``."""


class StoreOptions(Section):
    """Options passed to ``open_store``."""

    budget_bytes: int | None = Field(default=None, ge=1)
    max_age_s: float | None = Field(default=None, gt=0)
    token: str | None = None


class StoreSection(Section):
    """The feature store."""

    uri: str = ""
    """Empty → chosen from the topology."""
    options: StoreOptions = StoreOptions()

    @field_validator("uri")
    @classmethod
    def _valid_uri(cls, value: str) -> str:
        if value:
            parse_store_uri(value)
        return value


class LedgerOptions(Section):
    """Options passed to ``open_ledger``."""

    timeout_s: float = Field(default=10.0, gt=0)


class LedgerSection(Section):
    """The run's ledger."""

    uri: str = ""
    """Empty → chosen from the topology and deployment mode."""
    options: LedgerOptions = LedgerOptions()
    consumer_lease_s: float = Field(default=30.0, gt=0)
    """The consumer's fenced lease on its run lasts this long without a heartbeat (renewed every
    third of it); a second consumer is refused until it expires, then takes over."""

    @field_validator("uri")
    @classmethod
    def _valid_uri(cls, value: str) -> str:
        if value:
            parse_ledger_uri(value)
        return value


class FlowSection(Section):
    """Producer backpressure: watermarks in refs and bytes, and a hard byte cap."""

    high_watermark: int = Field(default=64, ge=1)
    low_watermark: int = Field(default=48, ge=0)
    high_bytes: int | None = Field(default=None, ge=1)
    low_bytes: int | None = Field(default=None, ge=0)
    byte_cap: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _ordered(self) -> FlowSection:
        if self.low_watermark > self.high_watermark:
            raise ValueError(
                f"low_watermark: {self.low_watermark} must be <= high_watermark {self.high_watermark}"
            )
        if (self.low_bytes is None) != (self.high_bytes is None):
            raise ValueError("low_bytes: set both high_bytes and low_bytes, or neither")
        if self.low_bytes is not None and self.high_bytes is not None:
            if self.low_bytes > self.high_bytes:
                raise ValueError(
                    f"low_bytes: {self.low_bytes} must be <= high_bytes {self.high_bytes}"
                )
            if self.byte_cap is not None and self.high_bytes > self.byte_cap:
                raise ValueError(
                    f"high_bytes: {self.high_bytes} must be <= byte_cap {self.byte_cap}"
                )
        return self


class StalenessSection(Section):
    """Draft-weight staleness: off by default."""

    enabled: bool = False
    max_draft_lag: int = Field(default=2, ge=0)
    require_target_match: bool = True
    admission: bool = True
    """Also refuse to start rollouts that would arrive too stale."""
    publish_every: int = Field(default=0, ge=0)
    """The trainer publishes a draft version at start, at each checkpoint and, when > 0, every
    this many optimizer steps (weights saved under ``<out_dir>/weights``)."""
    first_version_timeout_s: float = Field(default=300.0, gt=0)
    """A producer waiting this long for the trainer's first draft version fails the run."""

    def publishes_per_step(self, checkpoint_every: int) -> float:
        """Expected draft publishes per optimizer step (admission's look-ahead)."""
        every = self.publish_every or checkpoint_every
        return 1.0 / every if every else 0.0


class ProducerSection(Section):
    """The rollout producer's workers."""

    workers: int = Field(default=1, ge=1)
    max_attempts: int = Field(default=3, ge=1)
    """A prompt is tried at most this many times, then FAILED."""
    worker_max_failures: int = Field(default=3, ge=1)
    """A worker failing this many captures in a row is dropped."""
    max_failed_prompts: int = Field(default=0, ge=0)
    """More prompts than this FAILED for good at the end fail the run instead of closing it."""
    lease_s: float = Field(default=120.0, gt=0)
    poll_s: float = Field(default=0.05, gt=0)
    regenerate: bool = False
    """The target writes the assistant turns itself; features cover prompt + its own response
    and the loss mask covers the response only. Each conversation becomes one prompt: its
    turns before the first assistant turn (``token_ids`` data: the ids before the first loss
    mask 1). Needs an engine that generates (not ``sglang``) and
    ``max_new_tokens < data.max_length``; prompts longer than ``data.max_length -
    max_new_tokens`` are skipped and reported."""
    max_new_tokens: int = Field(default=64, ge=1)
    """With ``regenerate``: the most tokens the target writes per sample."""
    temperature: float = Field(default=0.0, ge=0)
    """With ``regenerate``: 0 is greedy decoding; above 0 samples (seeded by ``run.seed``)."""


class TrainerSection(Section):
    """The draft trainer."""

    batch_size: int = Field(default=1, ge=1)
    accumulation_steps: int = Field(default=1, ge=1)
    dp_size: int = Field(default=1, ge=1)
    sp_size: int = Field(default=1, ge=1)
    lr: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    min_lr_ratio: float = Field(default=0.0, ge=0, le=1)
    warmup_steps: int = Field(default=0, ge=0)
    total_steps: int = Field(default=100, ge=1)
    """The LR schedule's horizon (warmup then cosine to ``lr * min_lr_ratio``)."""
    max_steps: int | None = Field(default=None, ge=1)
    """Stop after this many optimizer steps; None: when the data ends."""
    max_grad_norm: float = Field(default=0.5, gt=0)
    bf16: bool | None = None
    """None → by capability, as ``target.dtype: auto`` (bf16 only with native bf16)."""
    checkpoint_every: int = Field(default=0, ge=0)
    """0 → only at the end."""
    keep_last: int = Field(default=2, ge=1)
    ttt_length: int = Field(default=7, ge=1)
    draft_vocab_size: int = Field(default=512, ge=2)
    log_every: int = Field(default=1, ge=1)
    on_nonfinite: Literal["fail", "skip"] = "fail"
    """An optimizer window with a NaN/inf loss or gradient norm is never applied: ``fail`` the
    run naming its samples, or ``skip`` the window (gradients discarded) and go on."""
    max_bad_samples: int = Field(default=0, ge=0)
    """Samples with bad feature values (NaN/inf, no tokens, longer than the run's length, a loss
    mask not 0/1) are dropped with a reason; more than this many fail the run."""

    @property
    def world_size(self) -> int:
        """Trainer processes: ``dp_size * sp_size`` (each sequence-parallel group of ``sp_size``
        ranks trains one data-parallel share).
        """
        return self.dp_size * self.sp_size

    @property
    def quantum(self) -> int:
        """Samples per optimizer window: dp_size * batch_size * accumulation_steps."""
        return self.dp_size * self.batch_size * self.accumulation_steps
