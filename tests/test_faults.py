"""The fault-injection suite (loadtest/faults.py), every scenario, in its short
CI mode: real service trees, a real PostgreSQL stopped and restarted, kills of
every process, a memory flood -- lost = 0 and duplicated = 0 everywhere."""

import subprocess
import sys

import pytest
from conftest import ROOT

pytestmark = pytest.mark.service

SERVERS = ["gunicorn", "granian"]


@pytest.fixture(scope="module")
def suites():
    """Both stacks' suites, started together: each has its own PostgreSQL,
    service trees, ports and banner ids, and most of a scenario is waiting
    (loads of fixed length, a frozen flusher, a database that is down), so
    they overlap at about the time of one. Killed by pid if still running."""
    started = {server: subprocess.Popen(
        [sys.executable, "-m", "loadtest.faults", "--mode", "ci", "--server", server],
        cwd=str(ROOT), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for server in SERVERS}
    yield started
    for proc in started.values():
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


@pytest.mark.parametrize("server", SERVERS)
def test_every_fault_scenario_loses_and_duplicates_nothing(suites, server):
    stdout, stderr = suites[server].communicate(timeout=1200)
    print(stdout)
    assert suites[server].returncode == 0, stdout + stderr[-3000:]
    assert "13 passed, 0 failed" in stdout
