"""Owner identities: pid + start time + pid namespace; who may be judged dead."""

import os
import subprocess
import sys

from dataflow.store.owner import DETACHED, current_owner, owner_alive, owner_of


def test_the_current_process_is_alive_and_its_identity_has_a_fixed_width():
    me = current_owner()
    assert owner_alive(me)
    assert len(me) == len(DETACHED)
    assert owner_of(os.getpid()) == me


def test_an_exited_process_is_dead_and_a_reused_pid_does_not_revive_it():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    owner = owner_of(child.pid)
    assert owner is not None and owner_alive(owner)
    child.kill()
    child.wait()
    assert not owner_alive(owner)
    reused = owner.replace(f"{child.pid:010d}.", f"{os.getpid():010d}.", 1)  # our pid, its start
    assert not owner_alive(reused)


def test_owners_that_cannot_be_judged_here_count_as_alive_garbage_as_dead():
    pid, start, ns = current_owner().split(".")
    other_namespace = f"{1:010d}.{start}.{int(ns) + 1:012d}"
    assert owner_alive(other_namespace)  # another container's process: never reclaimed from here
    assert owner_alive(DETACHED)
    assert not owner_alive("not-an-owner")
    assert pid.isdigit()
