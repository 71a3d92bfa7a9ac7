"""Real services across virtual hosts: Redis and a Mooncake master on a, clients on b and c."""

from __future__ import annotations

import hashlib
import json
import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from dataflow_testing.netns import (
    ClusterServices,
    VirtualHost,
    VirtualHostError,
    VirtualHosts,
    serve_cluster,
)
from netns_support import needs_services, read_line

from dataflow.contracts.uris import parse_store_uri

pytestmark = needs_services

CLIENT = str(Path(__file__).parent / "clients" / "mooncake_client.py")
STORE_CLIENT = str(Path(__file__).parent / "clients" / "store_client.py")
MIB = 1 << 20
KEYS, SIZE, SEED = 3, 2 * MIB, 7

REDIS_ROUND_TRIP = """
import sys, redis
r = redis.Redis.from_url(sys.argv[1], socket_timeout=5, socket_connect_timeout=5)
r.set("multihost:key", b"\\x00value\\xff")
print(r.get("multihost:key").hex(), r.client_list()[0]["addr"].split(":")[0])
"""

LISTEN = "import socket,sys,time; s=socket.create_server((sys.argv[1], int(sys.argv[2]))); time.sleep(60)"


def expected_sha256(index: int) -> str:
    # The same seeded bytes as clients/mooncake_client.py, computed here independently.
    return hashlib.sha256(random.Random(f"{SEED}/{index}").randbytes(SIZE)).hexdigest()


def client_argv(role: str, host: VirtualHost, cluster: ClusterServices) -> list[str]:
    return [
        sys.executable, CLIENT, role, "--local", host.address,
        "--metadata", cluster.mooncake_metadata_url, "--master", cluster.mooncake_master,
        "--keys", str(KEYS), "--size", str(SIZE), "--seed", str(SEED),
    ]  # fmt: skip


def assert_all_equal(report: dict) -> None:
    assert report["setup"] == 0
    assert [row["key"] for row in report["got"]] == [f"obj-{i}" for i in range(KEYS)]
    for index, row in enumerate(report["got"]):
        assert row["equal"] is True and row["length"] == SIZE
        assert row["sha256"] == expected_sha256(index)


@pytest.mark.redis
def test_redis_on_a_serves_b(hosts: VirtualHosts, cluster: ClusterServices) -> None:
    a, b = hosts["a"], hosts["b"]
    assert cluster.redis_url == f"redis://{a.address}:{cluster.redis_port}/0"
    proc = b.python(REDIS_ROUND_TRIP, cluster.redis_url, timeout=30)
    assert proc.returncode == 0, proc.stderr
    value, client_address = proc.stdout.split()
    assert bytes.fromhex(value) == b"\x00value\xff"
    assert client_address == b.address  # the server saw the connection come from host b


@pytest.mark.redis
@pytest.mark.mooncake
def test_services_listen_only_inside_host_a(hosts: VirtualHosts, cluster: ClusterServices) -> None:
    a = hosts["a"]
    ports = (cluster.redis_port, cluster.master_port, cluster.metadata_port, cluster.metrics_port)
    listening = a.run(["ss", "-ltnH"], capture_output=True, text=True).stdout
    bound = {int(local.rsplit(":", 1)[1]): local.rsplit(":", 1)[0] for local in (line.split()[3] for line in listening.splitlines())}  # fmt: skip
    assert bound == {
        cluster.redis_port: a.address,
        cluster.master_port: a.address,
        cluster.metrics_port: a.address,
        cluster.metadata_port: "0.0.0.0",  # Mooncake ignores --http_metadata_server_host
    }
    for port in ports:
        with pytest.raises(ConnectionRefusedError), socket.socket() as sock:
            sock.settimeout(2)
            sock.connect(("127.0.0.1", port))  # the root namespace's loopback
        # Other hosts' own loopbacks are theirs alone.
        assert not hosts["b"].wait_for_port(port, 0.2, address="127.0.0.1")
    # Redis is bound to a's address: not even on a's own loopback.
    assert not a.wait_for_port(cluster.redis_port, 0.3, address="127.0.0.1")
    assert hosts["c"].wait_for_port(cluster.redis_port, 5, address=cluster.address)


