"""The ledger conformance suite on ``sqlite:///path``, plus what only a file can get wrong."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest
from ledger_conformance import LedgerConformance, ids, make_ref, make_refs

from dataflow.contracts import (
    BackendUnavailableError,
    CorruptRecordError,
    InvalidInputError,
    LedgerConflictError,
    ProducerState,
    SchemaVersionError,
)
from dataflow.control.ledger import open_ledger


class TestSQLiteLedger(LedgerConformance):
    @pytest.fixture
    def uri(self, tmp_path: Path) -> str:
        return f"sqlite://{tmp_path}/ledger.db"


def test_pragmas_wal_and_full_sync(tmp_path: Path) -> None:
    ledger = open_ledger(f"sqlite://{tmp_path}/l.db")
    ledger.open_run("run-1", 4, resume=False)
    ledger.close()
    conn = sqlite3.connect(tmp_path / "l.db")
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("SELECT name, version FROM ledger_schema").fetchall() == [
        ("dataflow-ledger", 4)
    ]
    conn.close()


# The schema-1 layout, as a file written by an older dataflow holds it: ref text inline.
_SCHEMA_1 = (
    "CREATE TABLE ledger_schema (name TEXT PRIMARY KEY, version INTEGER NOT NULL)",
    "CREATE TABLE meta (k TEXT PRIMARY KEY, v TEXT NOT NULL) WITHOUT ROWID",
    "CREATE TABLE counters (k TEXT PRIMARY KEY, v INTEGER NOT NULL) WITHOUT ROWID",
    """CREATE TABLE samples (
        seq INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, state INTEGER NOT NULL,
        rank INTEGER NOT NULL, win INTEGER NOT NULL, step INTEGER NOT NULL,
        reason TEXT NOT NULL, nbytes INTEGER NOT NULL, ref TEXT NOT NULL)""",
    "CREATE INDEX samples_by_state ON samples (state, seq)",
    "CREATE INDEX samples_assigned ON samples (rank, win) WHERE state = 1",
    """CREATE TABLE prompts (
        id TEXT PRIMARY KEY, seq INTEGER NOT NULL, state INTEGER NOT NULL,
        attempt INTEGER NOT NULL, worker TEXT NOT NULL, deadline REAL NOT NULL,
        reason TEXT NOT NULL, task TEXT NOT NULL) WITHOUT ROWID""",
    "CREATE INDEX prompts_by_state ON prompts (state, seq)",
    "CREATE TABLE weights (ord INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, record TEXT NOT NULL)",
)


def _schema_1_file(path: Path) -> list:
    """A schema-1 ledger holding two committed refs, one of them assigned to rank 1."""
    from dataflow.control.ledger._serial import encode_ref

    refs = [make_ref(i, run="old") for i in range(2)]
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    for statement in _SCHEMA_1:
        conn.execute(statement)
    conn.execute("INSERT INTO ledger_schema VALUES ('dataflow-ledger', 1)")
    meta = {"run_id": "old", "quantum": "1", "next_seq": "2", "next_window": "1"}
    conn.executemany("INSERT INTO meta VALUES (?, ?)", meta.items())
    counters = {"s.committed": 1, "s.assigned": 1, "bytes.in_flight": 2 * refs[0].estimated_bytes}
    conn.executemany("INSERT INTO counters VALUES (?, ?)", counters.items())
    conn.executemany(
        "INSERT INTO samples VALUES (?, ?, ?, ?, ?, -1, '', ?, ?)",
        [
            (0, refs[0].sample_id, 1, 1, 0, refs[0].estimated_bytes, encode_ref(refs[0])),
            (1, refs[1].sample_id, 0, -1, -1, refs[1].estimated_bytes, encode_ref(refs[1])),
        ],
    )
    conn.close()
    return refs


def test_a_schema_1_file_is_read_read_only_and_upgraded_when_opened_to_write(
    tmp_path: Path,
) -> None:
    path = tmp_path / "old.db"
    refs = _schema_1_file(path)
    reader = open_ledger(f"sqlite://{path}", read_only=True)
    assert reader.refs([r.sample_id for r in refs]) == refs
    assert reader.assigned(1) == [refs[0]]
    reader.close()
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT version FROM ledger_schema").fetchone() == (1,)  # not written
    conn.close()

    ledger = open_ledger(f"sqlite://{path}")
    assert ledger.refs([r.sample_id for r in refs]) == refs
    assert ledger.assigned(1) == [refs[0]]
    window = ledger.assign_window(1, 1)
    assert window is not None and window.assignments == ((refs[1].sample_id,),)
    assert ledger.commit([make_ref(7, run="old")]).committed == (make_ref(7).sample_id,)
    assert ledger.status().samples["assigned"] == 2 and ledger.status().in_flight == 3
    ledger.close()
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT version FROM ledger_schema").fetchone() == (4,)
    columns = [row[1] for row in conn.execute("PRAGMA table_info(samples)")]
    assert "ref" not in columns
    # The upgraded rows have no CRC (validated in full when read); the new commit has one.
    crcs = conn.execute("SELECT crc FROM sample_refs ORDER BY seq").fetchall()
    assert crcs[:2] == [(None,), (None,)] and isinstance(crcs[2][0], int)
    indexes = {row[1] for row in conn.execute("PRAGMA index_list(samples)")}
    assert {"samples_by_state", "samples_assigned"} <= indexes
    assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    conn.close()


def test_a_schema_2_file_is_read_read_only_and_upgraded_when_opened_to_write(
    tmp_path: Path,
) -> None:
    path = tmp_path / "v2.db"
    ledger = open_ledger(f"sqlite://{path}")
    ledger.open_run("old", 1, resume=False)
    refs = make_refs(0, 2, run="old")
    ledger.commit(refs)
    ledger.close()
    conn = sqlite3.connect(path)  # back to the schema-2 layout: no CRC column
    conn.execute("ALTER TABLE sample_refs DROP COLUMN crc")
    conn.execute("UPDATE ledger_schema SET version = 2")
    conn.commit()
    conn.close()
    reader = open_ledger(f"sqlite://{path}", read_only=True)
    assert reader.refs([r.sample_id for r in refs]) == refs
    reader.close()
    ledger = open_ledger(f"sqlite://{path}")
    assert ledger.refs([r.sample_id for r in refs]) == refs
    ledger.commit([make_ref(5, run="old")])
    assert ledger.refs([make_ref(5).sample_id]) == [make_ref(5, run="old")]
    ledger.close()
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT version FROM ledger_schema").fetchone() == (4,)
    crcs = conn.execute("SELECT crc FROM sample_refs ORDER BY seq").fetchall()
    assert crcs[:2] == [(None,), (None,)] and isinstance(crcs[2][0], int)
    conn.close()


def _as_schema_3(path: Path) -> None:
    """Rewrite a closed ledger file as schema 3 wrote it: each ref as the codec's JSON object."""
    from dataflow.control.ledger._packed import unpack_ref
    from dataflow.control.ledger._serial import encode_ref, ref_crc

    conn = sqlite3.connect(path)
    rows = conn.execute("SELECT seq, ref FROM sample_refs").fetchall()
    texts = [(seq, encode_ref(unpack_ref(text, "test"))) for seq, text in rows]
    conn.executemany(
        "UPDATE sample_refs SET ref = ?, crc = ? WHERE seq = ?",
        [(text, ref_crc(text), seq) for seq, text in texts],
    )
    conn.execute("UPDATE ledger_schema SET version = 3")
    conn.commit()
    conn.close()


