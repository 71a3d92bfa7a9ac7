"""Import every module of one installed dataflow package; run by `nox -s isolation`.

Usage: python isolation_check.py PACKAGE [--torch-free] [--optional MODULE ...]

A module may fail to import only because a module named in --optional (an optional extra's
dependency, e.g. ``redis`` for ``dataflow-control[redis]``) is absent; any other import error
fails the check. With --torch-free, importing the package must not load torch or numpy.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import pkgutil
import sys


def main() -> int:
    """Run the check; the exit status is 0 only if every module imported as required."""
    parser = argparse.ArgumentParser()
    parser.add_argument("package")
    parser.add_argument("--torch-free", action="store_true")
    parser.add_argument("--optional", nargs="*", default=[])
    args = parser.parse_args()

    root = importlib.import_module(f"dataflow.{args.package}")
    print(f"imported {root.__name__} {root.__version__} from {root.__path__[0]}")
    imported, needs_extra = 0, []
    for info in pkgutil.walk_packages(root.__path__, f"{root.__name__}."):
        if info.name.endswith(".__main__"):  # importing it would run the program
            continue
        try:
            importlib.import_module(info.name)
            imported += 1
        except ModuleNotFoundError as exc:
            missing = (exc.name or "").split(".")[0]
            if missing not in args.optional:
                print(f"FAIL: {info.name} needs {exc.name!r}, which is not a declared dependency")
                return 1
            needs_extra.append(f"{info.name} (needs optional {missing!r})")
    print(f"{imported} modules imported")
    for line in needs_extra:
        print(f"skipped: {line}")
    if args.torch_free:
        loaded = sorted(k for k in sys.modules if k.split(".")[0] in ("torch", "numpy"))
        if loaded:
            print(f"FAIL: importing dataflow.{args.package} loaded {loaded[:5]}")
            return 1
        present = importlib.util.find_spec("torch") is not None
        print(f"no torch/numpy module loaded; torch installed in this venv: {present}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
