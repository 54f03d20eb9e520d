"""A bounded click load that remembers every acknowledged click.

Used by the end-to-end tests (and runnable alone): it sends `total` clicks
over `connections` keep-alive connections, spread over `banners` banner ids,
to a loopback address, and stops at `total` or `deadline`, whichever first.

For every 2xx answer it records the banner and, when the request was sent
and answered within one minute, that minute (the server stamps the click
somewhere in between). A request that got no answer (connection reset by a
killed worker) is "unanswered": the server may or may not have counted it.
A refused connection is "refused": nothing was sent, nothing can be counted.
"""

import argparse
import collections
import http.client
import json
import threading
import time
import urllib.parse


class Tally:
    def __init__(self):
        self.lock = threading.Lock()
        self.acked = collections.Counter()  # banner -> 2xx answers
        self.by_minute = collections.Counter()  # (banner, minute) -> 2xx answers certainly in it
        self.straddling = collections.Counter()  # banner -> 2xx answers across a minute edge
        self.statuses = collections.Counter()
        self.unanswered_by = collections.Counter()  # banner -> requests without an answer
        self.refused = 0
        self.no_retry_after = 0  # 503 answers without a Retry-After header

    @property
    def unanswered(self):
        return sum(self.unanswered_by.values())

    @property
    def total(self):
        return sum(self.acked.values())

    def merge(self, other):
        with self.lock:
            self.acked.update(other.acked)
            self.by_minute.update(other.by_minute)
            self.straddling.update(other.straddling)
            self.statuses.update(other.statuses)
            self.unanswered_by.update(other.unanswered_by)
            self.refused += other.refused
            self.no_retry_after += other.no_retry_after

    def summary(self):
        return {"acknowledged": self.total, "unanswered": self.unanswered, "refused": self.refused,
                "statuses": dict(self.statuses)}

    def dump(self, path):
        """Everything, as JSON (for a load run in another process)."""
        with open(path, "w") as f:
            json.dump({"acked": list(self.acked.items()),
                       "by_minute": [[b, m, n] for (b, m), n in self.by_minute.items()],
                       "straddling": list(self.straddling.items()),
                       "unanswered_by": list(self.unanswered_by.items()),
                       "statuses": list(self.statuses.items()),
                       "refused": self.refused, "no_retry_after": self.no_retry_after}, f)

    @classmethod
    def load(cls, path):
        with open(path) as f:
            data = json.load(f)
        tally = cls()
        tally.acked.update(dict((k, v) for k, v in data["acked"]))
        tally.by_minute.update({(b, m): n for b, m, n in data["by_minute"]})
        tally.straddling.update(dict((k, v) for k, v in data["straddling"]))
        tally.unanswered_by.update(dict((k, v) for k, v in data["unanswered_by"]))
        tally.statuses.update({int(k): v for k, v in data["statuses"]})
        tally.refused, tally.no_retry_after = data["refused"], data["no_retry_after"]
        return tally


def _host_port(base_url):
    parts = urllib.parse.urlsplit(base_url)
    if parts.hostname not in ("127.0.0.1", "localhost", "::1"):
        raise ValueError("load goes to loopback addresses only")
    return parts.hostname, parts.port or 80


def _worker(base_url, requests, deadline, tally):
    """Send (key, method, path, body) requests one after another on a
    keep-alive connection; tally the 2xx answers by key."""
    host, port = _host_port(base_url)
    mine = Tally()
    conn = None
    headers = {"Content-Type": "application/json"}
    for banner, method, path, body in requests:
        if time.monotonic() > deadline:
            break
        if conn is None:
            conn = http.client.HTTPConnection(host, port, timeout=10)
        sent = time.time()
        try:
            conn.request(method, path, body=body, headers=headers if body else {})
            response = conn.getresponse()
            response.read()
        except ConnectionRefusedError:
            mine.refused += 1  # nothing was sent
            conn.close()
            conn = None
            time.sleep(0.05)
            continue
        except (OSError, http.client.HTTPException):
            mine.unanswered_by[banner] += 1
            conn.close()
            conn = None
            time.sleep(0.01)
            continue
        answered = time.time()
        mine.statuses[response.status] += 1
        if response.status in (502, 504):  # a proxy lost the upstream's answer: maybe counted
            mine.unanswered_by[banner] += 1
        if response.status == 503 and not response.getheader("Retry-After"):
            mine.no_retry_after += 1
        if 200 <= response.status < 300:
            mine.acked[banner] += 1
            if int(sent // 60) == int(answered // 60):
                mine.by_minute[banner, int(sent // 60)] += 1
            else:
                mine.straddling[banner] += 1
        if response.will_close:
            conn.close()
            conn = None
    if conn is not None:
        conn.close()
    tally.merge(mine)


def drive(base_url, total, banners=200, connections=16, seconds=120.0,
          path="/counter/{}", first_banner=1, tally=None):
    """Send up to `total` clicks within `seconds`; return the Tally. Banner ids
    cycle, so every banner gets clicks on every connection."""
    def clicks(offset):  # made lazily: `total` may be far more than the time allows
        for i in range(offset, total, connections):
            banner = first_banner + i % banners
            yield banner, "GET", path.format(banner), None

    return send(base_url, [clicks(i) for i in range(connections)], seconds, tally)


def drive_impressions(base_url, campaign_id, users, repeats=1, connections=16, seconds=120.0,
                      tally=None):
    """Each of `users` user ids sees the campaign `repeats` times (the repeats
    spread over different connections); the tally is keyed by user id."""
    plan = []
    for _ in range(repeats):
        for user in users:
            body = json.dumps({"campaign_id": str(campaign_id), "user_id": user, "ad_id": "ad-1"})
            plan.append((user, "POST", "/api/v1/impressions", body))
    return send(base_url, [plan[i::connections] for i in range(connections)], seconds, tally)


def send(base_url, plans, seconds=120.0, tally=None):
    """Send each plan -- an iterable of (key, method, path, body) -- on a
    connection of its own, within `seconds`; return the Tally."""
    tally = tally or Tally()
    deadline = time.monotonic() + seconds
    threads = [threading.Thread(target=_worker, args=(base_url, plan, deadline, tally))
               for plan in plans]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return tally


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base_url", help="e.g. http://127.0.0.1:8000")
    parser.add_argument("--total", type=int, default=20000)
    parser.add_argument("--banners", type=int, default=200)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=120)
    parser.add_argument("--first-banner", type=int, default=1)
    parser.add_argument("--out", help="write the whole tally here as JSON")
    args = parser.parse_args()
    started = time.monotonic()
    tally = drive(args.base_url, args.total, args.banners, args.connections, args.seconds,
                  first_banner=args.first_banner)
    if args.out:
        tally.dump(args.out)
    summary = tally.summary()
    summary["seconds"] = round(time.monotonic() - started, 2)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
