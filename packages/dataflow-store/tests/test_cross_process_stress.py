"""Slow: several producer and consumer processes on one shm:// / dir:// store at once."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import pytest
from procs import expected_digest, start_child

PRODUCER = """
import json
store = open_store(sys.argv[1])
for i in range(int(sys.argv[3])):
    ref = store.put(f"{sys.argv[2]}-{i}", sample(i))
    print(json.dumps({"seed": i, "ref": dumps(ref)}), flush=True)
store.close()
"""

CONSUMER = """
import json
store = open_store(sys.argv[1])
for line in sys.stdin:
    item = json.loads(line)
    tensors, handle = store.get(loads(item["ref"], SampleRef))
    print(json.dumps({"seed": item["seed"], "digest": digest(tensors)}), flush=True)
    store.release(handle)
print(json.dumps({"resident": store.health().resident_samples}), flush=True)
"""


@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["shm", "dir"])
def test_two_producers_two_consumers(scheme: str, tmp_path: Path) -> None:
    uri = f"shm://stress{uuid.uuid4().hex[:10]}" if scheme == "shm" else f"dir://{tmp_path}/s"
    count = 12
    producers = [start_child(PRODUCER, uri, f"p{p}", str(count)) for p in range(2)]
    consumers = [start_child(CONSUMER, uri, stdin=True) for _ in range(2)]
    seen = []
    try:
        for p, producer in enumerate(producers):
            assert producer.stdout is not None
            for n, line in enumerate(producer.stdout):
                consumer = consumers[(p + n) % 2]
                assert consumer.stdin is not None
                consumer.stdin.write(line)
                consumer.stdin.flush()
            assert producer.wait(timeout=120) == 0, (
                producer.stderr.read() if producer.stderr else ""
            )
        for consumer in consumers:
            assert consumer.stdin is not None and consumer.stdout is not None
            consumer.stdin.close()
            lines = [json.loads(line) for line in consumer.stdout]
            assert consumer.wait(timeout=120) == 0
            assert lines[-1] == {"resident": 0}
            seen += lines[:-1]
    finally:
        for child in producers + consumers:
            if child.poll() is None:
                child.kill()
                child.wait()
            for pipe in (child.stdin, child.stdout, child.stderr):
                if pipe is not None:
                    pipe.close()
    assert len(seen) == 2 * count
    for item in seen:
        assert item["digest"] == expected_digest(item["seed"])
    if scheme == "shm":
        name = uri.removeprefix("shm://")
        assert [e for e in os.listdir("/dev/shm") if e.startswith(f"dfs~{name}~")] == []
    else:
        assert sorted(p.name for p in (tmp_path / "s").iterdir()) == [
            ".dataflow-store.json",
            ".generation",
        ]
