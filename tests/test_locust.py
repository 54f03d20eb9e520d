"""The README's locust commands, run headless against a real service (loopback,
small and short): each process exits 0 on success, the run ends with one
verdict line and prints no periodic tables; a failing run exits 1."""

import os
import pathlib
import re
import shlex
import subprocess
import sys

import pytest

from counter.storage import embedded

pytestmark = pytest.mark.processes  # locust runs as processes of its own

ROOT = pathlib.Path(__file__).resolve().parent.parent
LOCUST = [sys.executable, "-m", "locust"]


def documented_commands():
    """The locust command lines of the README's "Load testing" block, as argv lists."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Load testing"):]
    block = re.search(r"^```sh\n(.*?)^```$", section, re.S | re.M)[1].replace("\\\n", " ")
    commands = []
    for line in block.splitlines():
        if line.startswith(".venv/bin/locust"):
            argv = shlex.split(line.split("#")[0].rstrip().rstrip("&"))
            commands.append(argv[1:])
    return commands


def small(args, url, master_port):
    """The documented options, pointed at the test's service, small and short."""
    args = [url if a == "http://127.0.0.1:8000" else a for a in args]
    for option, value in (("-t", "4s"), ("-u", "20"), ("-r", "20")):
        if option in args:
            args[args.index(option) + 1] = value
    if "--worker" in args:
        args += ["--master-port", str(master_port)]
    if "--master" in args:
        args += ["--master-bind-port", str(master_port)]
    return LOCUST + args


def run_all(commands, env, timeout=90):
    procs = [subprocess.Popen(c, cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT) for c in commands]
    results = []
    for proc in procs:
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        results.append((proc.returncode, out))
    return results


def assert_passed(code, out):
    assert code == 0, out
    assert "thresholds met: " in out.strip().splitlines()[-1], out
    # the final tables only (requests, percentiles): no table every 2 s
    assert out.count("Aggregated") == 2, out


def test_the_documented_locust_runs_exit_0_with_one_verdict(database_url, service_factory):
    service = service_factory(database_url, workers=1)
    env = dict(os.environ, LOCUST_MAX_P95_MS="2000")  # exit codes are tested here, not speed
    single, workers, master = documented_commands()[0], [], None
    for args in documented_commands()[1:]:
        if "--worker" in args:
            workers.append(args)
        else:
            master = args
    assert "--only-summary" in single and "--only-summary" in master and len(workers) == 2
    assert master[master.index("--master-bind-host") + 1] == "127.0.0.1"

    [(code, out)] = run_all([small(single, service.url, None)], env)
    assert_passed(code, out)

    port = embedded.free_port()
    # workers first, as documented: they wait for the master
    *ran_workers, (code, out) = run_all([small(w, service.url, port) for w in workers]
                                        + [small(master, service.url, port)], env)
    assert_passed(code, out)
    for worker_code, worker_out in ran_workers:
        assert worker_code == 0 and "no requests were made" not in worker_out, worker_out


def test_a_locust_run_that_misses_its_thresholds_exits_1():
    url = f"http://127.0.0.1:{embedded.free_port()}"  # nothing listens: every request fails
    [(code, out)] = run_all([LOCUST + ["-f", "loadtest/locustfile.py", "--headless", "--only-summary",
                                       "-H", url, "-u", "2", "-r", "2", "-t", "2s"]], dict(os.environ))
    assert code == 1, out
    assert "FAILED: the failure ratio is above its limit" in out.strip().splitlines()[-1], out
