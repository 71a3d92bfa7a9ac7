"""The launch config: one typed, strict, frozen pydantic model loaded from YAML + overrides."""

from dataflow.launch.config.loading import (
    apply_overrides,
    config_from_mapping,
    config_to_dict,
    dump_yaml,
    fingerprint,
    load_config,
    parse_override,
    read_yaml,
)
from dataflow.launch.config.schema import LaunchConfig
from dataflow.launch.config.sections import (
    BuiltinTargetSection,
    DataSection,
    FlowSection,
    LedgerOptions,
    LedgerSection,
    ProducerSection,
    RunSection,
    StalenessSection,
    StoreOptions,
    StoreSection,
    TargetSection,
    TrainerSection,
    VLLMServerSection,
)

__all__ = [
    "BuiltinTargetSection",
    "DataSection",
    "FlowSection",
    "LaunchConfig",
    "LedgerOptions",
    "LedgerSection",
    "ProducerSection",
    "RunSection",
    "StalenessSection",
    "StoreOptions",
    "StoreSection",
    "TargetSection",
    "VLLMServerSection",
    "TrainerSection",
    "apply_overrides",
    "config_from_mapping",
    "config_to_dict",
    "dump_yaml",
    "fingerprint",
    "load_config",
    "parse_override",
    "read_yaml",
]
