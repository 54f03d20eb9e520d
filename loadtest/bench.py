"""The benchmark: click route vs. an empty WSGI callable, and flusher throughput.

    python -m loadtest.bench [--seconds 10] [--connections 64] [--workers 1]

The server (gunicorn master, its workers, the flusher) is pinned to CPU 0 and
wrk to CPU 1 (taskset), both stacks in the same run. It prints requests/s,
latency percentiles and the ratio to the ceiling, checks that the database
holds the clicks wrk saw answered, then times one flush of 100,000 distinct
(banner, minute) keys. Load goes to 127.0.0.1 only and is bounded by time.
DATABASE_URL is used when set, otherwise an embedded PostgreSQL.
"""

import argparse
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

import psycopg2

from counter import embedded, storage
from counter.flusher import Flusher
from counter.segment import SegmentWriter

ROOT = pathlib.Path(__file__).resolve().parent.parent
SPREAD = str(pathlib.Path(__file__).with_name("spread.lua"))


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


def stop(proc):
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def _ms(text):
    number, unit = re.match(r"([\d.]+)(us|ms|s)", text).groups()
    return float(number) * _UNITS[unit]


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
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: (.*)", out)
    result["non_2xx"] = int(bad[1]) if bad else 0
    result["socket_errors"] = errors[1] if errors else ""
    return result


def serve(command, env, url):
    proc = subprocess.Popen(pinned(0, command), env=env, cwd=str(ROOT),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_ready(url, proc)
    return proc


def bench_http(database_url, args):
    port = embedded.free_port()
    base = f"http://127.0.0.1:{port}"
    shm = tempfile.mkdtemp(prefix="cc-bench-", dir="/dev/shm")
    env = dict(os.environ, DATABASE_URL=database_url, BIND=f"127.0.0.1:{port}",
               WORKERS=str(args.workers), SHM_DIR=shm, LOG_LEVEL="warning")
    results = {}
    try:
        ceiling = serve([sys.executable, "-m", "gunicorn", "-c", "python:counter.gunicorn_config",
                         "loadtest.empty_app:application"], env, base + "/")
        try:
            time.sleep(1)
            results["empty_wsgi"] = wrk(base + "/", args.seconds, args.connections)
        finally:
            stop(ceiling)
        before = _stored(database_url)
        service = serve([sys.executable, "-m", "cli", "serve"], env, base + "/v1/healthcheck")
        try:
            time.sleep(1)
            results["click_route"] = wrk(base + "/counter/1", args.seconds, args.connections, SPREAD)
        finally:
            stop(service)  # SIGTERM: the final flush stores everything counted
        stored = _stored(database_url) - before
        click = results["click_route"]
        results["ratio_to_ceiling"] = round(click["rps"] / results["empty_wsgi"]["rps"], 3)
        answered = click["requests"] - click["non_2xx"]
        # wrk stops with up to `connections` requests in flight: the server may
        # have counted those without wrk seeing the answer.
        results["stored_vs_answered"] = {"stored": stored, "answered_2xx": answered,
                                         "in_flight_slack": args.connections,
                                         "ok": answered <= stored <= answered + args.connections}
    finally:
        shutil.rmtree(shm, ignore_errors=True)
    return results


def _stored(url):
    conn = psycopg2.connect(url)
    try:
        with conn, conn.cursor() as cur:
            cur.execute("SELECT coalesce(sum(count), 0)::bigint FROM clicks")
            return cur.fetchone()[0]
    finally:
        conn.close()


def bench_flush(database_url, keys=100_000):
    """One flush of `keys` distinct (banner, minute) rows."""
    shm = tempfile.mkdtemp(prefix="cc-bench-flush-", dir="/dev/shm")
    try:
        writer = SegmentWriter(shm, keys, 1 << 30)
        for banner in range(10_000_001, 10_000_001 + keys):
            writer.add(banner)
        flusher = Flusher(shm, database_url)
        flusher._connection()  # connect outside the timing
        started = time.perf_counter()
        result = flusher.flush_once()
        seconds = time.perf_counter() - started
        flusher.close()
        writer.close()
        assert result["rows"] == keys, result
        return {"rows": keys, "seconds": round(seconds, 3), "rows_per_s": round(keys / seconds)}
    finally:
        shutil.rmtree(shm, ignore_errors=True)


def main():
    parser = argparse.ArgumentParser(description="click-counter benchmark")
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--skip-http", action="store_true")
    args = parser.parse_args()

    server = None
    url = os.environ.get("DATABASE_URL")
    data = None
    if not url:
        data = tempfile.mkdtemp(prefix="cc-bench-pg-")
        server = embedded.EmbeddedPostgres(data)
        url = server.start()
    try:
        conn = storage.connect(url)
        storage.migrate(conn)
        conn.close()
        report = {"cpus": os.cpu_count(), "workers": args.workers, "connections": args.connections}
        if not args.skip_http:
            report.update(bench_http(url, args))
        report["flush"] = bench_flush(url)
        print(json.dumps(report, indent=2))
    finally:
        if server is not None:
            server.stop()
            shutil.rmtree(data, ignore_errors=True)


if __name__ == "__main__":
    main()
