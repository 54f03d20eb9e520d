"""The click route's cost in instructions: a measure that this machine's noise
cannot move.

    python -m loadtest.instructions [--requests 20000] [--connections 16]

Serves the empty WSGI callable and then the service's WSGI app, each in one
meinheld process (as a gunicorn worker serves it) under valgrind's callgrind,
and counts the user-space instructions the server executes for exactly
`--requests` keep-alive requests over 1,000 banners. Instrumentation is
switched on only after a warm-up (Python's specializing interpreter and the
route's memo settle in it), and hash randomization and the request sequence
are fixed, so the same code gives the same count run after run. It prints
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
import signal
import socket
import subprocess
import sys
import tempfile
import time

from counter import embedded

APPS = {"empty_wsgi": "loadtest.empty_app:application", "click_route": "counter.wsgi:application"}
BANNERS = 1000
ROOT = pathlib.Path(__file__).resolve().parent.parent


def serve(app_path, port):
    """Run in the measured process: meinheld with the gunicorn worker's settings."""
    from meinheld import server

    module, name = app_path.split(":")
    app = getattr(__import__(module, fromlist=[name]), name)
    server.set_access_logger(None)
    server.set_keepalive(5)
    server.set_picoev_max_fd(16384)
    server.listen(("127.0.0.1", port))
    server.run(app)


def drive(port, requests, connections, seed):
    """Exactly `requests` GET /counter/{id} over `connections` keep-alive
    connections, one request in flight on each; every answer must be 2xx."""
    pick = random.Random(seed)
    selector = selectors.DefaultSelector()
    pending = {}
    sent = answered = 0

    def send(conn):
        nonlocal sent
        sent += 1
        conn.sendall(b"GET /counter/%d HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" % pick.randint(1, BANNERS))

    for _ in range(min(connections, requests)):
        conn = socket.create_connection(("127.0.0.1", port), timeout=600)
        pending[conn] = b""
        selector.register(conn, selectors.EVENT_READ)
        send(conn)
    try:
        while answered < requests:
            for key, _ in selector.select(timeout=600):
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
                    if sent < requests:
                        send(conn)
    finally:
        for conn in pending:
            conn.close()
        selector.close()


def wait_ready(port, proc, timeout=300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the measured server exited with {proc.returncode}")
        try:
            drive(port, 1, 1, seed=0)
            return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError("the measured server did not answer")


def count(app_path, requests, connections, workdir):
    """User-space instructions per request of `app_path`, under callgrind."""
    port = embedded.free_port()
    folder = tempfile.mkdtemp(dir=workdir)
    out = os.path.join(folder, "callgrind.out")
    shm = tempfile.mkdtemp(prefix="cc-instructions-", dir="/dev/shm")
    env = dict(os.environ, PYTHONHASHSEED="0", SHM_DIR=shm, LOG_LEVEL="warning",
               DATABASE_URL=os.environ.get("DATABASE_URL", "postgresql://unused@127.0.0.1:1/unused"))
    command = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}",
               sys.executable, "-m", "loadtest.instructions", "--serve", app_path, str(port)]
    proc = subprocess.Popen(command, env=env, cwd=str(ROOT),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_ready(port, proc)
        drive(port, max(requests // 10, 100), connections, seed=1)  # warm-up, not counted
        control = ["callgrind_control"]
        subprocess.run(control + ["-i", "on", str(proc.pid)], check=True, capture_output=True)
        drive(port, requests, connections, seed=2)
        subprocess.run(control + ["-d", str(proc.pid)], check=True, capture_output=True)
        with open(out + ".1") as f:  # the dump: only what ran while instrumented
            return round(int(re.search(r"^totals: (\d+)", f.read(), re.M)[1]) / requests)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(shm, ignore_errors=True)


def measure(requests=20_000, connections=16):
    for tool in ("valgrind", "callgrind_control"):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} is not installed (apt-get install valgrind)")
    workdir = tempfile.mkdtemp(prefix="cc-instructions-")
    try:
        per_request = {name: count(path, requests, connections, workdir) for name, path in APPS.items()}
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
