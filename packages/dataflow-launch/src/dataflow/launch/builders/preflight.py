"""Checks a run's inputs before anything is created, so bad input fails in one clear line and
leaves nothing behind: the model directory, the prompt file, and reachable ledger and store
services.
"""

from __future__ import annotations

from typing import Any

from dataflow.contracts import InvalidInputError, parse_ledger_uri, parse_store_uri
from dataflow.launch.config import LaunchConfig


def _tokenizer(config: LaunchConfig) -> Any:
    if config.target.model_dir is None:
        from dataflow.launch.builtin.tokenizer import load_builtin_tokenizer

        return load_builtin_tokenizer()
    from transformers import AutoTokenizer

    from dataflow.launch.engines.target_files import read_model_config

    read_model_config(config.target.model_dir)  # missing dir / no config.json: named
    try:
        return AutoTokenizer.from_pretrained(config.target.model_dir, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise InvalidInputError(
            f"target.model_dir {config.target.model_dir!r}: cannot load its tokenizer ({exc})"
        ) from None


def check_services(config: LaunchConfig) -> None:
    """A Redis ledger and a Mooncake store must answer now (``BackendUnavailableError``)."""
    if parse_ledger_uri(config.ledger.uri).scheme == "redis":
        from dataflow.launch.producer import open_config_ledger

        open_config_ledger(config).close()
    if parse_store_uri(config.store.uri).scheme == "mooncake":
        from dataflow.launch.builders.common import open_run_store

        open_run_store(config).close()


def check_regeneration(config: LaunchConfig) -> None:
    """A colocated offline run trains the feature files under its ``file://`` store as they
    are: with ``producer.regenerate`` they must be the target's own (see
    ``builders.features.check_precomputed``).
    """
    if config.producer.regenerate and config.run.topology == "colocated_offline":
        from pathlib import Path

        from dataflow.launch.builders.features import check_precomputed

        check_precomputed(config, Path(parse_store_uri(config.store.uri).location))


def preflight(config: LaunchConfig, *, prompts: bool = True) -> None:
    """Refuse bad input before a run starts; changes nothing on disk.

    Raises ``InvalidInputError`` for a missing or incomplete model directory, a missing prompt
    file or too many malformed prompt lines (naming them), or pre-computed features that
    ``producer.regenerate`` cannot apply to; ``BackendUnavailableError`` for an unreachable
    Redis ledger or Mooncake store.
    """
    check_regeneration(config)
    tokenizer = _tokenizer(config)
    if prompts:
        from dataflow.launch.data import load_prompts
        from dataflow.launch.producer import regenerate_tokens

        loaded = load_prompts(config.data, tokenizer, regenerate_tokens=regenerate_tokens(config))
        if not loaded.prompts:
            raise InvalidInputError(f"{loaded.source} holds no usable prompt ({loaded.report()})")
    check_services(config)


def check_fresh_ledger(config: LaunchConfig) -> None:
    """A fresh (not resumed) run refuses a shared ledger that already holds a run.

    Otherwise a finished earlier run on the same ledger would make the new one silently train
    nothing (every prompt a duplicate). A SQLite file that does not exist yet is fresh (and is
    not created here).
    """
    parsed = parse_ledger_uri(config.ledger.uri)
    if parsed.scheme not in ("sqlite", "redis"):
        return
    if parsed.scheme == "sqlite":
        from pathlib import Path

        if not Path(parsed.location).exists():
            return
    from dataflow.launch.producer import open_config_ledger

    ledger = open_config_ledger(config)
    try:
        status = ledger.status()
    finally:
        ledger.close()
    held = sum(status.samples.values()) + sum(status.prompts.values())
    if status.markers.run_id or held:
        raise InvalidInputError(
            f"the ledger {config.ledger.uri} already holds run {status.markers.run_id!r} "
            f"({held} samples and prompts); pass --resume to continue it, or point ledger.uri "
            "at a new ledger"
        )
