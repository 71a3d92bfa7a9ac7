"""Building the producer's pieces from a LaunchConfig: ledger, store, flow limits, admission."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from dataflow.contracts import FeatureStore, InvalidInputError, Ledger
from dataflow.contracts.uris import parse_ledger_uri
from dataflow.control import open_ledger
from dataflow.control.flow import FlowLimits
from dataflow.control.gate import StalenessAdmission
from dataflow.control.staleness import StalenessPolicy, WeightRegistry
from dataflow.launch.config import LaunchConfig
from dataflow.launch.engines import Regeneration, TargetEngine, open_engine
from dataflow.launch.producer.producer import RolloutProducer
from dataflow.launch.producer.settings import ProducerSettings
from dataflow.store import open_store


def ledger_options(config: LaunchConfig) -> dict[str, Any]:
    """``open_ledger`` keyword options for the configured ledger's backend."""
    scheme = parse_ledger_uri(config.ledger.uri).scheme
    if scheme == "noop":
        return {}
    options: dict[str, Any] = {"max_prompt_attempts": config.producer.max_attempts}
    if scheme == "sqlite":
        options["busy_timeout_s"] = config.ledger.options.timeout_s
    elif scheme == "redis":
        options["connect_timeout_s"] = config.ledger.options.timeout_s
    return options


def open_config_ledger(config: LaunchConfig) -> Ledger:
    """The run's ledger, opened from ``config.ledger``."""
    return open_ledger(config.ledger.uri, **ledger_options(config))


def store_options(config: LaunchConfig) -> dict[str, Any]:
    """``open_store`` keyword options from ``config.store.options`` (unset ones left out)."""
    opts = config.store.options
    options: dict[str, Any] = {}
    if opts.budget_bytes is not None:
        options["budget_bytes"] = opts.budget_bytes
    if opts.max_age_s is not None:
        options["max_age_s"] = opts.max_age_s
    if opts.token is not None:
        if not config.store.uri.startswith("dir://"):
            raise InvalidInputError("store.options.token: only dir:// stores take a token")
        options["token"] = opts.token
    return options


def open_config_store(config: LaunchConfig) -> FeatureStore:
    """The run's feature store, opened from ``config.store``."""
    return open_store(config.store.uri, **store_options(config))


def engine_regeneration(config: LaunchConfig) -> Regeneration | None:
    """``producer.regenerate`` as the engine's :class:`Regeneration` (``max_new_tokens``,
    ``temperature``, seeded by ``run.seed``), or None when the target reads the data's responses.
    """
    p = config.producer
    if not p.regenerate:
        return None
    return Regeneration(
        max_new_tokens=p.max_new_tokens, temperature=p.temperature, seed=config.run.seed
    )


def regenerate_tokens(config: LaunchConfig) -> int | None:
    """The room prompts leave for the target's response (``load_prompts(regenerate_tokens=)``):
    ``producer.max_new_tokens`` with ``producer.regenerate``, else None.
    """
    return config.producer.max_new_tokens if config.producer.regenerate else None


def open_run_engine(config: LaunchConfig) -> TargetEngine:
    """The run's target engine: ``config.target``, regenerating per ``producer.regenerate``.
    Every place a run opens its engine goes through here, so the setting is never ignored.
    """
    return open_engine(
        config.target,
        regeneration=engine_regeneration(config),
        store_uri=config.store.uri,
        store_options={k: v for k, v in store_options(config).items() if k == "token"},
    )


def flow_limits(config: LaunchConfig) -> FlowLimits:
    """The producer's backpressure limits from ``config.flow``."""
    flow = config.flow
    return FlowLimits(
        high_refs=flow.high_watermark,
        low_refs=flow.low_watermark,
        high_bytes=flow.high_bytes,
        low_bytes=flow.low_bytes,
        max_bytes=flow.byte_cap,
    )


def admission_factory(
    config: LaunchConfig, target_version: str
) -> Callable[[Ledger], StalenessAdmission] | None:
    """Staleness admission per ``config.staleness`` (None when staleness or admission is off)."""
    stale = config.staleness
    if not (stale.enabled and stale.admission):
        return None
    policy = StalenessPolicy(stale.max_draft_lag, stale.require_target_match)
    quantum = config.trainer.quantum
    per_window = stale.publishes_per_step(config.trainer.checkpoint_every)

    def build(ledger: Ledger) -> StalenessAdmission:
        return StalenessAdmission(
            ledger,
            WeightRegistry(ledger),
            policy,
            target_version,
            quantum,
            publishes_per_window=per_window,
        )

    return build


def build_producer(
    config: LaunchConfig,
    engine: TargetEngine,
    ledger: Ledger,
    store: FeatureStore,
    *,
    producer_id: str = "producer",
    draft_version: Callable[[], str | None] = lambda: None,
) -> RolloutProducer:
    """A producer wired per ``config`` (not opened yet: call ``open()`` then ``ingest``/``run``)
    with flow control and, when enabled, staleness admission.
    """
    return RolloutProducer(
        ledger,
        store,
        engine,
        ProducerSettings.from_config(config, producer_id),
        flow_limits=flow_limits(config),
        admission=admission_factory(config, engine.info.version),
        draft_version=draft_version,
    )
