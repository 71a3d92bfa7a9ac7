"""The colocated-online interleaved loop: a producer thread feeding a trainer on the caller's thread.

``run_interleaved(producer, trainer, queue)`` runs ``producer(stop_event)`` on a background
thread and ``trainer(ref_queue)`` on the calling thread, connected by any of the contracts'
``RefQueue`` (the controller's ledger-backed rank queue, or the in-process ``HandoffQueue``),
with the three shutdown paths of the interleaved online loop and no thread left behind.
"""

from dataflow.launch.interleave.handoff import HandoffQueue
from dataflow.launch.interleave.producer_thread import ProducerStuckError
from dataflow.launch.interleave.runner import InterleaveOutcome, run_interleaved

__all__ = ["HandoffQueue", "InterleaveOutcome", "ProducerStuckError", "run_interleaved"]
