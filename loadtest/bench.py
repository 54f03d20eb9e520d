"""The benchmark: the click route vs. an empty WSGI callable on the same
serving stack, nginx's bare `return 204`, stats latency, flusher throughput.

    python -m loadtest.bench [--seconds 3] [--rounds 2] [--starts 8] [--connections 64] [--workers 1]
                             [--stacks gunicorn,granian] [--skip-http] [--json]

Progress goes to stderr as it runs; at the end a short table says, for each
target (TARGETS), whether it was met, with the other figures below it;
--json prints the whole report instead, for machines.

Servers (master, workers, flusher; nginx with one worker) are pinned to CPU 0
and wrk to CPU 1 (taskset), everything in the same run. wrk alternates
between the empty callable and the service, sending both the same clicks
over 1,000 banners, 2 rounds per start, and both are started afresh 8
times. For each stack it prints the median requests/s, p50/p99 latency, the
ratio to that stack's empty callable within each start and the median of
those, and the ratio to nginx, then checks answered
2xx <= stored clicks <= sent (wrk stops with requests in flight). Then the
latency of a one-day stats query over 1,440 minute rows, and the flusher:
the median of five flushes of 100,000 distinct (banner, minute) keys that
make new rows, and of five that add to those rows. Load goes to 127.0.0.1
only and is bounded by time.
DATABASE_URL is used when set, otherwise an embedded PostgreSQL.
"""

import argparse
import contextlib
import json
import os
import pathlib
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

import psycopg2

from counter.flush.flusher import Flusher
from counter.shm.segment import SegmentWriter
from counter.storage import connection, embedded, schema

ROOT = pathlib.Path(__file__).resolve().parent.parent
SPREAD = str(pathlib.Path(__file__).with_name("spread.lua"))

# The click route's requests/s over its own stack's empty WSGI callable
# (median of the per-start ratios): what the route may cost at most.
RATIO_TARGETS = {"gunicorn": 0.85, "granian": 0.90}
FLUSH_TARGET = 150_000  # rows/s, a flush of 100,000 distinct (banner, minute) keys
STARTED = [time.monotonic()]  # main() sets it again


def say(text):
    """Progress, on stderr, with the time since the start."""
    elapsed = int(time.monotonic() - STARTED[0])
    print(f"[{elapsed // 60}:{elapsed % 60:02d}] {text}", file=sys.stderr, flush=True)


def pinned(cpu, command):
    return (["taskset", "-c", str(cpu)] if shutil.which("taskset") and os.cpu_count() > 1 else []) + command


def wait_ready(url, proc, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            urllib.request.urlopen(url, timeout=1).read()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer")


def stop(*procs):
    """SIGTERM to each at once (a graceful gunicorn stop takes seconds), then
    wait for each; SIGKILL one that takes more than a minute."""
    for proc in procs:
        proc.send_signal(signal.SIGTERM)  # a no-op once it has exited
    for proc in procs:
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


_UNITS = {"ns": 1e-6, "us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4, "h": 3.6e6}


def _ms(text):
    """wrk's latency ("812.00us", "1.20ms", "2.00s", "1.02m") in milliseconds."""
    match = re.match(r"([\d.]+)(ns|us|ms|s|m|h)$", text)
    return round(float(match[1]) * _UNITS[match[2]], 3) if match else None


def wrk(url, seconds, connections, script=None):
    command = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency"]
    if script:
        command += ["-s", script]
    out = subprocess.run(pinned(1, command + [url]), capture_output=True, text=True, check=True).stdout
    result = {
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out)[1]),
        "requests": int(re.search(r"(\d+) requests in", out)[1]),
        "p50_ms": _ms(re.search(r"50%\s+(\S+)", out)[1]),
        "p99_ms": _ms(re.search(r"99%\s+(\S+)", out)[1]),
    }
    sent = re.search(r"sent: (\d+)", out)
    result["sent"] = int(sent[1]) if sent else None
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: (.*)", out)
    result["non_2xx"] = int(bad[1]) if bad else 0
    result["socket_errors"] = errors[1] if errors else ""
    return result


