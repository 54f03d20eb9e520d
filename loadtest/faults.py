"""The fault-injection suite: no click lost, none counted twice, under every fault.

    python -m loadtest.faults --mode full     # >= 1,000,000 clicks, PostgreSQL down 60 s
    python -m loadtest.faults --mode ci       # every scenario, shorter
    python -m loadtest.faults --only pg_down  # one scenario
    python -m loadtest.faults --server granian  # on the second serving stack

Each scenario starts the real service (gunicorn master, meinheld workers,
flusher) against a real PostgreSQL of its own (embedded, so it can be stopped
and started), drives a steady click load from a separate process that counts
every 2xx answer per banner (loopback only, bounded in count and time),
injects its faults, waits for the final drain, and compares the database with
what was acknowledged, per banner and per minute. It prints acknowledged,
stored, lost and duplicated; the exit status is 1 if any scenario lost or
duplicated a click or missed its own check.
"""

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

from counter.storage import connection, embedded, schema
from counter.testing import audit, clicker, hostile
from counter.testing.harness import Service, alive, remove_tree

MODES = {
    # seconds of load per scenario, seconds PostgreSQL stays down, seconds the
    # flusher stays frozen, seconds the clicks table stays locked
    "ci": {"seconds": 4, "pg_down": 4, "frozen": 7, "locked": 4},
    "full": {"seconds": 60, "pg_down": 60, "frozen": 20, "locked": 15},
}
SLOW_CLICK = 1.0  # seconds: a click this slow waited on the database (tests/test_db_waits.py: 0.1)


class Load:
    """A click load in another process, over its own range of banner ids."""

    def __init__(self, url, workdir, first_banner, seconds, banners=500, connections=16):
        self.out = os.path.join(workdir, f"tally-{first_banner}.json")
        self.banners = set(range(first_banner, first_banner + banners))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "counter.testing.clicker", url, "--total", "100000000",
             "--seconds", str(seconds), "--banners", str(banners), "--connections", str(connections),
             "--first-banner", str(first_banner), "--out", self.out],
            stdout=subprocess.DEVNULL)

    def finish(self, timeout=600):
        self.proc.wait(timeout=timeout)
        return clicker.Tally.load(self.out)


