"""``redis://host:port/db``: the durable multi-host ledger in a real Redis server.

Every transaction is optimistic and serialisable: it WATCHes the ledger's version key, reads
what it needs, runs the shared rules, and writes everything in one MULTI/EXEC that also bumps
the version. If anyone else committed in between, EXEC does nothing and the operation runs
again from scratch, so multi-key transitions are atomic and a refused one writes nothing. All
keys live under ``dataflow:<namespace>:`` (the ``namespace`` option), so runs can share a
server. Durability is the server's: configure AOF (``appendfsync always``) for a ledger that
must survive the server's own crash.

An unreachable server raises ``BackendUnavailableError`` within ``connect_timeout_s``. A
connection lost during EXEC is not retried (a replay could apply twice): the error says the
outcome is unknown, and every operation is safe to check and repeat (commit reports
duplicates, a repeated ack is refused as already trained).
"""

from __future__ import annotations

import json
import random
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from types import ModuleType
from typing import TYPE_CHECKING, Any, TypeVar

from dataflow.contracts.checks import is_number
from dataflow.contracts.errors import (
    BackendUnavailableError,
    ClosedError,
    CorruptRecordError,
    DataflowError,
    InvalidInputError,
    SchemaVersionError,
)
from dataflow.contracts.features import SampleRef
from dataflow.contracts.ids import validate_id
from dataflow.contracts.prompt import PromptTask
from dataflow.contracts.states import PromptState, SampleState
from dataflow.contracts.uris import ParsedURI
from dataflow.contracts.weights import WeightVersion
from dataflow.control.ledger._serial import (
    decode_record,
    encode_record,
    encode_ref,
    open_sealed_ref,
    seal_ref,
)
from dataflow.control.ledger._tx import (
    LedgerStorage,
    LedgerTx,
    PromptChange,
    PromptRow,
    SampleChange,
    SampleRow,
)

if TYPE_CHECKING:
    import redis as redis_py

R = TypeVar("R")

SCHEMA_VERSION = 2
"""2: a ref is stored as its CRC-32 (8 hex digits) then its text, so a read that finds it intact
rebuilds the ref without re-validating it; 1: the text alone (still read, validated in full)."""
_MAX_ATTEMPTS = 200  # optimistic retries before contention is reported as unavailability
_SAMPLE_INDEXED = (SampleState.COMMITTED, SampleState.ASSIGNED, SampleState.TRAINED)
_PROMPT_INDEXED = (PromptState.PENDING, PromptState.LEASED)

Pipe = Any  # redis-py's Pipeline is not generic-typed


class _Keys:
    """Every key of one ledger, under one prefix."""

    def __init__(self, namespace: str) -> None:
        p = f"dataflow:{namespace}:"
        self.version = p + "version"
        self.schema = p + "schema"
        self.meta = p + "meta"
        self.counters = p + "counters"
        self.samples = p + "samples"
        self.refs = p + "refs"
        self.prompts = p + "prompts"
        self.tasks = p + "tasks"
        self.weights = p + "weights"
        self.sample_index = {s: f"{p}idx:sample:{s.value}" for s in _SAMPLE_INDEXED}
        self.assigned_by_window = p + "idx:assigned-window"
        self.prompt_index = {s: f"{p}idx:prompt:{s.value}" for s in _PROMPT_INDEXED}


def _sample_text(row: SampleRow) -> str:
    return json.dumps(
        [row.seq, row.state.value, row.rank, row.window, row.step, row.reason, row.nbytes]
    )


def _prompt_text(row: PromptRow) -> str:
    return json.dumps([row.seq, row.state.value, row.attempt, row.worker, row.deadline, row.reason])


def _parse(text: str, where: str) -> list[Any]:
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if type(value) is not list:
        raise CorruptRecordError(f"{where}: stored row {text!r:.80} does not parse")
    return value


