"""The README's main-job install line installs every backend the README shows (issue 18)."""

from __future__ import annotations

import re
import tomllib

from run_helpers import REPO

# README backend name -> the dataflow-launch extra that makes it work ("" = always installed).
_BACKEND_EXTRAS = {"Redis": "redis", "Mooncake": "mooncake-cpu", "SQLite": "", "shm": ""}


def _install_line() -> str:
    lines = [ln for ln in (REPO / "README.md").read_text().splitlines() if "pip install" in ln]
    assert lines, "the README has no pip install line"
    return lines[0]


def test_the_install_line_has_an_extra_for_every_backend_the_readme_shows():
    readme = (REPO / "README.md").read_text()
    match = re.search(r"packages/dataflow-launch\[([^\]]*)\]", _install_line())
    assert match, _install_line()
    extras = set(match.group(1).split(","))
    declared = tomllib.loads((REPO / "packages/dataflow-launch/pyproject.toml").read_text())
    known = set(declared["project"]["optional-dependencies"])
    for backend, extra in _BACKEND_EXTRAS.items():
        assert backend in readme
        if extra:
            assert extra in extras, (
                f"{backend} is shown in the README but [{extra}] is not installed"
            )
    assert extras <= known, extras - known
