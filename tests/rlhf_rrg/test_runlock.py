"""Run-folder lock against real processes (live, SIGKILLed, other host) and trainers that die with their launcher."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rlhf_rrg.runlock import LOCK_NAME, RunLock, RunLockedError, pid_alive

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}
HOLD = "import sys, time\nfrom rlhf_rrg.runlock import RunLock\nRunLock(sys.argv[1]).acquire()\ntime.sleep(120)\n"
# Arms the parent-death signal, says whether it did, then waits to be killed.
TRAINER = ("import os, sys, time\nfrom rlhf_rrg.runlock import exit_with_parent\narmed = exit_with_parent()\n"
           "open(sys.argv[1] + '.tmp', 'w').write(f'{os.getpid()} {armed}')\n"
           "os.rename(sys.argv[1] + '.tmp', sys.argv[1])\ntime.sleep(120)\n")


def wait_for(condition, timeout: float = 90.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def test_a_live_holder_is_named_and_a_sigkilled_one_is_taken_over(tmp_path, caplog):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], env=ENV)
    try:
        assert wait_for(lambda: (tmp_path / LOCK_NAME).is_file() and (tmp_path / LOCK_NAME).read_text())
        with pytest.raises(RunLockedError, match=rf"in use by pid {holder.pid} on host '{socket.gethostname()}'"):
            RunLock(tmp_path).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    lock = RunLock(tmp_path).acquire()
    assert f"stale lock (pid {holder.pid}" in caplog.text
    assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    lock.release()
    assert not lock.path.exists()


def test_a_lock_from_another_host_is_never_taken_over(tmp_path):
    dead_pid = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True).stdout.strip()
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": int(dead_pid), "host": "elsewhere", "started": 0}))
    with pytest.raises(RunLockedError, match=f"pid {dead_pid} on host 'elsewhere'"):
        RunLock(tmp_path).acquire()


def test_this_process_may_take_its_own_lock_again(tmp_path):
    first = RunLock(tmp_path).acquire()
    second = RunLock(tmp_path).acquire()
    assert first.held and second.held
    second.release()
    assert not (tmp_path / LOCK_NAME).exists()


def read_trainer(pid_file: Path) -> tuple[int, str]:
    assert wait_for(pid_file.is_file), "the trainer never started"
    pid, armed = pid_file.read_text().split()
    return int(pid), armed


def test_a_trainer_ends_when_accelerate_launch_is_sigkilled(tmp_path):
    script, pid_file = tmp_path / "trainer.py", tmp_path / "trainer.pid"
    script.write_text(TRAINER)
    launcher = subprocess.Popen([sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1",
                                 "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                                 str(script), str(pid_file)], env=ENV)
    try:
        pid, armed = read_trainer(pid_file)
    finally:
        launcher.send_signal(signal.SIGKILL)
        launcher.wait()
    assert armed == "True"
    ended = wait_for(lambda: not pid_alive(pid), timeout=20)
    if not ended:
        os.kill(pid, signal.SIGKILL)
    assert ended, "the trainer outlived its launcher"


def test_a_script_started_from_a_shell_outlives_it(tmp_path):
    """Without a launcher (e.g. nohup python stages/x.py) the parent's death must not end the run."""
    script, pid_file = tmp_path / "trainer.py", tmp_path / "trainer.pid"
    script.write_text(TRAINER)
    env = {k: v for k, v in ENV.items() if k not in ("ACCELERATE_MIXED_PRECISION", "TORCHELASTIC_RUN_ID")}
    parent = subprocess.Popen([sys.executable, "-c", "import subprocess, sys; subprocess.Popen(sys.argv[1:]).wait()",
                               sys.executable, str(script), str(pid_file)], env=env)
    pid, armed = read_trainer(pid_file)
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    time.sleep(1.0)
    alive = pid_alive(pid)
    os.kill(pid, signal.SIGKILL)
    assert armed == "False" and alive
