"""Published draft-weight versions (metadata only): the staleness axis."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from dataflow.contracts.checks import check_non_negative, check_text, check_type
from dataflow.contracts.errors import InvalidInputError
from dataflow.contracts.frozen import JsonMap, freeze_map
from dataflow.contracts.ids import validate_id


class WeightStatus(enum.StrEnum):
    """Lifecycle of a published draft version."""

    CANDIDATE = "candidate"
    ACTIVE = "active"
    ROLLED_BACK = "rolled_back"


@dataclass(frozen=True)
class WeightVersion:
    """One published draft-weight version.

    ``publish_order`` is assigned by the registry on publish (0 before that); it, not ``step``,
    is the axis staleness is measured on. ``location`` says where the weights are, if anywhere.
    """

    version_id: str
    step: int
    publish_order: int = 0
    status: WeightStatus = WeightStatus.CANDIDATE
    location: str | None = None
    target_version: str = "unknown"
    metadata: JsonMap = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        validate_id(self.version_id, "weight version id")
        check_non_negative("WeightVersion", "step", self.step)
        check_non_negative("WeightVersion", "publish_order", self.publish_order)
        if not isinstance(self.status, WeightStatus):
            try:
                object.__setattr__(self, "status", WeightStatus(self.status))
            except ValueError:
                raise InvalidInputError(
                    f"WeightVersion.status {self.status!r} is not one of "
                    f"{[s.value for s in WeightStatus]}"
                ) from None
        if self.location is not None:
            check_type("WeightVersion", "location", self.location, str)
        check_text("WeightVersion", "target_version", self.target_version)
        object.__setattr__(self, "metadata", freeze_map(self.metadata, "WeightVersion.metadata"))
