"""Staleness in an offline run: the feature set is screened against the run's target.

Offline, the trainer reads a retained feature set captured before training and no draft is
served to the target, so there is no draft lag to bound (``staleness.max_draft_lag`` does not
apply). What still goes stale is the target: features captured by another target than the one
the run names (a ``file://`` directory or a manifest left from an earlier target) would train
the draft against the wrong model. With ``staleness.enabled`` and
``staleness.require_target_match`` every ref whose target version is not the configured
target's is dropped before training, with its reason, counted in ``staleness.json``; a set in
which every ref would be dropped fails fast naming the setting.

The colocated offline capture records each file's target in ``target.json`` beside the files;
the disaggregated offline manifest's refs carry the producer's target version.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

from dataflow.contracts import RunFailedError, SampleRef
from dataflow.control.staleness import TARGET_VERSION_MISMATCH
from dataflow.launch.config import LaunchConfig
from dataflow.launch.engines import expected_version
from dataflow.launch.run_dir import RunDir, write_json_atomic

log = logging.getLogger(__name__)

TARGETS_FILE = "target.json"
"""Beside a colocated offline feature set: ``{task id: target version}`` of each file."""

UNKNOWN = "unknown"


def read_file_targets(directory: Path) -> dict[str, str]:
    """The target version of each feature file under ``directory`` (empty when not recorded)."""
    path = directory / TARGETS_FILE
    if not path.is_file():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}


def write_file_targets(directory: Path, targets: Mapping[str, str]) -> None:
    """Record (merge) the target version of newly captured files."""
    merged = {**read_file_targets(directory), **targets}
    write_json_atomic(directory / TARGETS_FILE, dict(sorted(merged.items())))


def screen_offline_refs(
    config: LaunchConfig,
    run_dir: RunDir,
    refs: list[SampleRef],
    versions: Mapping[str, str] | None = None,
) -> list[SampleRef]:
    """``refs`` without those captured by another target than ``config.target`` (staleness on).

    ``versions`` maps a sample id to its target version where the refs do not carry it (file
    refs); a ref with no known version counts as another target's. With staleness off the refs
    are returned unchanged and nothing is written. Raises ``RunFailedError`` (nothing written)
    when every ref would be dropped.
    """
    stale = config.staleness
    if not (stale.enabled and stale.require_target_match):
        return refs
    current = expected_version(config.target)

    def version_of(ref: SampleRef) -> str:
        if versions is not None:
            return versions.get(ref.sample_id, UNKNOWN)
        return ref.target_version

    kept = [ref for ref in refs if version_of(ref) == current]
    others = Counter(version_of(ref) for ref in refs if version_of(ref) != current)
    if refs and not kept:
        raise RunFailedError(
            f"staleness.require_target_match: all {len(refs)} offline samples were captured by "
            f"another target ({', '.join(sorted(others))}) than this run's {current!r}; every "
            "sample would be dropped (capture the features again with this target, or set "
            "staleness.require_target_match=false)"
        )
    dropped = len(refs) - len(kept)
    if dropped:
        log.warning(
            "staleness: dropped %d offline sample(s) captured by another target than %r: %s",
            dropped,
            current,
            dict(others),
        )
    if os.environ.get("RANK", "0") != "0":
        return kept  # one rank writes the record
    write_json_atomic(
        run_dir.root / "staleness.json",
        {
            "target_version": current,
            "passed": len(kept),
            "dropped": len(refs) - len(kept),
            "dropped_reasons": {TARGET_VERSION_MISMATCH: dropped} if dropped else {},
            "other_targets": dict(sorted(others.items())),
        },
    )
    return kept