def serve(command, env, url):
    proc = subprocess.Popen(pinned(0, command), env=env, cwd=str(ROOT),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_ready(url, proc)
    except BaseException:
        stop(proc)  # a server that never answered is not left running
        raise
    return proc


def ceiling_command(stack, workers):
    """The empty WSGI callable, served the way the service is on that stack."""
    if stack == "granian":
        from counter import config
        from counter.serving import granian_serve

        command = granian_serve.granian_command(config.load(dict(os.environ, WORKERS=str(workers))))
        return command[:-1] + ["loadtest.empty_app:application"]
    return [sys.executable, "-m", "gunicorn", "-c", "python:counter.serving.gunicorn_hooks",
            "loadtest.empty_app:application"]


def _rps(runs):
    return ", ".join(f"{r['rps']:,.0f}" for r in runs) + " req/s"


def _median_run(runs):
    return sorted(runs, key=lambda r: r["rps"])[len(runs) // 2]


def ratios_by_start(runs, baseline_runs):
    """For each fresh start, in order, the median requests/s of `runs` over
    that of `baseline_runs` in the same start (runs carry their "start")."""
    def median_rps(of, start):
        return statistics.median(r["rps"] for r in of if r["start"] == start)

    return [round(median_rps(runs, start) / median_rps(baseline_runs, start), 3)
            for start in sorted({r["start"] for r in baseline_runs})]


def bench_stack(stack, database_url, args):
    """Both servers run side by side (pinned to CPU 0); wrk alternates between
    them for `rounds` rounds, the first of each pair swapped every round, so
    the machine's drift hits both alike. That is done `starts` times with fresh
    processes, since one process's memory layout can make it faster or slower
    for its whole life: each start is one draw of that luck for each server.
    The ratio is taken within each start (the click route's median over the
    empty callable's, both measured in the same minutes), and the median of
    those ratios is the headline; the median run of each server is reported
    beside it."""
    ports = embedded.free_port(), embedded.free_port()
    shms = [tempfile.mkdtemp(prefix="cc-bench-", dir="/dev/shm") for _ in ports]
    envs = [dict(os.environ, DATABASE_URL=database_url, BIND=f"127.0.0.1:{port}", SERVER=stack,
                 WORKERS=str(args.workers), SHM_DIR=shm, LOG_LEVEL="warning")
            for port, shm in zip(ports, shms)]
    ceiling_url, click_url = (f"http://127.0.0.1:{port}" for port in ports)
    os.environ["BIND"] = envs[0]["BIND"]  # for ceiling_command's settings
    results = {}
    empty_runs, click_runs = [], []
    try:
        before = _stored(database_url)
        for start in range(args.starts):
            say(f"{stack}: start {start + 1} of {args.starts}")
            ceiling = serve(ceiling_command(stack, args.workers), envs[0], ceiling_url + "/")
            try:
                service = serve([sys.executable, "-m", "cli", "serve"], envs[1],
                                click_url + "/v1/healthcheck")
                try:
                    time.sleep(1)
                    pair = ((ceiling_url, empty_runs), (click_url, click_runs))
                    for round_number in range(args.rounds):
                        # the same click requests to both: only the app differs
                        for url, runs in pair if round_number % 2 == 0 else pair[::-1]:
                            run = wrk(url + "/counter/1", args.seconds, args.connections, SPREAD)
                            runs.append(dict(run, start=start))
                    say(f"{stack}: start {start + 1}: empty {_rps(empty_runs[-args.rounds:])}, "
                        f"click route {_rps(click_runs[-args.rounds:])}")
                    if start == 0 and stack == args.stacks[0]:
                        say("stats: one day of minute rows, 200 requests")
                        results["stats_one_day"] = stats_latency(click_url, database_url)
                finally:
                    stop(service, ceiling)  # SIGTERM: the final flush stores everything counted
            finally:
                stop(ceiling)  # if the service did not start
        stored = _stored(database_url) - before
        results["empty_wsgi"] = _median_run(empty_runs)
        results["click_route"] = _median_run(click_runs)
        results["rounds_rps"] = {"empty_wsgi": [r["rps"] for r in empty_runs],
                                 "click_route": [r["rps"] for r in click_runs]}
        results["ratio_by_start"] = sorted(ratios_by_start(click_runs, empty_runs))
        results["ratio_to_own_ceiling"] = round(statistics.median(results["ratio_by_start"]), 3)
        # each round's click run over the empty run beside it: the spread
        # shows how far the machine drifts from one run to the next
        results["round_ratios"] = sorted(round(click["rps"] / empty["rps"], 3)
                                         for empty, click in zip(empty_runs, click_runs))
        answered = sum(r["requests"] - r["non_2xx"] for r in click_runs)
        sent = sum(r["sent"] or 0 for r in click_runs)
        results["stored_vs_answered"] = {"answered_2xx": answered, "stored": stored, "sent": sent,
                                         "ok": answered <= stored <= sent}
    finally:
        for shm in shms:
            shutil.rmtree(shm, ignore_errors=True)
    return results


def bench_nginx(args):
    """nginx `return 204` with one worker, pinned like the others."""
    if not shutil.which("nginx") and not os.path.exists("/usr/sbin/nginx"):
        return {"skipped": "nginx is not installed (apt-get install nginx-light)"}
    say("nginx return 204")
    port = embedded.free_port()
    folder = tempfile.mkdtemp(prefix="cc-bench-nginx-")
    conf = os.path.join(folder, "nginx.conf")
    with open(conf, "w") as f:
        f.write(f"pid {folder}/nginx.pid;\nerror_log {folder}/error.log;\nworker_processes 1;\n"
                "daemon off;\nevents { worker_connections 4096; }\n"
                f"http {{ access_log off; server {{ listen 127.0.0.1:{port}; "
                "location / { return 204; } } }\n")
    proc = subprocess.Popen(pinned(0, [shutil.which("nginx") or "/usr/sbin/nginx", "-c", conf]),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1).read()
                break
            except OSError:
                time.sleep(0.1)
        return wrk(f"http://127.0.0.1:{port}/", args.seconds, args.connections)
    finally:
        proc.send_signal(signal.SIGQUIT)
        proc.wait(timeout=10)
        shutil.rmtree(folder, ignore_errors=True)


def stats_latency(base, database_url, requests=200):
    """GET /stats for one day of minute rows (1,440 of them), one at a time."""
    banner = 4_000_000_001
    conn = psycopg2.connect(database_url)
    with conn, conn.cursor() as cur:
        cur.execute("INSERT INTO clicks SELECT %s, timestamptz '2024-03-01' + i * interval '1 minute', 1 + i %% 7"
                    " FROM generate_series(0, 1439) AS i ON CONFLICT DO NOTHING", (banner,))
    conn.close()
    url = f"{base}/stats/{banner}?from=2024-03-01T00:00:00Z&to=2024-03-02T00:00:00Z"
    times = []
    for _ in range(requests):
        started = time.perf_counter()
        body = urllib.request.urlopen(url, timeout=10).read()
        times.append((time.perf_counter() - started) * 1000)
    times.sort()
    assert json.loads(body)["total"] > 0
    return {"requests": requests, "buckets": 1440, "p50_ms": round(times[len(times) // 2], 2),
            "p99_ms": round(times[int(len(times) * 0.99) - 1], 2)}


def _stored(url):
    """Clicks stored for the banners spread.lua clicks (1..1000)."""
    conn = psycopg2.connect(url)
    try:
        with conn, conn.cursor() as cur:
            cur.execute("SELECT coalesce(sum(count), 0)::bigint FROM clicks WHERE banner_id <= 1000")
            return cur.fetchone()[0]
    finally:
        conn.close()


def bench_flush(database_url, keys=100_000, rounds=5):
    """Flusher throughput over `rounds` rounds, each of `keys` new banners
    (the table grows by `keys` rows a round), in two flushes: the minute's
    first flush, which makes the rows, then one more click on every banner,
    which adds to them. Medians are the figures; each round's are beside them."""
    made, added = [], []
    for round_ in range(rounds):
        say(f"flusher: round {round_ + 1} of {rounds}, {keys:,} keys")
        first = 10_000_001 + round_ * keys
        shm = tempfile.mkdtemp(prefix="cc-bench-flush-", dir="/dev/shm")
        now = time.time()
        try:
            writer = SegmentWriter(shm, keys, 1 << 30, clock=lambda now=now: now)  # one minute
            flusher = Flusher(shm, database_url)
            flusher.store.connect()  # connect outside the timing
            for seconds in (made, added):
                for banner in range(first, first + keys):
                    writer.add(banner)
                started = time.perf_counter()
                result = flusher.flush_once()
                seconds.append(time.perf_counter() - started)
                assert result["rows"] == keys, result
            flusher.close()
            writer.close()
        finally:
            shutil.rmtree(shm, ignore_errors=True)

    def summary(seconds):
        return {"seconds": round(statistics.median(seconds), 3),
                "rows_per_s": round(keys / statistics.median(seconds)),
                "rows_per_s_each": [round(keys / s) for s in seconds]}
    return {"rows": keys, "rounds": rounds, "new_rows": summary(made), "existing_rows": summary(added)}


@contextlib.contextmanager
def migrated_database():
    """The URL of a migrated database: DATABASE_URL when set, otherwise an
    embedded PostgreSQL that lives as long as the `with` block."""
    url = os.environ.get("DATABASE_URL")
    server = data = None
    if not url:
        say("starting an embedded PostgreSQL (DATABASE_URL is unset)")
        data = tempfile.mkdtemp(prefix="cc-loadtest-pg-")
        server = embedded.EmbeddedPostgres(data)
        url = server.start()
    try:
        conn = connection.connect(url)
        schema.migrate(conn)
        conn.close()
        yield url
    finally:
        if server is not None:
            server.stop()
            shutil.rmtree(data, ignore_errors=True)


def _duration(seconds) -> str:
    return f"{round(seconds)} s" if seconds < 120 else f"{round(seconds / 60)} minutes"


def expected_seconds(args) -> float:
    """A rough duration: the wrk runs and the pauses are exact; starting both
    servers (~4 s) and a flush round of 100,000 keys (~3 s) are estimates."""
    seconds = 5 * args.flush_rounds * args.flush_keys / 100_000 + 10
    if not args.skip_http:
        per_start = 4 + 1 + args.rounds * 2 * (args.seconds + 0.5)
        seconds += len(args.stacks) * args.starts * per_start + args.seconds + 5
    return seconds


def targets(report) -> list:
    """Each target: what, the figure, the bound, met or not."""
    rows = []
    for stack, bound in RATIO_TARGETS.items():
        if stack in report:
            figures = report[stack]
            ratio = figures["ratio_to_own_ceiling"]
            rows.append({"target": f"{stack}: click route / empty WSGI, median of "
                                   f"{len(figures['ratio_by_start'])} starts",
                         "value": ratio, "bound": f">= {bound}", "met": ratio >= bound})
            counted = figures["stored_vs_answered"]
            rows.append({"target": f"{stack}: answered 2xx <= stored <= sent",
                         "value": f"{counted['answered_2xx']:,} <= {counted['stored']:,} <= {counted['sent']:,}",
                         "bound": "holds", "met": counted["ok"]})
    for kind in ("new_rows", "existing_rows"):
        if report["flush"]["rows"] != 100_000:
            break  # the target is for flushes of 100,000 keys
        rate = report["flush"][kind]["rows_per_s"]
        rows.append({"target": f"flusher: {kind.replace('_', ' ')}, rows/s (median of {report['flush']['rounds']})",
                     "value": rate, "bound": f">= {FLUSH_TARGET:,}", "met": rate >= FLUSH_TARGET})
    return rows


def summary(report, args) -> str:
    """The short table of targets, then the other figures, one line each."""
    rows = [(t["target"], f"{t['value']:,}" if isinstance(t["value"], int) else str(t["value"]),
             t["bound"], "yes" if t["met"] else "NO") for t in report["targets"]]
    header = ("target", "value", "bound", "met")
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(4)]
    lines = [f"click-counter benchmark: {report['took']}, {args.workers} worker(s), "
             f"{args.connections} connections", ""]
    for row in [header] + rows if rows else []:
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
    met = sum(t["met"] for t in report["targets"])
    lines += [f"{met} of {len(report['targets'])} targets met" if rows else
              "no target applies (they need the HTTP part, and flushes of 100,000 keys)", ""]
    for stack in args.stacks if not args.skip_http else []:
        figures = report[stack]
        empty, click = figures["empty_wsgi"], figures["click_route"]
        lines.append(f"{stack}: empty WSGI {empty['rps']:,.0f} req/s, click route {click['rps']:,.0f} req/s "
                     f"(p50 {click['p50_ms']} ms, p99 {click['p99_ms']} ms), per-start ratios "
                     + ", ".join(map(str, figures["ratio_by_start"])))
        if "click_ratio_to_nginx" in figures:
            lines.append(f"{stack}: click route / nginx return 204 "
                         f"({report['nginx_return_204']['rps']:,.0f} req/s): {figures['click_ratio_to_nginx']}")
    if "stats_one_day" in report.get(args.stacks[0], {}) and not args.skip_http:
        latency = report[args.stacks[0]]["stats_one_day"]
        lines.append(f"stats, one day of minute rows: p50 {latency['p50_ms']} ms, p99 {latency['p99_ms']} ms")
    flush = report["flush"]
    lines.append(f"flusher, {flush['rows']:,} keys: making rows {flush['new_rows']['rows_per_s']:,} rows/s, "
                 f"adding to them {flush['existing_rows']['rows_per_s']:,} rows/s (medians of {flush['rounds']})")
    return "\n".join(lines)


def parse_args(argv=None):
    defaults = argparse.Namespace(seconds=3, rounds=2, starts=8, stacks=["gunicorn", "granian"],
                                  flush_rounds=5, flush_keys=100_000, skip_http=False)
    expected = _duration(expected_seconds(defaults))
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.bench", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="The click route against an empty WSGI callable on each serving stack, "
                    "nginx's return 204, stats latency and flusher throughput; a table of "
                    "targets met at the end. Needs wrk and nginx (apt-get install wrk nginx-light) "
                    "and the whole machine: servers on CPU 0, wrk on CPU 1.",
        epilog=f"With the defaults it takes about {expected}; it says how far it is on "
               "stderr. Smallest run: --stacks gunicorn --starts 1 --rounds 1 --seconds 1 "
               "--flush-rounds 1.")
    parser.add_argument("--seconds", type=int, default=3, help="per wrk run")
    parser.add_argument("--rounds", type=int, default=2, help="alternating runs per server and start")
    parser.add_argument("--starts", type=int, default=8, help="fresh starts of both servers")
    parser.add_argument("--connections", type=int, default=64, help="wrk connections")
    parser.add_argument("--workers", type=int, default=1, help="worker processes per server")
    parser.add_argument("--stacks", default="gunicorn,granian",
                        help="comma-separated: gunicorn, granian")
    parser.add_argument("--skip-http", action="store_true", help="only the flusher")
    parser.add_argument("--flush-rounds", type=int, default=5, help="flusher rounds")
    parser.add_argument("--flush-keys", type=int, default=100_000,
                        help="distinct (banner, minute) keys per flush")
    parser.add_argument("--json", action="store_true", help="print the whole report as JSON")
    args = parser.parse_args(argv)
    args.stacks = [name.strip() for name in args.stacks.split(",") if name.strip()]
    unknown = set(args.stacks) - set(RATIO_TARGETS)
    if unknown:
        parser.error(f"unknown stack(s): {', '.join(sorted(unknown))} (gunicorn, granian)")
    if not args.skip_http and not shutil.which("wrk"):
        parser.error("wrk is not installed (apt-get install wrk), or use --skip-http")
    return args


def main(argv=None):
    args = parse_args(argv)
    STARTED[0] = time.monotonic()
    say(f"expected to take about {_duration(expected_seconds(args))}")
    with migrated_database() as url:
        report = {"cpus": os.cpu_count(), "workers": args.workers, "connections": args.connections}
        if not args.skip_http:
            report["nginx_return_204"] = bench_nginx(args)
            for stack in args.stacks:
                report[stack] = bench_stack(stack, url, args)
                nginx_rps = report["nginx_return_204"].get("rps")
                if nginx_rps:
                    report[stack]["click_ratio_to_nginx"] = round(
                        report[stack]["click_route"]["rps"] / nginx_rps, 3)
        report["flush"] = bench_flush(url, keys=args.flush_keys, rounds=args.flush_rounds)
    elapsed = int(time.monotonic() - STARTED[0])
    report["took"] = _duration(elapsed)
    report["targets"] = targets(report)
    print(json.dumps(report, indent=2) if args.json else summary(report, args))


if __name__ == "__main__":
    main()
