"""Fixtures of the virtual-host harness tests: three hosts and the services on host a."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from dataflow_testing.netns import ClusterServices, VirtualHosts, serve_cluster
from dataflow_testing.ports import free_port


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
