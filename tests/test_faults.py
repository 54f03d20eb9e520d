"""The fault-injection suite (loadtest/faults.py), every scenario, in its short
CI mode: real service trees, a real PostgreSQL stopped and restarted, kills of
every process, a memory flood -- lost = 0 and duplicated = 0 everywhere."""

import subprocess
import sys

import pytest
from conftest import ROOT


@pytest.mark.service
@pytest.mark.parametrize("server", ["gunicorn", "granian"])
def test_every_fault_scenario_loses_and_duplicates_nothing(server):
    done = subprocess.run([sys.executable, "-m", "loadtest.faults", "--mode", "ci", "--server", server],
                          cwd=str(ROOT), capture_output=True, text=True, timeout=1200)
    print(done.stdout)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    assert "13 passed, 0 failed" in done.stdout
