"""``LaunchConfig``: the one typed config of a run, with its cross-section rules.

Defaults that depend on the topology (deployment mode, ledger and store URIs) are filled in at
validation, so a validated config is fully resolved: dumping it shows what actually runs.
"""

from __future__ import annotations

from typing import Any

from pydantic import model_validator

from dataflow.contracts import DeploymentMode
from dataflow.contracts.uris import parse_ledger_uri, parse_store_uri
from dataflow.launch.config.sections import (
    DataSection,
    FlowSection,
    LedgerSection,
    ProducerSection,
    RunSection,
    Section,
    StalenessSection,
    StoreSection,
    TargetSection,
    TrainerSection,
)
from dataflow.launch.topologies import TOPOLOGIES, TopologySpec

_DURABLE_LEDGERS = ("sqlite", "redis")


def _section(data: dict[str, Any], name: str) -> dict[str, Any]:
    value = data.get(name)
    return value if isinstance(value, dict) else {}


# ``scheme://`` + an absolute path gives ``scheme:///abs``; + a relative one stays cwd-relative.
def _default_ledger(mode: str, out_dir: str, spec: TopologySpec) -> str:
    if mode == "local_colocated":
        # online runs lease prompts from the ledger: in-process memory://, no I/O
        return "memory://" if spec.online else "noop://"
    return f"sqlite://{out_dir.rstrip('/')}/ledger.sqlite"


