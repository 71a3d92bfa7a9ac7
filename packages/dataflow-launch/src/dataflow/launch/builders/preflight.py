"""Checks a run's inputs before anything is created, so bad input fails in one clear line and
leaves nothing behind: the model directory, the prompt file, and reachable ledger and store
services.
"""

from __future__ import annotations

from typing import Any

from dataflow.contracts import InvalidInputError
from dataflow.contracts.uris import parse_ledger_uri, parse_store_uri
from dataflow.launch.builders.config_checks import check_config, check_dataset_fits
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
    if config.producer.regenerate and config.topology.ref_source == "files":
        from pathlib import Path

        from dataflow.launch.builders.features import check_precomputed

        check_precomputed(config, Path(parse_store_uri(config.store.uri).location))


def preflight(config: LaunchConfig, *, prompts: bool = True, role: str = "run") -> None:
    """Refuse bad input before a run starts; changes nothing on disk.

    First the config-level checks of :func:`check_config` (a relative ``dir://`` store, more
    trainer ranks than the host or ``torchrun`` provides), then the inputs: raises
    ``InvalidInputError`` for a missing or incomplete model directory, a missing prompt file,
    too many malformed prompt lines (naming them), a dataset smaller than one optimizer window
    (with the numbers) or pre-computed features that ``producer.regenerate`` cannot apply to;
    ``BackendUnavailableError`` for an unreachable Redis ledger or Mooncake store.
    """
    check_config(config, role)
    check_regeneration(config)
    tokenizer = _tokenizer(config)
    if prompts:
        from dataflow.launch.data import load_prompts
        from dataflow.launch.producer import regenerate_tokens

        loaded = load_prompts(config.data, tokenizer, regenerate_tokens=regenerate_tokens(config))
        if not loaded.prompts:
            raise InvalidInputError(f"{loaded.source} holds no usable prompt ({loaded.report()})")
        check_dataset_fits(config, len(loaded.prompts), loaded.source)
    check_services(config)
    if role == "consume" and config.topology.online:
        check_consumer_lease(config)


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


def check_consumer_lease(config: LaunchConfig) -> None:
    """A consumer refuses to start while another live consumer holds the run's lease, naming it
    (before the run directory or any store segment is touched). Read-only: a SQLite file is
    opened with ``mode=ro``; a missing one holds no lease. The ledger re-checks at open.
    """
    import os
    import socket
    import time
    from pathlib import Path

    from dataflow.contracts import CorruptRecordError, LedgerConflictError
    from dataflow.contracts.processes import pid_alive

    parsed = parse_ledger_uri(config.ledger.uri)
    if parsed.scheme == "sqlite":
        if not Path(parsed.location).is_file():
            return
        from dataflow.control.ledger import open_ledger

        try:
            ledger = open_ledger(config.ledger.uri, read_only=True)
        except CorruptRecordError:
            # No ledger schema yet (the producer may be creating it this instant): no lease is
            # held. A foreign or damaged file is refused by the ledger's own open just after.
            return
    elif parsed.scheme == "redis":
        from dataflow.launch.producer import open_config_ledger

        ledger = open_config_ledger(config)
    else:
        return
    try:
        held = ledger.consumer_lease()
    finally:
        ledger.close()
    now = time.time()
    if held.pid == 0 or held.expires_at <= now:
        return
    if held.host == socket.gethostname():
        if held.pid == os.getpid():
            return
        if not pid_alive(held.pid):
            return  # a crashed consumer on this host: taken over at open
    raise LedgerConflictError(
        f"another consumer holds run {config.run.id!r} on {config.ledger.uri}: "
        f"{held.describe(now)}; stop it, or wait for its lease to expire"
    )
