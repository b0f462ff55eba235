"""An interrupt that lands inside a __del__ or a garbage-collector callback (where Python drops exceptions)
still stops the process: the CI run of stop 35 lost a SIGTERM that way."""

import subprocess
import sys

import pytest

from tests.live import ROOT

SCRIPT = """
import os, signal, sys, time
from gpl_platform.cli import interrupts

interrupts.install()

class SignalledOnCollection:
    def __del__(self):
        os.kill(os.getpid(), signal.{name})
        time.sleep(0.2)  # the handler runs here, inside __del__

try:
    SignalledOnCollection()
    time.sleep(5)
    print("went on")
except KeyboardInterrupt as exc:
    print("interrupted:", exc)
"""


@pytest.mark.parametrize("name", ["SIGINT", "SIGTERM"])
def test_an_interrupt_dropped_inside_a_finalizer_is_delivered_again(name):
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT.replace("{name}", name)], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    signum = {"SIGINT": 2, "SIGTERM": 15}[name]
    assert done.stdout.strip() == f"interrupted: signal {signum}", done.stdout + done.stderr
    assert "Exception ignored" not in done.stderr, done.stderr


def test_other_dropped_exceptions_are_still_printed():
    script = (
        "from gpl_platform.cli import interrupts\ninterrupts.install()\n"
        "class Broken:\n    def __del__(self):\n        raise ValueError('in a finalizer')\nBroken()\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert "Exception ignored" in done.stderr and "ValueError: in a finalizer" in done.stderr, done.stderr