def _sample_row(sample_id: str, text: str) -> SampleRow:
    v = _parse(text, f"sample {sample_id!r}")
    try:
        return SampleRow(sample_id, v[0], SampleState(v[1]), *v[2:7])
    except (ValueError, IndexError, TypeError):
        raise CorruptRecordError(
            f"sample {sample_id!r}: stored row {text!r:.80} is malformed"
        ) from None


def _prompt_row(task_id: str, text: str) -> PromptRow:
    v = _parse(text, f"task {task_id!r}")
    try:
        return PromptRow(task_id, v[0], PromptState(v[1]), *v[2:6])
    except (ValueError, IndexError, TypeError):
        raise CorruptRecordError(
            f"task {task_id!r}: stored row {text!r:.80} is malformed"
        ) from None


class _RedisTx(LedgerTx):
    """Reads run at once on the watching pipeline; writes are queued for MULTI/EXEC."""

    def __init__(self, pipe: Pipe, keys: _Keys) -> None:
        self._p = pipe
        self._k = keys
        self.writes: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []

    def _queue(self, command: str, *args: Any, **kwargs: Any) -> None:
        self.writes.append((command, args, kwargs))

    def _hmget(self, key: str, ids: Sequence[str]) -> dict[str, str]:
        if not ids:
            return {}
        values = self._p.hmget(key, list(ids))
        return {i: v for i, v in zip(ids, values, strict=True) if v is not None}

    def meta(self) -> dict[str, str]:
        return dict(self._p.hgetall(self._k.meta))

    def counters(self) -> dict[str, int]:
        return {k: int(v) for k, v in self._p.hgetall(self._k.counters).items()}

    def samples(self, sample_ids: Sequence[str]) -> dict[str, SampleRow]:
        return {i: _sample_row(i, t) for i, t in self._hmget(self._k.samples, sample_ids).items()}

    def samples_in(self, state: SampleState, limit: int | None = None) -> list[SampleRow]:
        if limit == 0:
            return []
        ids = self._p.zrange(self._k.sample_index[state], 0, -1 if limit is None else limit - 1)
        rows = self.samples(ids)
        return [rows[i] for i in ids if i in rows]

    def assigned_rows(self, rank: int, after_window: int) -> list[SampleRow]:
        ids = self._p.zrangebyscore(self._k.assigned_by_window, f"({after_window}", "+inf")
        rows = [
            row
            for row in self.samples(ids).values()
            if row.state is SampleState.ASSIGNED and row.rank == rank
        ]
        return sorted(rows, key=lambda row: (row.window, row.seq))

    def refs(self, sample_ids: Sequence[str]) -> dict[str, SampleRef]:
        found = self._hmget(self._k.refs, sample_ids)
        return {i: open_sealed_ref(t, i, f"redis ledger sample {i!r}") for i, t in found.items()}

    def prompts(self, task_ids: Sequence[str]) -> dict[str, PromptRow]:
        return {i: _prompt_row(i, t) for i, t in self._hmget(self._k.prompts, task_ids).items()}

    def prompts_in(self, state: PromptState, limit: int | None = None) -> list[PromptRow]:
        if limit == 0:
            return []
        ids = self._p.zrange(self._k.prompt_index[state], 0, -1 if limit is None else limit - 1)
        rows = self.prompts(ids)
        return [rows[i] for i in ids if i in rows]

    def tasks(self, task_ids: Sequence[str]) -> dict[str, PromptTask]:
        found = self._hmget(self._k.tasks, task_ids)
        return {
            i: decode_record(t, PromptTask, f"redis ledger task {i!r}") for i, t in found.items()
        }

    def weights(self) -> list[WeightVersion]:
        return [
            decode_record(t, WeightVersion, f"redis ledger weight #{n + 1}")
            for n, t in enumerate(self._p.lrange(self._k.weights, 0, -1))
        ]

    # -- queued writes -------------------------------------------------------------------
    def set_meta(self, values: Mapping[str, str]) -> None:
        mapping = dict(values)
        if mapping:
            self._queue("hset", self._k.meta, mapping=mapping)

    def add_counters(self, deltas: Mapping[str, int]) -> None:
        for name, delta in deltas.items():
            if delta:
                self._queue("hincrby", self._k.counters, name, delta)

    def _move(self, index: Mapping[Any, str], moves: Sequence[tuple[Any, Any, str, int]]) -> None:
        """Per-state index upkeep: (old state or None, new state, id, seq) for each row."""
        removed: dict[str, list[str]] = defaultdict(list)
        added: dict[str, dict[str, int]] = defaultdict(dict)
        for old, new, key_id, seq in moves:
            if old is not None and old in index and old is not new:
                removed[index[old]].append(key_id)
            if new in index:
                added[index[new]][key_id] = seq
        for key, members in removed.items():
            self._queue("zrem", key, *members)
        for key, scores in added.items():
            self._queue("zadd", key, scores)

    def insert_samples(self, rows: Sequence[SampleRow], refs: Sequence[SampleRef]) -> None:
        texts = {r.sample_id: _sample_text(r) for r in rows}
        refs_text = {ref.sample_id: seal_ref(encode_ref(ref)) for ref in refs}
        self._queue("hset", self._k.samples, mapping=texts)
        self._queue("hset", self._k.refs, mapping=refs_text)
        self._move(self._k.sample_index, [(None, r.state, r.sample_id, r.seq) for r in rows])

    def update_samples(self, changes: Sequence[SampleChange]) -> None:
        texts = {r.sample_id: _sample_text(r) for _, r in changes}
        self._queue("hset", self._k.samples, mapping=texts)
        self._move(self._k.sample_index, [(o, r.state, r.sample_id, r.seq) for o, r in changes])
        # A rank's newest windows are found by window id (see assigned_rows).
        assigned = SampleState.ASSIGNED
        entered = {r.sample_id: r.window for o, r in changes if r.state is assigned}
        left = [r.sample_id for o, r in changes if o is assigned and r.state is not assigned]
        if entered:
            self._queue("zadd", self._k.assigned_by_window, entered)
        if left:
            self._queue("zrem", self._k.assigned_by_window, *left)

    def insert_prompts(self, rows: Sequence[PromptRow], tasks: Sequence[PromptTask]) -> None:
        texts = {r.task_id: _prompt_text(r) for r in rows}
        tasks_text = {t.task_id: encode_record(t) for t in tasks}
        self._queue("hset", self._k.prompts, mapping=texts)
        self._queue("hset", self._k.tasks, mapping=tasks_text)
        self._move(self._k.prompt_index, [(None, r.state, r.task_id, r.seq) for r in rows])

    def update_prompts(self, changes: Sequence[PromptChange]) -> None:
        texts = {r.task_id: _prompt_text(r) for _, r in changes}
        self._queue("hset", self._k.prompts, mapping=texts)
        # ZADD also re-scores a task that stays in its state with a new FIFO position.
        self._move(self._k.prompt_index, [(o, r.state, r.task_id, r.seq) for o, r in changes])

    def append_weight(self, version: WeightVersion) -> None:
        text = encode_record(version)
        self._queue("rpush", self._k.weights, text)