@pytest.mark.mooncake
def test_mooncake_put_on_c_read_on_c_and_b(
    hosts: VirtualHosts, cluster: ClusterServices, tmp_path: Path
) -> None:
    b, c = hosts["b"], hosts["c"]
    with (tmp_path / "writer.log").open("w") as log:
        writer = c.popen(
            client_argv("put", c, cluster),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True,
        )  # fmt: skip
    assert writer.stdin is not None and writer.stdout is not None
    try:
        line = read_line(writer.stdout, 60)
        assert line, (tmp_path / "writer.log").read_text()[-3000:]
        written = json.loads(line)
        assert written["put"] == [0] * KEYS
        assert_all_equal(written)

        # Host b reads what c put: the objects live in c's segment and cross the bridge.
        reader = b.run(client_argv("get", b, cluster), capture_output=True, text=True, timeout=60)
        assert reader.returncode == 0, reader.stderr[-3000:]
        assert_all_equal(json.loads(reader.stdout.splitlines()[-1]))
    finally:
        writer.stdin.write("release\n")
        writer.stdin.close()
        assert writer.wait(timeout=30) == 0
        writer.stdout.close()

    # With c's segment unmounted the objects are gone, so b really was reading from c.
    after = b.run(client_argv("get", b, cluster), capture_output=True, text=True, timeout=60)
    assert [row["length"] for row in json.loads(after.stdout.splitlines()[-1])["got"]] == [0] * KEYS


@pytest.mark.mooncake
def test_dataflow_store_producer_on_b_consumer_on_c(
    hosts: VirtualHosts, cluster: ClusterServices, tmp_path: Path
) -> None:
    # The real mooncake:// backend through the URI the harness hands out: the shape of the
    # multihost gate's producer/consumer run.
    b, c = hosts["b"], hosts["c"]
    # The master is known to be up (serve_cluster waited for it), so the store's guard against
    # a setup() hang — a probe in a child process — would only cost time here.
    options = {"segment": "64MiB", "buffer": "16MiB", "handshake_probe": "false"}
    with (tmp_path / "producer.log").open("w") as log:
        producer = b.popen(
            [sys.executable, STORE_CLIENT, "put", cluster.mooncake_store_uri(b.address, **options)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True,
        )  # fmt: skip
    assert producer.stdin is not None and producer.stdout is not None
    try:
        ref = read_line(producer.stdout, 60)
        assert ref, (tmp_path / "producer.log").read_text()[-3000:]
        consumer = c.run(
            [sys.executable, STORE_CLIENT, "get", cluster.mooncake_store_uri(c.address, **options)],
            input=ref, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert consumer.returncode == 0, consumer.stderr[-3000:]
        report = json.loads(consumer.stdout.splitlines()[-1])
        assert report == {
            "equal": {"hidden": True, "input_ids": True},
            "names": ["hidden", "input_ids"],
        }
    finally:
        producer.stdin.write("done\n")
        producer.stdin.close()
        assert producer.wait(timeout=30) == 0
        producer.stdout.close()


@pytest.mark.redis
def test_a_service_that_cannot_start_is_reported_with_its_log(hosts: VirtualHosts) -> None:
    c = hosts["c"]
    squatter = c.popen([sys.executable, "-c", LISTEN, c.address, "7200"])
    try:
        assert c.wait_for_port(7200, 10)
        with pytest.raises(VirtualHostError) as caught, serve_cluster(c, redis_port=7200):
            pytest.fail("services started on a taken port")
        message = str(caught.value)
        assert f"redis-server on host c ({c.address}) exited with code 1" in message
        assert "Address already in use" in message
        assert c.pids() == [squatter.pid]  # nothing of the failed start is left running
    finally:
        squatter.kill()
        squatter.wait(timeout=5)


@pytest.mark.redis
@pytest.mark.mooncake
def test_services_are_stopped_on_exit(hosts: VirtualHosts, tmp_path: Path) -> None:
    b = hosts["b"]
    with serve_cluster(b, redis_port=6400, master_port=6401, metadata_port=6402, metrics_port=6403, log_dir=tmp_path) as services:  # fmt: skip
        assert len(b.pids()) == 2
        assert services.mooncake_setup_args(hosts["c"].address, 1, 2) == (
            hosts["c"].address, f"http://{b.address}:6402/metadata", 1, 2, "tcp", "", f"{b.address}:6401"
        )  # fmt: skip
    uri = parse_store_uri(services.mooncake_store_uri(hosts["c"].address, segment="64MiB"))
    assert (uri.scheme, uri.host, uri.port) == ("mooncake", b.address, 6401)
    assert dict(uri.options) == {
        "metadata": f"http://{b.address}:6402/metadata",
        "local_hostname": hosts["c"].address,
        "protocol": "tcp",
        "segment": "64MiB",
    }
    assert b.pids() == []
    assert not b.wait_for_port(6400, 0.3) and not b.wait_for_port(6401, 0.3)
    assert {p.name for p in tmp_path.iterdir()} >= {"redis-server.log", "mooncake_master.log"}
