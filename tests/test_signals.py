"""The signal contract of `process.StopRequest`, in a plain process (the 2-rank launches in
tests/test_reliability.py cover the saves): exit codes 128 + n while nothing would be lost, a stop after the
step otherwise, and a second signal that ends the process at once by that signal."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent(
    """
    import os, signal, sys, time
    from tropd_ds.process import StopRequest
    stop = StopRequest()
    stop.can_leave_now = {can_leave}
    os.kill(os.getpid(), {sig})
    time.sleep(0.5)
    print("still running after the first signal:", stop.signal_name, stop.agreed(), flush=True)
    if {second}:
        os.kill(os.getpid(), {sig})
        time.sleep(5)
    print("survived", flush=True)
    sys.exit(7)
    """
)


def run(sig: signal.Signals, can_leave: bool, second: bool) -> subprocess.CompletedProcess:
    code = SCRIPT.format(can_leave=can_leave, sig=int(sig), second=second)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_while_nothing_would_be_lost_exits_at_once_with_128_plus_its_number(sig):
    proc = run(sig, can_leave=True, second=False)
    assert proc.returncode == 128 + int(sig), proc.stdout + proc.stderr
    assert f"{sig.name} during set-up: stopping now" in proc.stdout and "still running" not in proc.stdout


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_after_an_unsaved_step_is_recorded_and_a_second_one_ends_the_process_by_that_signal(sig):
    first_only = run(sig, can_leave=False, second=False)
    assert first_only.returncode == 7, first_only.stderr  # the run goes on to its checkpoint
    assert f"still running after the first signal: {sig.name} True" in first_only.stdout
    twice = run(sig, can_leave=False, second=True)
    assert twice.returncode == -int(sig), twice.stdout + twice.stderr  # killed by the signal itself, not exit 1
    assert "survived" not in twice.stdout


def test_a_signal_after_the_run_has_finished_stops_nothing_and_exits_0():
    """A SIGTERM in the second after a finished run used to report the completed run as killed (128 + 15)."""
    code = SCRIPT.replace("stop.can_leave_now = {can_leave}", "stop.finished = True").format(
        sig=int(signal.SIGTERM), second=False
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SIGTERM after the run had finished: nothing to stop" in proc.stdout and "survived" not in proc.stdout


LAUNCHED = textwrap.dedent(
    """
    import os, sys, time
    from tropd_ds.process import StopRequest
    stop = StopRequest()
    stop.can_leave_now = False
    print("watching", [pid for pid, _ in stop.launchers], "agreed", stop.agreed(), flush=True)
    parent = os.getppid()
    open(sys.argv[1], "w").close()  # ready: the launcher ends now
    deadline = time.time() + 30
    while os.getppid() == parent and time.time() < deadline:
        time.sleep(0.05)
    print("agreed", stop.agreed(), "because", stop.reason(), flush=True)
    """
)


def test_a_rank_whose_launcher_has_ended_stops_at_the_next_step_boundary(tmp_path):
    """SIGTERM to the `deepspeed` command ends it at once (on one node it forwards no signal) and used to leave
    its ranks training to the end, orphaned: now a rank watches the launcher processes above it (by command
    line: not a shell or scheduler, which may end on purpose) and agrees to stop when one has gone."""
    ready = tmp_path / "ready"
    launcher_stand_in = textwrap.dedent(
        f"""
        # a stand-in for the deepspeed launcher: starts the rank, then ends
        import os, subprocess, sys, time
        rank = subprocess.Popen([sys.executable, "-c", {LAUNCHED!r}, {str(ready)!r}])
        while not os.path.exists({str(ready)!r}):
            time.sleep(0.05)
        """
    )
    # the rank inherits the output pipe: run() returns once the rank, too, has ended
    proc = subprocess.run([sys.executable, "-c", launcher_stand_in], capture_output=True, text=True, timeout=90)
    assert proc.returncode == 0, proc.stderr
    watching, agreed = proc.stdout.splitlines()[-2:]
    assert watching.endswith("] agreed False") and watching != "watching [] agreed False", proc.stdout
    assert agreed == "agreed True because the loss of the launcher", proc.stdout + proc.stderr


def test_launcher_processes_are_the_launchers_above_a_rank_and_their_end_is_seen():
    from tropd_ds.process import launcher_gone, launcher_processes

    child = subprocess.Popen(
        [sys.executable, "-c", "# deepspeed.launcher.launch stand-in\nimport subprocess, sys, time\n"
         "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\nprint(p.pid, flush=True)\n"
         "time.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        rank = int(child.stdout.readline())
        watched = launcher_processes(rank)
        assert [pid for pid, _ in watched] == [child.pid]  # the stand-in; not pytest, which launched no rank
        assert not launcher_gone(watched)
        child.kill()
        child.wait()
        assert launcher_gone(watched)
        assert launcher_gone([(os.getpid(), 12.0)])  # a pid that now belongs to another process: gone
        assert not launcher_gone([(os.getpid(), __import__("psutil").Process().create_time())])
    finally:
        child.kill()
        import psutil

        if psutil.pid_exists(rank):
            psutil.Process(rank).kill()


def test_only_a_rank_that_lost_its_peer_waits_before_it_exits(tmp_path):
    import torch.distributed as dist

    from tropd_ds import process

    started_here = not dist.is_initialized()
    if started_here:
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        gone = process.collective_exit(RuntimeError("[pair.cc:537] Read error: Connection reset by peer"), 10)
        assert gone is not None and gone[0].startswith("another rank has stopped") and gone[1] >= 1.5
        timed_out = process.collective_exit(RuntimeError("[gloo] Timed out waiting 600000ms for recv"), 10)
        assert timed_out is not None and "collective_timeout_minutes=10" in timed_out[0] and timed_out[1] == 0
        assert process.collective_exit(RuntimeError("CUDA error: an illegal memory access"), 10) is None
        assert process.collective_exit(RuntimeError("a shape mismatch"), 10) is None
    finally:
        if started_here:
            dist.destroy_process_group()


def test_leave_now_waits_the_given_time_and_a_signal_ends_the_wait(tmp_path):
    code = "from tropd_ds import process; process.leave_now(5, 'peer gone', linger_s=%s)"
    started = time.time()
    done = subprocess.run([sys.executable, "-c", code % 2], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 5 and "error: peer gone" in done.stdout and time.time() - started >= 2
    waiting = subprocess.Popen([sys.executable, "-c", code % 60], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert "error: peer gone" in waiting.stdout.readline()
    waiting.send_signal(signal.SIGTERM)  # the launcher's clean-up: at its default, not deferred to a step's end
    assert waiting.wait(timeout=10) == -signal.SIGTERM
