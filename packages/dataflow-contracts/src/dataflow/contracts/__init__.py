"""dataflow.contracts: the tensor-free records, protocols, errors and codecs every plane shares.

Standard library only: importing this package never imports torch or numpy.
"""

from dataflow.contracts._checks import is_int, is_number
from dataflow.contracts._json import FrozenDict, freeze_map
from dataflow.contracts.batch import TensorLike, TrainBatch
from dataflow.contracts.codec import SCHEMA_VERSIONS, decode, dumps, encode, loads
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
from dataflow.contracts.features import (
    DTYPE_ITEMSIZE,
    FEATURE_SCHEMA_VERSION,
    FeatureHandle,
    FeatureSpec,
    SampleRef,
)
from dataflow.contracts.ids import MAX_ID_LENGTH, validate_id, validate_sample_id, validate_task_id
from dataflow.contracts.lease import ConsumerLease
from dataflow.contracts.modes import DeploymentMode
from dataflow.contracts.no_tensors import assert_no_tensors, looks_like_tensor
from dataflow.contracts.prompt import PromptTask
from dataflow.contracts.protocols import (
    Collective,
    FeatureStore,
    Ledger,
    RefQueue,
    SampleAborter,
)
from dataflow.contracts.states import (
    MAX_REASON_LENGTH,
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
    clip_reason,
)
from dataflow.contracts.uris import (
    ParsedURI,
    parse_ledger_uri,
    parse_store_uri,
)
from dataflow.contracts.version import __version__
from dataflow.contracts.weights import WeightStatus, WeightVersion

__all__ = [
    "MAX_REASON_LENGTH",
    "clip_reason",
    "DTYPE_ITEMSIZE",
    "FEATURE_SCHEMA_VERSION",
    "MAX_ID_LENGTH",
    "SCHEMA_VERSIONS",
    "BackendUnavailableError",
    "CapacityExceededError",
    "ClosedError",
    "Collective",
    "CommitResult",
    "ConsumerState",
    "CorruptRecordError",
    "DataflowError",
    "DeploymentMode",
    "FeatureHandle",
    "FrozenDict",
    "freeze_map",
    "FeatureSpec",
    "FeatureStore",
    "GcReport",
    "InvalidInputError",
    "InvalidRecordError",
    "Ledger",
    "LedgerConflictError",
    "LedgerStatus",
    "NotFoundError",
    "ParsedURI",
    "ProducerState",
    "PromptState",
    "PromptTask",
    "ReconcileResult",
    "RefQueue",
    "RunFailedError",
    "RunMarkers",
    "ConsumerLease",
    "SampleAborter",
    "SampleRef",
    "SampleState",
    "SchemaMismatchError",
    "SchemaVersionError",
    "StaleGenerationError",
    "StoreHealth",
    "TensorLike",
    "TrainBatch",
    "UnauthorizedError",
    "WeightStatus",
    "WeightVersion",
    "Window",
    "is_int",
    "is_number",
    "__version__",
    "assert_no_tensors",
    "decode",
    "dumps",
    "encode",
    "loads",
    "looks_like_tensor",
    "parse_ledger_uri",
    "parse_store_uri",
    "validate_id",
    "validate_sample_id",
    "validate_task_id",
]
