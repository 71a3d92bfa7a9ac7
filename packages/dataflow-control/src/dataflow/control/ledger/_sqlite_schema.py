"""The SQLite ledger's schema, its version, and the checks run when a file is opened."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

from dataflow.contracts.errors import CorruptRecordError, InvalidInputError, SchemaVersionError
from dataflow.contracts.states import PromptState, SampleState

SCHEMA_NAME = "dataflow-ledger"
SCHEMA_VERSION = 4
"""4: a ref committed from now on is stored packed (``_packed``: its values as a JSON array,
about half the text of the codec's object); rows written before keep their object text and
read as they did, so the upgrade only records the version (older code refuses the file
instead of misreading packed rows);
3: ``sample_refs.crc`` holds the CRC-32 of the ref text written at commit (from a ref the
ledger validated), so a read that finds it intact rebuilds the ref without re-validating it;
2: a ref's text lives in ``sample_refs`` beside its row, so the state changes of dispatch and
ack rewrite a few small columns instead of the whole ~0.7 KB record (1: the text inline).
Rows upgraded from 1 or 2 have no CRC (NULL) and are validated in full when read."""
_SQLITE_MAGIC = b"SQLite format 3\x00"

# Sample and prompt states are stored as small integers.
SAMPLE_CODES = {state: code for code, state in enumerate(SampleState)}
PROMPT_CODES = {state: code for code, state in enumerate(PromptState)}
_ASSIGNED = SAMPLE_CODES[SampleState.ASSIGNED]
# samples.seq is the commit order and the rowid; the (state, seq) indexes serve every scan of a
# live state in commit/FIFO order without touching history; the partial index over ASSIGNED
# rows serves a rank's newest windows and holds only what is in flight. A ref's text is written
# once, at commit, into ``sample_refs`` under the sample's seq with its CRC-32, and only read
# after that.
SCHEMA = (
    "CREATE TABLE IF NOT EXISTS ledger_schema (name TEXT PRIMARY KEY, version INTEGER NOT NULL)",
    "CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT NOT NULL) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS counters (k TEXT PRIMARY KEY, v INTEGER NOT NULL) WITHOUT ROWID",
    """CREATE TABLE IF NOT EXISTS samples (
        seq INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, state INTEGER NOT NULL,
        rank INTEGER NOT NULL, win INTEGER NOT NULL, step INTEGER NOT NULL,
        reason TEXT NOT NULL, nbytes INTEGER NOT NULL)""",
    "CREATE TABLE IF NOT EXISTS sample_refs "
    "(seq INTEGER PRIMARY KEY, ref TEXT NOT NULL, crc INTEGER)",
    "CREATE INDEX IF NOT EXISTS samples_by_state ON samples (state, seq)",
    f"CREATE INDEX IF NOT EXISTS samples_assigned ON samples (rank, win) WHERE state = {_ASSIGNED}",
    """CREATE TABLE IF NOT EXISTS prompts (
        id TEXT PRIMARY KEY, seq INTEGER NOT NULL, state INTEGER NOT NULL,
        attempt INTEGER NOT NULL, worker TEXT NOT NULL, deadline REAL NOT NULL,
        reason TEXT NOT NULL, task TEXT NOT NULL) WITHOUT ROWID""",
    "CREATE INDEX IF NOT EXISTS prompts_by_state ON prompts (state, seq)",
    """CREATE TABLE IF NOT EXISTS weights (
        ord INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, record TEXT NOT NULL)""",
)

_NETWORK_FILESYSTEMS = frozenset(
    {
        "nfs",
        "nfs4",
        "cifs",
        "smb3",
        "smbfs",
        "afs",
        "ceph",
        "glusterfs",
        "fuse.sshfs",
        "fuse.glusterfs",
        "lustre",
        "gpfs",
        "beegfs",
    }
)


def network_filesystem(path: Path, mounts_table: str | None = None) -> str | None:
    """The type of the network filesystem holding ``path``, else None.

    Reads the mount table (``/proc/mounts`` on Linux, or ``mounts_table``) and takes the
    longest mount point containing ``path``; no table (not Linux) means no check.
    """
    if mounts_table is None:
        try:
            mounts_table = Path("/proc/mounts").read_text()
        except OSError:
            return None
    mounts = mounts_table.splitlines()
    target = os.path.realpath(path)
    best, kind = "", ""
    for line in mounts:
        parts = line.split()
        if len(parts) < 3:
            continue
        point = parts[1].replace("\\040", " ")
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, kind = point, parts[2]
    return kind if kind in _NETWORK_FILESYSTEMS else None


def check_file(path: Path) -> None:
    """Refuse a network filesystem and a file that is not an SQLite database at all."""
    remote = network_filesystem(path.parent)
    if remote is not None:
        raise InvalidInputError(
            f"{path} is on a {remote} network filesystem: SQLite's locking and WAL are not safe "
            "there; use a local disk or a redis:// ledger"
        )
    if path.is_dir():
        raise InvalidInputError(f"{path} is a directory, not a ledger file")
    if path.exists() and path.stat().st_size > 0:
        with path.open("rb") as handle:
            header = handle.read(len(_SQLITE_MAGIC))
        if header != _SQLITE_MAGIC:
            raise CorruptRecordError(
                f"{path} is not an SQLite database (bad header {header[:16]!r}); "
                "refusing to use it as a ledger"
            )


# Schema 1 -> 2: the texts move to sample_refs and samples is rebuilt without them (a copy, not
# ALTER TABLE DROP COLUMN, which SQLite before 3.35 lacks); the old table's indexes go with it
# and are made again for the new one.
_SAMPLES_TABLE = next(s for s in SCHEMA if "TABLE IF NOT EXISTS samples (" in s)
_UPGRADE_FROM_1 = (
    "CREATE TABLE sample_refs (seq INTEGER PRIMARY KEY, ref TEXT NOT NULL)",
    "INSERT INTO sample_refs (seq, ref) SELECT seq, ref FROM samples",
    _SAMPLES_TABLE.replace("TABLE IF NOT EXISTS samples (", "TABLE samples_v2 ("),
    "INSERT INTO samples_v2 (seq, id, state, rank, win, step, reason, nbytes) "
    "SELECT seq, id, state, rank, win, step, reason, nbytes FROM samples",
    "DROP TABLE samples",
    "ALTER TABLE samples_v2 RENAME TO samples",
    *(s for s in SCHEMA if " ON samples " in s),
)
# Schema 2 -> 3: the CRC column, NULL for the rows already there (read with full validation).
_UPGRADE_FROM_2 = ("ALTER TABLE sample_refs ADD COLUMN crc INTEGER",)


def upgrade(conn: sqlite3.Connection, version: int) -> None:
    """Bring a ledger of an older schema ``version`` to ``SCHEMA_VERSION`` (inside the caller's
    write transaction, so a failed upgrade leaves the file as it was).
    """
    if version == 1:
        for statement in _UPGRADE_FROM_1:
            conn.execute(statement)
    if version <= 2:
        for statement in _UPGRADE_FROM_2:
            conn.execute(statement)
    # 3 -> 4 changes no table: the decoder tells packed text from object text by its first
    # character.
    conn.execute(
        "UPDATE ledger_schema SET version = ? WHERE name = ?", (SCHEMA_VERSION, SCHEMA_NAME)
    )


def read_older(conn: sqlite3.Connection, version: int) -> None:
    """Let a read-only connection read a ledger of an older schema ``version`` as the current one
    (a temporary view on this connection only; the file is never written).
    """
    if version == 1:
        conn.execute(
            "CREATE TEMP VIEW sample_refs AS SELECT seq, ref, NULL AS crc FROM main.samples"
        )
    elif version == 2:
        # A temp view shadows the main table of the same name for unqualified reads.
        conn.execute(
            "CREATE TEMP VIEW sample_refs AS SELECT seq, ref, NULL AS crc FROM main.sample_refs"
        )


def check_schema(conn: sqlite3.Connection, path: Path) -> bool:
    """True if the file already holds a ledger (see ``schema_version``); False if it is empty."""
    return schema_version(conn, path) > 0


def schema_version(conn: sqlite3.Connection, path: Path) -> int:
    """The schema version of the ledger the file holds, or 0 if the file is empty.

    A database with other tables, a newer schema or failing its quick integrity check is
    refused, so a wrong path never gets ledger tables mixed into it.
    """
    tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    if not tables:
        return 0
    if "ledger_schema" not in tables:
        raise CorruptRecordError(
            f"{path} is an SQLite database but not a dataflow ledger (tables: {sorted(tables)})"
        )
    row = conn.execute(
        "SELECT version FROM ledger_schema WHERE name = ?", (SCHEMA_NAME,)
    ).fetchone()
    if row is None or not isinstance(row[0], int):
        raise CorruptRecordError(f"{path}: the ledger schema row is missing or malformed")
    if row[0] > SCHEMA_VERSION:
        raise SchemaVersionError(
            f"{path} holds ledger schema {row[0]}, newer than the {SCHEMA_VERSION} this code "
            "supports; upgrade dataflow-control"
        )
    verdict = conn.execute("PRAGMA quick_check").fetchone()
    if verdict is None or verdict[0] != "ok":
        raise CorruptRecordError(f"{path} fails SQLite's integrity check: {verdict}")
    return int(row[0])
