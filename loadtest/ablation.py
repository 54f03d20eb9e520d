"""Where the click route's gap to the empty callable goes: WSGI apps that
each add one step of the route's work, served side by side and compared.

    python -m loadtest.ablation [--variants empty,click_answer,route_counting_nothing,route]
                                [--stack gunicorn] [--rounds 4] [--seconds 3] [--starts 3]
                                [--connections 64]

Each variant (see loadtest/ablation_apps.py) runs in its own server with the
service's settings: gunicorn (one meinheld worker, plus the flusher) or
granian (one worker with the service's threads; no flusher: a run stays well
within the memory bound), all pinned to
CPU 0; wrk, pinned to CPU 1, sends each the benchmark's clicks over 1,000
banners in turn, in reverse order every other round, so the machine's drift
hits all alike; all are started afresh `--starts` times, since a process
can be faster or slower than another for its whole life. For each variant it
prints the median requests/s, the ratio to the first variant (overall, per
start, and the median of the per-start ratios, the benchmark's headline),
and the worker's user and system CPU time per request (from
/proc/<pid>/stat around each wrk run). Load goes to 127.0.0.1 only and
is bounded by time. DATABASE_URL is used when set, otherwise an embedded
PostgreSQL.
"""

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile

from counter.storage import embedded
from counter.testing import harness
from loadtest import bench

DEFAULT_VARIANTS = "empty,click_answer,route_counting_nothing,route"
TICKS_PER_SECOND = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid):
    """(user, system) CPU seconds of a process so far."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return int(fields[11]) / TICKS_PER_SECOND, int(fields[12]) / TICKS_PER_SECOND


def worker_pid(master_pid):
    """The server's one worker: its child that is not the flusher."""
    for child in harness.children(master_pid):
        if "cli flusher" not in harness.cmdline(child):
            return child
    raise RuntimeError("the server has no worker")


def start(variant, database_url, shm_dir, stack="gunicorn"):
    """Serve one variant; returns (process, url)."""
    port = embedded.free_port()
    env = dict(os.environ, DATABASE_URL=database_url, BIND=f"127.0.0.1:{port}", WORKERS="1",
               SHM_DIR=shm_dir, LOG_LEVEL="warning", ABLATION_VARIANT=variant, SERVER=stack)
    if stack == "granian":
        from counter import config
        from counter.serving import granian_serve

        command = granian_serve.granian_command(config.load(env))[:-1]
    else:
        command = [sys.executable, "-m", "gunicorn", "-c", "python:counter.serving.gunicorn_hooks"]
    command.append("loadtest.ablation_apps:application")
    url = f"http://127.0.0.1:{port}/counter/1"
    return bench.serve(command, env, url), url


def compare(variants, database_url, rounds=4, seconds=3, starts=3, connections=64, stack="gunicorn"):
    runs = {variant: [] for variant in variants}
    for start_number in range(starts):
        servers, shm_dirs = {}, []
        try:
            for variant in variants:
                shm_dirs.append(tempfile.mkdtemp(prefix="cc-ablation-", dir="/dev/shm"))
                servers[variant] = start(variant, database_url, shm_dirs[-1], stack)
            workers = {variant: worker_pid(proc.pid) for variant, (proc, _) in servers.items()}
            for round_number in range(rounds):
                for variant in variants if round_number % 2 == 0 else variants[::-1]:
                    user, system = cpu_seconds(workers[variant])
                    result = bench.wrk(servers[variant][1], seconds, connections, bench.SPREAD)
                    user_after, system_after = cpu_seconds(workers[variant])
                    result["user_us"] = 1e6 * (user_after - user) / result["requests"]
                    result["system_us"] = 1e6 * (system_after - system) / result["requests"]
                    result["start"] = start_number
                    runs[variant].append(result)
        finally:
            bench.stop(*(proc for proc, _ in servers.values()))
            for shm_dir in shm_dirs:
                shutil.rmtree(shm_dir, ignore_errors=True)
    return summarize(runs)


def summarize(runs):
    """Medians per variant, and each variant's median requests/s as a ratio
    to the first variant's, over all runs and within each start."""
    report = {}
    for variant, results in runs.items():
        report[variant] = {
            "rps": round(statistics.median(r["rps"] for r in results)),
            "user_us_per_request": round(statistics.median(r["user_us"] for r in results), 1),
            "system_us_per_request": round(statistics.median(r["system_us"] for r in results), 1),
            "runs": len(results),
            "answered": sum(r["requests"] for r in results),
            "sent": sum(r["sent"] or 0 for r in results),
            "non_2xx": sum(r["non_2xx"] for r in results),
        }

    first = next(iter(runs))
    for variant, figures in report.items():
        figures["ratio"] = round(figures["rps"] / report[first]["rps"], 3)
        figures["ratio_by_start"] = bench.ratios_by_start(runs[variant], runs[first])
        # the benchmark's headline: each start is one draw of every process's luck
        figures["median_ratio_of_starts"] = round(statistics.median(figures["ratio_by_start"]), 3)
    return report


def main():
    parser = argparse.ArgumentParser(description="where the click route's gap to the empty callable goes")
    parser.add_argument("--variants", default=DEFAULT_VARIANTS,
                        help="comma-separated names from loadtest/ablation_apps.py; the first is the baseline")
    parser.add_argument("--rounds", type=int, default=4, help="runs per variant and start")
    parser.add_argument("--seconds", type=int, default=3, help="per wrk run")
    parser.add_argument("--starts", type=int, default=3, help="fresh starts of all servers")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--stack", choices=("gunicorn", "granian"), default="gunicorn")
    args = parser.parse_args()
    from loadtest import ablation_apps  # names only; the apps are built in the workers

    variants = [name.strip() for name in args.variants.split(",") if name.strip()]
    unknown = [name for name in variants if name not in ablation_apps.VARIANTS]
    if unknown or not variants:
        parser.error(f"unknown variants {unknown}; known: {', '.join(ablation_apps.VARIANTS)}")

    with bench.migrated_database() as url:
        print(json.dumps(compare(variants, url, args.rounds, args.seconds, args.starts,
                                 args.connections, args.stack), indent=2))


if __name__ == "__main__":
    main()
