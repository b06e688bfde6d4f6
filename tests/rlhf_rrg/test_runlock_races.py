"""Run lock under racing starts and takeovers, starts killed at every step, and holders this machine cannot see."""

import itertools
import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rlhf_rrg import runlock
from rlhf_rrg.runlock import LOCK_NAME, UNREADABLE_GRACE_S, RunLock, RunLockedError, machine_identity, pid_start_time

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}
HOLD = "import sys, time\nfrom rlhf_rrg.runlock import RunLock\nRunLock(sys.argv[1]).acquire()\ntime.sleep(120)\n"
# Acquires the lock, SIGKILLed just before its N-th file-system change (argv[2]); exits 0 if it makes fewer.
TRIPWIRE = """
import os, signal, sys
from rlhf_rrg.runlock import RunLock
limit, calls = int(sys.argv[2]), [0]
def tripwire(real):
    def op(*args, **kwargs):
        calls[0] += 1
        if calls[0] == limit:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)
    return op
for name in ("fsync", "link", "unlink", "rename", "replace"):
    setattr(os, name, tripwire(getattr(os, name)))
RunLock(sys.argv[1]).acquire()
"""
RACERS, ROUNDS = 8, 4
HERE = machine_identity()


def dead_pid() -> int:
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                           check=True)
    return int(child.stdout)


def stale_record(**fields) -> dict:
    """A lock record of a process of this machine that has ended."""
    return {**HERE, "pid": dead_pid(), "pid_start": 1, "started": 0.0, "token": "dead", **fields}


def write_lock(directory: Path, **fields) -> None:
    (directory / LOCK_NAME).write_text(json.dumps(stale_record(**fields)))


def lock_owner(directory: Path) -> dict:
    try:
        return json.loads((directory / LOCK_NAME).read_text())
    except (OSError, ValueError):
        return {}


def names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def wait_for(condition, timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return False


def _racer(directory: Path, gate, results, done) -> None:
    gate.wait()
    try:
        RunLock(directory).acquire()
        results.put((os.getpid(), "won"))
    except RunLockedError:
        results.put((os.getpid(), "lost"))
    except BaseException as err:  # reported to the test, which names it
        results.put((os.getpid(), repr(err)))
    done.wait()  # alive, holding the lock if it won, until every racer has tried


@pytest.mark.parametrize("stale", [False, True], ids=["free", "stale"])
def test_exactly_one_of_many_racing_starts_wins(tmp_path, stale):
    context = mp.get_context("fork")
    for round_ in range(ROUNDS):
        directory = tmp_path / str(round_)
        directory.mkdir()
        if stale:
            write_lock(directory)
        gate, done, results = context.Barrier(RACERS), context.Event(), context.Queue()
        racers = [context.Process(target=_racer, args=(directory, gate, results, done)) for _ in range(RACERS)]
        for racer in racers:
            racer.start()
        try:
            outcomes = dict(results.get(timeout=120) for _ in racers)
        finally:
            done.set()
            for racer in racers:
                racer.join()
        assert sorted(outcomes.values()) == ["lost"] * (RACERS - 1) + ["won"], outcomes
        assert outcomes[lock_owner(directory)["pid"]] == "won"
        assert names(directory) == [LOCK_NAME]  # no temp file or breaker left behind


def test_a_taker_never_removes_the_lock_that_replaced_the_stale_one_it_read(tmp_path, monkeypatch):
    write_lock(tmp_path)
    other: list[subprocess.Popen] = []
    judge = runlock.holder_is_dead

    def judged_while_another_run_takes_over(holder, here):
        if not other:
            other.append(subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], env=ENV))
            assert wait_for(lambda: lock_owner(tmp_path).get("pid") == other[0].pid)
        return judge(holder, here)

    monkeypatch.setattr(runlock, "holder_is_dead", judged_while_another_run_takes_over)
    try:
        with pytest.raises(RunLockedError, match=r"in use by pid \d+"):
            RunLock(tmp_path).acquire()
        assert lock_owner(tmp_path)["pid"] == other[0].pid
    finally:
        for process in other:
            process.kill()
            process.wait()