def test_a_schema_3_file_reads_its_object_texts_and_packs_new_commits(tmp_path: Path) -> None:
    path = tmp_path / "v3.db"
    ledger = open_ledger(f"sqlite://{path}")
    ledger.open_run("old", 2, resume=False)
    refs = make_refs(0, 4, run="old")
    ledger.commit(refs)
    assert ledger.assign_window(1, 2) is not None
    ledger.close()
    _as_schema_3(path)
    reader = open_ledger(f"sqlite://{path}", read_only=True)
    assert reader.refs(ids(refs)) == refs and reader.assigned(0) == refs[:2]
    reader.close()
    ledger = open_ledger(f"sqlite://{path}")
    assert ledger.refs(ids(refs)) == refs
    ledger.commit([make_ref(5, run="old")])
    assert ledger.committed(10) == [*refs[2:], make_ref(5, run="old")]
    ledger.close()
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT version FROM ledger_schema").fetchone() == (4,)
    texts = [row[0] for row in conn.execute("SELECT ref FROM sample_refs ORDER BY seq")]
    assert [text[0] for text in texts] == ["{"] * 4 + ["["]  # old rows kept, the new one packed
    conn.close()


def test_a_newer_schema_is_refused_by_this_code(tmp_path: Path) -> None:
    path = tmp_path / "v5.db"
    open_ledger(f"sqlite://{path}").close()
    conn = sqlite3.connect(path)
    conn.execute("UPDATE ledger_schema SET version = 5")
    conn.commit()
    conn.close()
    with pytest.raises(SchemaVersionError, match="schema 5, newer than the 4"):
        open_ledger(f"sqlite://{path}")


