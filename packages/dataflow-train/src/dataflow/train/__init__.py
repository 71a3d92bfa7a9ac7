"""dataflow.train — see this package's README for what it owns."""

from dataflow.train.checkpoint import CheckpointInfo, CheckpointManager
from dataflow.train.collate import collate
from dataflow.train.config import TrainerConfig
from dataflow.train.distributed import (
    DistributedContext,
    FailTogether,
    LocalCollective,
    TorchCollective,
    init_distributed,
    shutdown_distributed,
)
from dataflow.train.hooks import (
    AckHook,
    ControlPlaneHook,
    HookContext,
    LedgerAck,
    RetainedAck,
    StepEvent,
    TrainerHook,
    WeightPublishHook,
)
from dataflow.train.loader import FeatureDataLoader
from dataflow.train.metrics import JsonlMetrics, MetricsSink, TensorBoardMetrics, default_metrics
from dataflow.train.optim import OptimConfig, WarmupCosineSchedule, build_adamw
from dataflow.train.parallel.backend import LocalBackend, TrainBackend
from dataflow.train.parallel.fsdp import FSDPBackend
from dataflow.train.ref_sources import AbortSettler, LedgerDropSettler, RefSettler
from dataflow.train.trainer import FitResult, Trainer
from dataflow.train.version import __version__

__all__ = [
    "__version__",
    # trainer infrastructure
    "AbortSettler",
    "AckHook",
    "CheckpointInfo",
    "CheckpointManager",
    "ControlPlaneHook",
    "DistributedContext",
    "FSDPBackend",
    "FailTogether",
    "FeatureDataLoader",
    "FitResult",
    "HookContext",
    "JsonlMetrics",
    "LedgerAck",
    "LedgerDropSettler",
    "LocalBackend",
    "LocalCollective",
    "MetricsSink",
    "OptimConfig",
    "RefSettler",
    "RetainedAck",
    "StepEvent",
    "TensorBoardMetrics",
    "TorchCollective",
    "TrainBackend",
    "Trainer",
    "TrainerConfig",
    "TrainerHook",
    "WarmupCosineSchedule",
    "WeightPublishHook",
    "build_adamw",
    "collate",
    "default_metrics",
    "init_distributed",
    "shutdown_distributed",
]
