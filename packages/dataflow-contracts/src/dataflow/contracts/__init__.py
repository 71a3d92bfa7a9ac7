"""dataflow.contracts: the tensor-free records, protocols and errors every plane shares.

Standard library only: importing this package never imports torch or numpy. The top level
exports what the planes and their users call: the records, the protocols, the error taxonomy and
the no-tensor guard. Codecs (:mod:`dataflow.contracts.codec`), id and URI validation
(:mod:`~dataflow.contracts.ids`, :mod:`~dataflow.contracts.uris`), value checks
(:mod:`~dataflow.contracts.checks`), read-only JSON values (:mod:`~dataflow.contracts.frozen`)
and record constants live in their modules.
"""

from dataflow.contracts.batch import TrainBatch
from dataflow.contracts.errors import (
    BackendUnavailableError,
    CapacityExceededError,
    ClosedError,
    CorruptRecordError,
    DataflowError,
    InvalidInputError,
    InvalidRecordError,
    LedgerConflictError,
    NotFoundError,
    RunFailedError,
    SchemaMismatchError,
    SchemaVersionError,
    StaleGenerationError,
    UnauthorizedError,
)
from dataflow.contracts.features import FeatureHandle, FeatureSpec, SampleRef
from dataflow.contracts.frozen import FrozenDict
from dataflow.contracts.lease import ConsumerLease
from dataflow.contracts.modes import DeploymentMode
from dataflow.contracts.no_tensors import assert_no_tensors
from dataflow.contracts.prompt import PromptTask
from dataflow.contracts.protocols import (
    Collective,
    FeatureStore,
    Ledger,
    RefQueue,
    SampleAborter,
)
from dataflow.contracts.states import (
    CommitResult,
    ConsumerState,
    GcReport,
    LedgerStatus,
    ProducerState,
    PromptState,
    ReconcileResult,
    RunMarkers,
    SampleState,
    StoreHealth,
    Window,
)
from dataflow.contracts.version import __version__
from dataflow.contracts.weights import WeightStatus, WeightVersion

__all__ = [
    # records
    "PromptTask",
    "FeatureSpec",
    "SampleRef",
    "FeatureHandle",
    "FrozenDict",
    "TrainBatch",
    "WeightVersion",
    "WeightStatus",
    "ConsumerLease",
    "DeploymentMode",
    "RunMarkers",
    "LedgerStatus",
    "StoreHealth",
    "GcReport",
    "CommitResult",
    "Window",
    "ReconcileResult",
    "SampleState",
    "PromptState",
    "ProducerState",
    "ConsumerState",
    # protocols
    "FeatureStore",
    "Ledger",
    "RefQueue",
    "Collective",
    "SampleAborter",
    # errors
    "DataflowError",
    "InvalidInputError",
    "InvalidRecordError",
    "SchemaVersionError",
    "SchemaMismatchError",
    "NotFoundError",
    "StaleGenerationError",
    "CapacityExceededError",
    "UnauthorizedError",
    "LedgerConflictError",
    "RunFailedError",
    "BackendUnavailableError",
    "CorruptRecordError",
    "ClosedError",
    # the guard
    "assert_no_tensors",
    "__version__",
]
