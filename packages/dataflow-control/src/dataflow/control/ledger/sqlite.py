"""``sqlite:///path``: the durable single-host ledger in one SQLite file.

Guarantees: WAL journal with ``synchronous=FULL`` (a returned call survives power loss), one
``BEGIN IMMEDIATE`` transaction per state change (so writers in several processes sharing the
file are serialised, and readers see consistent snapshots), a busy timeout instead of instant
"database is locked" failures, and a versioned schema. A file that is not a ledger, or fails
its integrity check, raises ``CorruptRecordError`` and is left untouched.

Never put the file on a network filesystem (NFS, SMB, …): SQLite's locks and WAL shared memory
do not work there; opening such a path is refused. Open a ledger per process (after any fork).
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, TypeVar

from dataflow.contracts.errors import (
    BackendUnavailableError,
    CapacityExceededError,
    ClosedError,
    CorruptRecordError,
    InvalidInputError,
)
from dataflow.contracts.features import SampleRef
from dataflow.contracts.prompt import PromptTask
from dataflow.contracts.states import PromptState, SampleState
from dataflow.contracts.weights import WeightVersion
from dataflow.control.ledger._meta import RunMeta
from dataflow.control.ledger._packed import pack_ref, read_ref
from dataflow.control.ledger._serial import decode_record, encode_record, ref_crc
from dataflow.control.ledger._sqlite_schema import (
    PROMPT_CODES,
    SAMPLE_CODES,
    SCHEMA,
    SCHEMA_NAME,
    SCHEMA_VERSION,
    check_file,
    read_older,
    schema_version,
    upgrade,
)
from dataflow.control.ledger._tx import (
    LedgerStorage,
    LedgerTx,
    PromptChange,
    PromptRow,
    SampleChange,
    SampleRow,
)

R = TypeVar("R")

SAMPLE_STATES = {code: state for state, code in SAMPLE_CODES.items()}
PROMPT_STATES = {code: state for state, code in PROMPT_CODES.items()}
_CHUNK = 500  # ids per IN (...) list, well under SQLite's variable limit
_SAMPLE_COLUMNS = "id, seq, state, rank, win, step, reason, nbytes"
_PROMPT_COLUMNS = "id, seq, state, attempt, worker, deadline, reason"


def _chunks(items: Sequence[str]) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), _CHUNK):
        yield items[start : start + _CHUNK]


def _sample(row: tuple[Any, ...]) -> SampleRow:
    return SampleRow(row[0], row[1], SAMPLE_STATES[row[2]], *row[3:])


def _prompt(row: tuple[Any, ...]) -> PromptRow:
    return PromptRow(row[0], row[1], PROMPT_STATES[row[2]], *row[3:])


class _MetaCache:
    """The meta table as this connection last saw it committed, tagged with the file's
    ``PRAGMA data_version`` at that read. The version changes only when another connection
    commits, so an unchanged version means the table still holds exactly these values plus
    what this connection itself committed since (merged in after each successful COMMIT).
    """

    __slots__ = ("parsed", "values", "version")

    def __init__(self) -> None:
        self.version: int | None = None
        self.values: dict[str, str] | None = None  # never mutated in place once cached
        self.parsed: RunMeta | None = None

    def clear(self) -> None:
        self.version = self.values = self.parsed = None


class _SQLiteTx(LedgerTx):
    def __init__(self, conn: sqlite3.Connection, path: Path, cache: _MetaCache) -> None:
        self._c = conn
        self._path = path
        self._cache = cache
        self._values: dict[str, str] | None = None
        self.meta_written: dict[str, str] = {}

    def _in(self, sql: str, ids: Sequence[str]) -> list[tuple[Any, ...]]:
        # Fetched whole (never a lazy generator): a row that fails to decode must not leave a
        # cursor suspended past the transaction, to be finalised by gc on a closed connection.
        rows: list[tuple[Any, ...]] = []
        for chunk in _chunks(ids):
            marks = ",".join("?" * len(chunk))
            rows.extend(self._c.execute(sql.format(marks), chunk).fetchall())
        return rows

    def _meta_values(self) -> dict[str, str]:
        # One cheap pragma instead of reading and parsing the markers in every transaction.
        if self._values is None:
            cache = self._cache
            version = self._c.execute("PRAGMA data_version").fetchone()[0]
            if cache.values is None or cache.version != version:
                cache.values = dict(self._c.execute("SELECT k, v FROM meta"))
                cache.version, cache.parsed = version, None
            self._values = cache.values
        return self._values

    def meta(self) -> dict[str, str]:
        return dict(self._meta_values())

    def run_meta(self) -> RunMeta:
        values = self._meta_values()
        cache = self._cache
        if cache.values is values and cache.parsed is not None:
            return cache.parsed
        parsed = RunMeta.load(values)
        if cache.values is values:
            cache.parsed = parsed
        return parsed

    def counters(self) -> dict[str, int]:
        return dict(self._c.execute("SELECT k, v FROM counters"))

    def samples(self, sample_ids: Sequence[str]) -> dict[str, SampleRow]:
        sql = f"SELECT {_SAMPLE_COLUMNS} FROM samples WHERE id IN ({{}})"
        return {row[0]: _sample(row) for row in self._in(sql, sample_ids)}

    # The next commit order is max(seq) + 1 (rows are never deleted), read with the lookups.
    stores_next_seq = False

    def commit_reads(
        self, sample_ids: Sequence[str], task_ids: Sequence[str], meta: RunMeta
    ) -> tuple[dict[str, SampleRow], dict[str, PromptRow], int]:
        if len(sample_ids) + len(task_ids) > _CHUNK:
            top = self._c.execute("SELECT max(seq) FROM samples").fetchone()[0]
            known, prompts = self.samples(sample_ids), self.prompts(task_ids) if task_ids else {}
        else:
            # One statement: the known samples, the known tasks and the newest seq.
            sql = (
                f"SELECT 0, {_SAMPLE_COLUMNS} FROM samples "
                f"WHERE id IN ({','.join('?' * len(sample_ids))}) UNION ALL "
            )
            if task_ids:
                sql += (
                    f"SELECT 1, {_PROMPT_COLUMNS}, NULL FROM prompts "
                    f"WHERE id IN ({','.join('?' * len(task_ids))}) UNION ALL "
                )
            sql += "SELECT 2, NULL, max(seq), NULL, NULL, NULL, NULL, NULL, NULL FROM samples"
            known, prompts, top = {}, {}, None
            for row in self._c.execute(sql, (*sample_ids, *task_ids)).fetchall():
                if row[0] == 0:
                    known[row[1]] = _sample(row[1:])
                elif row[0] == 1:
                    prompts[row[1]] = _prompt(row[1:8])
                else:
                    top = row[2]
        return known, prompts, meta.next_seq if top is None else max(meta.next_seq, top + 1)

    def samples_in(self, state: SampleState, limit: int | None = None) -> list[SampleRow]:
        sql = f"SELECT {_SAMPLE_COLUMNS} FROM samples WHERE state = ? ORDER BY seq LIMIT ?"
        rows = self._c.execute(sql, (SAMPLE_CODES[state], -1 if limit is None else limit))
        return [_sample(row) for row in rows]

    def assigned_rows(self, rank: int, after_window: int) -> list[SampleRow]:
        sql = (
            f"SELECT {_SAMPLE_COLUMNS} FROM samples INDEXED BY samples_assigned "
            f"WHERE state = {SAMPLE_CODES[SampleState.ASSIGNED]} AND rank = ? AND win > ? "
            "ORDER BY win, seq"
        )
        return [_sample(row) for row in self._c.execute(sql, (rank, after_window)).fetchall()]

    def assign_oldest(self, quantum: int, per_rank: int, window_id: int) -> list[str] | None:
        committed = SAMPLE_CODES[SampleState.COMMITTED]
        rows = self._c.execute(
            "SELECT seq, id FROM samples WHERE state = ? ORDER BY seq LIMIT ?", (committed, quantum)
        ).fetchall()
        if len(rows) < quantum:
            return None
        # These are the oldest COMMITTED rows, so every COMMITTED row between a rank's first and
        # last seq is one of that rank's: one range UPDATE per rank, no seq list to bind.
        for rank, start in enumerate(range(0, quantum, per_rank)):
            changed = self._c.execute(
                "UPDATE samples SET state = ?, rank = ?, win = ? "
                "WHERE state = ? AND seq BETWEEN ? AND ?",
                (
                    SAMPLE_CODES[SampleState.ASSIGNED],
                    rank,
                    window_id,
                    committed,
                    rows[start][0],
                    rows[start + per_rank - 1][0],
                ),
            ).rowcount
            if changed != per_rank:  # cannot happen inside this transaction; never half-written
                raise CorruptRecordError(
                    f"{self._path}: window {window_id} rank {rank} assigned {changed} rows, "
                    f"not {per_rank}"
                )
        return [sid for _, sid in rows]

    def assigned_refs(self, rank: int, after_window: int) -> list[SampleRef]:
        # The texts with the rows, in one query, and no SampleRow built (dispatch's hot path).
        sql = (
            "SELECT s.id, r.ref, r.crc FROM samples AS s INDEXED BY samples_assigned "
            "JOIN sample_refs AS r ON r.seq = s.seq "
            f"WHERE s.state = {SAMPLE_CODES[SampleState.ASSIGNED]} AND s.rank = ? AND s.win > ? "
            "ORDER BY s.win, s.seq"
        )
        path = self._path
        return [
            read_ref(text, crc, sid, f"{path} sample {sid!r}")
            for sid, text, crc in self._c.execute(sql, (rank, after_window)).fetchall()
        ]

    def refs(self, sample_ids: Sequence[str]) -> dict[str, SampleRef]:
        sql = (
            "SELECT s.id, r.ref, r.crc FROM samples AS s "
            "JOIN sample_refs AS r ON r.seq = s.seq WHERE s.id IN ({})"
        )
        path = self._path
        return {
            sid: read_ref(text, crc, sid, f"{path} sample {sid!r}")
            for sid, text, crc in self._in(sql, sample_ids)
        }

    def prompts(self, task_ids: Sequence[str]) -> dict[str, PromptRow]:
        sql = f"SELECT {_PROMPT_COLUMNS} FROM prompts WHERE id IN ({{}})"
        return {row[0]: _prompt(row) for row in self._in(sql, task_ids)}

    def prompts_in(self, state: PromptState, limit: int | None = None) -> list[PromptRow]:
        sql = f"SELECT {_PROMPT_COLUMNS} FROM prompts WHERE state = ? ORDER BY seq LIMIT ?"
        rows = self._c.execute(sql, (PROMPT_CODES[state], -1 if limit is None else limit))
        return [_prompt(row) for row in rows]

    def tasks(self, task_ids: Sequence[str]) -> dict[str, PromptTask]:
        rows = self._in("SELECT id, task FROM prompts WHERE id IN ({})", task_ids)
        return {
            tid: decode_record(text, PromptTask, f"{self._path} task {tid!r}") for tid, text in rows
        }

    def weights(self) -> list[WeightVersion]:
        rows = self._c.execute("SELECT id, record FROM weights ORDER BY ord").fetchall()
        return [
            decode_record(text, WeightVersion, f"{self._path} weight {vid!r}") for vid, text in rows
        ]

    def set_meta(self, values: Mapping[str, str]) -> None:
        self._c.executemany("INSERT OR REPLACE INTO meta (k, v) VALUES (?, ?)", values.items())
        self.meta_written.update(values)

    def committed(self) -> None:
        """The transaction committed: what it wrote to meta is now what the table holds."""
        cache = self._cache
        if self.meta_written and cache.values is not None:
            cache.values, cache.parsed = {**cache.values, **self.meta_written}, None

    def add_counters(self, deltas: Mapping[str, int]) -> None:
        # One statement for every counter of the transaction (they are few).
        values = ",".join(["(?, ?)"] * len(deltas))
        self._c.execute(
            f"INSERT INTO counters (k, v) VALUES {values} "
            "ON CONFLICT (k) DO UPDATE SET v = v + excluded.v",
            [item for pair in deltas.items() for item in pair],
        )

    def insert_samples(self, rows: Sequence[SampleRow], refs: Sequence[SampleRef]) -> None:
        self._c.executemany(
            "INSERT INTO samples (seq, id, state, rank, win, step, reason, nbytes) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (r.seq, r.sample_id, SAMPLE_CODES[r.state], r.rank, r.window, r.step, r.reason,
                 r.nbytes)
                for r in rows
            ],
        )  # fmt: skip
        texts = [(r.seq, pack_ref(ref)) for r, ref in zip(rows, refs, strict=True)]
        self._c.executemany(
            "INSERT INTO sample_refs (seq, ref, crc) VALUES (?, ?, ?)",
            [(seq, text, ref_crc(text)) for seq, text in texts],
        )

    def update_samples(self, changes: Sequence[SampleChange]) -> None:
        # Rows that get the same values (a window's rank, an ack's step) change in one
        # statement over their seqs instead of one statement per row.
        groups: dict[tuple[int, int, int, int, str], list[int]] = {}
        for _, r in changes:
            key = (SAMPLE_CODES[r.state], r.rank, r.window, r.step, r.reason)
            seqs = groups.get(key)
            if seqs is None:
                groups[key] = [r.seq]
            else:
                seqs.append(r.seq)
        if len(groups) * 4 > len(changes):  # mostly distinct rows: one statement per row
            self._c.executemany(
                "UPDATE samples SET state = ?, rank = ?, win = ?, step = ?, reason = ? "
                "WHERE seq = ?",
                [(*key, seq) for key, seqs in groups.items() for seq in seqs],
            )
            return
        for key, seqs in groups.items():
            for start in range(0, len(seqs), _CHUNK):
                chunk = seqs[start : start + _CHUNK]
                self._c.execute(
                    "UPDATE samples SET state = ?, rank = ?, win = ?, step = ?, reason = ? "
                    f"WHERE seq IN ({','.join('?' * len(chunk))})",
                    (*key, *chunk),
                )

    def insert_prompts(self, rows: Sequence[PromptRow], tasks: Sequence[PromptTask]) -> None:
        self._c.executemany(
            "INSERT INTO prompts (id, seq, state, attempt, worker, deadline, reason, task) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (r.task_id, r.seq, PROMPT_CODES[r.state], r.attempt, r.worker, r.deadline,
                 r.reason, encode_record(task))
                for r, task in zip(rows, tasks, strict=True)
            ],
        )  # fmt: skip

    def update_prompts(self, changes: Sequence[PromptChange]) -> None:
        self._c.executemany(
            "UPDATE prompts SET seq = ?, state = ?, attempt = ?, worker = ?, deadline = ?, "
            "reason = ? WHERE id = ?",
            [
                (r.seq, PROMPT_CODES[r.state], r.attempt, r.worker, r.deadline, r.reason, r.task_id)
                for _, r in changes
            ],
        )

    def append_weight(self, version: WeightVersion) -> None:
        self._c.execute(
            "INSERT INTO weights (ord, id, record) VALUES (?, ?, ?)",
            (version.publish_order, version.version_id, encode_record(version)),
        )


def _is_busy(exc: sqlite3.Error) -> bool:
    """Whether ``exc`` is SQLite saying another connection holds the lock."""
    return isinstance(exc, sqlite3.OperationalError) and (
        "locked" in str(exc) or "busy" in str(exc)
    )


def _enter_wal(conn: sqlite3.Connection, timeout_s: float) -> str:
    """Switch the file to WAL, retrying while another connection holds the lock.

    Entering WAL upgrades a read lock to a write lock, and SQLite answers a lock upgrade with
    an immediate SQLITE_BUSY instead of calling the busy handler (to avoid deadlock). So two
    processes creating the same fresh ledger at once would fail without this retry; once the
    file is in WAL mode the pragma writes nothing and cannot collide.
    """
    deadline = time.monotonic() + timeout_s
    pause = 0.001
    while True:
        try:
            return str(conn.execute("PRAGMA journal_mode = WAL").fetchone()[0])
        except sqlite3.OperationalError as exc:
            if not _is_busy(exc) or time.monotonic() + pause > deadline:
                raise
        time.sleep(pause)
        pause = min(pause * 2, 0.05)


class SQLiteStorage(LedgerStorage):
    """One SQLite connection per ledger object; calls from several threads are serialised."""

    backend = "sqlite"
    durable = True

    def __init__(self, path: str, *, busy_timeout_s: float = 30.0, read_only: bool = False) -> None:
        if not isinstance(busy_timeout_s, (int, float)) or busy_timeout_s <= 0:
            raise InvalidInputError(f"busy_timeout_s must be a number > 0, got {busy_timeout_s!r}")
        self._path = Path(path)
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._conn: sqlite3.Connection | None = None
        self._meta = _MetaCache()
        try:
            if not read_only:
                self._path.parent.mkdir(parents=True, exist_ok=True)
            check_file(self._path)
            if read_only:
                # mode=ro: SQLite never writes the file, never switches its journal mode and
                # never creates it; a missing file fails here instead. With no -wal file no
                # writer has it open, and immutable=1 also keeps SQLite from creating the
                # -wal/-shm side files a WAL reader would otherwise leave behind.
                target = f"{self._path.resolve().as_uri()}?mode=ro"
                if not Path(f"{self._path}-wal").exists():
                    target += "&immutable=1"
                conn = sqlite3.connect(
                    target,
                    uri=True,
                    timeout=busy_timeout_s,
                    isolation_level=None,
                    check_same_thread=False,
                )
            else:
                conn = sqlite3.connect(
                    self._path,
                    timeout=busy_timeout_s,
                    isolation_level=None,
                    check_same_thread=False,
                )
        except (OSError, sqlite3.OperationalError) as exc:
            raise BackendUnavailableError(
                f"cannot open the ledger file {self._path}: {exc}"
            ) from None
        try:
            with self._errors("open"):
                if read_only:
                    conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
                    version = schema_version(conn, self._path)
                    if not version:
                        raise CorruptRecordError(
                            f"{self._path} is an empty SQLite database, not a dataflow ledger"
                        )
                    read_older(conn, version)
                else:
                    self._configure(conn, busy_timeout_s)
                    self._create_schema(conn)
        except BaseException:
            conn.close()
            raise
        self._conn = conn

    def _configure(self, conn: sqlite3.Connection, busy_timeout_s: float) -> None:
        conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
        mode = _enter_wal(conn, busy_timeout_s)
        if str(mode).lower() != "wal":
            raise BackendUnavailableError(f"{self._path}: SQLite refused WAL mode (got {mode!r})")
        conn.execute("PRAGMA synchronous = FULL")

    def _create_schema(self, conn: sqlite3.Connection) -> None:
        conn.execute("BEGIN IMMEDIATE")
        try:
            version = schema_version(conn, self._path)
            if not version:
                for statement in SCHEMA:
                    conn.execute(statement)
                conn.execute(
                    "INSERT INTO ledger_schema (name, version) VALUES (?, ?)",
                    (SCHEMA_NAME, SCHEMA_VERSION),
                )
            elif version < SCHEMA_VERSION:
                upgrade(conn, version)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    @contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        """Map sqlite3's errors onto the taxonomy: disk full → capacity, busy → unavailable,
        anything else (damage) → corrupt.
        """
        try:
            yield
        except sqlite3.DatabaseError as exc:
            if getattr(exc, "sqlite_errorname", "") == "SQLITE_FULL" or "disk is full" in str(exc):
                raise CapacityExceededError(
                    f"{self._path}: {what} failed: the disk holding the ledger is full ({exc}); "
                    "the transaction was rolled back, nothing changed"
                ) from None
            if _is_busy(exc):
                raise BackendUnavailableError(
                    f"{self._path}: {what} gave up waiting for the database lock ({exc})"
                ) from None
            raise CorruptRecordError(f"{self._path}: {what} failed: {exc}") from None

    def _run(self, begin: str, operation: Callable[[LedgerTx], R]) -> R:
        with self._lock:
            conn = self._conn
            if conn is None:
                raise ClosedError(f"the ledger {self._path} is closed")
            if os.getpid() != self._pid:
                # A connection copied by fork() shares locks and file offsets with its parent.
                raise ClosedError(
                    f"the ledger {self._path} was opened by process {self._pid}; this forked "
                    f"process {os.getpid()} must open its own"
                )
            with self._errors("transaction"):
                conn.execute(begin)
                tx = _SQLiteTx(conn, self._path, self._meta)
                try:
                    result = operation(tx)
                    conn.execute("COMMIT")
                    tx.committed()
                except BaseException:
                    self._meta.clear()
                    # A failed COMMIT (disk full) may or may not have ended the transaction;
                    # never leave one open, or every later call fails "within a transaction".
                    if conn.in_transaction:
                        with suppress(sqlite3.Error):
                            conn.execute("ROLLBACK")
                    raise
            return result

    def write(self, operation: Callable[[LedgerTx], R]) -> R:
        return self._run("BEGIN IMMEDIATE", operation)

    def read(self, operation: Callable[[LedgerTx], R]) -> R:
        return self._run("BEGIN", operation)

    def close(self) -> None:
        with self._lock:
            if self._conn is not None and os.getpid() == self._pid:
                self._conn.close()
            self._conn = None
