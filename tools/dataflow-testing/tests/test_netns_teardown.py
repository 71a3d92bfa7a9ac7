"""Teardown leaves nothing behind: after errors, KeyboardInterrupt, SIGINT, SIGKILL and crashes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from dataflow_testing import netns
from dataflow_testing.netns import (
    GUARD_PROTO,
    SUBNET_POOL,
    VirtualHostError,
    VirtualHosts,
    cleanup_leftovers,
)
from netns_support import (
    guard_routes,
    namespaces,
    needs_netns,
    own_guard_routes,
    read_line,
    root_links,
    run_prefix,
)

pytestmark = needs_netns

# A run in another process: builds two hosts, starts `sleep` in one, reports, then waits.
CHILD = """
import json, sys, time
from dataflow_testing.netns import VirtualHosts
with VirtualHosts(2, prefix=sys.argv[1]) as hosts:
    sleeper = hosts[0].popen(["sleep", "300"])
    print(json.dumps({"namespaces": hosts.namespaces, "subnet": str(hosts.subnet),
                      "sleeper": sleeper.pid}), flush=True)
    time.sleep(120)
"""


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def start_child(prefix: str) -> tuple[subprocess.Popen[str], dict]:
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, prefix], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )  # fmt: skip
    line = read_line(child.stdout, 60)
    assert line, child.stderr.read() if child.stderr else ""
    return child, json.loads(line)


def assert_gone(state: dict, owner: int) -> None:
    assert not set(state["namespaces"]) & namespaces()
    assert (state["subnet"], owner) not in guard_routes()
    assert not alive(state["sleeper"])


@pytest.mark.parametrize("exc_type", [RuntimeError, KeyboardInterrupt])
def test_exception_in_body_tears_everything_down(exc_type: type[BaseException]) -> None:
    links = root_links()
    with pytest.raises(exc_type, match="boom"), VirtualHosts(2, prefix="dfterr") as hosts:
        sleeper = hosts[1].popen(["sleep", "300"])
        assert sleeper.pid in hosts[1].pids()  # `ip netns exec` execs in place
        state = {
            "namespaces": hosts.namespaces,
            "subnet": str(hosts.subnet),
            "sleeper": sleeper.pid,
        }
        assert len(state["namespaces"]) == 3
        raise exc_type("boom")
    assert sleeper.returncode == -signal.SIGKILL
    assert_gone(state, os.getpid())
    assert root_links() == links


def test_failure_while_entering_removes_what_was_built() -> None:
    hosts = VirtualHosts(("a", "b"), prefix="dftenter")
    squatter = f"{hosts.stem}-b"  # host b's namespace name is taken, so building b fails
    subprocess.run(["ip", "netns", "add", squatter], check=True, timeout=10)
    try:
        before = own_guard_routes()
        with pytest.raises(VirtualHostError, match=f"`ip netns add {squatter}` failed"), hosts:
            pytest.fail("entered")
        assert f"{hosts.stem}-a" not in namespaces()
        assert f"{hosts.stem}-sw" not in namespaces()
        assert own_guard_routes() == before
        assert hosts.namespaces == []
    finally:
        subprocess.run(["ip", "netns", "del", squatter], check=True, timeout=10)


def test_sigint_to_a_run_tears_it_down() -> None:
    links = root_links()
    child, state = start_child(run_prefix("intr"))
    child.send_signal(signal.SIGINT)
    _, err = child.communicate(timeout=30)
    # An uncaught KeyboardInterrupt makes Python end itself with SIGINT after cleaning up.
    assert child.returncode == -signal.SIGINT and "KeyboardInterrupt" in err
    assert_gone(state, child.pid)
    assert root_links() == links


def test_cleanup_removes_a_crashed_run_and_spares_a_live_one() -> None:
    prefix = run_prefix("crash")
    child, state = start_child(prefix)
    try:
        assert cleanup_leftovers(prefix) == []  # the owner is alive: nothing is touched
        assert set(state["namespaces"]) <= namespaces()
        assert (state["subnet"], child.pid) in guard_routes()
    finally:
        child.kill()
        child.wait(timeout=30)  # not communicate(): the orphaned sleeper still holds the pipes
        for pipe in (child.stdout, child.stderr):
            assert pipe is not None
            pipe.close()
    assert set(state["namespaces"]) <= namespaces()  # SIGKILL leaves the run's namespaces
    assert cleanup_leftovers(run_prefix("other")) == []  # another prefix's cleanup leaves them
    assert (state["subnet"], child.pid) in guard_routes()
    removed = cleanup_leftovers(prefix)
    assert sorted(removed) == sorted(
        [f"netns {n}" for n in state["namespaces"]]
        + [f"route unreachable {state['subnet']} metric {child.pid}"]
    )
    assert_gone(state, child.pid)
    assert cleanup_leftovers(prefix) == []


def test_sigkill_of_a_process_inside_a_host(hosts: VirtualHosts) -> None:
    b, c = hosts["b"], hosts["c"]
    server = b.popen(
        [sys.executable, "-c", "import socket,sys,time; s=socket.create_server((sys.argv[1], 7100)); time.sleep(60)", b.address]
    )  # fmt: skip
    assert c.wait_for_port(7100, 10, address=b.address)
    assert server.pid in b.pids()
    os.kill(server.pid, signal.SIGKILL)
    assert server.wait(timeout=10) == -signal.SIGKILL
    assert server.pid not in b.pids()
    assert not c.wait_for_port(7100, 0.5, address=b.address)


def test_wait_for_port_is_bounded(hosts: VirtualHosts) -> None:
    started = time.monotonic()
    assert not hosts["c"].wait_for_port(7999, 1.0)
    assert time.monotonic() - started < 10


def test_ctrl_c_during_teardown_is_held_until_teardown_ends(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Fault injection: a real SIGINT raised while the first namespace is being removed.
    real = netns._kill_namespace
    calls: list[str] = []

    def interrupted(name: str, **kwargs: bool) -> None:
        if not calls:
            signal.raise_signal(signal.SIGINT)
        calls.append(name)
        real(name, **kwargs)

    monkeypatch.setattr(netns, "_kill_namespace", interrupted)
    with pytest.raises(KeyboardInterrupt), VirtualHosts(2, prefix="dftctrlc") as hosts:
        created = hosts.namespaces
        owner, subnet = hosts.owner, str(hosts.subnet)
    assert sorted(calls) == sorted(created)  # every namespace was still removed
    assert not set(created) & namespaces()
    assert (subnet, owner) not in guard_routes()


def test_crash_kills_every_process_on_a_host_and_only_there(hosts: VirtualHosts) -> None:
    a, b = hosts["a"], hosts["b"]
    bystander = a.popen(["sleep", "60"])
    tree = b.popen(["sh", "-c", "sleep 60 & sleep 60 & wait"])
    deadline = time.monotonic() + 10
    while len(b.pids()) < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    before = b.pids()
    assert len(before) == 3
    assert sorted(b.crash()) == sorted(before)
    assert b.pids() == [] and tree.returncode == -signal.SIGKILL
    assert bystander.poll() is None and bystander.pid in a.pids()
    bystander.kill()
    bystander.wait(timeout=5)


def test_disconnect_and_reconnect_a_host(hosts: VirtualHosts) -> None:
    a, c = hosts["a"], hosts["c"]
    server = c.popen(
        [sys.executable, "-c", "import socket,sys,time; s=socket.create_server((sys.argv[1], 7300)); time.sleep(60)", c.address]
    )  # fmt: skip
    try:
        assert a.wait_for_port(7300, 10, address=c.address)
        c.disconnect()
        assert not a.wait_for_port(7300, 0.5, address=c.address)
        c.reconnect()
        assert a.wait_for_port(7300, 10, address=c.address)
    finally:
        c.reconnect()
        server.kill()
        server.wait(timeout=5)


def test_cleanup_removes_an_orphaned_guard_route() -> None:
    # A run killed between reserving its subnet and creating any namespace leaves only a route.
    gone = subprocess.Popen(["true"])
    gone.wait(timeout=10)
    owner = gone.pid  # a pid that is no longer running
    for subnet in reversed(list(SUBNET_POOL.subnets(new_prefix=24))):
        add = ["ip", "route", "add", "unreachable", str(subnet), "proto", str(GUARD_PROTO), "metric", str(owner)]  # fmt: skip
        if subprocess.run(add, capture_output=True, timeout=10).returncode == 0:
            break
    assert (str(subnet), owner) in guard_routes()
    assert f"route unreachable {subnet} metric {owner}" in cleanup_leftovers(run_prefix("orph"))
    assert (str(subnet), owner) not in guard_routes()
