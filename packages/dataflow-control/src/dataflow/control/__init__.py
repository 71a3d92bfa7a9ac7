"""dataflow.control — see this package's README for what it owns."""

from dataflow.control.consumer import ConsumerSide, ReleasePolicy
from dataflow.control.controller import Controller
from dataflow.control.dispatch import Dispatcher
from dataflow.control.dist_ack import DistAckResult, SoloCollective, distributed_ack, run_on_rank0
from dataflow.control.drift import DriftMonitor, DriftSnapshot
from dataflow.control.flow import Admission, FlowControl, FlowLimits, FlowSnapshot
from dataflow.control.gate import StalenessAdmission, StalenessGate
from dataflow.control.ledger import PARTIAL_WINDOW, NoopLedger, open_ledger
from dataflow.control.producer import ProducerSide
from dataflow.control.queue import RankQueue
from dataflow.control.staleness import StalenessAssessment, StalenessPolicy, WeightRegistry
from dataflow.control.version import __version__
from dataflow.control.window import WindowShape

__all__ = ["PARTIAL_WINDOW", "NoopLedger", "__version__", "open_ledger"]
# controller, flow control, staleness, distributed ack
__all__ += [
    "Admission",
    "ConsumerSide",
    "Controller",
    "Dispatcher",
    "DistAckResult",
    "DriftMonitor",
    "DriftSnapshot",
    "FlowControl",
    "FlowLimits",
    "FlowSnapshot",
    "ProducerSide",
    "RankQueue",
    "ReleasePolicy",
    "SoloCollective",
    "StalenessAdmission",
    "StalenessAssessment",
    "StalenessGate",
    "StalenessPolicy",
    "WeightRegistry",
    "WindowShape",
    "distributed_ack",
    "run_on_rank0",
]
