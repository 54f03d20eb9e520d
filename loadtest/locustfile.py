"""Locust scenarios for click-counter: click beacons over a realistic banner
distribution (a few hot banners, a long tail), stats queries, impressions.

    locust -f loadtest/locustfile.py --headless --only-summary -H http://127.0.0.1:8000 -u 200 -r 50 -t 60s

Distributed: start workers (`--worker --master-host 127.0.0.1`), then the
master (`--master --master-bind-host 127.0.0.1 --expect-workers N` plus the
options above); see the README. The run ends with one line, the verdict:
the process (the master, when distributed) exits 1 when the failure ratio or
the 95th percentile latency misses its threshold (LOCUST_MAX_FAIL_RATIO,
default 0.01; LOCUST_MAX_P95_MS, default 100) or no request was made, else 0.
Workers send their numbers to the master and exit 0. Point it only at hosts
you run yourself.
"""

import datetime
import json
import logging
import os
import random
import time
import urllib.request
import uuid

from locust import FastHttpUser, between, events, task
from locust.runners import MasterRunner, WorkerRunner

HOT_BANNERS = 20  # get most of the clicks
TAIL_BANNERS = 100_000  # share the rest
HOT_SHARE = 0.8
MAX_FAIL_RATIO = float(os.environ.get("LOCUST_MAX_FAIL_RATIO", "0.01"))
MAX_P95_MS = float(os.environ.get("LOCUST_MAX_P95_MS", "100"))

campaign_id = None
verdict = None  # the last line of the run (see check_thresholds)


def banner():
    if random.random() < HOT_SHARE:
        return random.randint(1, HOT_BANNERS)
    return random.randint(HOT_BANNERS + 1, HOT_BANNERS + TAIL_BANNERS)


@events.test_start.add_listener
def make_campaign(environment, **kwargs):
    """One campaign per load process, starting a moment from now, for the impressions."""
    global campaign_id
    if not environment.host or isinstance(environment.runner, MasterRunner):
        return  # a master makes no requests
    start = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=1)
    body = json.dumps({"name": f"locust {uuid.uuid4().hex[:6]}", "start_time": start.isoformat()}).encode()
    request = urllib.request.Request(environment.host.rstrip("/") + "/api/v1/campaigns", data=body,
                                     headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=5) as answer:
            campaign_id = json.load(answer)["id"]
        time.sleep(1.1)
    except OSError as exc:
        logging.warning("no campaign for impressions (%s); impressions are skipped", exc)


class Visitor(FastHttpUser):
    wait_time = between(0, 0.01)

    @task(40)
    def click(self):
        self.client.get(f"/counter/{banner()}", name="/counter/[id]")

    @task(5)
    def impression(self):
        if campaign_id is None:
            return
        self.client.post("/api/v1/impressions", name="/api/v1/impressions",
                         json={"campaign_id": campaign_id, "user_id": f"u{random.randint(1, 50_000)}",
                               "ad_id": "a1"})

    @task(1)
    def stats(self):
        self.client.get(f"/stats/{random.randint(1, HOT_BANNERS)}?from=-1h", name="/stats/[id]")


@events.quitting.add_listener
def check_thresholds(environment, **kwargs):
    """The verdict and the exit code, where the numbers are: in a standalone
    run or on the master. A worker's own stats are empty by now (it sent them
    to the master as it went), so it judges nothing."""
    global verdict
    if isinstance(environment.runner, WorkerRunner):
        return
    total = environment.stats.total
    p95 = total.get_response_time_percentile(0.95) or 0
    numbers = (f"{total.num_requests:,} requests ({total.total_rps:,.0f}/s), "
               f"failure ratio {total.fail_ratio:.4f} (limit {MAX_FAIL_RATIO}), "
               f"p95 {p95:.0f} ms (limit {MAX_P95_MS:.0f})")
    if total.num_requests == 0:
        problem = "no requests were made"
    elif total.fail_ratio > MAX_FAIL_RATIO:
        problem = "the failure ratio is above its limit"
    elif p95 > MAX_P95_MS:
        problem = "the 95th percentile is above its limit"
    else:
        problem = None
    environment.process_exit_code = 1 if problem else 0
    verdict = f"FAILED: {problem}: {numbers}" if problem else f"thresholds met: {numbers}"


@events.quit.add_listener
def say_verdict(**kwargs):
    """After locust's final tables, so it is the last line printed."""
    if verdict is not None:
        (logging.error if verdict.startswith("FAILED") else logging.info)(verdict)
