"""Fixtures of the virtual-host harness tests: three hosts, the services and a Mooncake storage
node on host a."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import pytest
from dataflow_testing.netns import ClusterServices, VirtualHosts, serve_cluster
from dataflow_testing.ports import free_port
from netns_support import read_line


@pytest.fixture(scope="module")
def hosts() -> Iterator[VirtualHosts]:
    """Three hosts a, b, c on one bridge, shared by a test module."""
    with VirtualHosts(("a", "b", "c")) as vhosts:
        yield vhosts


@pytest.fixture(scope="module")
def cluster(hosts: VirtualHosts) -> Iterator[ClusterServices]:
    """Redis and a Mooncake master on host a, on ports that are free on the root namespace's
    loopback, so "not reachable there" is a meaningful check.
    """
    ports = {n: free_port() for n in ("redis_port", "master_port", "metadata_port", "metrics_port")}
    with serve_cluster(hosts["a"], **ports) as services:
        yield services


STORAGE_NODE = """
import sys
from dataflow.store.factory import open_store
store = open_store(sys.argv[1])
print("mounted", flush=True)
sys.stdin.readline()  # holds the segment until the test ends
store.close()
"""


@pytest.fixture(scope="module")
def storage(
    hosts: VirtualHosts, cluster: ClusterServices, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[None]:
    """A Mooncake client on host a mounting 256 MiB: the only segment puts can land in."""
    a = hosts["a"]
    uri = cluster.mooncake_store_uri(a.address, segment="256MiB")
    log = tmp_path_factory.mktemp("storage") / "storage.log"
    with log.open("wb") as err:  # a file, not a pipe: Mooncake's logging could fill a pipe
        node = a.popen(
            [sys.executable, "-c", STORAGE_NODE, uri],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
        )
    try:
        line = read_line(node.stdout, timeout=60)
        if line.strip() != "mounted":
            node.kill()
            node.wait(timeout=10)
            tail = log.read_text(errors="replace")[-3000:]
            pytest.fail(f"the storage node on a did not mount its segment: {line!r}\n{tail}")
        yield
    finally:
        assert node.stdin is not None
        node.stdin.close()
        try:
            node.wait(timeout=30)
        except subprocess.TimeoutExpired:
            node.kill()
            node.wait(timeout=10)
