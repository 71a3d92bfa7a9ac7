"""How a rollout producer runs: its identity, its workers and their failure budget."""

from __future__ import annotations

from dataclasses import dataclass

from dataflow.contracts import InvalidInputError
from dataflow.contracts.checks import is_int, is_number
from dataflow.contracts.ids import validate_id
from dataflow.launch.config import LaunchConfig


@dataclass(frozen=True)
class ProducerSettings:
    """Validated producer settings.

    ``producer_id`` names this producer on the ledger: worker ``i`` leases as
    ``<producer_id>-w<i>``, so a restarted producer with the same id reclaims exactly its own
    leases. ``quantum`` is the run's optimizer window (fixed for the run; the ledger refuses a
    different one). A worker failing ``worker_max_failures`` captures in a row is dropped. More
    than ``max_failed_prompts`` prompts FAILED for good (attempts used up, or bad input) when the
    pool drains is a run failure, not a clean end.
    """

    run_id: str
    quantum: int
    workers: int = 1
    prompts_per_lease: int = 4
    lease_s: float = 120.0
    worker_max_failures: int = 3
    poll_s: float = 0.05
    producer_id: str = "producer"
    close_when_drained: bool = True
    max_failed_prompts: int = 0
    max_length: int | None = None
    """A captured sample longer than this fails its prompt (``bad_features``); None: no limit."""

    def __post_init__(self) -> None:
        validate_id(self.run_id, "run id")
        validate_id(self.producer_id, "producer id")
        for name in ("quantum", "workers", "prompts_per_lease", "worker_max_failures"):
            value = getattr(self, name)
            if not is_int(value) or value < 1:
                raise InvalidInputError(
                    f"ProducerSettings.{name} must be an int >= 1, got {value!r}"
                )
        if (
            isinstance(self.max_failed_prompts, bool)
            or not isinstance(self.max_failed_prompts, int)
            or self.max_failed_prompts < 0
        ):
            raise InvalidInputError(
                f"ProducerSettings.max_failed_prompts must be an int >= 0, got "
                f"{self.max_failed_prompts!r}"
            )
        for name in ("lease_s", "poll_s"):
            value = getattr(self, name)
            if not is_number(value) or value <= 0:
                raise InvalidInputError(f"ProducerSettings.{name} must be > 0, got {value!r}")

    @property
    def worker_names(self) -> tuple[str, ...]:
        """The ledger names of this producer's workers."""
        return tuple(f"{self.producer_id}-w{i}" for i in range(self.workers))

    @classmethod
    def from_config(cls, config: LaunchConfig, producer_id: str = "producer") -> ProducerSettings:
        """Settings from a launch config (prompts per lease = the target's batch size)."""
        return cls(
            run_id=config.run.id,
            quantum=config.trainer.quantum,
            workers=config.producer.workers,
            prompts_per_lease=config.target.batch_size,
            lease_s=config.producer.lease_s,
            worker_max_failures=config.producer.worker_max_failures,
            poll_s=config.producer.poll_s,
            producer_id=producer_id,
            max_failed_prompts=config.producer.max_failed_prompts,
            max_length=config.data.max_length
            + (config.producer.max_new_tokens if config.producer.regenerate else 0),
        )
