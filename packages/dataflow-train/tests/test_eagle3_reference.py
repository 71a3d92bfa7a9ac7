"""EAGLE3 loss, gradients and metrics against a plain reference written with explicit loops.

The reference below shares no code with ``dataflow.train.eagle3``: it reads the draft's weights
by name and recomputes everything one sample, one TTT step, one position and one head at a time,
straight from the published description (EAGLE shift, TTT attention over step-0 causal keys plus
same-position keys of later steps, soft cross-entropy against the teacher restricted to the
draft vocabulary, 0.8^k step weights).
"""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from dataflow.train.eagle3 import Eagle3Config, Eagle3Objective, build_vocab_map

H, HEADS, KV_HEADS, HEAD_DIM, VOCAB, DRAFT_VOCAB = 32, 4, 2, 8, 97, 31


def make_config(ttt_length: int) -> Eagle3Config:
    return Eagle3Config(
        hidden_size=H,
        intermediate_size=48,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        vocab_size=VOCAB,
        draft_vocab_size=DRAFT_VOCAB,
        target_layers=(1, 2, 4),
        ttt_length=ttt_length,
        rope_theta=10000.0,
    )


def make_batch(lengths: list[int], seed: int) -> dict[str, torch.Tensor]:
    """Right-padded batch; loss_mask zero on a prefix (the "prompt") and on padding."""
    gen = torch.Generator().manual_seed(seed)
    batch, total = len(lengths), max(lengths)
    ids = torch.randint(0, VOCAB, (batch, total), generator=gen)
    attention = torch.zeros(batch, total, dtype=torch.int64)
    loss = torch.zeros(batch, total, dtype=torch.int64)
    for b, n in enumerate(lengths):
        attention[b, :n] = 1
        loss[b, n // 3 : n] = 1
    hidden = torch.randn(batch, total, H, generator=gen) * 3.0
    aux = torch.randn(batch, total, 3 * H, generator=gen)
    pad = (attention == 0)[..., None]
    return {
        "input_ids": ids.masked_fill(attention == 0, 0),
        "loss_mask": loss,
        "attention_mask": attention,
        "hidden_state": hidden.masked_fill(pad, 0.0),
        "aux_hidden_state": aux.masked_fill(pad, 0.0),
    }


def make_objective(
    ttt_length: int, batch: dict[str, torch.Tensor], warm_steps: int
) -> Eagle3Objective:
    """A draft whose vocabulary holds about half the teacher's argmax tokens, trained a few steps
    on ``batch`` so that accuracy and acceptance are far from zero."""
    objective = Eagle3Objective(make_config(ttt_length), seed=3)
    teacher = (batch["hidden_state"] @ objective.target_head.weight.T).argmax(-1)
    counts = Counter(batch["input_ids"].flatten().tolist())
    for token in teacher[:, ::2].flatten().tolist():
        counts[token] += 100
    objective.set_vocab_map(*build_vocab_map(dict(counts), VOCAB, DRAFT_VOCAB))
    optimizer = torch.optim.Adam(objective.trainable_parameters(), lr=3e-2)
    for _ in range(warm_steps):
        optimizer.zero_grad()
        objective(batch).loss.backward()
        optimizer.step()
    optimizer.zero_grad()
    return objective


# --------------------------------------------------------------------------------------------
# The reference.


def ref_rms(x, w, eps):
    return w * (x / torch.sqrt((x * x).mean() + eps))


def ref_rope(vec, pos, theta):
    """Rotate pairs (i, i + D/2) by pos * theta^(-2i/D)."""
    half = vec.shape[0] // 2
    out = []
    for i in range(half):
        angle = pos * theta ** (-2.0 * i / vec.shape[0])
        out.append(vec[i] * math.cos(angle) - vec[i + half] * math.sin(angle))
    for i in range(half):
        angle = pos * theta ** (-2.0 * i / vec.shape[0])
        out.append(vec[i + half] * math.cos(angle) + vec[i] * math.sin(angle))
    return torch.stack(out)


def reference(params, frozen, batch, cfg):
    """Return (loss, per-step ploss, acc and acceptance lists) by explicit loops."""
    eps, theta, steps = cfg.rms_norm_eps, cfg.rope_theta, cfg.ttt_length
    embed, head, d2t, t2d = frozen["embed"], frozen["head"], frozen["d2t"], frozen["t2d"]
    draft_ids = [i + int(d2t[i]) for i in range(DRAFT_VOCAB)]
    group = HEADS // KV_HEADS
    batch_size, total = batch["input_ids"].shape
    ploss_num = [0.0] * steps
    correct = [0] * steps
    acc_den = [0] * steps
    accept_num = [0.0] * steps
    accept_den = [0] * steps
    tokens = int(batch["attention_mask"].sum())

    for b in range(batch_size):
        ids = batch["input_ids"][b].tolist()
        real = batch["attention_mask"][b].tolist()
        lmask = batch["loss_mask"][b].tolist()

        def token(i, ids=ids):
            return ids[i] if i < total else 0

        def is_real(i, real=real):
            return i < total and real[i] == 1

        def last_hidden(i, b=b):
            return batch["hidden_state"][b, i] if i < total else torch.zeros(H)

        hidden = [params["fc.weight"] @ batch["aux_hidden_state"][b, t] for t in range(total)]
        keys, values = [], []  # per step: list over positions of [KV_HEADS, D]
        for k in range(steps):
            qs, ks, vs = [], [], []
            for t in range(total):
                e = embed[token(t + 1 + k)]
                x = torch.cat(
                    [
                        ref_rms(e, params["midlayer.input_layernorm.weight"], eps),
                        ref_rms(hidden[t], params["midlayer.hidden_norm.weight"], eps),
                    ]
                )
                q = (params["midlayer.self_attn.q_proj.weight"] @ x).view(HEADS, HEAD_DIM)
                kk = (params["midlayer.self_attn.k_proj.weight"] @ x).view(KV_HEADS, HEAD_DIM)
                v = (params["midlayer.self_attn.v_proj.weight"] @ x).view(KV_HEADS, HEAD_DIM)
                qs.append(torch.stack([ref_rope(q[i], t + k, theta) for i in range(HEADS)]))
                ks.append(torch.stack([ref_rope(kk[i], t + k, theta) for i in range(KV_HEADS)]))
                vs.append(v)
            keys.append(ks)
            values.append(vs)
            new_hidden = []
            for t in range(total):
                head_outputs = []
                for hh in range(HEADS):
                    kv = hh // group
                    scores, vals = [], []
                    for s in range(total):
                        if (s <= t and is_real(s)) or s == t:
                            scores.append(qs[t][hh] @ keys[0][s][kv] / math.sqrt(HEAD_DIM))
                            vals.append(values[0][s][kv])
                    for j in range(1, k + 1):
                        scores.append(qs[t][hh] @ keys[j][t][kv] / math.sqrt(HEAD_DIM))
                        vals.append(values[j][t][kv])
                    weights = torch.softmax(torch.stack(scores), dim=0)
                    head_outputs.append(sum(w * val for w, val in zip(weights, vals, strict=True)))
                attn = params["midlayer.self_attn.o_proj.weight"] @ torch.cat(head_outputs)
                h1 = hidden[t] + attn
                n1 = ref_rms(h1, params["midlayer.post_attention_layernorm.weight"], eps)
                gate = params["midlayer.mlp.gate_proj.weight"] @ n1
                up = params["midlayer.mlp.up_proj.weight"] @ n1
                h2 = h1 + params["midlayer.mlp.down_proj.weight"] @ (
                    gate * torch.sigmoid(gate) * up
                )
                new_hidden.append(h2)
                logits = params["lm_head.weight"] @ ref_rms(h2, params["norm.weight"], eps)
                log_q = torch.log_softmax(logits, dim=0)

                p_row = t + k  # the position this step predicts after
                z = head @ last_hidden(p_row + 1)
                teacher_token = int(torch.argmax(z))
                z_draft = torch.stack([z[i] for i in draft_ids])
                p = torch.softmax(z_draft, dim=0)
                supervised = p_row < total and lmask[p_row] == 1
                supervised = supervised and is_real(p_row) and is_real(p_row + 1)
                if supervised:
                    acc_den[k] += 1
                    correct[k] += int(draft_ids[int(torch.argmax(logits))] == teacher_token)
                if supervised and bool(t2d[teacher_token]):
                    ploss_num[k] = ploss_num[k] - (p * log_q).sum()
                    mass = torch.exp(z_draft - torch.logsumexp(z, dim=0))
                    accept_num[k] += float(torch.minimum(mass, torch.exp(log_q.detach())).sum())
                    accept_den[k] += 1
            hidden = new_hidden
    ploss = [n / tokens for n in ploss_num]
    loss = sum(cfg.ttt_decay**k * ploss[k] for k in range(steps))
    acc = [c / d if d else 0.0 for c, d in zip(correct, acc_den, strict=True)]
    acceptance = [n / d if d else 0.0 for n, d in zip(accept_num, accept_den, strict=True)]
    return loss, ploss, acc, acceptance


def as_float(x) -> float:
    return float(x.detach()) if isinstance(x, torch.Tensor) else float(x)


@pytest.mark.parametrize("ttt_length", [1, 3])
def test_loss_gradients_and_metrics_match_the_loop_reference(ttt_length):
    batch = make_batch([10, 7], seed=ttt_length)
    objective = make_objective(ttt_length, batch, warm_steps=12)
    out = objective(batch)
    out.loss.backward()

    params = {
        name: p.detach().clone().requires_grad_(True)
        for name, p in objective.draft.named_parameters()
    }
    frozen = {
        "embed": objective.target_embedding.weight.detach(),
        "head": objective.target_head.weight.detach(),
        "d2t": objective.draft.d2t,
        "t2d": objective.draft.t2d,
    }
    ref_loss, ref_ploss, ref_acc, ref_accept = reference(params, frozen, batch, objective.config)
    names = sorted(params)
    ref_grads = torch.autograd.grad(ref_loss, [params[n] for n in names])

    torch.testing.assert_close(out.loss.detach(), ref_loss.detach(), rtol=1e-5, atol=1e-6)
    for name, ref_grad in zip(names, ref_grads, strict=True):
        grad = dict(objective.draft.named_parameters())[name].grad
        assert grad is not None, name
        assert float(ref_grad.abs().max()) > 0, f"reference gradient of {name} is all zero"
        torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-6, msg=name)
    for k in range(ttt_length):
        assert out.metrics[f"ploss_{k}"].item() == pytest.approx(as_float(ref_ploss[k]), rel=1e-5)
        assert out.metrics[f"acc_{k}"].item() == pytest.approx(ref_acc[k], abs=1e-9)
        assert out.metrics[f"acceptance_rate_{k}"].item() == pytest.approx(ref_accept[k], rel=1e-5)
    assert out.metrics["loss"].item() == pytest.approx(as_float(ref_loss), rel=1e-5)
    # The comparison covered real work: accuracy, acceptance and the draft-vocab mask all bite.
    assert 0 < out.metrics["acc_0"].item() < 1
    assert 0 < out.counts["accept_total_0"].item() < out.counts["acc_total_0"].item()
