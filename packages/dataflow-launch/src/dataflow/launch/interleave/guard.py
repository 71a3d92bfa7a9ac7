"""GuardedQueue: the trainer's view of the hand-off, which also watches the producer thread."""

from __future__ import annotations

import time
from typing import Any

from dataflow.contracts.errors import RunFailedError
from dataflow.contracts.features import SampleRef
from dataflow.contracts.protocols import RefQueue
from dataflow.launch.interleave.producer_thread import ProducerThread


class GuardedQueue:
    """The contracts' ``RefQueue`` over an inner queue, failing fast when the producer raised.

    Guarantees:
    - once the producer thread has raised, ``get`` raises ``RunFailedError`` (its ``__cause__``
      the producer's exception) within about ``poll_s``, whatever the inner queue is doing and
      even if the producer never marked its stream failed; refs still buffered are not handed
      out after that (a failed stream is not trained to its end);
    - otherwise ``get`` is the inner queue's: a ref, ``None`` at a clean end of stream, the
      inner queue's own errors; ``timeout`` (or else ``idle_timeout_s``) bounds the whole call
      and then raises ``TimeoutError``;
    - the last exception raised out of ``get`` is kept in ``raised``, so the runner can tell a
      consequence of the producer's failure from an independent trainer error.

    The inner queue is asked in slices of at most ``poll_s`` seconds, so it must honour the
    protocol's ``timeout``. One reader, like the queues it wraps.
    """

    def __init__(
        self,
        inner: RefQueue,
        producer: ProducerThread[Any],
        *,
        poll_s: float,
        idle_timeout_s: float | None,
    ) -> None:
        self._inner = inner
        self._producer = producer
        self._poll_s = poll_s
        self._idle_timeout_s = idle_timeout_s
        self.raised: BaseException | None = None

    def get(self, timeout: float | None = None) -> SampleRef | None:
        try:
            return self._get(self._idle_timeout_s if timeout is None else timeout)
        except BaseException as exc:
            self.raised = exc
            raise

    def _get(self, limit: float | None) -> SampleRef | None:
        deadline = None if limit is None else time.monotonic() + limit
        while True:
            self._raise_if_producer_failed()
            slice_s = self._poll_s
            if deadline is not None:
                slice_s = max(0.0, min(slice_s, deadline - time.monotonic()))
            try:
                return self._inner.get(timeout=slice_s)
            except TimeoutError:
                if deadline is not None and time.monotonic() >= deadline:
                    raise TimeoutError(f"no ref to train on within {limit:g}s") from None
            except RunFailedError:
                # The producer may have marked its stream failed an instant before raising:
                # prefer its own exception, which is the root cause.
                if self._producer.failed.wait(self._poll_s):
                    self._raise_if_producer_failed()
                raise

    def _raise_if_producer_failed(self) -> None:
        if self._producer.failed.is_set():
            error = self._producer.error
            raise RunFailedError(
                f"the producer thread {self._producer.name!r} failed: "
                f"{type(error).__name__}: {error}"
            ) from error

    def close(self) -> None:
        """Close the inner queue (the trainer will read no more)."""
        self._inner.close()
