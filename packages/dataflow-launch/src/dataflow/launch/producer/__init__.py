"""The rollout producer: lease prompts, capture target features, put them, commit refs."""

from dataflow.launch.producer.factory import (
    admission_factory,
    build_producer,
    engine_regeneration,
    flow_limits,
    ledger_options,
    open_config_ledger,
    open_config_store,
    open_run_engine,
    regenerate_tokens,
    store_options,
)
from dataflow.launch.producer.producer import RolloutProducer
from dataflow.launch.producer.report import ProducerReport, WorkerReport
from dataflow.launch.producer.settings import ProducerSettings
from dataflow.launch.producer.worker import RolloutWorker, pool_drained

__all__ = [
    "admission_factory",
    "build_producer",
    "engine_regeneration",
    "open_run_engine",
    "regenerate_tokens",
    "flow_limits",
    "ledger_options",
    "open_config_ledger",
    "open_config_store",
    "store_options",
    "ProducerReport",
    "ProducerSettings",
    "RolloutProducer",
    "RolloutWorker",
    "WorkerReport",
    "pool_drained",
]
