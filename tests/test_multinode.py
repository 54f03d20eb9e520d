"""Several nodes (each its own gunicorn master, workers, flusher and shared-
memory directory) behind nginx round-robin, one PostgreSQL -- using the
shipped deploy/nginx/click-counter.conf."""

import os
import pathlib
import shutil
import signal
import subprocess
import threading
import time

import pytest
from conftest import ROOT, wait_until

from counter.storage.embedded import free_port
from counter.testing import audit, clicker
from counter.testing.harness import Service

pytestmark = pytest.mark.service

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"


@pytest.fixture
def nginx(tmp_path):
    """start(ports) -> URL of an nginx in front of those nodes (loopback only)."""
    started = []

    def start(node_ports):
        assert os.path.exists(NGINX), "nginx is needed (apt-get install nginx-light)"
        site = (ROOT / "deploy/nginx/click-counter.conf").read_text()
        listen = free_port()
        for default, port in zip((8001, 8002, 8003), node_ports):
            site = site.replace(f"127.0.0.1:{default} ", f"127.0.0.1:{port} ")
        site = site.replace("listen 127.0.0.1:8080;", f"listen 127.0.0.1:{listen};")
        (tmp_path / "site.conf").write_text(site)
        (tmp_path / "nginx.conf").write_text(
            f"pid {tmp_path}/nginx.pid;\nerror_log {tmp_path}/error.log;\nworker_processes 1;\n"
            "daemon off;\nevents { worker_connections 4096; }\n"
            f"http {{ access_log off; client_body_temp_path {tmp_path}; proxy_temp_path {tmp_path};\n"
            f"include {tmp_path}/site.conf; }}\n")
        proc = subprocess.Popen([NGINX, "-c", str(tmp_path / "nginx.conf")],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        started.append(proc)
        url = f"http://127.0.0.1:{listen}"
        assert wait_until(lambda: _answers(url), timeout=10), (tmp_path / "error.log").read_text()
        return url

    yield start
    for proc in started:
        proc.send_signal(signal.SIGQUIT)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


def _answers(url):
    import urllib.request

    try:
        with urllib.request.urlopen(url + "/v1/healthcheck", timeout=1) as r:
            return r.status == 200
    except OSError:
        return False


def _exact(url, tally):
    assert wait_until(lambda: sum(audit.stored_clicks(url)[0].values()) >= tally.total, timeout=30)
    time.sleep(1.0)
    verdict = audit.compare(tally, *audit.stored_clicks(url))
    assert verdict["lost"] == 0 and verdict["duplicated"] == 0 and verdict["minute_mismatches"] == 0, verdict
    return verdict


def test_clicks_through_nginx_to_three_nodes_are_exact(database_url, service_factory, nginx):
    nodes = [service_factory(database_url, workers=1) for _ in range(3)]
    url = nginx([n.port for n in nodes])
    tally = clicker.drive(url, 15_000, banners=300, connections=16, seconds=120)
    assert tally.total == 15_000, tally.summary()
    _exact(database_url, tally)
    # every node served a share (round robin)
    for node in nodes:
        assert "flusher started" in node.log()
    assert len({p for n in nodes for p in os.listdir(n.shm_dir)}) >= 3


def test_a_node_killed_during_load_drains_its_orphans_when_restarted(database_url, service_factory, nginx, tmp_path):
    nodes = [service_factory(database_url, workers=1, flush_interval=600) for _ in range(3)]
    url = nginx([n.port for n in nodes])
    tally = clicker.Tally()
    load = threading.Thread(target=clicker.drive, args=(url, 10**8),
                            kwargs=dict(banners=300, connections=16, seconds=5, tally=tally))
    load.start()
    time.sleep(2)
    victim = nodes[1]
    flusher = victim.flusher_pid()
    tree = victim.worker_pids() + [flusher]
    # the master, and its flusher with it, so that nothing of this node gets
    # flushed before it is started again
    os.kill(victim.master_pid, signal.SIGKILL)
    os.kill(flusher, signal.SIGKILL)
    load.join()
    assert tally.statuses[200] > 0 and all(n.proc.poll() is None for n in (nodes[0], nodes[2]))
    before_restart = sum(audit.stored_clicks(database_url)[0].values())
    assert wait_until(lambda: not any(os.path.exists(f"/proc/{p}") and _running(p) for p in tree), timeout=20)
    leftovers = [n for n in os.listdir(victim.shm_dir) if n.endswith(".seg")]
    assert leftovers, "the killed node left no segments to drain"
    # the other nodes flush every 10 minutes here; stop them gracefully: their final flush
    for node in (nodes[0], nodes[2]):
        assert node.terminate() == 0
    again = Service(database_url, victim.shm_dir, tmp_path, workers=1, port=victim.port).start()
    try:
        _exact(database_url, tally)
        assert wait_until(lambda: not [n for n in os.listdir(victim.shm_dir) if n in leftovers], timeout=20)
    finally:
        again.terminate()
        again.kill_all()
    assert before_restart <= sum(audit.stored_clicks(database_url)[0].values())


def _running(pid):
    try:
        return pathlib.Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False
