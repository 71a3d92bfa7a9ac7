"""VirtualHosts builds isolated hosts: unique names, a fresh subnet, no route anywhere else."""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import subprocess
import sys

import pytest
from dataflow_testing.netns import GUARD_PROTO, SUBNET_POOL, VirtualHosts
from netns_support import (
    ip_json,
    namespaces,
    needs_netns,
    own_guard_routes,
    own_namespaces,
    root_links,
)

pytestmark = needs_netns


def test_hosts_names_addresses_and_subnet(hosts: VirtualHosts) -> None:
    assert [h.name for h in hosts] == ["a", "b", "c"]
    assert len(hosts) == 3 and hosts[1] is hosts["b"]
    assert all(f"-{os.getpid()}-" in h.namespace for h in hosts)
    assert set(hosts.namespaces) <= namespaces()
    assert hosts.subnet is not None and hosts.subnet.subnet_of(SUBNET_POOL)
    addresses = [ipaddress.IPv4Address(h.address) for h in hosts]
    assert len(set(addresses)) == 3 and all(a in hosts.subnet for a in addresses)
    # Only our guard route covers the subnet in the root namespace.
    overlapping = [
        r
        for r in ip_json("-4", "route", "show", "table", "all")
        if r["dst"] != "default"
        and ipaddress.IPv4Network(str(r["dst"]), strict=False).overlaps(hosts.subnet)
    ]
    assert overlapping == [
        {
            "type": "unreachable",
            "dst": str(hosts.subnet),
            "protocol": str(GUARD_PROTO),
            "metric": os.getpid(),
            "flags": [],
        }
    ]
    with pytest.raises(KeyError, match="no virtual host named 'z'"):
        hosts["z"]


def test_hosts_reach_each_other_only_on_their_subnet(hosts: VirtualHosts) -> None:
    a, b, c = hosts
    listener = a.popen(
        [sys.executable, "-c", "import socket,sys,time; s=socket.create_server((sys.argv[1], 7000)); time.sleep(60)", a.address]
    )  # fmt: skip
    try:
        assert b.wait_for_port(7000, 10, address=a.address)
        assert c.wait_for_port(7000, 10, address=a.address)
        assert a.wait_for_port(7000, 10)
    finally:
        listener.kill()
        listener.wait(5)
    for host in hosts:
        routes = host.run(["ip", "-4", "route"], capture_output=True, text=True).stdout
        assert routes.split() == [str(hosts.subnet), "dev", "eth0", "proto", "kernel", "scope", "link", "src", host.address]  # fmt: skip


def test_no_route_out_of_the_hosts(hosts: VirtualHosts) -> None:
    # Every address the root namespace knows (its gateway and own addresses) is unroutable from
    # inside the hosts: `ip route get` asks the kernel without sending anything.
    outside = {"192.0.2.1"}  # TEST-NET-1 (documentation range): only looked up, never contacted
    for route in ip_json("-4", "route", "show", "table", "all"):
        outside |= {str(route[k]) for k in ("gateway", "prefsrc") if k in route}
    outside = {a for a in outside if not ipaddress.IPv4Address(a).is_loopback}
    for host in hosts:
        for address in sorted(outside):
            proc = host.run(["ip", "route", "get", address], capture_output=True, text=True)
            assert proc.returncode != 0, (host.name, address, proc.stdout)
            assert "Network is unreachable" in proc.stderr
        for address in ("2001:db8::1", "::ffff:192.0.2.1"):  # and no IPv6 way out either
            proc = host.run(["ip", "-6", "route", "get", address], capture_output=True, text=True)
            assert proc.returncode != 0, (host.name, address, proc.stdout)


def test_root_namespace_cannot_send_to_the_hosts(hosts: VirtualHosts) -> None:
    a = hosts["a"]
    proc = subprocess.run(
        ["ip", "route", "get", a.address], capture_output=True, text=True, timeout=10
    )
    assert proc.returncode != 0 and "No route to host" in proc.stderr
    # Safe to try for real now: the guard route fails the connect locally.
    with pytest.raises(OSError) as caught, socket.socket() as sock:
        sock.settimeout(2)
        sock.connect((a.address, 9))
    assert caught.value.errno == errno.EHOSTUNREACH


def test_parallel_instances_get_distinct_names_and_subnets(hosts: VirtualHosts) -> None:
    with VirtualHosts(1) as other:
        assert other.subnet != hosts.subnet
        assert not set(other.namespaces) & set(hosts.namespaces)
        assert other[0].name == "h0"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"hosts": 0}, "need between 1 and 200 hosts, got 0"),
        ({"hosts": ("a", "a")}, "host names must be unique"),
        ({"hosts": ("Bad",)}, "host names must be 1-8 lowercase"),
        ({"hosts": ("sw",)}, "and not 'sw'"),
        ({"hosts": 2, "prefix": "bad-prefix"}, "prefix must be 1-12 lowercase"),
    ],
)
def test_bad_arguments_are_refused_before_anything_is_created(kwargs: dict, message: str) -> None:
    before = (own_namespaces(), own_guard_routes(), root_links())
    with pytest.raises(ValueError, match=message):
        VirtualHosts(**kwargs)
    assert (own_namespaces(), own_guard_routes(), root_links()) == before


def test_bridge_and_veths_live_only_in_the_namespaces_and_vanish_on_exit() -> None:
    links_before, netns_before = root_links(), own_namespaces()
    with VirtualHosts(3, prefix="dftlinks") as vhosts:
        switch = vhosts.switch_namespace
        links = {str(x["ifname"]): x for x in ip_json("-n", switch, "link", "show")}
        assert set(links) == {"lo", "br0", "port0", "port1", "port2"}
        assert all(links[f"port{i}"].get("master") == "br0" for i in range(3))
        for host in vhosts:
            names = {str(x["ifname"]) for x in ip_json("-n", host.namespace, "link", "show")}
            assert names == {"lo", "eth0"}
        assert root_links() == links_before
        created = set(vhosts.namespaces)
        assert len(created) == 4 and created.isdisjoint(netns_before)
    assert own_namespaces() == netns_before
    assert root_links() == links_before
    gone = subprocess.run(["ip", "-n", switch, "link"], capture_output=True, text=True, timeout=10)
    assert gone.returncode != 0
