"""Ctrl-C in the main thread stops the producer too: a real SIGINT to a real process.

The child runs the interleaved loop over the control plane's rank queue on a ``memory://``
ledger, with the trainer blocked waiting for refs; the test sends SIGINT once it is there.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap

CHILD = textwrap.dedent(
    """
    import json, threading
    from dataflow.contracts import FeatureSpec, SampleRef
    from dataflow.control import open_ledger
    from dataflow.control.controller import Controller
    from dataflow.control.window import WindowShape
    from dataflow.launch.interleave import run_interleaved

    ledger = open_ledger("memory://")
    controller = Controller(ledger)
    consumer = controller.consumer(WindowShape(1, 1), idle_timeout_s=60)
    consumer.open("run")
    side = controller.producer()
    side.open("run", resume=True)
    seen = {}

    def produce(stop):
        side.commit([SampleRef("s0", "memory://f", {"h": "s0/h"},
                               {"h": FeatureSpec("h", (1,), "int64")})])
        stop.wait(60)  # a slow rollout; wakes on the stop request
        seen["producer_saw_stop"] = stop.is_set()
        return "stopped"

    def train(refs):
        first = refs.get()
        consumer.ack(0, [first.sample_id])
        print("blocked", flush=True)
        refs.get()  # nothing more comes: blocked here until Ctrl-C
        return "unreachable"

    try:
        run_interleaved(produce, train, consumer.queue(), name="producer-under-test")
        seen["outcome"] = "returned"
    except KeyboardInterrupt as exc:
        seen["outcome"] = "KeyboardInterrupt"
        seen["notes"] = getattr(exc, "__notes__", [])
    seen["threads"] = sorted(t.name for t in threading.enumerate())
    print(json.dumps(seen), flush=True)
    """
)


def test_sigint_in_the_main_thread_stops_the_producer():
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "blocked"
        child.send_signal(signal.SIGINT)
        out, err = child.communicate(timeout=20)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == 0, err
    report = json.loads(out)
    assert report == {
        "producer_saw_stop": True,
        "outcome": "KeyboardInterrupt",
        "notes": [],
        "threads": ["MainThread"],
    }
