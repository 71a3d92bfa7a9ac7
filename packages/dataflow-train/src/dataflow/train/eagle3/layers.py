"""Building blocks of the EAGLE3 draft: RMSNorm, RoPE, the TTT-cached attention, SwiGLU MLP.

Tensor names follow SGLang's ``llama_eagle3`` module tree (``self_attn.q_proj`` …,
``mlp.gate_proj`` …) so that exported weights load there by name.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from dataflow.train.eagle3.config import Eagle3Config
from dataflow.train.eagle3.sequence import SequenceExchange


class RMSNorm(nn.Module):
    """``weight * x / sqrt(mean(x^2) + eps)``, computed in fp32 and returned in ``x``'s dtype."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight.float() * normed).to(x.dtype)


def rotary_tables(
    positions: torch.Tensor, head_dim: int, theta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos`` and ``sin`` of the default (unscaled) Llama RoPE, fp32 ``[T, head_dim]``."""
    exponent = torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim
    inv_freq = 1.0 / (theta**exponent)
    angles = positions.to(torch.float32)[:, None] * inv_freq[None, :]
    both = torch.cat([angles, angles], dim=-1)
    return both.cos(), both.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ``[B, T, h, D]`` by the tables (NeoX / HF "rotate half" layout)."""
    x32 = x.float()
    half = x32.shape[-1] // 2
    rotated = torch.cat([-x32[..., half:], x32[..., :half]], dim=-1)
    out = x32 * cos[None, :, None, :] + rotated * sin[None, :, None, :]
    return out.to(x.dtype)


class TTTCache:
    """Keys and values of the earlier TTT steps of one forward, in head-sharded layout.

    ``allowed`` is the step-0 mask ``[B, T, T]``: query ``t`` sees key ``s`` iff ``s <= t`` and
    ``s`` is a real token, and always sees itself (so no row is empty).
    """

    def __init__(self, attention_mask_full: torch.Tensor) -> None:
        seq = attention_mask_full.shape[1]
        idx = torch.arange(seq, device=attention_mask_full.device)
        causal = idx[None, :] <= idx[:, None]
        real = attention_mask_full.bool()[:, None, :]
        self.allowed = (causal[None] & real) | torch.eye(seq, dtype=torch.bool, device=idx.device)
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []


class Eagle3Attention(nn.Module):
    """Self-attention over ``[embedding ‖ hidden]`` (2H input) with the TTT key/value cache.

    At TTT step ``k`` a query at position ``t`` (RoPE position ``t + k``) attends to the step-0
    keys at positions ``<= t`` plus, for each step ``1..k``, the key of that step at the same
    position ``t``. With a sharded :class:`SequenceExchange` the projections run on the local
    positions and the attention itself on the full sequence for a slice of the heads (Ulysses).
    """

    def __init__(self, config: Eagle3Config) -> None:
        super().__init__()
        h, d = config.num_attention_heads, config.head_dim
        kvh = config.num_key_value_heads
        self.num_heads, self.num_kv_heads, self.head_dim = h, kvh, d
        self.rope_theta = config.rope_theta
        self.q_proj = nn.Linear(2 * config.hidden_size, h * d, bias=False)
        self.k_proj = nn.Linear(2 * config.hidden_size, kvh * d, bias=False)
        self.v_proj = nn.Linear(2 * config.hidden_size, kvh * d, bias=False)
        self.o_proj = nn.Linear(h * d, config.hidden_size, bias=False)

    def forward(
        self, x: torch.Tensor, step: int, cache: TTTCache, exchange: SequenceExchange
    ) -> torch.Tensor:
        batch, local_len, _ = x.shape
        h, kvh, d = self.num_heads, self.num_kv_heads, self.head_dim
        q = self.q_proj(x).view(batch, local_len, h, d)
        k = self.k_proj(x).view(batch, local_len, kvh, d)
        v = self.v_proj(x).view(batch, local_len, kvh, d)
        if exchange.world > 1 and kvh % exchange.world:
            # KV heads cannot be split evenly: give every query head its own copy first.
            k = k.repeat_interleave(h // kvh, dim=2)
            v = v.repeat_interleave(h // kvh, dim=2)
        q = exchange.heads_from_sequence(q)
        k = exchange.heads_from_sequence(k)
        v = exchange.heads_from_sequence(v)
        seq = q.shape[1]
        positions = torch.arange(seq, device=x.device) + step
        cos, sin = rotary_tables(positions, d, self.rope_theta)
        q = apply_rotary(q, cos, sin)
        k = apply_rotary(k, cos, sin)
        group = q.shape[2] // k.shape[2]
        k = k.repeat_interleave(group, dim=2)
        v = v.repeat_interleave(group, dim=2)
        cache.keys.append(k)
        cache.values.append(v)
        out = self._attend(q, cache)
        out = exchange.sequence_from_heads(out)
        return self.o_proj(out.reshape(batch, local_len, h * d))

    def _attend(self, q: torch.Tensor, cache: TTTCache) -> torch.Tensor:
        """Softmax over step-0 causal keys plus the same-position keys of steps 1..k, in fp32."""
        # Autocast would run the score einsum in bf16 despite the fp32 inputs.
        with torch.autocast(device_type=q.device.type, enabled=False):
            return self._attend_fp32(q, cache)

    def _attend_fp32(self, q: torch.Tensor, cache: TTTCache) -> torch.Tensor:
        scale = 1.0 / math.sqrt(self.head_dim)
        k0, v0 = cache.keys[0], cache.values[0]
        scores = torch.einsum("bthd,bshd->bhts", q.float(), k0.float()) * scale
        scores = scores.masked_fill(~cache.allowed[:, None, :, :], float("-inf"))
        diagonal = [
            (q.float() * kj.float()).sum(-1).permute(0, 2, 1)[..., None] * scale
            for kj in cache.keys[1:]
        ]
        probs = torch.softmax(torch.cat([scores, *diagonal], dim=-1), dim=-1)
        seq = k0.shape[1]
        out = torch.einsum("bhts,bshd->bthd", probs[..., :seq], v0.float())
        for j, vj in enumerate(cache.values[1:]):
            out = out + probs[..., seq + j].permute(0, 2, 1)[..., None] * vj.float()
        return out.to(q.dtype)


class SwiGLU(nn.Module):
    """``down(silu(gate(x)) * up(x))`` without biases."""

    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Eagle3DecoderLayer(nn.Module):
    """The draft's single decoder layer ("midlayer").

    ``out = h + attn([input_layernorm(emb) ‖ hidden_norm(h)])``, then
    ``out = out + mlp(post_attention_layernorm(out))``; the residual is the un-normalised hidden.
    """

    def __init__(self, config: Eagle3Config) -> None:
        super().__init__()
        hidden, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = RMSNorm(hidden, eps)
        self.hidden_norm = RMSNorm(hidden, eps)
        self.self_attn = Eagle3Attention(config)
        self.post_attention_layernorm = RMSNorm(hidden, eps)
        self.mlp = SwiGLU(hidden, config.intermediate_size)

    def forward(
        self,
        embeds: torch.Tensor,
        hidden: torch.Tensor,
        step: int,
        cache: TTTCache,
        exchange: SequenceExchange,
    ) -> torch.Tensor:
        joined = torch.cat([self.input_layernorm(embeds), self.hidden_norm(hidden)], dim=-1)
        out = hidden + self.self_attn(joined, step, cache, exchange)
        return out + self.mlp(self.post_attention_layernorm(out))
