"""What every nox session shares: the repository root, the constraints, the package table and
the install helpers. Imported by ``noxfile.py`` and by each ``tools/sessions/<name>.py``.
"""

from __future__ import annotations

from pathlib import Path

import nox

ROOT = Path(__file__).resolve().parents[2]
CONSTRAINTS = ("-c", str(ROOT / "constraints.txt"))
PACKAGES = ("contracts", "store", "control", "train", "launch")
# In-repo dependencies of each package (what its wheel needs beside it).
INTERNAL_DEPS = {
    "contracts": (),
    "store": ("contracts",),
    "control": ("contracts",),
    "train": ("contracts", "store", "control"),
    "launch": ("contracts", "store", "control", "train"),
}
# Extras each package's tests need (beyond "test").
TEST_EXTRAS = {
    "contracts": ("test",),
    "store": ("test", "mooncake-cpu"),
    "control": ("test", "redis"),
    "train": ("test", "tensorboard"),
    "launch": ("test", "hf", "plots", "redis", "mooncake-cpu", "tensorboard"),
}
TORCH_FREE = ("contracts", "control")
# Modules that only optional extras provide: a module needing one may be skipped in isolation.
OPTIONAL_MODULES = {
    "contracts": (),
    "store": ("mooncake",),
    "control": ("redis", "hiredis"),
    "train": ("tensorboard",),
    "launch": (
        "transformers",
        "tokenizers",
        "matplotlib",
        "sglang",
        "vllm",
        "requests",
        "redis",
        "mooncake",
        "tensorboard",
    ),
}


def pkg_dir(name: str) -> str:
    """The directory of the package ``dataflow-<name>``."""
    return str(ROOT / "packages" / f"dataflow-{name}")


def install_editable(session: nox.Session, name: str, extras: tuple[str, ...] = ()) -> None:
    """Install a package, its in-repo dependencies (editable) and the test-support plugin."""
    args: list[str] = ["-e", str(ROOT / "tools" / "dataflow-testing")]
    for dep in INTERNAL_DEPS[name]:
        args += ["-e", pkg_dir(dep)]
    suffix = f"[{','.join(extras)}]" if extras else ""
    args += ["-e", pkg_dir(name) + suffix]
    session.install(*CONSTRAINTS, *args)
