"""Stopping the servers and daemons the tests start in their own process groups."""

import os
import signal
import subprocess


def stop_process_group(proc: subprocess.Popen, grace_s: float, kill_leftovers: bool = False) -> None:
    """SIGTERM the group of ``proc``, SIGKILL it if ``proc`` outlives ``grace_s``. ``kill_leftovers``:
    SIGKILL the group even after ``proc`` stopped (children it started may still run)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            kill_leftovers = True
    if kill_leftovers:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)
