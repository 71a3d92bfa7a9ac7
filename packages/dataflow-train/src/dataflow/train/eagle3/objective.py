"""Eagle3Objective: the draft plus the frozen target embedding and head, and the TTT loss.

Input (one batch, as the loader collates it; ``L`` = local length, the whole padded length ``T``
unless the sequence is sharded):

=====================  ===============  ====================================================
name                   shape / dtype    meaning
=====================  ===============  ====================================================
``input_ids``          int64 [B, L]     token ids
``loss_mask``          int [B, L]       1 on positions to supervise (assistant tokens)
``attention_mask``     int [B, L]       1 = real token, 0 = right padding (optional: all 1)
``hidden_state``       float [B, L, H]  target's last *post-norm* hidden state
``aux_hidden_state``   float [B, L, 3H] the three captured layers, concatenated
=====================  ===============  ====================================================

Alignment (the EAGLE shift): at TTT step ``k`` position ``t`` gets the draft hidden of step
``k-1`` (step 0: ``fc(aux[t])``) and the embedding of token ``t+1+k``; its teacher is the target's
distribution computed from ``hidden_state[t+1+k]`` (predicting token ``t+2+k``), restricted to the
draft vocabulary and renormalised. Positions past the end read zeros (so their teacher is
uniform and they are never supervised). A position ``p`` (= ``t+k``) is supervised iff
``loss_mask[p]``, ``attention_mask[p]`` and ``attention_mask[p+1]`` (its teacher comes from a real
token) and, for the loss and acceptance, the teacher's argmax is in the draft vocabulary.

Loss: ``sum_k ttt_decay**k * ploss_k`` with ``ploss_k = -(1/N) sum_{b,t} m sum_v p log q``, where
``N`` is the number of real tokens of the batch (of the whole SP group when sharded) unless the
caller passes ``loss_denominator``. Using real tokens rather than SpecForge's ``B*T`` makes the
loss independent of how much padding a batch carries.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from dataflow.contracts.errors import InvalidInputError, SchemaMismatchError
from dataflow.train.eagle3.config import Eagle3Config
from dataflow.train.eagle3.draft import INIT_STD, Eagle3DraftModel
from dataflow.train.eagle3.metrics import metrics_from_counts
from dataflow.train.eagle3.sequence import LocalSequence, SequenceExchange
from dataflow.train.eagle3.vocab import draft_to_target_ids

REQUIRED_FEATURES = ("input_ids", "loss_mask", "hidden_state", "aux_hidden_state")


@dataclass
class StepOutput:
    """What one objective evaluation returns.

    ``loss``: scalar to backpropagate (under sequence parallelism this rank's share: the shares
    of an SP group sum to the full-sequence loss, and SUM-reducing gradients over the group gives
    the full-sequence gradient). ``metrics``: detached 0-d tensors (``loss``, ``ploss_k``,
    ``acc_k``, ``acceptance_rate_k``, ``acc``, ``acceptance_rate``,
    ``simulated_acceptance_length``), already global over the SP group. ``counts``: the additive
    sums the metrics are made of (sum them over data-parallel ranks, then call
    :func:`~dataflow.train.eagle3.metrics.metrics_from_counts`). ``sample_loss``: detached ``[B]``,
    each sample's TTT-weighted loss over its own real tokens.
    """

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor]
    counts: dict[str, torch.Tensor] = field(default_factory=dict)
    sample_loss: torch.Tensor | None = None


@dataclass
class _Teacher:
    """Teacher rows for local positions ``0 .. L+K-2`` (row ``r`` predicts after token r+1)."""

    probs: torch.Tensor  # [B, R, Vd] target distribution renormalised over the draft vocab
    mass_on_draft: torch.Tensor  # [B, R, Vd] true target probability of each draft token
    argmax: torch.Tensor  # [B, R] target-vocab argmax
    supervised: torch.Tensor  # [B, R] bool: loss_mask & real & next real
    in_draft: torch.Tensor  # [B, R] bool: supervised & argmax in the draft vocab


class Eagle3Objective(nn.Module):
    """The EAGLE3 training objective (see the module docstring for alignment and loss).

    Holds ``draft`` (trainable, :class:`Eagle3DraftModel`), ``target_embedding`` and
    ``target_head`` (frozen: ``requires_grad=False``, never yielded by
    :meth:`trainable_parameters`). Guarantees: deterministic for a ``seed`` (initial weights and
    outputs); all softmaxes and the loss in fp32 whatever the parameter dtype; malformed batches
    raise :class:`SchemaMismatchError` naming the feature, before any computation.
    ``sequence_parallel`` (e.g. :class:`~dataflow.train.parallel.ulysses.UlyssesExchange`)
    makes ``forward`` take this rank's chunk of every sequence instead of the whole sequence.
    """

    def __init__(
        self,
        config: Eagle3Config,
        *,
        seed: int = 0,
        sequence_parallel: SequenceExchange | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.draft = Eagle3DraftModel(config, seed=seed)
        with torch.random.fork_rng(devices=[]):
            self.target_embedding = nn.Embedding(config.vocab_size, config.hidden_size)
            self.target_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        gen = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for module in (self.target_embedding, self.target_head):
                weight = torch.randn(module.weight.shape, generator=gen) * INIT_STD
                module.weight.copy_(weight)
                module.weight.requires_grad_(False)
        self.exchange: SequenceExchange = sequence_parallel or LocalSequence()
        if config.num_attention_heads % self.exchange.world:
            raise InvalidInputError(
                f"num_attention_heads ({config.num_attention_heads}) must be a multiple of the "
                f"sequence-parallel degree ({self.exchange.world})"
            )

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """The draft's parameters: exactly what the optimizer must see."""
        return (p for p in self.draft.parameters() if p.requires_grad)

    def init_from_target(
        self, embedding_weight: torch.Tensor, lm_head_weight: torch.Tensor
    ) -> None:
        """Copy the target's token embedding and LM head (both ``[vocab_size, hidden_size]``).

        Wrong shapes raise :class:`InvalidInputError` and change nothing; the copies stay frozen.
        """
        expected = (self.config.vocab_size, self.config.hidden_size)
        for name, weight in (("embedding", embedding_weight), ("lm_head", lm_head_weight)):
            if tuple(weight.shape) != expected:
                raise InvalidInputError(
                    f"target {name} weight has shape {tuple(weight.shape)}, expected {expected}"
                )
        with torch.no_grad():
            self.target_embedding.weight.copy_(embedding_weight)
            self.target_head.weight.copy_(lm_head_weight)

    def set_vocab_map(self, d2t: torch.Tensor, t2d: torch.Tensor) -> None:
        """Install the draft vocabulary map (see :meth:`Eagle3DraftModel.set_vocab_map`)."""
        self.draft.set_vocab_map(d2t, t2d)

    # -- validation -------------------------------------------------------------------------

    def _check_batch(self, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Validate names, ranks and widths; return the attention mask (all ones if absent)."""
        missing = [name for name in REQUIRED_FEATURES if name not in tensors]
        if missing:
            raise SchemaMismatchError(
                f"EAGLE3 batch lacks feature(s) {missing}; present: {sorted(tensors)}"
            )
        ids = tensors["input_ids"]
        if ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32):
            raise SchemaMismatchError(
                f"input_ids must be int64 [B, T], got {ids.dtype} {tuple(ids.shape)}"
            )
        batch, length = ids.shape
        hidden = self.config.hidden_size
        mask = tensors.get("attention_mask")
        if mask is None:
            mask = torch.ones_like(ids)
        expected = {
            "loss_mask": (batch, length),
            "attention_mask": (batch, length),
            "hidden_state": (batch, length, hidden),
            "aux_hidden_state": (batch, length, 3 * hidden),
        }
        for name, shape in expected.items():
            value = mask if name == "attention_mask" else tensors[name]
            if tuple(value.shape) != shape:
                raise SchemaMismatchError(
                    f"{name} has shape {tuple(value.shape)}, expected {shape} "
                    f"(input_ids is {tuple(ids.shape)}, hidden_size {hidden})"
                )
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.config.vocab_size):
            raise SchemaMismatchError(
                f"input_ids outside the target vocabulary [0, {self.config.vocab_size})"
            )
        return mask

    # -- the objective ----------------------------------------------------------------------

    def _extend(self, x: torch.Tensor) -> torch.Tensor:
        """Append the next ``ttt_length`` positions of the sequence (zeros past its end)."""
        return torch.cat([x, self.exchange.halo(x, self.config.ttt_length)], dim=1)

    @torch.no_grad()
    def _teacher(
        self, hidden_ext: torch.Tensor, loss_ext: torch.Tensor, real_ext: torch.Tensor
    ) -> _Teacher:
        # The teacher's argmax decides which positions are supervised (``in_draft``), a
        # discontinuous choice: target logits of a weak head are often tied to ~1e-4, which bf16
        # (8 mantissa bits) cannot resolve. So the frozen head always runs in fp32, outside any
        # autocast region, on fp32 copies of the (possibly bf16) weight and hidden state.
        with torch.autocast(device_type=hidden_ext.device.type, enabled=False):
            logits = F.linear(hidden_ext[:, 1:].float(), self.target_head.weight.float())
        draft_ids = draft_to_target_ids(self.draft.d2t)
        on_draft = logits[..., draft_ids]
        argmax = logits.argmax(dim=-1)
        supervised = loss_ext[:, :-1].bool() & real_ext[:, :-1].bool() & real_ext[:, 1:].bool()
        return _Teacher(
            probs=torch.softmax(on_draft, dim=-1),
            mass_on_draft=torch.exp(on_draft - torch.logsumexp(logits, dim=-1, keepdim=True)),
            argmax=argmax,
            supervised=supervised,
            in_draft=supervised & self.draft.t2d[argmax],
        )

    def forward(
        self,
        tensors: Mapping[str, torch.Tensor],
        *,
        loss_denominator: float | torch.Tensor | None = None,
    ) -> StepOutput:
        """Evaluate the TTT objective on one batch (see the module docstring).

        ``loss_denominator`` overrides ``N`` (e.g. the real-token count of a whole
        data-parallel accumulation window, so per-rank losses add up to the global one).
        """
        cfg = self.config
        attention_mask = self._check_batch(tensors)
        ex = self.exchange
        steps = cfg.ttt_length
        ids = tensors["input_ids"].to(torch.int64)
        local_len = ids.shape[1]
        ids_ext = self._extend(ids)
        real_ext = self._extend(attention_mask.to(torch.int64))
        teacher = self._teacher(
            self._extend(tensors["hidden_state"]),
            self._extend(tensors["loss_mask"].to(torch.int64)),
            real_ext,
        )
        with torch.no_grad():
            embeds = [
                self.target_embedding(ids_ext[:, 1 + k : 1 + k + local_len]) for k in range(steps)
            ]
        all_logits = self.draft(
            tensors["aux_hidden_state"], embeds, ex.gather_sequence(attention_mask), ex
        )
        draft_ids = draft_to_target_ids(self.draft.d2t)
        sample_num = torch.zeros(ids.shape[0], dtype=torch.float32, device=ids.device)
        counts: dict[str, torch.Tensor] = {}
        for k, (weight, logits) in enumerate(zip(cfg.step_weights, all_logits, strict=True)):
            rows = slice(k, k + local_len)
            log_q = F.log_softmax(logits.float(), dim=-1)
            in_draft = teacher.in_draft[:, rows].float()
            per_position = -(teacher.probs[:, rows] * log_q).sum(-1) * in_draft
            per_sample = per_position.sum(1)
            sample_num = sample_num + weight * per_sample
            with torch.no_grad():
                supervised = teacher.supervised[:, rows]
                predicted = draft_ids[logits.argmax(-1)]
                correct = (predicted == teacher.argmax[:, rows]) & supervised
                accept = torch.minimum(teacher.mass_on_draft[:, rows], log_q.exp()).sum(-1)
                counts[f"ploss_sum_{k}"] = per_sample.detach().sum()
                counts[f"acc_correct_{k}"] = correct.sum()
                counts[f"acc_total_{k}"] = supervised.sum()
                counts[f"accept_sum_{k}"] = (accept * in_draft).sum()
                counts[f"accept_total_{k}"] = in_draft.sum()
        sample_tokens = attention_mask.to(torch.float64).sum(1)
        counts["tokens"] = sample_tokens.sum()
        counts = {name: ex.sum(value.to(torch.float64)) for name, value in counts.items()}
        denominator = (
            counts["tokens"].clamp(min=1) if loss_denominator is None else loss_denominator
        )
        loss = sample_num.sum() / torch.as_tensor(denominator, dtype=torch.float32)
        with torch.no_grad():
            totals = ex.sum(torch.stack([sample_num.detach().double(), sample_tokens]))
            sample_loss = totals[0] / totals[1].clamp(min=1)
        return StepOutput(
            loss=loss,
            metrics=metrics_from_counts(counts, cfg.step_weights),
            counts=counts,
            sample_loss=sample_loss,
        )
