"""What the deployment mode decides: which plane a run keeps and when features are freed.

The trainer never branches on topology; this is the one place the mode is read. The ledger is
always the configured one; config load refuses a ledger the mode cannot run on, naming
``ledger.uri`` (the launch README, "Deployment modes").

| mode | plane | ledger | release policy | features freed | checkpoint-durable tracking |
|---|---|---|---|---|---|
| ``local_colocated`` | lightweight | ``memory://`` (online) or ``noop://`` (offline): in process, no I/O | ``on_ack`` | as the loader consumes them | no |
| ``dataflow_colocated`` | durable | ``sqlite://`` or ``redis://`` | ``on_checkpoint`` | once a checkpoint is durable | yes |
| ``disaggregated`` | durable, shared | ``sqlite://`` or ``redis://`` | ``on_checkpoint`` | once a checkpoint is durable | yes |
"""

from __future__ import annotations

from dataclasses import dataclass

from dataflow.contracts import DeploymentMode, InvalidInputError
from dataflow.contracts.uris import parse_ledger_uri
from dataflow.control import ReleasePolicy
from dataflow.launch.config import LaunchConfig


@dataclass(frozen=True)
class ControlPlan:
    """The ledger URI a role opens, the ack policy its trainer follows, and whether the
    trainer's store keeps a feature after the loader read it (durable planes: a sample trained
    after the last checkpoint must still be there to train again after a crash).
    """

    ledger_uri: str
    release: ReleasePolicy
    durable: bool

    @property
    def tracks_checkpoints(self) -> bool:
        """Whether a durable checkpoint frees features (``on_checkpoint``)."""
        return self.release is ReleasePolicy.ON_CHECKPOINT

    @property
    def trainer_store_options(self) -> dict[str, object]:
        """Options of the trainer's store handle: the lightweight plane frees a feature as the
        loader releases it (consume-once); a durable plane retains it until the control plane
        frees it (at the ack or once a checkpoint is durable).
        """
        return {"retain_on_release": self.durable}


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
