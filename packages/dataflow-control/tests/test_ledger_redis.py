"""The ledger conformance suite on a real redis-server, plus what only a network can get wrong."""

from __future__ import annotations

import itertools
import socket
import threading
import time
from collections.abc import Iterator

import pytest
import redis
from dataflow_testing.ports import free_port
from dataflow_testing.redis import RedisServer
from ledger_conformance import LedgerConformance, make_refs

from dataflow.contracts import (
    BackendUnavailableError,
    CorruptRecordError,
    InvalidInputError,
    SchemaVersionError,
)
from dataflow.control.ledger import open_ledger

pytestmark = pytest.mark.redis
_names = itertools.count()


class TestRedisLedger(LedgerConformance):
    @pytest.fixture
    def uri(self, redis_server: RedisServer) -> str:
        return redis_server.url(0, namespace=f"conformance-{next(_names)}")


def test_keys_are_namespaced(redis_server: RedisServer) -> None:
    ledger = open_ledger(redis_server.url(1, namespace="ns-a"))
    other = open_ledger(redis_server.url(1, namespace="ns-b"))
    ledger.open_run("run-1", 4, resume=False)
    ledger.commit(make_refs(0, 3))
    assert other.status().samples["committed"] == 0
    keys = redis.Redis(port=redis_server.port, db=1, decode_responses=True).keys("*")
    assert "dataflow:ns-a:meta" in keys
    assert all(k.startswith("dataflow:ns-a:") for k in keys if k != "dataflow:ns-b:schema")
    ledger.close()
    other.close()


def test_unreachable_redis_fails_within_the_connect_timeout() -> None:
    port = free_port()  # nothing listens there
    start = time.monotonic()
    with pytest.raises(BackendUnavailableError, match=f"cannot reach Redis at 127.0.0.1:{port}"):
        open_ledger(f"redis://127.0.0.1:{port}/0", connect_timeout_s=1.0)
    assert time.monotonic() - start < 3.0


@pytest.fixture
def silent_server() -> Iterator[int]:
    """A TCP port that accepts connections but never answers (a hung server)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    stop = threading.Event()
    accepted: list[socket.socket] = []

    def accept() -> None:
        sock.settimeout(0.1)
        while not stop.is_set():
            try:
                accepted.append(sock.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield sock.getsockname()[1]
    stop.set()
    thread.join(timeout=2)
    for conn in accepted:
        conn.close()
    sock.close()


def test_hung_redis_fails_within_the_connect_timeout(silent_server: int) -> None:
    start = time.monotonic()
    with pytest.raises(BackendUnavailableError, match="cannot reach Redis"):
        open_ledger(f"redis://127.0.0.1:{silent_server}/0?connect_timeout_s=1")
    elapsed = time.monotonic() - start
    assert 0.9 <= elapsed < 3.0


def test_a_server_dying_mid_run_surfaces_as_unavailable(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from dataflow_testing.redis import start_redis_server

    with start_redis_server(tmp_path) as server:
        ledger = open_ledger(server.url(0), connect_timeout_s=1.0, op_timeout_s=1.0)
        ledger.open_run("run-1", 4, resume=False)
        server.process.kill()
        server.process.wait()
        with pytest.raises(BackendUnavailableError):
            ledger.commit(make_refs(0, 1))
        ledger.close()


def test_a_newer_schema_is_refused(redis_server: RedisServer) -> None:
    client = redis.Redis(port=redis_server.port, db=2)
    client.set("dataflow:future:schema", 99)
    with pytest.raises(SchemaVersionError, match="schema 99 is newer"):
        open_ledger(redis_server.url(2, namespace="future"))


def test_a_foreign_key_in_the_namespace_is_reported_as_corrupt(redis_server: RedisServer) -> None:
    client = redis.Redis(port=redis_server.port, db=2)
    client.set("dataflow:clash:meta", "not a hash")
    ledger = open_ledger(redis_server.url(2, namespace="clash"))
    with pytest.raises(CorruptRecordError, match="WRONGTYPE"):
        ledger.status()
    ledger.close()


def test_bad_redis_options(redis_server: RedisServer) -> None:
    with pytest.raises(InvalidInputError, match="connect_timeout_s"):
        open_ledger(redis_server.url(0), connect_timeout_s=0)
    with pytest.raises(InvalidInputError, match="namespace"):
        open_ledger(redis_server.url(0, namespace="a/b"))


def test_concurrent_writers_never_lose_an_update(redis_server: RedisServer) -> None:
    uri = redis_server.url(3, namespace="contention")
    first = open_ledger(uri)
    first.open_run("run-1", 4, resume=False)
    writers = [open_ledger(uri) for _ in range(4)]

    def commit_range(ledger, start: int) -> None:  # type: ignore[no-untyped-def]
        for i in range(start, start + 50, 5):
            ledger.commit(make_refs(i, 5))

    threads = [
        threading.Thread(target=commit_range, args=(w, n * 50)) for n, w in enumerate(writers)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    status = first.status()
    assert status.samples["committed"] == 200
    assert status.in_flight_bytes == 200 * 100
    windows = []
    while (w := first.assign_window(2, 2)) is not None:
        windows.append(w)
    assert len(windows) == 50
    for ledger in [first, *writers]:
        ledger.close()


def test_a_refusal_decided_on_a_torn_snapshot_is_rerun(redis_server: RedisServer) -> None:
    """Another writer commits between an operation's reads: its refusal must not stand."""
    from dataflow.contracts import LedgerConflictError
    from dataflow.contracts.uris import parse_ledger_uri
    from dataflow.control.ledger.redis import RedisStorage

    uri = redis_server.url(7, namespace="torn")
    storage = RedisStorage(parse_ledger_uri(uri), namespace="torn")
    other = open_ledger(uri)
    other.open_run("run-1", 4, resume=False)
    attempts = []

    def operation(tx):  # type: ignore[no-untyped-def]
        attempts.append(tx.meta().get("run_id"))
        if len(attempts) == 1:
            other.commit(make_refs(0, 1))  # a writer slips in between our reads
            raise LedgerConflictError("decided on what was read before the commit")
        return tx.counters().get("s.committed", 0)

    assert storage.write(operation) == 1
    assert attempts == ["run-1", "run-1"]

    def refuse(tx):  # type: ignore[no-untyped-def]
        raise LedgerConflictError("refused on a consistent snapshot")

    with pytest.raises(LedgerConflictError, match="consistent snapshot"):
        storage.write(refuse)
    storage.close()
    other.close()