class Suite:
    def __init__(self, mode, workdir, server="gunicorn"):
        self.mode = MODES[mode]
        self.server = server
        self.workdir = workdir
        self.pg = embedded.EmbeddedPostgres(os.path.join(workdir, "pg"))
        self.url = self.pg.start()
        conn = connection.connect(self.url)
        schema.migrate(conn)
        conn.close()
        self.services = []
        self.shm_dirs = []  # made here; removed when the suite ends
        self.next_banner = 1

    # -- helpers ------------------------------------------------------------------

    def service(self, shm_dir=None, **env):
        if shm_dir is None:
            shm_dir = tempfile.mkdtemp(prefix="cc-faults-", dir="/dev/shm")
            self.shm_dirs.append(shm_dir)
        base = {"FLUSH_INTERVAL": "0.2", "GRACEFUL_TIMEOUT": "90", "LOG_LEVEL": "warning"}
        base.update(env)
        service = Service(self.url, shm_dir, self.workdir, workers=2, extra_env=base,
                          server=self.server).start()
        self.services.append(service)
        return service

    def load(self, service, seconds=None, **kwargs):
        first = self.next_banner
        self.next_banner += 1_000_000
        return Load(service.url, self.workdir, first, seconds or self.mode["seconds"], **kwargs)

    def verdict(self, load, tally, timeout=120):
        """Wait until the database holds every acknowledged click of this load
        (and a little longer), then compare."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            by_banner, _ = audit.stored_clicks(self.url, load.banners)
            if sum(by_banner.values()) >= tally.total:
                break
            time.sleep(0.2)
        time.sleep(1.5)  # a late double count would show now
        by_banner, by_minute = audit.stored_clicks(self.url, load.banners)
        return audit.compare(tally, by_banner, by_minute)

    def stop_all(self):
        """After a scenario's verdict: nothing more is asked of its trees, so
        they are killed (by pid), not stopped (a graceful stop costs seconds)."""
        for service in self.services:
            service.kill_all()
        self.services.clear()

    @staticmethod
    def wait_gone(pids, timeout=20):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(alive(p) for p in pids):
            time.sleep(0.1)
        return not any(alive(p) for p in pids)

    # -- scenarios ------------------------------------------------------------------

    def _kill_repeatedly(self, victims, times=5):
        """`times` times during the load, SIGKILL one of victims() (if any)."""
        kills = 0
        for _ in range(times):
            time.sleep(self.mode["seconds"] / (times + 1))
            pids = victims()
            if pids:
                os.kill(random.choice(pids), signal.SIGKILL)
                kills += 1
        return kills

    def worker_kills(self):
        service = self.service()
        load = self.load(service)
        kills = self._kill_repeatedly(service.worker_pids)
        tally = load.finish()
        checks = {"master survived": service.proc.poll() is None, "workers killed": kills}
        return tally, self.verdict(load, tally), checks

    def flusher_kills(self):
        # the flusher also kills itself at random just before and just after COMMIT
        service = self.service(COUNTER_TEST_FAULT="before_commit:0.1,after_commit:0.1",
                               FLUSH_INTERVAL="0.1")
        load = self.load(service)
        kills = self._kill_repeatedly(lambda: [p for p in [service.flusher_pid()] if p])
        tally = load.finish()
        self_kills = service.log().count("died; restarting it")
        checks = {"external kills": kills, "restarts seen": self_kills}
        return tally, self.verdict(load, tally), checks

    def _kill_and_restart(self, kill_everything):
        service = self.service()
        load = self.load(service)
        time.sleep(self.mode["seconds"] / 3)
        tree = service.worker_pids() + [service.flusher_pid()]
        if kill_everything:
            for pid in [service.master_pid] + tree:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:  # granian's children follow its supervisor at once
                    pass
        else:
            os.kill(service.master_pid, signal.SIGKILL)
        service.proc.wait()
        gone = self.wait_gone(tree)
        # the same address (the load goes on) and the same shared-memory directory
        again = Service(self.url, service.shm_dir, self.workdir, workers=2, port=service.port,
                        extra_env={"FLUSH_INTERVAL": "0.2", "LOG_LEVEL": "warning"},
                        server=self.server)
        again.start()
        self.services.append(again)
        tally = load.finish()
        return tally, self.verdict(load, tally), {"old tree gone": gone}

    def master_kill(self):
        return self._kill_and_restart(kill_everything=False)

    def kill_everything(self):
        return self._kill_and_restart(kill_everything=True)

    def pg_down(self):
        service = self.service()
        seconds = self.mode["pg_down"] + self.mode["seconds"]
        load = self.load(service, seconds=seconds)
        time.sleep(self.mode["seconds"] / 3)
        self.pg.stop(mode="fast")
        time.sleep(self.mode["pg_down"])
        health = json.loads(service.get("/health")[1])
        self.pg.start()
        tally = load.finish()
        errors = sum(n for status, n in tally.statuses.items() if status >= 500)
        checks = {"5xx while down": errors, "health while down": health["status"],
                  "database seen down": health["database"]["reachable"] is False}
        return tally, self.verdict(load, tally), checks

    def pg_restarts(self):
        service = self.service(FLUSH_INTERVAL="0.1")
        load = self.load(service)
        restarts = 0
        for _ in range(3):
            time.sleep(self.mode["seconds"] / 4)
            self.pg.stop(mode="fast")
            self.pg.start()
            restarts += 1
        tally = load.finish()
        errors = sum(n for status, n in tally.statuses.items() if status >= 500)
        return tally, self.verdict(load, tally), {"restarts": restarts, "5xx": errors}

    def memory_flood(self):
        # room for few small segments: a flood of new banner ids fills it at once
        service = self.service(SEGMENT_SLOTS="16", IMPRESSION_SLOTS="16",
                               SHM_MAX_BYTES=str(64 << 10), FLUSH_INTERVAL="2")
        flood = self.load(service, banners=400_000)
        flood_tally = flood.finish()
        flood_verdict = self.verdict(flood, flood_tally)
        time.sleep(5)  # two flush intervals: the flusher retires the flood's segments
        after = self.load(service, seconds=2, banners=8)  # normal traffic: fewer banners than slots
        after_tally = after.finish()
        after_verdict = self.verdict(after, after_tally)
        for key in ("acknowledged", "stored", "lost", "duplicated", "unanswered", "minute_mismatches"):
            flood_verdict[key] += after_verdict[key]
        checks = {"503 in flood": flood_tally.statuses.get(503, 0),
                  "503 without Retry-After": flood_tally.no_retry_after,
                  "recovered (2xx after)": after_tally.total,
                  "5xx after": sum(n for s, n in after_tally.statuses.items() if s >= 500)}
        flood_tally.merge(after_tally)
        return flood_tally, flood_verdict, checks

    def shm_removed(self):
        """rm -rf SHM_DIR under load (a tmp cleaner, RemoveIPC), then SIGKILL
        the flusher before it has drained what it had mapped."""
        service = self.service()
        load = self.load(service)
        time.sleep(self.mode["seconds"] / 3)
        flusher = service.flusher_pid()
        remove_tree(service.shm_dir)
        os.kill(flusher, signal.SIGKILL)
        tally = load.finish()
        health = json.loads(service.get("/health")[1])
        checks = {"recreated_at in /health": health["shm"]["recreated_at"] is not None}
        return tally, self.verdict(load, tally), checks

    def flusher_frozen(self):
        """SIGSTOP the flusher under load: /health must say degraded, and
        everything is stored once it runs again."""
        service = self.service()
        seconds = self.mode["frozen"] + self.mode["seconds"]
        load = self.load(service, seconds=seconds)
        time.sleep(self.mode["seconds"] / 3)
        flusher = service.flusher_pid()
        os.kill(flusher, signal.SIGSTOP)
        try:
            time.sleep(self.mode["frozen"])
            health = json.loads(service.get("/health")[1])
        finally:
            os.kill(flusher, signal.SIGCONT)
        tally = load.finish()
        checks = {"health while frozen": health["status"], "pending while frozen": health["pending"]}
        return tally, self.verdict(load, tally), checks

    def statement_timeout(self):
        """A 20 ms statement timeout on the server and a backlog of 30,000
        banners (the flusher frozen meanwhile): parts shrink, all drains."""
        service = self.service(FLUSH_INTERVAL="0.2")
        load = self.load(service, banners=30_000, connections=32)
        time.sleep(self.mode["seconds"] / 4)
        flusher = service.flusher_pid()
        self._set_statement_timeout("20ms")
        try:
            os.kill(flusher, signal.SIGSTOP)  # a backlog builds up
            time.sleep(self.mode["seconds"] / 3)
            os.kill(flusher, signal.SIGCONT)
            tally = load.finish()
            verdict = self.verdict(load, tally)
        finally:
            self._set_statement_timeout(None)
        shrunk = service.log().count("retrying at once with part_rows")
        return tally, verdict, {"parts shrunk": shrunk}

    def _set_statement_timeout(self, value):
        """For every session without its own setting (the flusher's), at once."""
        conn = connection.connect(self.url)
        conn.autocommit = True
        try:
            with conn.cursor() as cur:
                cur.execute("SET statement_timeout = 0")  # this session may have the tiny one
                if value is None:
                    cur.execute("ALTER SYSTEM RESET statement_timeout")
                else:
                    cur.execute("ALTER SYSTEM SET statement_timeout = %s", (value,))
                cur.execute("SELECT pg_reload_conf()")
        finally:
            conn.close()

    def table_locked(self):
        """`clicks` locked (ACCESS EXCLUSIVE) while the load runs and stats
        requests pile up on every worker: clicks are still answered at once
        and counted; stats beyond what may wait get a 503 with Retry-After."""
        service = self.service()
        load = self.load(service, seconds=self.mode["locked"] + self.mode["seconds"] / 2)
        locker = connection.connect(self.url)
        stop = threading.Event()
        stats, probe = [], []
        path = "/stats/1?from=-1h"

        def ask_stats():
            while not stop.is_set():
                stats.append(service.get_with_headers(path))

        def probe_clicks():  # one click every 20 ms, its latency measured
            while not stop.is_set():
                started = time.monotonic()
                status = service.get("/counter/999999999")[0]
                probe.append((status, time.monotonic() - started))
                stop.wait(0.02)

        try:
            with locker.cursor() as cur:
                cur.execute("LOCK TABLE clicks IN ACCESS EXCLUSIVE MODE")
            # DB_WAITERS_PER_WORKER (4) may wait per worker; more than that ask
            threads = [threading.Thread(target=ask_stats) for _ in range(2 * 6)]
            threads.append(threading.Thread(target=probe_clicks))
            for thread in threads:
                thread.start()
            time.sleep(self.mode["locked"])
        finally:
            stop.set()
            locker.rollback()
            locker.close()
        for thread in threads:
            thread.join(timeout=30)
        tally = load.finish()
        refused = [a for a in stats if a[0] == 503]
        probe_ok = [s for s, _ in probe if s == 200]
        checks = {"slowest probe click (s)": round(max(t for _, t in probe), 3),
                  "probe clicks 2xx": f"{len(probe_ok)}/{len(probe)}",
                  "stats refused with 503": len(refused),
                  "503 without Retry-After": sum(1 for a in refused if not a[1].get("Retry-After")),
                  "5xx to clicks": sum(n for status, n in tally.statuses.items() if status >= 500)}
        verdict = self.verdict(load, tally)
        verdict["lost"] += max(0, len(probe_ok) - audit.stored_clicks(self.url, {999999999})[0].get(999999999, 0))
        return tally, verdict, checks

    def upgrade_storm(self):
        """Hostile clients beside the load: bad Upgrade/CONNECT requests,
        garbage, huge ids, odd methods. Nobody else may get a 5xx, and no
        worker may die."""
        service = self.service()
        workers = sorted(service.worker_pids())
        load = self.load(service)
        sent = {"requests": 0, "5xx": 0}
        lock = threading.Lock()
        deadline = time.monotonic() + self.mode["seconds"]

        def attacker(seed):
            for raw, wait, _ in hostile.hostile_requests(random.Random(seed)):
                if time.monotonic() > deadline:
                    return
                codes = hostile.attack(service.port, raw, wait)
                with lock:
                    sent["requests"] += 1
                    sent["5xx"] += sum(c >= 500 for c in codes)

        threads = [threading.Thread(target=attacker, args=(seed,)) for seed in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        tally = load.finish()
        checks = {"hostile requests": sent["requests"], "5xx to hostile": sent["5xx"],
                  "5xx to clicks": sum(n for status, n in tally.statuses.items() if status >= 500),
                  "same workers": sorted(service.worker_pids()) == workers}
        return tally, self.verdict(load, tally), checks

    def sigterm(self):
        service = self.service()
        load = self.load(service)
        time.sleep(self.mode["seconds"] / 2)
        code = service.terminate(timeout=120)
        tally = load.finish()
        leftover = [n for n in os.listdir(service.shm_dir) if n.endswith((".seg", ".imp"))]
        return tally, self.verdict(load, tally), {"exit code": code, "segments left": len(leftover)}


SCENARIOS = ["worker_kills", "flusher_kills", "master_kill", "kill_everything", "pg_down",
             "pg_restarts", "memory_flood", "shm_removed", "flusher_frozen", "statement_timeout",
             "table_locked", "upgrade_storm", "sigterm"]


def passed(name, verdict, checks):
    ok = verdict["lost"] == 0 and verdict["duplicated"] == 0 and verdict["minute_mismatches"] == 0
    ok = ok and verdict["acknowledged"] > 0
    if name == "worker_kills":
        ok = ok and checks["master survived"] and checks["workers killed"] > 0
    if name in ("master_kill", "kill_everything"):
        ok = ok and checks["old tree gone"]
    if name == "pg_down":
        ok = ok and checks["5xx while down"] == 0 and checks["health while down"] == "degraded"
    if name == "pg_restarts":
        ok = ok and checks["5xx"] == 0
    if name == "memory_flood":
        ok = ok and checks["503 in flood"] > 0 and checks["503 without Retry-After"] == 0
        ok = ok and checks["recovered (2xx after)"] > 0 and checks["5xx after"] == 0
    if name == "shm_removed":
        ok = ok and checks["recreated_at in /health"]
    if name == "flusher_frozen":
        ok = ok and checks["health while frozen"] == "degraded" and checks["pending while frozen"] > 0
    if name == "statement_timeout":
        ok = ok and checks["parts shrunk"] > 0
    if name == "table_locked":
        ok = ok and checks["slowest probe click (s)"] < SLOW_CLICK and checks["5xx to clicks"] == 0
        ok = ok and checks["stats refused with 503"] > 0 and checks["503 without Retry-After"] == 0
        done, sent = map(int, checks["probe clicks 2xx"].split("/"))
        ok = ok and done == sent > 0
    if name == "upgrade_storm":
        ok = ok and checks["hostile requests"] > 100 and checks["5xx to hostile"] == 0
        ok = ok and checks["5xx to clicks"] == 0 and checks["same workers"]
    if name == "sigterm":
        ok = ok and checks["exit code"] == 0 and checks["segments left"] == 0
    return ok


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=sorted(MODES), default="ci")
    parser.add_argument("--only", choices=SCENARIOS, action="append")
    parser.add_argument("--server", choices=["gunicorn", "granian"], default="gunicorn")
    args = parser.parse_args()
    failures = 0
    totals = {"acknowledged": 0, "stored": 0, "lost": 0, "duplicated": 0}
    with tempfile.TemporaryDirectory(prefix="cc-faults-") as workdir:
        suite = Suite(args.mode, workdir, args.server)
        print(f"serving stack: {args.server}, mode: {args.mode}")
        try:
            print(f"{'scenario':<16} {'acknowledged':>12} {'stored':>9} {'lost':>5} {'dup':>4} "
                  f"{'unanswered':>10} {'refused':>8} {'secs':>5}  checks", flush=True)
            for name in args.only or SCENARIOS:
                started = time.monotonic()
                try:
                    tally, verdict, checks = getattr(suite, name)()
                finally:
                    suite.stop_all()
                ok = passed(name, verdict, checks)
                failures += not ok
                for key in totals:
                    totals[key] += verdict[key]
                print(f"{name:<16} {verdict['acknowledged']:>12} {verdict['stored']:>9} "
                      f"{verdict['lost']:>5} {verdict['duplicated']:>4} {verdict['unanswered']:>10} "
                      f"{tally.refused:>8} {time.monotonic() - started:>5.0f}  "
                      f"{'ok' if ok else 'FAILED'} {json.dumps(checks)}", flush=True)
        finally:
            suite.stop_all()
            suite.pg.stop(mode="immediate")
            for shm_dir in suite.shm_dirs:
                shutil.rmtree(shm_dir, ignore_errors=True)
    print(f"{'all':<16} {totals['acknowledged']:>12} {totals['stored']:>9} {totals['lost']:>5} "
          f"{totals['duplicated']:>4}")
    print(f"{len(args.only or SCENARIOS) - failures} passed, {failures} failed")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