def _alter_ref_text(path: Path, sample_id: str, edit: Callable[[str], str]) -> None:
    conn = sqlite3.connect(path)
    (text,) = conn.execute(
        "SELECT ref FROM sample_refs WHERE seq = (SELECT seq FROM samples WHERE id = ?)",
        (sample_id,),
    ).fetchone()
    new = edit(text)
    assert new != text
    conn.execute(
        "UPDATE sample_refs SET ref = ? WHERE seq = (SELECT seq FROM samples WHERE id = ?)",
        (new, sample_id),
    )
    conn.commit()
    conn.close()


@pytest.mark.parametrize(
    ("schema", "edit"),
    [
        (4, lambda text: text.replace(",100,4,", ",101,4,")),
        (4, lambda text: text.replace('"unknown"', '"other"')),
        (4, lambda text: text.replace('{"i":1}', '{"i":2}')),
        (3, lambda text: text.replace('"estimated_bytes":100', '"estimated_bytes":101')),
        (3, lambda text: text.replace('"target_version":"unknown"', '"target_version":"other"')),
        (3, lambda text: text.replace('"metadata":{"i":1}', '"metadata":{"i":2}')),
    ],
    ids=[
        f"{form}-{field}"
        for form in ("packed", "object")
        for field in ("estimated_bytes", "target_version", "metadata")
    ],
)
def test_a_ref_text_altered_after_commit_fails_its_checksum(
    tmp_path: Path, schema: int, edit: Callable[[str], str]
) -> None:
    # Valid JSON and a valid-looking ref, but not what was committed: refused, naming the row,
    # on every read path (by id, a rank's window, the committed list); other rows still read.
    # Both stored forms: packed (schema 4) and the codec's object (rows from schema 3).
    path = tmp_path / "l.db"
    ledger = open_ledger(f"sqlite://{path}")
    ledger.open_run("run-1", 2, resume=False)
    refs = make_refs(0, 4, run="run-1")
    ledger.commit(refs)
    ledger.close()
    if schema == 3:
        _as_schema_3(path)
    victim = refs[1].sample_id
    _alter_ref_text(path, victim, edit)
    ledger = open_ledger(f"sqlite://{path}")
    try:
        for read in (
            lambda: ledger.refs([victim]),
            lambda: ledger.committed(4),
        ):
            with pytest.raises(CorruptRecordError, match="checksum") as info:
                read()
            assert victim in str(info.value)
        assert ledger.refs([refs[0].sample_id, refs[2].sample_id]) == [refs[0], refs[2]]
        assert ledger.assign_window(1, 2) is not None
        with pytest.raises(CorruptRecordError, match="checksum"):
            ledger.assigned(0)
    finally:
        ledger.close()


