"""The trainer step of ``session.py``, one rank per GPU under ``torchrun`` (NCCL, FSDP2 bf16).

``session_train.py WORK``: reads ``WORK/config.json`` (a launch config over the saved target)
and the hf features in ``WORK/features/*.safetensors``, trains the draft on them
(``REPEATS`` passes, batch 1), and on rank 0 writes ``WORK/train_result.json`` (samples/s,
tokens/s, MFU, mean loss of the first and last quarter of steps, the optimizer's parameter dtypes) and exports the draft in
SGLang's EAGLE3 format to ``WORK/draft``. The timed span is ``trainer.fit()`` between CUDA
synchronisations, warm-up steps included (a conservative figure).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

REPEATS = 6
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0}
"""Dense bf16 tensor-core peak per device family (vendor data sheets, no sparsity)."""


def peak_flops() -> float | None:
    """Peak bf16 FLOP/s of this device: ``DATAFLOW_GPU_PEAK_TFLOPS`` or its name's family."""
    if os.environ.get("DATAFLOW_GPU_PEAK_TFLOPS"):
        return float(os.environ["DATAFLOW_GPU_PEAK_TFLOPS"]) * 1e12
    name = torch.cuda.get_device_name()
    for family, tflops in PEAK_TFLOPS.items():
        if family in name:
            return tflops * 1e12
    return None


def main() -> None:
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        set_model_state_dict,
    )

    from dataflow.launch.builders.common import trainer_objective
    from dataflow.launch.config import LaunchConfig
    from dataflow.store import open_store
    from dataflow.train.config import TrainerConfig
    from dataflow.train.distributed import init_distributed, shutdown_distributed
    from dataflow.train.export import export_draft
    from dataflow.train.loader import FeatureDataLoader
    from dataflow.train.metrics import JsonlMetrics
    from dataflow.train.optim import OptimConfig
    from dataflow.train.parallel.fsdp import FSDPBackend
    from dataflow.train.trainer import Trainer

    work = Path(sys.argv[1])
    config = LaunchConfig.model_validate(json.loads((work / "config.json").read_text()))
    context = init_distributed()
    assert context.device.type == "cuda", context.device
    ok = False
    try:
        objective = trainer_objective(config)
        trainable = sum(p.numel() for p in objective.parameters() if p.requires_grad)
        store = open_store("memory://gpu-session", retain_on_release=True)
        files = sorted((work / "features").glob("*.safetensors"))
        refs, tokens = [], 0
        for rep in range(REPEATS):
            for path in files:
                tensors = load_file(str(path))
                tokens += int(tensors["input_ids"].shape[-1])
                refs.append(store.put(f"{path.stem}-r{rep}", tensors))
        loader = FeatureDataLoader(
            store, refs=refs, batch_size=1, seed=0, rank=context.rank, world_size=context.world_size
        )
        trainer = Trainer(
            objective,
            loader,
            TrainerConfig(
                run_id="gpu-session",
                optim=OptimConfig(lr=config.trainer.lr, warmup_steps=2, max_grad_norm=0.5),
                seed=0,
                progress=False,
            ),
            backend=FSDPBackend(context, "bf16"),
            metrics=JsonlMetrics(work / "metrics.jsonl") if context.rank == 0 else None,
        )
        torch.cuda.synchronize()
        start = time.perf_counter()
        trainer.fit()
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        full = get_model_state_dict(
            trainer.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
        if context.rank == 0:
            rows = [json.loads(x) for x in (work / "metrics.jsonl").read_text().splitlines() if x]
            losses = [r["loss"] for r in rows if "loss" in r]
            window = max(1, len(losses) // 4)  # mean of the first and last quarter of steps
            peak = peak_flops()
            flops = 6.0 * trainable * tokens * config.trainer.ttt_length
            dtypes = sorted({str(p.dtype) for p in trainer.model.parameters() if p.requires_grad})
            result = {
                "samples_per_s": len(refs) / seconds,
                "tokens_per_s": tokens / seconds,
                "mfu": flops / (seconds * peak) if peak else None,
                "seconds": seconds,
                "trainable_params": trainable,
                "loss_first": sum(losses[:window]) / window,
                "loss_last": sum(losses[-window:]) / window,
                "dtypes": ",".join(d.removeprefix("torch.") for d in dtypes),
            }
            fresh = trainer_objective(config)
            set_model_state_dict(fresh, full)
            export_draft(fresh, work / "draft", fmt="sglang")
            (work / "train_result.json").write_text(json.dumps(result))
        ok = True
    finally:
        shutdown_distributed(ok)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
