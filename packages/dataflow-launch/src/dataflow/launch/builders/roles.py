"""What the deployment mode decides: which ledger a run keeps and when features are freed.

The trainer never branches on topology; this is the one place the mode is read.

| mode | ledger | release policy | checkpoint-durable tracking |
|---|---|---|---|
| ``local_colocated`` | as configured; ``noop://`` becomes an in-process ``memory://`` when prompts must be leased (online) | ``on_ack`` | no |
| ``dataflow_colocated`` | as configured (durable) | ``on_checkpoint`` | yes |
| ``disaggregated`` | as configured (durable, shared) | ``on_checkpoint`` | yes |
"""

from __future__ import annotations

from dataclasses import dataclass

from dataflow.contracts import DeploymentMode, parse_ledger_uri
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

    ``leases_prompts``: the role runs a rollout producer in this process, which needs a ledger
    that retains prompts; a ``noop://`` ledger of a ``local_colocated`` run is then replaced by
    an in-process ``memory://`` one (bookkeeping only, nothing durable, nothing shared).
    """
    mode = config.deployment_mode
    uri = config.ledger.uri
    if mode is DeploymentMode.LOCAL_COLOCATED:
        if leases_prompts and parse_ledger_uri(uri).scheme == "noop":
            uri = "memory://"
        return ControlPlan(uri, ReleasePolicy.ON_ACK, durable=False)
    return ControlPlan(uri, ReleasePolicy.ON_CHECKPOINT, durable=True)