def test_a_ref_text_moved_to_another_row_is_refused(tmp_path: Path) -> None:
    # Both texts and their CRCs intact, but swapped between rows: the id check refuses it.
    path = tmp_path / "l.db"
    ledger = open_ledger(f"sqlite://{path}")
    ledger.open_run("run-1", 2, resume=False)
    refs = make_refs(0, 2, run="run-1")
    ledger.commit(refs)
    ledger.close()
    conn = sqlite3.connect(path)
    conn.execute(
        "UPDATE sample_refs SET (ref, crc) = "
        "(SELECT ref, crc FROM sample_refs WHERE seq = (SELECT min(seq) FROM sample_refs)) "
        "WHERE seq = (SELECT max(seq) FROM sample_refs)"
    )
    conn.commit()
    conn.close()
    ledger = open_ledger(f"sqlite://{path}")
    try:
        with pytest.raises(CorruptRecordError) as info:
            ledger.refs([refs[1].sample_id])
        assert refs[1].sample_id in str(info.value) and refs[0].sample_id in str(info.value)
    finally:
        ledger.close()


def test_markers_written_by_another_connection_are_seen_by_the_next_transaction(
    tmp_path: Path,
) -> None:
    uri = f"sqlite://{tmp_path}/shared.db"
    one, two = open_ledger(uri), open_ledger(uri)
    one.open_run("run-1", 2, resume=False)
    assert two.markers().run_id == "run-1" and two.markers().quantum == 2
    # Commits alternate between the connections: each sees the other's next commit order.
    for i in range(6):
        (one if i % 2 else two).commit([make_ref(i, run="run-1")])
    assert one.assign_window(1, 2) is not None and two.assign_window(1, 2) is not None
    assert one.markers() == two.markers()
    two.set_producer_state(ProducerState.RUNNING)
    two.set_producer_state(ProducerState.CLOSED)
    with pytest.raises(LedgerConflictError, match="the producer closed the run"):
        one.commit([make_ref(9, run="run-1")])
    assert one.status() == two.status() and one.status().samples["assigned"] == 4
    one.close()
    two.close()


def test_a_file_that_is_not_sqlite_is_refused_and_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_bytes(b"hello, this is not a database\n" * 10)
    with pytest.raises(CorruptRecordError, match="not an SQLite database"):
        open_ledger(f"sqlite://{path}")
    assert path.read_bytes() == b"hello, this is not a database\n" * 10


def test_an_sqlite_file_that_is_not_a_ledger_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE users (name TEXT)")
    conn.commit()
    conn.close()
    with pytest.raises(CorruptRecordError, match=r"not a dataflow ledger \(tables: \['users'\]\)"):
        open_ledger(f"sqlite://{path}")
    conn = sqlite3.connect(path)
    tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
    conn.close()
    assert tables == ["users"]


def test_a_corrupted_ledger_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    ledger = open_ledger(f"sqlite://{path}")
    ledger.open_run("run-1", 4, resume=False)
    ledger.commit(make_refs(0, 200))
    ledger.close()
    data = bytearray(path.read_bytes())
    # Scribble over everything after the first page: tables and indexes are damaged.
    data[4096:] = b"\xff" * (len(data) - 4096)
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptRecordError, match=str(path)):
        open_ledger(f"sqlite://{path}")
    assert path.read_bytes() == bytes(data)  # refused, and left exactly as found


def test_a_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="is a directory"):
        open_ledger(f"sqlite://{tmp_path}")


def test_uri_options(tmp_path: Path) -> None:
    ledger = open_ledger(f"sqlite://{tmp_path}/l.db?busy_timeout_s=2&max_prompt_attempts=1")
    ledger.close()
    with pytest.raises(InvalidInputError, match="unknown option 'namespace'"):
        open_ledger(f"sqlite://{tmp_path}/l.db?namespace=x")
    with pytest.raises(InvalidInputError, match="does not parse"):
        open_ledger(f"sqlite://{tmp_path}/l.db?busy_timeout_s=soon")


def test_a_forked_child_must_open_its_own_ledger(tmp_path: Path) -> None:
    import multiprocessing

    ledger = open_ledger(f"sqlite://{tmp_path}/l.db")
    ledger.open_run("run-1", 4, resume=False)
    context = multiprocessing.get_context("fork")
    result = context.Queue()

    def child() -> None:
        try:
            ledger.status()
            result.put("used the parent's connection")
        except Exception as exc:  # reported to the parent
            result.put(f"{type(exc).__name__}: {exc}")

    proc = context.Process(target=child)
    proc.start()
    proc.join(timeout=30)
    message = result.get(timeout=5)
    result.close()
    assert message.startswith("ClosedError") and "must open its own" in message
    assert ledger.status().markers.run_id == "run-1"  # the parent's ledger still works
    ledger.close()


