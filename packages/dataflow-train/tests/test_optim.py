import math

import pytest
import torch

from dataflow.contracts import InvalidInputError
from dataflow.train.optim import OptimConfig, WarmupCosineSchedule, build_adamw
from dataflow.train.parallel.backend import LocalBackend


def _opt(lr=1.0):
    return build_adamw([torch.nn.Parameter(torch.zeros(2))], OptimConfig(lr=lr))


def test_warmup_then_cosine_to_the_floor():
    config = OptimConfig(lr=2.0, warmup_steps=2, min_lr_ratio=0.1)
    opt = _opt()
    schedule = WarmupCosineSchedule(opt, config, total_steps=6)
    rates = []
    for _ in range(8):
        rates.append(opt.param_groups[0]["lr"])
        schedule.step()
    assert rates[:2] == [1.0, 2.0]  # (s+1)/warmup * lr
    assert rates[2] == pytest.approx(2.0)  # cosine starts at the peak
    mid = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 2 / 4))
    assert rates[4] == pytest.approx(2.0 * mid)
    assert rates[6] == rates[7] == pytest.approx(0.2)  # floor past the horizon


def test_schedule_state_round_trips_and_refuses_another_schedule():
    config = OptimConfig(lr=1.0, warmup_steps=1)
    a = WarmupCosineSchedule(_opt(), config, total_steps=10)
    for _ in range(3):
        a.step()
    opt = _opt()
    b = WarmupCosineSchedule(opt, config, total_steps=10)
    b.load_state_dict(a.state_dict())
    assert b.lr == a.lr == opt.param_groups[0]["lr"]
    c = WarmupCosineSchedule(_opt(), config, total_steps=12)
    with pytest.raises(InvalidInputError, match="total_steps: saved 10, now 12"):
        c.load_state_dict(a.state_dict())
    assert c.state_dict()["steps_done"] == 0


def test_config_and_schedule_refuse_bad_values():
    with pytest.raises(InvalidInputError, match="lr must be a positive number"):
        OptimConfig(lr=0.0)
    with pytest.raises(InvalidInputError, match="max_grad_norm must be positive"):
        OptimConfig(max_grad_norm=0.0)
    with pytest.raises(InvalidInputError, match=r"warmup_steps \(5\) exceeds total_steps \(3\)"):
        WarmupCosineSchedule(_opt(), OptimConfig(warmup_steps=5), total_steps=3)
    with pytest.raises(InvalidInputError, match="no trainable parameters"):
        build_adamw([], OptimConfig())


def test_clipping_scales_to_the_global_norm_and_reports_the_pre_clip_norm():
    a = torch.nn.Parameter(torch.zeros(2))
    b = torch.nn.Parameter(torch.zeros(1))
    a.grad, b.grad = torch.tensor([3.0, 0.0]), torch.tensor([4.0])
    norm = LocalBackend().clip_grad_norm([a, b], max_norm=1.0)
    assert norm == pytest.approx(5.0)
    total = torch.cat([a.grad, b.grad]).norm().item()
    assert total == pytest.approx(1.0, rel=1e-5)
    assert LocalBackend().clip_grad_norm([a, b], max_norm=None) == pytest.approx(total)
