"""Locust scenarios for click-counter: click beacons over a realistic banner
distribution (a few hot banners, a long tail), stats queries, impressions.

    locust -f loadtest/locustfile.py --headless -H http://127.0.0.1:8000 -u 200 -r 50 -t 60s

The run exits non-zero when the failure ratio or the 95th percentile latency
misses its threshold (LOCUST_MAX_FAIL_RATIO, default 0.01; LOCUST_MAX_P95_MS,
default 100). Point it only at hosts you run yourself.
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

HOT_BANNERS = 20  # get most of the clicks
TAIL_BANNERS = 100_000  # share the rest
HOT_SHARE = 0.8
MAX_FAIL_RATIO = float(os.environ.get("LOCUST_MAX_FAIL_RATIO", "0.01"))
MAX_P95_MS = float(os.environ.get("LOCUST_MAX_P95_MS", "100"))

campaign_id = None


def banner():
    if random.random() < HOT_SHARE:
        return random.randint(1, HOT_BANNERS)
    return random.randint(HOT_BANNERS + 1, HOT_BANNERS + TAIL_BANNERS)


@events.test_start.add_listener
def make_campaign(environment, **kwargs):
    """One campaign per load process, starting a moment from now, for the impressions."""
    global campaign_id
    if not environment.host:
        return
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
        now = datetime.datetime.now(datetime.timezone.utc)
        start = (now - datetime.timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
        self.client.get(f"/stats/{random.randint(1, HOT_BANNERS)}?from={start}"
                        f"&to={now.strftime('%Y-%m-%dT%H:%M:%SZ')}", name="/stats/[id]")


@events.quitting.add_listener
def check_thresholds(environment, **kwargs):
    total = environment.stats.total
    p95 = total.get_response_time_percentile(0.95)
    if total.num_requests == 0:
        logging.error("no requests were made")
        environment.process_exit_code = 1
    elif total.fail_ratio > MAX_FAIL_RATIO:
        logging.error("failure ratio %.4f is above %.4f", total.fail_ratio, MAX_FAIL_RATIO)
        environment.process_exit_code = 1
    elif p95 > MAX_P95_MS:
        logging.error("95th percentile %.0f ms is above %.0f ms", p95, MAX_P95_MS)
        environment.process_exit_code = 1
    else:
        logging.info("thresholds met: failure ratio %.4f, p95 %.0f ms", total.fail_ratio, p95)
        environment.process_exit_code = 0