def test_a_path_that_cannot_be_created_is_unavailable(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(BackendUnavailableError, match="cannot open the ledger file"):
        open_ledger(f"sqlite://{blocker}/sub/ledger.db")
    assert blocker.read_text() == "not a directory"


def test_network_filesystems_are_recognised_by_the_mount_table() -> None:
    from dataflow.control.ledger._sqlite_schema import network_filesystem

    table = "\n".join(
        [
            "/dev/vda / ext4 rw 0 0",
            "server:/export /mnt/shared nfs4 rw 0 0",
            "/dev/vdb /mnt/shared/local ext4 rw 0 0",
            "//host/share /mnt/smb cifs rw 0 0",
        ]
    )
    assert network_filesystem(Path("/mnt/shared/runs"), table) == "nfs4"
    assert network_filesystem(Path("/mnt/shared/local/runs"), table) is None  # longest mount wins
    assert network_filesystem(Path("/mnt/smb"), table) == "cifs"
    assert network_filesystem(Path("/mnt/sharedx"), table) is None  # not a path prefix
    assert network_filesystem(Path("/home/me"), table) is None


def _open_at_barrier(path: str, barrier, results) -> None:  # type: ignore[no-untyped-def]
    from dataflow.control.ledger.sqlite import SQLiteStorage

    barrier.wait()
    try:
        SQLiteStorage(path).close()
        results.put("ok")
    except Exception as exc:  # reported to the parent, which asserts on it
        results.put(f"{type(exc).__name__}: {exc}")


def test_processes_creating_the_same_fresh_ledger_at_once_all_open_it(tmp_path: Path) -> None:
    # A producer and a consumer started together both create the ledger file. Entering WAL
    # upgrades a lock, which SQLite refuses at once rather than waiting; before the retry this
    # failed in about one round in six with "database is locked".
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    for attempt in range(24):
        path = str(tmp_path / f"fresh-{attempt}.db")
        barrier, results = ctx.Barrier(4), ctx.Queue()
        procs = [
            ctx.Process(target=_open_at_barrier, args=(path, barrier, results)) for _ in range(4)
        ]
        for proc in procs:
            proc.start()
        outcomes = [results.get(timeout=60) for _ in procs]
        for proc in procs:
            proc.join(30)
        assert outcomes == ["ok"] * 4, (attempt, outcomes)
    ledger = open_ledger(f"sqlite://{tmp_path}/fresh-0.db")
    assert ledger.status().samples["committed"] == 0
    ledger.close()
    conn = sqlite3.connect(tmp_path / "fresh-0.db")
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()


def test_a_task_row_that_fails_to_decode_leaves_no_cursor_behind(tmp_path: Path) -> None:
    import gc
    import sys

    from dataflow.contracts import PromptTask

    path = tmp_path / "l.db"
    ledger = open_ledger(f"sqlite://{path}")
    ledger.open_run("run-1", 2, resume=False)
    ledger.add_prompts([PromptTask(f"t{i}", {"input_ids": [i]}) for i in range(3)])
    ledger.close()
    with sqlite3.connect(path) as db:
        db.execute("UPDATE prompts SET task = '{\"task_id\": 7, \"garb' WHERE id = 't0'")
    unraisable: list[str] = []
    previous, sys.unraisablehook = sys.unraisablehook, lambda u: unraisable.append(repr(u))
    try:
        ledger = open_ledger(f"sqlite://{path}")
        with pytest.raises(CorruptRecordError, match="task 't0'") as info:
            ledger.lease_prompts("w", 3, 30.0)
        ledger.close()
        del info  # its traceback would keep a suspended generator alive until the test ends
        gc.collect()
    finally:
        sys.unraisablehook = previous
    assert unraisable == []  # a suspended row generator would be finalised on a closed database
