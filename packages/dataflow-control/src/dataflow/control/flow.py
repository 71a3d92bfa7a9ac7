"""Producer backpressure derived from the ledger: watermarks with hysteresis and a hard byte cap.

In-flight means COMMITTED + ASSIGNED samples and their estimated bytes, always read from the
ledger's ``status()`` (never a counter kept here), so it stays right across processes and
restarts. The only figure kept in-process is the bytes *reserved* by admissions whose refs are
not committed yet (work between the admission and the ledger commit).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType

from dataflow.contracts.errors import CapacityExceededError, InvalidInputError, RunFailedError
from dataflow.contracts.protocols import Ledger
from dataflow.contracts.states import ConsumerState, LedgerStatus, SampleState
from dataflow.control._validate import non_negative_int, optional_timeout, positive_int

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FlowLimits:
    """Watermarks (refs and optionally bytes) and an optional hard byte cap.

    Guarantees after construction: ``1 <= low_refs <= high_refs`` (low defaults to high), byte
    watermarks only together with ``high_bytes`` and ``0 <= low_bytes <= high_bytes``, and a
    byte watermark never above ``max_bytes`` (it would never pause before the cap refuses).
    """

    high_refs: int
    low_refs: int | None = None
    high_bytes: int | None = None
    low_bytes: int | None = None
    max_bytes: int | None = None

    def __post_init__(self) -> None:
        positive_int("FlowLimits", "high_refs", self.high_refs)
        if self.low_refs is not None:
            non_negative_int("FlowLimits", "low_refs", self.low_refs)
            if self.low_refs > self.high_refs:
                raise InvalidInputError(
                    f"FlowLimits: low_refs ({self.low_refs}) must be <= high_refs ({self.high_refs})"
                )
        if self.high_bytes is None and self.low_bytes is not None:
            raise InvalidInputError("FlowLimits: low_bytes needs high_bytes")
        if self.high_bytes is not None:
            positive_int("FlowLimits", "high_bytes", self.high_bytes)
        if self.low_bytes is not None:
            non_negative_int("FlowLimits", "low_bytes", self.low_bytes)
            assert self.high_bytes is not None
            if self.low_bytes > self.high_bytes:
                raise InvalidInputError(
                    f"FlowLimits: low_bytes ({self.low_bytes}) must be <= "
                    f"high_bytes ({self.high_bytes})"
                )
        if self.max_bytes is not None:
            positive_int("FlowLimits", "max_bytes", self.max_bytes)
            if self.high_bytes is not None and self.high_bytes > self.max_bytes:
                raise InvalidInputError(
                    f"FlowLimits: high_bytes ({self.high_bytes}) must be <= the hard cap "
                    f"max_bytes ({self.max_bytes})"
                )

    @property
    def resolved_low_refs(self) -> int:
        """The refs level at or below which a paused producer resumes."""
        return self.high_refs if self.low_refs is None else self.low_refs

    @property
    def resolved_low_bytes(self) -> int | None:
        """The bytes level at or below which a paused producer resumes (None: no byte limit)."""
        return self.high_bytes if self.low_bytes is None else self.low_bytes


@dataclass(frozen=True)
class FlowSnapshot:
    """One reading of the flow state plus the pause accounting so far (tensor-free).

    ``pauses`` counts waits that had to block, ``paused_s`` their total duration and
    ``max_pause_s`` the longest; ``refusals`` counts admissions refused by the byte cap.
    """

    paused: bool
    in_flight: int
    in_flight_bytes: int
    reserved_bytes: int
    pauses: int
    paused_s: float
    max_pause_s: float
    pause_transitions: int
    resume_transitions: int
    refusals: int


class Admission:
    """Bytes reserved against the hard cap until the admitted refs are committed.

    Release it (or leave its ``with`` block) once the refs are in the ledger, whose in-flight
    bytes then account for them, or when the work is abandoned. Releasing twice is harmless.
    """

    def __init__(self, flow: FlowControl | None, nbytes: int) -> None:
        self._flow = flow
        self.nbytes = nbytes
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            if self._flow is not None:
                self._flow._unreserve(self.nbytes)

    def __enter__(self) -> Admission:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


class FlowControl:
    """Decides when a producer may start more work, from the ledger's in-flight figures.

    Guarantees:
    - the watermarks are at least one quantum (checked here, at construction), so a pause can
      never keep the first optimizer window from filling; likewise the producer is never
      paused while fewer than one quantum of samples is in flight;
    - pause/resume has hysteresis: pause once refs ≥ ``high_refs`` or bytes ≥ ``high_bytes``,
      resume only once both are below their high mark and at or below their low mark (one
      latch for both);
    - an admission that would take in-flight + reserved bytes past ``max_bytes`` is refused
      with ``CapacityExceededError`` and reserves nothing;
    - a producer held back while the consumer is FAILED gets ``RunFailedError`` instead of
      waiting for a trainer that will never free anything, and a pause that lasts longer than
      ``warn_after_s`` is logged (then once per ``warn_after_s``), so a stalled trainer is
      visible in the producer's log.
    """

    def __init__(
        self,
        ledger: Ledger,
        limits: FlowLimits,
        quantum: int,
        *,
        poll_s: float = 0.02,
        max_poll_s: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        warn_after_s: float = 60.0,
    ) -> None:
        positive_int("FlowControl", "quantum", quantum)
        if not isinstance(warn_after_s, (int, float)) or not warn_after_s > 0:
            raise InvalidInputError(f"FlowControl: warn_after_s must be > 0, got {warn_after_s!r}")
        if limits.high_refs < quantum or limits.resolved_low_refs < quantum:
            raise InvalidInputError(
                f"FlowControl: watermarks must be at least one quantum ({quantum} samples = "
                f"dp_size x batch_size x accumulation_steps), got high_refs={limits.high_refs}, "
                f"low_refs={limits.resolved_low_refs}; below it the first window could never fill"
            )
        self._ledger = ledger
        self.limits = limits
        self.quantum = quantum
        self._poll_s = poll_s
        self._max_poll_s = max_poll_s
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._latched = False
        self._reserved = 0
        self._pauses = 0
        self._paused_s = 0.0
        self._max_pause_s = 0.0
        self._pause_transitions = 0
        self._resume_transitions = 0
        self._refusals = 0
        self._warn_after_s = float(warn_after_s)
        self._latched_at = 0.0
        self._next_warning = 0.0

    # -- reading -----------------------------------------------------------------------------

    def snapshot(self) -> FlowSnapshot:
        """Read the ledger now, update the pause latch and return the state with its counters."""
        with self._lock:
            status = self._ledger.status()
            return self._snapshot(status, self._update_latch(status))

    def try_admit(self, nbytes: int) -> Admission:
        """Reserve ``nbytes`` against the hard cap now, or raise ``CapacityExceededError``.

        Ignores the watermarks (use ``wait_for_capacity`` to respect them); refusal reserves
        nothing.
        """
        non_negative_int("FlowControl.try_admit", "nbytes", nbytes)
        with self._lock:
            status = self._ledger.status()
            if not self._fits(status, nbytes):
                self._refusals += 1
                raise CapacityExceededError(self._cap_message(status, nbytes))
            self._reserved += nbytes
            return Admission(self, nbytes)

    def wait_for_capacity(self, nbytes: int = 0, timeout: float | None = None) -> Admission:
        """Block until the producer may start work of ``nbytes``, then reserve them.

        Waits while paused by the watermarks or while the cap cannot take ``nbytes``; raises
        ``TimeoutError`` after ``timeout`` seconds (nothing reserved) and
        ``CapacityExceededError`` at once when waiting could never help (``nbytes`` alone passes
        the cap, or the consumer holds nothing and less than a window is committed).
        """
        non_negative_int("FlowControl.wait_for_capacity", "nbytes", nbytes)
        timeout = optional_timeout("FlowControl.wait_for_capacity", timeout)
        start = self._clock()
        deadline = None if timeout is None else start + timeout
        delay = self._poll_s
        waited = False
        try:
            while True:
                with self._lock:
                    status = self._ledger.status()
                    paused = self._update_latch(status)
                    fits = self._fits(status, nbytes)
                    if not paused and fits:
                        self._reserved += nbytes
                        return Admission(self, nbytes)
                    if not fits and self._cap_is_hopeless(status, nbytes):
                        self._refusals += 1
                        raise CapacityExceededError(
                            self._cap_message(status, nbytes) + "; waiting cannot help: "
                            "the consumer holds no window and the cap cannot fit one"
                        )
                    self._check_consumer_alive(status)
                    self._warn_if_long(status)
                if not waited:
                    waited = True
                    with self._lock:
                        self._pauses += 1
                now = self._clock()
                if deadline is not None and now >= deadline:
                    raise TimeoutError(
                        f"FlowControl: no capacity for {nbytes} bytes within {timeout}s "
                        f"(in flight: {status.in_flight} refs, {status.in_flight_bytes} bytes; "
                        f"paused={paused})"
                    )
                step = delay if deadline is None else min(delay, max(deadline - now, 0.0))
                self._sleep(step)
                delay = min(delay * 2, self._max_poll_s)
        finally:
            if waited:
                elapsed = self._clock() - start
                with self._lock:
                    self._paused_s += elapsed
                    self._max_pause_s = max(self._max_pause_s, elapsed)

    # -- internals ---------------------------------------------------------------------------

    def _update_latch(self, status: LedgerStatus) -> bool:
        refs = status.in_flight
        nbytes = status.in_flight_bytes + self._reserved
        limits = self.limits
        over_high = refs >= limits.high_refs or (
            limits.high_bytes is not None and nbytes >= limits.high_bytes
        )
        # Resume only below the high watermark *and* at or below the low one, so that with
        # low == high (the default) the latch does not flip back at exactly the high mark.
        low_bytes = limits.resolved_low_bytes
        under_low = (
            refs < limits.high_refs
            and refs <= limits.resolved_low_refs
            and (
                limits.high_bytes is None
                or (nbytes < limits.high_bytes and low_bytes is not None and nbytes <= low_bytes)
            )
        )
        if not self._latched and over_high:
            self._latched = True
            self._pause_transitions += 1
            self._latched_at = self._clock()
            self._next_warning = self._latched_at + self._warn_after_s
        elif self._latched and under_low:
            self._latched = False
            self._resume_transitions += 1
            held = self._clock() - self._latched_at
            if held >= self._warn_after_s:
                _log.info("producer resumed after a %.0fs pause", held)
        # Never hold the producer back while less than one window is in flight.
        return self._latched and refs >= self.quantum

    def _check_consumer_alive(self, status: LedgerStatus) -> None:
        markers = status.markers
        if markers.consumer == ConsumerState.FAILED:
            raise RunFailedError(
                "the consumer FAILED, so nothing in flight will be freed and waiting for "
                f"capacity cannot help ({markers.consumer_reason or 'no reason recorded'})"
            )

    def _warn_if_long(self, status: LedgerStatus) -> None:
        now = self._clock()
        if not self._latched or now < self._next_warning:
            return
        self._next_warning = now + self._warn_after_s
        resume = f"<= {self.limits.resolved_low_refs} refs"
        if self.limits.resolved_low_bytes is not None:
            resume += f" and <= {self.limits.resolved_low_bytes} bytes"
        _log.warning(
            "producer paused for %.0fs: %d refs / %d bytes in flight (resumes at %s; the "
            "consumer is %s)",
            now - self._latched_at,
            status.in_flight,
            status.in_flight_bytes,
            resume,
            status.markers.consumer.value,
        )

    def _fits(self, status: LedgerStatus, nbytes: int) -> bool:
        cap = self.limits.max_bytes
        return cap is None or status.in_flight_bytes + self._reserved + nbytes <= cap

    def _cap_is_hopeless(self, status: LedgerStatus, nbytes: int) -> bool:
        cap = self.limits.max_bytes
        assert cap is not None
        if nbytes > cap:
            return True
        assigned = status.samples.get(SampleState.ASSIGNED.value, 0)
        committed = status.samples.get(SampleState.COMMITTED.value, 0)
        return self._reserved == 0 and assigned == 0 and committed < self.quantum

    def _cap_message(self, status: LedgerStatus, nbytes: int) -> str:
        return (
            f"FlowControl: admitting {nbytes} bytes would pass the hard cap of "
            f"{self.limits.max_bytes} bytes (in flight {status.in_flight_bytes}, "
            f"reserved {self._reserved})"
        )

    def _unreserve(self, nbytes: int) -> None:
        with self._lock:
            self._reserved -= nbytes

    def _snapshot(self, status: LedgerStatus, paused: bool) -> FlowSnapshot:
        return FlowSnapshot(
            paused=paused,
            in_flight=status.in_flight,
            in_flight_bytes=status.in_flight_bytes,
            reserved_bytes=self._reserved,
            pauses=self._pauses,
            paused_s=self._paused_s,
            max_pause_s=self._max_pause_s,
            pause_transitions=self._pause_transitions,
            resume_transitions=self._resume_transitions,
            refusals=self._refusals,
        )
