"""One client's bad request never hurts another client, on either stack.

meinheld 1.0.2 answered an unknown `Upgrade:` (h2c, foo) or a CONNECT with its
own 400 but left an exception set in the interpreter: the next request on that
worker, anybody's, got a 500 or killed the worker with SIGSEGV. The service
runs meinheld built with deploy/meinheld/meinheld-1.0.2.patch; these tests
prove that build is the one installed, and that a worker keeps serving others
exactly through a storm of attacks."""

import importlib.metadata
import random
import threading
import time

import pytest
from conftest import clicks_by_banner, wait_until
from test_http_hardening import exchange

from counter.testing import clicker
from counter.testing.hostile import ATTACKER, ATTACKS, attack, hostile_requests, status_codes

pytestmark = pytest.mark.service

def click(port, banner):
    """One valid click on a fresh connection; its status (None: no answer)."""
    codes = status_codes(exchange(
        port, f"GET /counter/{banner} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()))
    return codes[0] if codes else None


@pytest.fixture
def one_worker(database_url, service_factory, stack):
    service = service_factory(database_url, workers=1, server=stack)
    assert click(service.port, 1) == 200  # the worker's first request is behind us
    return service


def test_the_installed_meinheld_is_the_patched_build():
    try:
        from meinheld import server
    except ImportError:  # Python 3.13+: no meinheld, gunicorn serves with another worker
        pytest.skip("meinheld does not import here")
    assert server.CLICK_COUNTER_PATCH == 2, "deploy/install.sh builds meinheld with our patch"
    assert importlib.metadata.version("meinheld") == "1.0.2+clickcounter.2"


def test_a_bad_upgrade_or_connect_never_hurts_the_next_request_on_its_worker(one_worker, database_url):
    service = one_worker
    workers = service.worker_pids()
    attacker_ok, after = 0, []
    for round_ in range(100):
        codes = attack(service.port, ATTACKS[round_ % len(ATTACKS)])
        assert not [c for c in codes if c >= 500], (round_, codes)
        attacker_ok += sum(200 <= c < 300 for c in codes)
        after.append(click(service.port, 2))
    assert after == [200] * 100, [(i, c) for i, c in enumerate(after) if c != 200]
    assert service.worker_pids() == workers, "a worker died"
    expected = {1: 1, 2: 100}
    if attacker_ok:
        expected[ATTACKER] = attacker_ok
    assert wait_until(lambda: clicks_by_banner(database_url) == expected, timeout=15), \
        clicks_by_banner(database_url)


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        return int(f.read().split("VmRSS:")[1].split()[0])


def test_requests_cut_off_by_the_path_limit_do_not_grow_a_workers_memory(one_worker):
    """meinheld 1.0.2 leaked the path buffer (8 KiB) of every request whose
    headers never completed, e.g. a banner id longer than its 8 KiB path limit."""
    (worker,) = one_worker.worker_pids()
    huge = b"GET /counter/" + b"9" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n"
    for _ in range(500):  # the worker's buffers and free lists reach their size
        attack(one_worker.port, huge)
    before = rss_kib(worker)
    for _ in range(5000):  # 40 MiB if each leaked 8 KiB
        assert attack(one_worker.port, huge) in ([400], [431])
    grown = rss_kib(worker) - before
    assert grown < 8 * 1024, f"the worker grew by {grown} KiB"
    assert click(one_worker.port, 2) == 200 and one_worker.worker_pids() == [worker]


STORM_CLICKS = 20_000
STORM_BANNERS = range(1000, 1050)
HOSTILE_MIN, HOSTILE_MAX = 1000, 4000


def test_a_click_storm_mixed_with_hostile_requests_is_counted_exactly_by_the_same_workers(
        database_url, service_factory, stack):
    service = service_factory(database_url, workers=2, server=stack)
    workers = sorted(service.worker_pids())
    storm_done = threading.Event()
    lock = threading.Lock()
    hostile = {"sent": 0, "server_errors": [], "attacker_ok": 0, "attacker_unanswered": 0}

    def attacker(seed):
        deadline = time.monotonic() + 150
        for raw, wait, counts in hostile_requests(random.Random(seed)):
            with lock:
                if (hostile["sent"] >= HOSTILE_MAX or time.monotonic() > deadline
                        or (storm_done.is_set() and hostile["sent"] >= HOSTILE_MIN)):
                    return
                hostile["sent"] += 1
            codes = attack(service.port, raw, wait)
            with lock:
                hostile["server_errors"] += [(c, raw[:60]) for c in codes if c >= 500]
                if counts:
                    hostile["attacker_ok"] += sum(200 <= c < 300 for c in codes)
                    hostile["attacker_unanswered"] += not codes

    threads = [threading.Thread(target=attacker, args=(seed,)) for seed in range(4)]
    for thread in threads:
        thread.start()
    try:
        tally = clicker.drive(service.url, STORM_CLICKS, banners=len(STORM_BANNERS),
                              connections=8, seconds=120, first_banner=STORM_BANNERS[0])
    finally:
        storm_done.set()
        during_storm = hostile["sent"]
        for thread in threads:
            thread.join(timeout=160)

    print(f"{stack}: {tally.summary()}, hostile: {hostile}, during storm {during_storm}")
    assert hostile["sent"] >= HOSTILE_MIN and during_storm >= HOSTILE_MIN // 2, (hostile, during_storm)
    assert hostile["server_errors"] == [], hostile["server_errors"][:10]
    assert {s: n for s, n in tally.statuses.items() if s >= 500} == {}, tally.summary()
    assert tally.total == STORM_CLICKS and tally.unanswered == 0, tally.summary()
    assert sorted(service.worker_pids()) == workers, "a worker died"

    expected = dict(tally.acked)

    def flushed():
        counts = clicks_by_banner(database_url)
        storm = {b: n for b, n in counts.items() if b != ATTACKER}
        return storm == expected and counts.get(ATTACKER, 0) >= hostile["attacker_ok"]

    assert wait_until(flushed, timeout=30), (tally.summary(), hostile)
    counts = clicks_by_banner(database_url)
    # a GET of ATTACKER that got no answer may or may not have counted
    assert hostile["attacker_ok"] <= counts.get(ATTACKER, 0) \
        <= hostile["attacker_ok"] + hostile["attacker_unanswered"], (counts.get(ATTACKER), hostile)
