"""Gate fixtures: a summary printed at the end of the session (CI or long variant)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from gate_runs import SUMMARY, gate_variant


@pytest.fixture(scope="session")
def summary() -> list[str]:
    """Append summary lines here; they are printed after the test session."""
    return SUMMARY


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if SUMMARY:
        terminalreporter.section(f"gate summary ({gate_variant()} variant)")
        for line in SUMMARY:
            terminalreporter.write_line(line)
