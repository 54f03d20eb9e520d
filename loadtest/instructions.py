"""The click route's cost in instructions: a measure that this machine's noise
cannot move.

    python -m loadtest.instructions [--requests 20000] [--connections 16]

Serves the empty WSGI callable and then the service's WSGI app, each in one
meinheld process set up as a gunicorn worker sets it up, under valgrind's
callgrind, and counts the user-space instructions the server executes for
exactly `--requests` keep-alive requests over 1,000 banners. Instrumentation
is switched on only after a warm-up that clicks every banner (the route's
memo, the segment's slots and Python's specializing interpreter settle in
it); the counted run stays inside one minute (a new minute means a new
segment), and hash randomization and the request sequence are fixed, so the
same code gives the same count to within about 0.5% run after run. It prints
instructions per request for both, the click route's extra, and their ratio
(empty ÷ click): the share of the click route's user-space work that the
server needs anyway.

Kernel time (the socket work, most of a request's time) is not counted, and
cold caches make the click route's few extra instructions slow; this is the
requests/s benchmark's (loadtest/bench.py) companion, not its replacement.
Needs valgrind (`apt-get install valgrind`) and meinheld. Clicks are counted
into a scratch segment directory; nothing reaches a database.
"""

import argparse
import json
import os
import pathlib
import random
import re
import selectors
import shutil
import socket
import subprocess
import sys
import tempfile
import time

from counter.shm import segment
from counter.storage import embedded

APPS = {"empty_wsgi": "loadtest.empty_app:application", "click_route": "counter.wsgi:application"}
BANNERS = 1000
ROOT = pathlib.Path(__file__).resolve().parent.parent


def serve(app_path, port):
    """Run in the measured process: meinheld set up as counter.worker's
    MeinheldWorker sets it up in a gunicorn worker."""
    from meinheld import server

    module, name = app_path.split(":")
    app = getattr(__import__(module, fromlist=[name]), name)
    heartbeat = tempfile.TemporaryFile()
    server.set_access_logger(None)
    server.set_keepalive(5)  # gunicorn_config.keepalive
    server.set_picoev_max_fd(16384)  # gunicorn_config.worker_connections
    # as in a gunicorn worker; it also stops this server if the parent goes
    server.set_fastwatchdog(heartbeat.fileno(), os.getppid(), 30)
    server.listen(("127.0.0.1", port))
    server.run(app)


def drive(port, banners, connections, timeout=300):
    """GET /counter/{id} for each id of `banners`, in order, over `connections`
    keep-alive connections with one request in flight on each; every answer
    must be 2xx, and all of them must come within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    todo = iter(banners)
    selector = selectors.DefaultSelector()
    pending = {}
    expected = len(banners)
    answered = 0

    def send(conn):
        banner = next(todo, None)
        if banner is not None:
            conn.sendall(b"GET /counter/%d HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" % banner)

    for _ in range(min(connections, expected)):
        conn = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        pending[conn] = b""
        selector.register(conn, selectors.EVENT_READ)
        send(conn)
    try:
        while answered < expected:
            ready = selector.select(timeout=max(deadline - time.monotonic(), 0))
            if not ready:
                raise TimeoutError(f"{answered} of {expected} answers in {timeout} s")
            for key, _ in ready:
                conn = key.fileobj
                data = conn.recv(65536)
                if not data:
                    raise RuntimeError("the server closed a connection")
                pending[conn] += data
                # empty bodies: an answer ends with its blank line
                while b"\r\n\r\n" in pending[conn]:
                    head, pending[conn] = pending[conn].split(b"\r\n\r\n", 1)
                    if not head.startswith(b"HTTP/1.1 2"):
                        raise RuntimeError(f"not a 2xx answer: {head[:40]!r}")
                    answered += 1
                    send(conn)
    finally:
        for conn in pending:
            conn.close()
        selector.close()


def wait_for_a_fresh_minute(seconds_needed):
    """The click route opens a new segment each minute, and every banner's
    first click in it costs more: a counted run must not cross a minute."""
    into = time.time() % 60
    if into > 60 - seconds_needed:
        time.sleep(60 - into + 0.5)


def count(app_path, requests, connections, workdir):
    """User-space instructions per request of `app_path`, under callgrind;
    None when the counted run crossed a minute (the caller runs it again)."""
    # here, not at the top: the measured process imports this module too
    from loadtest.bench import stop, wait_ready

    port = embedded.free_port()
    folder = tempfile.mkdtemp(dir=workdir)
    out = os.path.join(folder, "callgrind.out")
    vgdb = f"--vgdb-prefix={folder}/vgdb"  # its pipes go with the folder
    shm = tempfile.mkdtemp(prefix="cc-instructions-", dir="/dev/shm")
    env = dict(os.environ, PYTHONHASHSEED="0", SHM_DIR=shm, LOG_LEVEL="warning",
               DATABASE_URL=os.environ.get("DATABASE_URL", "postgresql://unused@127.0.0.1:1/unused"))
    command = ["valgrind", "--tool=callgrind", "--instr-atstart=no", vgdb,
               f"--callgrind-out-file={out}",
               sys.executable, "-m", "loadtest.instructions", "--serve", app_path, str(port)]
    proc = subprocess.Popen(command, env=env, cwd=str(ROOT),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    control = ["callgrind_control", vgdb]
    measured = [random.Random(2).randint(1, BANNERS) for _ in range(requests)]
    try:
        wait_ready(f"http://127.0.0.1:{port}/counter/1", proc, timeout=300)
        # ~40 s for the default 20,000 requests under callgrind; a short run
        # need not wait out most of a minute (one that crosses is run again)
        wait_for_a_fresh_minute(seconds_needed=max(5, requests / 500))
        # warm-up, not counted: every banner twice (the route's memo, the
        # segment's slots, the interpreter's specializations), then more
        drive(port, list(range(1, BANNERS + 1)) * 2 + measured[:requests // 10], connections)
        segments = len(segment.list_segments(shm))
        subprocess.run(control + ["-i", "on", str(proc.pid)], check=True, capture_output=True,
                       timeout=60)
        drive(port, measured, connections)
        subprocess.run(control + ["-d", str(proc.pid)], check=True, capture_output=True, timeout=60)
        if len(segment.list_segments(shm)) != segments:  # a new minute began
            return None
        with open(out + ".1") as f:  # the dump: only what ran while instrumented
            return round(int(re.search(r"^totals: (\d+)", f.read(), re.M)[1]) / requests)
    finally:
        stop(proc)
        shutil.rmtree(shm, ignore_errors=True)


def measure(requests=20_000, connections=16):
    for tool in ("valgrind", "callgrind_control"):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} is not installed (apt-get install valgrind)")
    workdir = tempfile.mkdtemp(prefix="cc-instructions-")
    try:
        per_request = {}
        for name, path in APPS.items():
            for _ in range(3):
                per_request[name] = count(path, requests, connections, workdir)
                if per_request[name] is not None:
                    break
            else:
                raise RuntimeError(f"{name}: every counted run crossed a minute; use fewer requests")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    empty, click = per_request["empty_wsgi"], per_request["click_route"]
    return {"requests": requests, "connections": connections,
            "instructions_per_request": per_request,
            "click_route_extra": click - empty,
            "ratio_empty_to_click": round(empty / click, 3)}


def main():
    parser = argparse.ArgumentParser(description="click route cost in instructions (callgrind)")
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--serve", nargs=2, metavar=("APP", "PORT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve[0], int(args.serve[1]))
        return
    print(json.dumps(measure(args.requests, args.connections), indent=2))


if __name__ == "__main__":
    main()
