"""The project's task runner: lint, typecheck, tests per package, isolation, gates, benchmarks.

CPU sessions run by default; `nox -s ci` is what `.ci/run` runs. Every install goes through
`constraints.txt` so torch stays on the pinned CPU wheel.
"""

from __future__ import annotations

import glob
import importlib
import os
import shutil
import sys
import tempfile
from pathlib import Path

import nox

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tools.sessions._common import (
    CONSTRAINTS,
    INTERNAL_DEPS,
    OPTIONAL_MODULES,
    PACKAGES,
    ROOT,
    TEST_EXTRAS,
    TORCH_FREE,
    install_editable,
    pkg_dir,
)

nox.options.sessions = ["lint", "typecheck", "tests", "isolation"]
nox.options.reuse_existing_virtualenvs = True
nox.options.error_on_missing_interpreters = True


@nox.session
def lint(session: nox.Session) -> None:
    """ruff (check + format) and the import-linter layer contracts."""
    session.install(*CONSTRAINTS, "ruff>=0.6", "import-linter>=2.1")
    session.install("--no-deps", *[arg for p in PACKAGES for arg in ("-e", pkg_dir(p))])
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")
    session.run("lint-imports", "--config", str(ROOT / "pyproject.toml"))


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy over every package's source and the internal test support."""
    session.install(*CONSTRAINTS, "mypy>=1.10", "types-PyYAML", "types-requests", "pytest")
    install_editable(session, "launch", ("redis", "hf"))
    srcs = [str(ROOT / "packages" / f"dataflow-{p}" / "src" / "dataflow" / p) for p in PACKAGES]
    srcs.append(str(ROOT / "tools" / "dataflow-testing" / "src" / "dataflow_testing"))
    session.run("mypy", *srcs)


@nox.session
@nox.parametrize("package", PACKAGES)
def tests(session: nox.Session, package: str) -> None:
    """pytest for one package (``nox -s "tests(package='store')"``)."""
    install_editable(session, package, TEST_EXTRAS[package])
    if package == "contracts":  # the no-tensor guard is tested against real torch and numpy values
        session.install(*CONSTRAINTS, "torch", "numpy")
    args = session.posargs or ["-m", "not slow and not gpu and not vllm"]
    session.run("pytest", str(ROOT / "packages" / f"dataflow-{package}" / "tests"), *args)


def _build_wheels(session: nox.Session, outdir: str, names: list[str]) -> None:
    session.install("build>=1.0")
    for name in names:
        session.run(
            "python", "-m", "build", "--wheel", "--outdir", outdir, pkg_dir(name), silent=True
        )


@nox.session(reuse_venv=False)
@nox.parametrize("package", PACKAGES)
def isolation(session: nox.Session, package: str) -> None:
    """Build wheels, install one package ALONE (plus declared deps) in a fresh venv, import it.

    For the torch-free packages, also prove torch is absent and never imported.
    """
    outdir = tempfile.mkdtemp(prefix="dataflow-wheels-")
    try:
        # Our own wheels are installed by path so pip never looks for same-named packages on
        # an index; third-party dependencies come from the index as a user would get them.
        ours = [package, *INTERNAL_DEPS[package]]
        _build_wheels(session, outdir, ours)
        wheels = [glob.glob(os.path.join(outdir, f"dataflow_{p}-*.whl"))[0] for p in ours]
        session.run(
            "python",
            "-m",
            "pip",
            "uninstall",
            "-y",
            "build",
            "pyproject_hooks",
            "packaging",
            silent=True,
        )
        session.install(*CONSTRAINTS, *wheels)
        listing = session.run("python", "-m", "pip", "list", "--format=freeze", silent=True) or ""
        installed = {line.split("==")[0].lower() for line in listing.splitlines() if "==" in line}
        ours_installed = sorted(n for n in installed if n.startswith("dataflow-"))
        expected = sorted(f"dataflow-{p}" for p in ours)
        if ours_installed != expected:
            session.error(f"expected exactly {expected} of ours, found {ours_installed}")
        session.log(f"installed of ours: {ours_installed}; total distributions: {len(installed)}")
        if package in TORCH_FREE and ("torch" in installed or "numpy" in installed):
            session.error(f"dataflow-{package} pulled in torch/numpy: {sorted(installed)}")
        check = [str(ROOT / "tools" / "isolation_check.py"), package]
        if package in TORCH_FREE:
            check.append("--torch-free")
        check += ["--optional", *OPTIONAL_MODULES[package]]
        session.run("python", *check)
    finally:
        shutil.rmtree(outdir, ignore_errors=True)


@nox.session(venv_backend="none")
def ci(session: nox.Session) -> None:
    """Everything `.ci/run` runs: lint, typecheck, tests, isolation, and the gates' CI variants."""
    session.notify("lint")
    session.notify("typecheck")
    # A parametrized session must be notified once per parameter, by its full name.
    for package in PACKAGES:
        session.notify(f"tests(package='{package}')")
    for package in PACKAGES:
        session.notify(f"isolation(package='{package}')")
    # The gates' CI variants (their -long variants and bench/gpu are not run by CI).
    for gate in ("equivalence", "faults", "soak", "multihost", "vllm"):
        session.notify(gate)


# Plane-specific sessions (benchmarks, gates) live in tools/sessions/<name>.py, one module each
# importing tools/sessions/_common.py; importing a module registers its sessions with nox, so
# `nox -l` lists them all (see tools/sessions/README.md).
for _path in sorted((ROOT / "tools" / "sessions").glob("[!_]*.py")):
    try:
        importlib.import_module(f"tools.sessions.{_path.stem}")
    except NameError as _exc:  # a file still written for the old exec-in-noxfile style
        raise RuntimeError(
            f"{_path} uses a name it does not import ({_exc}): session files are modules that "
            "import what they use (see tools/sessions/README.md)"
        ) from _exc
