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
    """Redis and a Mooncake master on host a. Redis takes a port that is free on the root
    namespace's loopback, so "not reachable there" is a meaningful check.
    """
    with serve_cluster(hosts["a"], redis_port=free_port()) as services:
        yield services