@pytest.mark.parametrize("stale", [False, True], ids=["free", "stale"])
def test_a_start_killed_at_any_step_leaves_a_folder_the_next_start_locks(tmp_path, stale):
    for step in itertools.count(1):
        directory = tmp_path / str(step)
        directory.mkdir()
        if stale:
            write_lock(directory)
        killed = subprocess.run([sys.executable, "-c", TRIPWIRE, str(directory), str(step)], env=ENV).returncode
        if killed == 0:
            break  # it finished: every step before was interrupted once
        assert killed == -signal.SIGKILL
        lock = RunLock(directory).acquire()
        assert lock_owner(directory)["pid"] == os.getpid()
        assert names(directory) == [LOCK_NAME]  # the killed start's leftovers are swept
        lock.release()
        assert names(directory) == []
    # fsync, link (+ breaker, unlink of the stale lock and of the breaker, link), unlink of the temp file.
    assert step - 1 == (7 if stale else 3)


@pytest.mark.parametrize("content", ["", '{"pid": 12'], ids=["empty", "half-written"])
def test_an_unreadable_lock_is_taken_over_only_once_old(tmp_path, content, caplog):
    """An older writer created the lock before writing it: empty, it may be mid-write, or crashed long ago."""
    lock_file = tmp_path / LOCK_NAME
    lock_file.write_text(content)
    with pytest.raises(RunLockedError, match="unreadable"):
        RunLock(tmp_path).acquire()
    assert lock_file.read_text() == content
    old = time.time() - 2 * UNREADABLE_GRACE_S
    os.utime(lock_file, (old, old))
    RunLock(tmp_path).acquire()
    assert "taking over a stale lock" in caplog.text
    assert lock_owner(tmp_path)["pid"] == os.getpid()


def test_leftover_temp_files_of_dead_starts_are_swept_but_one_being_written_is_kept(tmp_path):
    (tmp_path / f"{LOCK_NAME}.a.tmp").write_text(json.dumps(stale_record()))
    old_partial = tmp_path / f"{LOCK_NAME}.b.tmp"
    old_partial.write_text('{"pid"')
    old = time.time() - 2 * UNREADABLE_GRACE_S
    os.utime(old_partial, (old, old))
    (tmp_path / f"{LOCK_NAME}.c.tmp").write_text("")  # another start may be writing it right now
    RunLock(tmp_path).acquire()
    assert names(tmp_path) == [LOCK_NAME, f"{LOCK_NAME}.c.tmp"]


def test_a_holder_on_another_machine_with_this_hostname_is_never_taken_over(tmp_path):
    write_lock(tmp_path, boot_id="another-boot", machine_id="another-machine")
    with pytest.raises(RunLockedError, match=rf"in use by pid \d+ on host '{HERE['host']}'"):
        RunLock(tmp_path).acquire()


def test_a_holder_in_another_pid_namespace_of_this_machine_is_never_taken_over(tmp_path):
    write_lock(tmp_path, pid_ns="pid:[1]")
    with pytest.raises(RunLockedError, match="in use by pid"):
        RunLock(tmp_path).acquire()


def test_a_holder_from_before_this_machine_rebooted_is_taken_over(tmp_path, monkeypatch):
    monkeypatch.setattr(runlock, "machine_identity", lambda: {**HERE, "machine_id": "this-machine"})
    # Same machine-id and another boot, but started after this boot began: a clone of this machine's image.
    write_lock(tmp_path, boot_id="another-boot", machine_id="this-machine", started=time.time())
    with pytest.raises(RunLockedError, match="in use by pid"):
        RunLock(tmp_path).acquire()
    write_lock(tmp_path, boot_id="an-earlier-boot", machine_id="this-machine", started=0.0)
    RunLock(tmp_path).acquire()
    assert lock_owner(tmp_path)["pid"] == os.getpid()


def test_a_holder_whose_pid_now_runs_another_process_is_taken_over(tmp_path):
    later = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        write_lock(tmp_path, pid=later.pid, pid_start=pid_start_time(later.pid) - 1)
        RunLock(tmp_path).acquire()
        assert lock_owner(tmp_path)["pid"] == os.getpid()
    finally:
        later.kill()
        later.wait()