def _redis_client_library() -> ModuleType:
    """redis-py, imported on first use: the package imports without the ``redis`` extra."""
    try:
        import redis
    except ImportError:
        raise BackendUnavailableError(
            "redis:// ledgers need redis-py: pip install 'dataflow-control[redis]'"
        ) from None
    return redis


class RedisStorage(LedgerStorage):
    """A ledger in one Redis database under one key namespace."""

    backend = "redis"
    durable = True

    def __init__(
        self,
        parsed: ParsedURI,
        *,
        connect_timeout_s: float = 5.0,
        op_timeout_s: float = 30.0,
        namespace: str = "default",
    ) -> None:
        for name, value in (
            ("connect_timeout_s", connect_timeout_s),
            ("op_timeout_s", op_timeout_s),
        ):
            if not is_number(value) or value <= 0:
                raise InvalidInputError(f"{name} must be a number > 0, got {value!r}")
        validate_id(namespace, "redis ledger namespace")
        self._r = _redis_client_library()
        self._where = f"Redis at {parsed.location} db {parsed.database}"
        self._keys = _Keys(namespace)
        probe = self._connect(parsed, connect_timeout_s, connect_timeout_s)
        self._client: redis_py.Redis | None = probe
        try:
            self._call("open", self._check_schema)
        finally:
            probe.close()
        # Reached within the connect timeout; later calls may wait longer (a big batch, a busy
        # server) before they count as unavailable.
        self._client = self._connect(parsed, connect_timeout_s, op_timeout_s)

    def _connect(self, parsed: ParsedURI, connect_s: float, op_s: float) -> redis_py.Redis:
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        client: redis_py.Redis = self._r.Redis(
            host=parsed.host,
            port=parsed.port,
            db=parsed.database,
            socket_connect_timeout=connect_s,
            socket_timeout=op_s,
            decode_responses=True,
            # No silent reconnect-and-resend: a transaction must not be replayed behind our back.
            retry=Retry(NoBackoff(), 0),
        )
        return client

    def _check_schema(self, client: redis_py.Redis) -> None:
        client.set(self._keys.schema, SCHEMA_VERSION, nx=True)
        stored = str(client.get(self._keys.schema))
        if not stored.isdigit():
            raise CorruptRecordError(f"{self._where}: {self._keys.schema} holds {stored!r}")
        if int(stored) > SCHEMA_VERSION:
            raise SchemaVersionError(
                f"{self._where}: ledger schema {stored} is newer than the {SCHEMA_VERSION} this "
                "code supports; upgrade dataflow-control"
            )
        if int(stored) < SCHEMA_VERSION:
            # 1 -> 2 changes nothing stored: bare ref texts stay readable beside sealed ones.
            client.set(self._keys.schema, SCHEMA_VERSION)

    def _call(self, what: str, fn: Callable[[redis_py.Redis], R]) -> R:
        client = self._client
        if client is None:
            raise ClosedError(f"the ledger at {self._where} is closed")
        try:
            return fn(client)
        except (self._r.ConnectionError, self._r.TimeoutError) as exc:
            raise BackendUnavailableError(f"{what}: cannot reach {self._where}: {exc}") from None
        except self._r.ResponseError as exc:
            raise CorruptRecordError(
                f"{what}: {self._where} refused a ledger command: {exc}"
            ) from None

    def _transaction(self, operation: Callable[[LedgerTx], R], client: redis_py.Redis) -> R:
        for attempt in range(_MAX_ATTEMPTS):
            with client.pipeline(transaction=True) as pipe:
                try:
                    pipe.watch(self._keys.version)
                    tx = _RedisTx(pipe, self._keys)
                    try:
                        result = operation(tx)
                    except DataflowError:
                        # A refusal counts only if it was decided on a consistent snapshot:
                        # this EXEC fails (and the operation reruns) if a writer slipped in.
                        pipe.multi()
                        pipe.get(self._keys.version)
                        pipe.execute()
                        raise
                    pipe.multi()
                    for command, args, kwargs in tx.writes:
                        getattr(pipe, command)(*args, **kwargs)
                    if tx.writes:
                        pipe.incr(self._keys.version)
                    else:  # a read: EXEC still fails if a writer slipped in
                        pipe.get(self._keys.version)
                    pipe.execute()
                    return result
                except self._r.WatchError:
                    time.sleep(random.uniform(0, 0.0005 * min(attempt + 1, 20)))
        raise BackendUnavailableError(
            f"{self._where}: gave up after {_MAX_ATTEMPTS} attempts under write contention"
        )

    def write(self, operation: Callable[[LedgerTx], R]) -> R:
        return self._call("transaction", lambda c: self._transaction(operation, c))

    def read(self, operation: Callable[[LedgerTx], R]) -> R:
        return self._call("read", lambda c: self._transaction(operation, c))

    def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.close()
