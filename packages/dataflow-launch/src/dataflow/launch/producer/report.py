"""What a producer run did, tensor-free."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class WorkerReport:
    """One worker's tallies: samples committed, prompts rejected as bad input, failed captures,
    whether it was dropped for failing too often, and its last error.
    """

    name: str
    committed: int = 0
    duplicates: int = 0
    rejected: int = 0
    failures: int = 0
    dropped: bool = False
    tokens: int = 0
    bytes: int = 0
    last_error: str = ""


@dataclass(frozen=True)
class ProducerReport:
    """How a producer run ended.

    ``outcome`` is ``closed`` (the prompt pool drained and the producer marked the stream
    closed), ``drained`` (pool drained, stream left open for another producer to close) or
    ``stopped`` (asked to stop; unfinished leases handed back, so a restart continues).
    Failures are never a report: they raise ``RunFailedError``.
    """

    outcome: str
    seconds: float
    workers: tuple[WorkerReport, ...]

    @property
    def committed(self) -> int:
        """Samples this run committed (duplicates excluded)."""
        return sum(w.committed for w in self.workers)

    @property
    def tokens(self) -> int:
        """Tokens of the committed samples."""
        return sum(w.tokens for w in self.workers)

    @property
    def tokens_per_s(self) -> float:
        """Committed tokens per second of wall time."""
        return self.tokens / self.seconds if self.seconds > 0 else 0.0
