"""What the deployment mode decides: which ledger a run keeps and when features are freed.

The trainer never branches on topology; this is the one place the mode is read.

| mode | ledger | release policy | checkpoint-durable tracking |
|---|---|---|---|
| ``local_colocated`` | as configured (online: ``memory://`` by default; ``noop://`` is refused at config load) | ``on_ack`` | no |
| ``dataflow_colocated`` | as configured (durable) | ``on_checkpoint`` | yes |
| ``disaggregated`` | as configured (durable, shared) | ``on_checkpoint`` | yes |
"""

from __future__ import annotations

from dataclasses import dataclass

from dataflow.contracts import DeploymentMode, InvalidInputError, parse_ledger_uri
from dataflow.control import ReleasePolicy
from dataflow.launch.config import LaunchConfig


@dataclass(frozen=True)
class ControlPlan:
    """The ledger URI a role opens and the ack policy its trainer follows."""

    ledger_uri: str
    release: ReleasePolicy
    durable: bool

    @property
    def tracks_checkpoints(self) -> bool:
        """Whether a durable checkpoint frees features (``on_checkpoint``)."""
        return self.release is ReleasePolicy.ON_CHECKPOINT


def control_plan(config: LaunchConfig, *, leases_prompts: bool) -> ControlPlan:
    """The control plan of ``config``'s deployment mode.

    The ledger is always the configured one, never replaced: ``leases_prompts`` (the role runs
    a rollout producer, which needs a ledger that retains prompts) refuses a ``noop://`` one.
    """
    mode = config.deployment_mode
    uri = config.ledger.uri
    if leases_prompts and parse_ledger_uri(uri).scheme == "noop":
        raise InvalidInputError(
            f"ledger.uri: this role leases prompts from its ledger and {uri} retains none; "
            "use memory:// (in-process, no I/O) or a durable ledger"
        )
    if mode is DeploymentMode.LOCAL_COLOCATED:
        return ControlPlan(uri, ReleasePolicy.ON_ACK, durable=False)
    return ControlPlan(uri, ReleasePolicy.ON_CHECKPOINT, durable=True)
