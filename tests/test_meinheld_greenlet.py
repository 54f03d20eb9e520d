"""meinheld's cooperative waits work against greenlet 3.

meinheld runs every request in a greenlet of its own, whose parent is the
event loop's. `meinheld.server.trampoline(fd, read=..., write=..., timeout=...)`
registers fd with the loop and switches to that parent; the loop switches back
when fd is ready (or raises `meinheld.server.timeout` in the request). A
response larger than the socket buffer waits the same way. Built with the
greenlet 0.4 header meinheld bundles, the parent was read from the wrong
offset of a greenlet 3 object: trampoline raised TypeError (500) and a large
response got an error page appended. deploy/install.sh builds meinheld against
greenlet 3's own header (deploy/meinheld/meinheld-1.0.2.patch).
"""

import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest
from conftest import wait_until

from counter.storage import embedded
from counter.testing.harness import alive, children

pytest.importorskip("meinheld.server", reason="meinheld does not import here (Python 3.13+)")

pytestmark = pytest.mark.service

BIG = 16 << 20  # far more than a loopback socket buffers

APP = textwrap.dedent('''
    import os, socket, time
    from meinheld import server

    def app(environ, start_response):
        path = environ["PATH_INFO"]
        if path == "/wait":  # until the test's socket sends a byte
            sock = socket.create_connection(("127.0.0.1", int(environ["QUERY_STRING"])))
            started = time.monotonic()
            server.trampoline(sock.fileno(), read=True, write=False, timeout=10)
            body = b"%s %.2f" % (sock.recv(16), time.monotonic() - started)
            sock.close()
        elif path == "/timeout":  # a pipe nobody writes to
            r, w = os.pipe()
            try:
                server.trampoline(r, read=True, write=False, timeout=1)
                body = b"woke"
            except server.timeout:
                body = b"timeout"
            finally:
                os.close(r)
                os.close(w)
        elif path == "/big":
            body = b"x" * BIG_SIZE
        else:
            body = b"fast"
        start_response("200 OK", [("Content-Length", str(len(body)))])
        return [body]
''').replace("BIG_SIZE", str(BIG))


@pytest.fixture
def meinheld_app(tmp_path):
    """One gunicorn worker of the service's class (counter.serving.meinheld_worker.MeinheldWorker)
    serving APP on a free loopback port; stopped by pid."""
    (tmp_path / "trampoline_app.py").write_text(APP)
    port = embedded.free_port()
    log = open(tmp_path / "gunicorn.log", "wb")
    master = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "-k", "counter.serving.meinheld_worker.MeinheldWorker", "-w", "1",
         "-b", f"127.0.0.1:{port}", "--no-control-socket", "trampoline_app:app"],
        cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)  # not the project's gunicorn.conf.py
    log.close()
    try:
        assert wait_until(lambda: get(port, "/fast", timeout=1)[0] == 200, timeout=20), \
            (tmp_path / "gunicorn.log").read_text()
        (worker,) = children(master.pid)
        yield port, worker
        assert children(master.pid) == [worker], "the worker died"
    finally:
        workers = children(master.pid)
        master.send_signal(signal.SIGTERM)
        try:
            master.wait(timeout=20)
        except subprocess.TimeoutExpired:
            master.kill()
            master.wait()
        for pid in workers:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def get(port, path, timeout=15, read_after=0.0):
    """(status, body) of one GET on a fresh connection; (None, error) if it failed."""
    try:
        sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    except OSError as e:
        return None, repr(e).encode()
    received = b""
    try:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        time.sleep(read_after)
        while True:
            chunk = sock.recv(1 << 20)
            if not chunk:
                break
            received += chunk
    except OSError as e:
        return None, repr(e).encode()
    finally:
        sock.close()
    head, _, body = received.partition(b"\r\n\r\n")
    return (int(head.split()[1]) if head else None), body


def test_a_request_waiting_in_trampoline_does_not_hold_up_its_worker(meinheld_app):
    port, _ = meinheld_app
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10)
    waited = {}
    waiter = threading.Thread(
        target=lambda: waited.update(answer=get(port, f"/wait?{listener.getsockname()[1]}")))
    waiter.start()
    try:
        peer, _ = listener.accept()  # the request is in the app, about to trampoline
        took = []
        for _ in range(5):
            started = time.monotonic()
            assert get(port, "/fast") == (200, b"fast")
            took.append(time.monotonic() - started)
        assert max(took) < 0.1, took  # answered by the same single worker meanwhile
        time.sleep(2 - sum(took))
        peer.sendall(b"ready")
        waiter.join(timeout=10)
        peer.close()
    finally:
        listener.close()
    status, body = waited["answer"]
    assert status == 200, body[-200:]
    word, seconds = body.split()
    assert word == b"ready" and 1.9 <= float(seconds) < 3, body


def test_a_trampoline_timeout_raises_in_the_request_and_the_worker_serves_on(meinheld_app):
    port, _ = meinheld_app
    started = time.monotonic()
    assert get(port, "/timeout") == (200, b"timeout")
    assert 0.9 <= time.monotonic() - started < 3
    assert get(port, "/fast") == (200, b"fast")


def test_a_response_larger_than_the_socket_buffer_arrives_whole(meinheld_app):
    port, _ = meinheld_app
    status, body = get(port, "/big", read_after=0.3)  # the server's write has to wait
    assert status == 200 and len(body) == BIG and body.count(b"x") == BIG, (status, len(body), body[-80:])
    assert get(port, "/fast") == (200, b"fast")
