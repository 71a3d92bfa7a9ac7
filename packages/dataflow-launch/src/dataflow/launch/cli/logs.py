"""``--log-level``: where the library's ``dataflow.*`` loggers go when ``dataflow-launch`` runs.

Library modules log through ``logging.getLogger(__name__)`` (``dataflow.control.flow``,
``dataflow.launch.producer.worker``, …) and never add handlers; the CLI is the one place that
configures them (docs/architecture.md §11). The level is also exported in
:data:`LOG_LEVEL_ENV`, so every child role process (``builders/supervise.py``, torchrun ranks)
inherits it and logs alike into its ``logs/<role>.log``.
"""

from __future__ import annotations

import logging
import os
import sys

from dataflow.contracts.errors import InvalidInputError

LOG_LEVEL_ENV = "DATAFLOW_LOG_LEVEL"
"""Environment variable carrying the level to child processes (and the CLI's default)."""

LEVELS = ("debug", "info", "warning", "error")
"""Accepted ``--log-level`` values, most verbose first."""

DEFAULT_LEVEL = "warning"

FORMAT = "%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s"


class _CliHandler(logging.StreamHandler):
    """The handler the CLI installs (marked by its type, so a second call replaces it)."""


def default_level() -> str:
    """The level a command runs with when ``--log-level`` is not given: the inherited
    :data:`LOG_LEVEL_ENV`, else ``warning``.
    """
    return os.environ.get(LOG_LEVEL_ENV, "").strip().lower() or DEFAULT_LEVEL


def configure_logging(level: str) -> None:
    """Send ``dataflow.*`` records at ``level`` or above to stderr and export the level to
    child processes. An unknown level raises ``InvalidInputError`` and configures nothing.
    """
    name = level.strip().lower()
    if name not in LEVELS:
        raise InvalidInputError(
            f"log level {level!r} is not one of {', '.join(LEVELS)} "
            f"(--log-level or {LOG_LEVEL_ENV})"
        )
    logger = logging.getLogger("dataflow")
    for handler in [h for h in logger.handlers if isinstance(h, _CliHandler)]:
        logger.removeHandler(handler)
    handler = _CliHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT))
    logger.addHandler(handler)
    logger.setLevel(name.upper())
    os.environ[LOG_LEVEL_ENV] = name
