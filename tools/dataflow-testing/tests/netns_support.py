"""Views of the root namespace and capability gates for the virtual-host harness tests."""

from __future__ import annotations

import json
import os
import select
import subprocess
from typing import IO

import pytest
from dataflow_testing.netns import GUARD_PROTO, multihost_available, netns_available

NETNS_OK, NETNS_REASON = netns_available()
MULTIHOST_OK, MULTIHOST_REASON = multihost_available()

needs_netns = pytest.mark.skipif(not NETNS_OK, reason=f"NOT RUN: {NETNS_REASON}")
needs_services = pytest.mark.skipif(not MULTIHOST_OK, reason=f"NOT RUN: {MULTIHOST_REASON}")


def ip_json(*args: str) -> list[dict[str, object]]:
    out = subprocess.run(
        ["ip", "-j", *args], capture_output=True, text=True, check=True, timeout=10
    ).stdout
    return json.loads(out) if out.strip() else []


def root_links() -> set[str]:
    """Interface names in the root namespace."""
    return {str(link["ifname"]) for link in ip_json("link", "show")}


def namespaces() -> set[str]:
    out = subprocess.run(
        ["ip", "netns", "list"], capture_output=True, text=True, check=True, timeout=10
    ).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def own_namespaces() -> set[str]:
    """Namespaces made by this process (their names carry its pid): parallel runs don't count."""
    return {n for n in namespaces() if f"-{os.getpid()}-" in n}


def own_guard_routes() -> set[tuple[str, int]]:
    """Guard routes owned by this process."""
    return {(subnet, owner) for subnet, owner in guard_routes() if owner == os.getpid()}


def run_prefix(tag: str) -> str:
    """A namespace prefix unique to this test run (``tag`` up to 5 letters), so parallel runs
    never clean up each other's crashed children."""
    return f"{tag}{os.getpid() % 10**7}"


def guard_routes() -> set[tuple[str, int]]:
    """(subnet, owner pid) of every harness guard route in the root namespace."""
    routes = ip_json("-4", "route", "show", "table", "main", "proto", str(GUARD_PROTO))
    return {(str(r["dst"]), int(str(r.get("metric", 0)))) for r in routes}


def read_line(pipe: IO[str] | None, timeout: float) -> str:
    """The next line from a child's pipe, or TimeoutError after ``timeout`` seconds."""
    assert pipe is not None
    ready, _, _ = select.select([pipe], [], [], timeout)
    if not ready:
        raise TimeoutError(f"no output within {timeout:g} s")
    return pipe.readline()
