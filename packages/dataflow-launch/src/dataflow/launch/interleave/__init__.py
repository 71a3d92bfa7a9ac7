"""The colocated-online interleaved loop: a producer thread feeding a trainer on the caller's thread.

``run_interleaved(producer, trainer, queue)`` runs ``producer(stop_event)`` on a background
thread and ``trainer(ref_queue)`` on the calling thread, connected by any of the contracts'
``RefQueue`` (in a run, the controller's rank queue over the run's ledger),
with the three shutdown paths of the interleaved online loop and no thread left behind.
"""

from dataflow.launch.interleave.producer_thread import ProducerStuckError
from dataflow.launch.interleave.runner import InterleaveOutcome, run_interleaved

__all__ = ["InterleaveOutcome", "ProducerStuckError", "run_interleaved"]
