"""The signal contract of `process.StopRequest`, in a plain process (the 2-rank launches in
tests/test_reliability.py cover the saves): exit codes 128 + n while nothing would be lost, a stop after the
step otherwise, and a second signal that ends the process at once by that signal."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

import pytest

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