class LaunchConfig(Section):
    """Everything one run needs: ``run``, ``target``, ``data``, ``store``, ``ledger``, ``flow``,
    ``staleness``, ``producer``, ``trainer``.

    Guarantees once constructed: every key was known, every value had the right type and range,
    topology-dependent defaults are filled in, and the cross-section rules hold (a disaggregated
    run has a cross-process store and a durable ledger; the high watermark holds one window;
    ``producer.regenerate`` has an engine that generates and room for a prompt).
    """

    run: RunSection = RunSection()
    target: TargetSection = TargetSection()
    data: DataSection = DataSection()
    store: StoreSection = StoreSection()
    ledger: LedgerSection = LedgerSection()
    flow: FlowSection = FlowSection()
    staleness: StalenessSection = StalenessSection()
    producer: ProducerSection = ProducerSection()
    trainer: TrainerSection = TrainerSection()

    @model_validator(mode="before")
    @classmethod
    def _fill_topology_defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        run = _section(data, "run")
        topology = run.get("topology", RunSection.model_fields["topology"].default)
        out_dir = run.get("out_dir", RunSection.model_fields["out_dir"].default)
        run_id = run.get("id", RunSection.model_fields["id"].default)
        if not all(isinstance(v, str) for v in (topology, out_dir, run_id)):
            return data  # field validation reports the bad types
        if topology not in TOPOLOGIES:
            return data
        spec = TOPOLOGIES[topology]
        mode = run.get("deployment_mode") or spec.default_mode
        out = dict(data)
        out["run"] = {**run, "deployment_mode": mode}
        ledger = _section(data, "ledger")
        if not ledger.get("uri"):
            out["ledger"] = {**ledger, "uri": _default_ledger(str(mode), out_dir, spec)}
        store = _section(data, "store")
        if not store.get("uri"):
            out["store"] = {**store, "uri": spec.default_store_uri(run_id, out_dir)}
        return out

    @model_validator(mode="after")
    def _cross_rules(self) -> LaunchConfig:
        spec = self.topology
        topology = spec.name
        mode = self.deployment_mode
        store_scheme = parse_store_uri(self.store.uri).scheme
        ledger_scheme = parse_ledger_uri(self.ledger.uri).scheme
        if spec.separate_roles and mode is not DeploymentMode.DISAGGREGATED:
            raise ValueError(
                f"run.deployment_mode: {topology} needs 'disaggregated', got {mode.value!r}"
            )
        if not spec.separate_roles and mode is DeploymentMode.DISAGGREGATED:
            raise ValueError(
                f"run.deployment_mode: {topology} runs in one process; use 'local_colocated' or "
                "'dataflow_colocated'"
            )
        allowed = spec.stores
        if store_scheme not in allowed:
            raise ValueError(
                f"store.uri: {topology} needs a store of scheme "
                + " or ".join(f"{s}://" for s in allowed)
                + f", got {self.store.uri!r}"
            )
        if self.target.capture == "mooncake" and (store_scheme != "mooncake" or not spec.online):
            raise ValueError(
                "target.capture: mooncake has the server write features into Mooncake; it needs "
                f"an online run with a mooncake:// store, got {topology} with {self.store.uri!r}"
            )
        if self.target.vllm.capture_mode == "store" and (
            self.target.engine != "vllm" or store_scheme not in ("shm", "dir", "mooncake")
        ):
            raise ValueError(
                "target.vllm.capture_mode: store has the vLLM server's connector write features "
                "into the run's store from another process; it needs target.engine vllm and a "
                f"shm://, dir:// or mooncake:// store, got engine {self.target.engine!r} with "
                f"{self.store.uri!r} (use capture_mode: file)"
            )
        if spec.separate_roles and spec.online and ledger_scheme not in _DURABLE_LEDGERS:
            raise ValueError(
                f"ledger.uri: {topology} shares its ledger between processes; use "
                f"sqlite:///PATH or redis://HOST:PORT/DB, got {self.ledger.uri!r}"
            )
        if self.staleness.enabled and not spec.online and not self.staleness.require_target_match:
            raise ValueError(
                f"staleness.require_target_match: {topology} trains a retained feature set no "
                "draft served, so there is no draft lag to bound; offline staleness only drops "
                "samples captured by another target, and with require_target_match=false it "
                "would check nothing (set staleness.enabled=false)"
            )
        if spec.online and ledger_scheme == "noop":
            raise ValueError(
                f"ledger.uri: {topology} leases prompts from its ledger and noop:// retains "
                "none; use memory:// (in-process, no I/O) or a durable sqlite:// or redis:// ledger"
            )
        if spec.ref_source == "files" and mode.durable:
            raise ValueError(
                f"run.deployment_mode: {topology} keeps no durable ledger; "
                f"{mode.value!r} needs one, use 'local_colocated'"
            )
        if spec.ref_source == "files" and ledger_scheme != "noop":
            raise ValueError(
                f"ledger.uri: {topology} trains retained feature files and keeps no "
                f"record (its ledger is noop://); {self.ledger.uri!r} would never be written"
            )
        if mode.durable and ledger_scheme not in _DURABLE_LEDGERS:
            raise ValueError(
                f"ledger.uri: deployment mode {mode.value!r} keeps a durable ledger (resumable "
                f"after a crash); {self.ledger.uri!r} is not durable; use sqlite:///PATH or "
                "redis://HOST:PORT/DB"
            )
        if not mode.durable and ledger_scheme in _DURABLE_LEDGERS:
            raise ValueError(
                f"ledger.uri: deployment mode 'local_colocated' runs the lightweight plane (in "
                f"process: no durable transaction, no I/O) and {self.ledger.uri!r} is durable; "
                "use memory:// or set run.deployment_mode=dataflow_colocated"
            )
        return self

    @model_validator(mode="after")
    def _trainer_and_producer_rules(self) -> LaunchConfig:
        topology = self.run.topology
        if self.trainer.sp_size > 1 and self.topology.online and not self.topology.separate_roles:
            raise ValueError(
                f"trainer.sp_size: sequence parallelism ({self.trainer.sp_size}) needs a "
                f"consumer of its own (disaggregated_online or an offline topology), whose "
                f"sequence-parallel peers read one shared ledger; {topology} trains in "
                f"the producer's process and is data-parallel only (use trainer.dp_size)"
            )
        producer = self.producer
        if producer.regenerate and self.target.engine == "sglang":
            raise ValueError(
                "producer.regenerate: the sglang engine cannot generate responses (it only "
                "captures the data's); use target.engine hf or vllm, or set producer.regenerate false"
            )
        if producer.regenerate and producer.max_new_tokens >= self.data.max_length:
            raise ValueError(
                f"producer.max_new_tokens: {producer.max_new_tokens} leaves no room for a prompt "
                f"within data.max_length {self.data.max_length} (prompt + response must fit); "
                "lower producer.max_new_tokens or raise data.max_length"
            )
        if self.flow.high_watermark < self.trainer.quantum:
            raise ValueError(
                f"flow.high_watermark: {self.flow.high_watermark} is below one optimizer window "
                f"(trainer quantum {self.trainer.quantum} = dp_size * batch_size * "
                "accumulation_steps); the first window could never fill"
            )
        return self

    @property
    def deployment_mode(self) -> DeploymentMode:
        """The resolved deployment mode (selects the ledger and ack policy)."""
        assert self.run.deployment_mode is not None  # filled in before validation
        return DeploymentMode(self.run.deployment_mode)

    @property
    def topology(self) -> TopologySpec:
        """The record of ``run.topology`` (what differs between topologies, as data)."""
        return TOPOLOGIES[self.run.topology]
