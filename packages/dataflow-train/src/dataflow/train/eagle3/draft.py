"""Eagle3DraftModel: ``fc`` over the captured layers, one decoder layer, norm, draft-vocab head.

Parameter and buffer names are the ones SGLang's ``LlamaForCausalLMEagle3`` loads
(``fc.weight``, ``midlayer.*``, ``norm.weight``, ``lm_head.weight``, ``d2t``, ``t2d``); the token
embedding is *not* part of the draft: it is the target's, frozen, and held by
:class:`~dataflow.train.eagle3.objective.Eagle3Objective`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from dataflow.contracts.errors import InvalidInputError
from dataflow.train.eagle3.config import Eagle3Config
from dataflow.train.eagle3.layers import Eagle3DecoderLayer, RMSNorm, TTTCache
from dataflow.train.eagle3.sequence import LocalSequence, SequenceExchange

INIT_STD = 0.02


class Eagle3DraftModel(nn.Module):
    """The trainable EAGLE3 draft.

    Guarantees: the same ``config`` and ``seed`` give bit-identical initial weights (the global
    RNG is neither read nor advanced); ``forward`` runs the whole TTT unroll in one call (so an
    FSDP2 unit wrapping this module sees one forward per training step); buffers ``d2t``
    (int64 ``[draft_vocab]``) and ``t2d`` (bool ``[target_vocab]``) start as the identity map of the
    first ``draft_vocab`` target ids until :meth:`set_vocab_map` installs a real one.
    """

    d2t: torch.Tensor
    t2d: torch.Tensor

    def __init__(self, config: Eagle3Config, *, seed: int = 0) -> None:
        super().__init__()
        self.config = config
        h = config.hidden_size
        # torch's default module init draws from the global RNG; keep the caller's stream intact.
        with torch.random.fork_rng(devices=[]):
            self.fc = nn.Linear(3 * h, h, bias=False)
            self.midlayer = Eagle3DecoderLayer(config)
            self.norm = RMSNorm(h, config.rms_norm_eps)
            self.lm_head = nn.Linear(h, config.draft_vocab_size, bias=False)
        self.register_buffer("d2t", torch.zeros(config.draft_vocab_size, dtype=torch.int64))
        t2d = torch.zeros(config.vocab_size, dtype=torch.bool)
        t2d[: config.draft_vocab_size] = True
        self.register_buffer("t2d", t2d)
        self.reset_parameters(seed)

    def reset_parameters(self, seed: int) -> None:
        """Re-initialise every weight from ``seed``: linears ~ N(0, 0.02), norms = 1."""
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, param in sorted(self.named_parameters()):
                if name.endswith("norm.weight"):
                    param.fill_(1.0)
                else:
                    sample = torch.randn(param.shape, generator=gen, dtype=torch.float32)
                    param.copy_(sample * INIT_STD)

    def set_vocab_map(self, d2t: torch.Tensor, t2d: torch.Tensor) -> None:
        """Install a vocabulary map from :func:`~dataflow.train.eagle3.vocab.build_vocab_map`.

        Refuses (with :class:`InvalidInputError`, buffers unchanged) maps of the wrong shape or
        dtype, or whose ``d2t`` target ids disagree with the set marked in ``t2d``.
        """
        cfg = self.config
        if tuple(d2t.shape) != (cfg.draft_vocab_size,) or d2t.dtype != torch.int64:
            raise InvalidInputError(
                f"d2t must be int64 [{cfg.draft_vocab_size}], got {d2t.dtype} {tuple(d2t.shape)}"
            )
        if tuple(t2d.shape) != (cfg.vocab_size,) or t2d.dtype != torch.bool:
            raise InvalidInputError(
                f"t2d must be bool [{cfg.vocab_size}], got {t2d.dtype} {tuple(t2d.shape)}"
            )
        ids = torch.arange(cfg.draft_vocab_size) + d2t.cpu()
        if int(ids.min()) < 0 or int(ids.max()) >= cfg.vocab_size:
            raise InvalidInputError("d2t maps a draft id outside the target vocabulary")
        expected = torch.zeros(cfg.vocab_size, dtype=torch.bool)
        expected[ids] = True
        if ids.unique().numel() != ids.numel() or not torch.equal(expected, t2d.cpu()):
            raise InvalidInputError("d2t and t2d disagree: t2d must mark exactly d2t's target ids")
        with torch.no_grad():
            self.d2t.copy_(d2t)
            self.t2d.copy_(t2d)

    def forward(
        self,
        aux_hidden: torch.Tensor,
        step_embeds: Sequence[torch.Tensor],
        attention_mask_full: torch.Tensor,
        exchange: SequenceExchange | None = None,
    ) -> list[torch.Tensor]:
        """Run the TTT unroll; return the draft logits ``[B, L, draft_vocab]`` of every step.

        ``aux_hidden`` is the local chunk of the three captured layers ``[B, L, 3H]``;
        ``step_embeds[k]`` the (frozen) embeddings of the inputs of step ``k`` ``[B, L, H]``;
        ``attention_mask_full`` the key mask of the *whole* sequence ``[B, T]``. Each step's layer
        output becomes the next step's hidden input.
        """
        exchange = exchange or LocalSequence()
        dtype = self.fc.weight.dtype
        hidden = self.fc(aux_hidden.to(dtype))
        cache = TTTCache(attention_mask_full)
        logits = []
        for step, embeds in enumerate(step_embeds):
            hidden = self.midlayer(embeds.to(dtype), hidden, step, cache, exchange)
            logits.append(self.lm_head(self.norm(hidden)))
        return logits