def test_a_ref_altered_after_commit_fails_its_checksum(redis_server: RedisServer) -> None:
    # Valid JSON, a valid-looking ref and an intact CRC prefix, but not the committed text.
    ledger = open_ledger(redis_server.url(4, namespace="altered"))
    ledger.open_run("run-1", 2, resume=False)
    refs = make_refs(0, 2)
    ledger.commit(refs)
    client = redis.Redis(port=redis_server.port, db=4, decode_responses=True)
    victim = refs[1].sample_id
    value = client.hget("dataflow:altered:refs", victim)
    assert value is not None and '"estimated_bytes":100' in value
    client.hset("dataflow:altered:refs", victim, value.replace('es":100', 'es":101'))
    with pytest.raises(CorruptRecordError, match="checksum") as info:
        ledger.refs([victim])
    assert victim in str(info.value)
    client.hset("dataflow:altered:refs", victim, "zz" + value[2:])  # the CRC itself garbled
    with pytest.raises(CorruptRecordError, match="checksum"):
        ledger.refs([victim])
    assert ledger.refs([refs[0].sample_id]) == [refs[0]]  # the good row still reads
    ledger.close()


def test_a_schema_1_namespace_is_upgraded_and_its_bare_texts_still_read(
    redis_server: RedisServer,
) -> None:
    ledger = open_ledger(redis_server.url(4, namespace="old"))
    ledger.open_run("run-1", 2, resume=False)
    refs = make_refs(0, 2)
    ledger.commit(refs)
    ledger.close()
    client = redis.Redis(port=redis_server.port, db=4, decode_responses=True)
    for ref in refs:  # back to schema 1: the text without its CRC
        value = client.hget("dataflow:old:refs", ref.sample_id)
        assert value is not None
        client.hset("dataflow:old:refs", ref.sample_id, value[8:])
    client.set("dataflow:old:schema", 1)
    ledger = open_ledger(redis_server.url(4, namespace="old"))
    assert client.get("dataflow:old:schema") == "2"
    assert ledger.refs([r.sample_id for r in refs]) == refs
    ledger.close()
