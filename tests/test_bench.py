"""The measurement tools, run small against a real PostgreSQL and real
server trees: the benchmark's flush and HTTP parts, the instruction count,
the ablation and the cold-cache timing of the route. Each must run, and what
it stores must match what it counted."""

import argparse
import statistics

import pytest
from conftest import query

from counter.kinds import clicks as click_kind
from loadtest import bench


def test_the_flush_benchmark_stores_exactly_what_it_counted(database_url, monkeypatch):
    upserts = []
    add_to_rows = click_kind._add_to_rows
    monkeypatch.setattr(click_kind, "_add_to_rows",
                        lambda cur, *args: (upserts.append(args[0]), add_to_rows(cur, *args)))
    report = bench.bench_flush(database_url, keys=3000, rounds=2)
    assert report["rows"] == 3000 and report["rounds"] == 2
    for figure in ("new_rows", "existing_rows"):
        assert len(report[figure]["rows_per_s_each"]) == 2
    # the rows were made by COPY; only the second flush of each round upserted
    assert len(upserts) == 2
    # each round: one click per banner made the row, one more added to it
    assert query(database_url, "SELECT count(DISTINCT banner_id), count(*), min(count), max(count)"
                               " FROM clicks") == [(6000, 6000, 2, 2)]


@pytest.mark.processes
def test_the_instruction_count_sees_the_click_routes_extra_work():
    """Under callgrind, the click route must cost more than the empty callable
    and the figures must add up; a few hundred requests keep it short."""
    pytest.importorskip("meinheld")  # the service runs on granian where meinheld does not import
    from loadtest import instructions

    report = instructions.measure(requests=400, connections=4)
    empty = report["instructions_per_request"]["empty_wsgi"]
    click = report["instructions_per_request"]["click_route"]
    assert 10_000 < empty < click  # meinheld and Python do thousands per request
    assert report["click_route_extra"] == click - empty
    assert report["ratio_empty_to_click"] == round(empty / click, 3)


def test_the_ablation_serves_each_variant_and_the_route_counts(database_url):
    """Each variant answers every click with 2xx, its worker's CPU time is read,
    and only the `route` variant (the service itself) stores what it answered."""
    pytest.importorskip("meinheld")
    from loadtest import ablation

    variants = ["empty", "route_counting_nothing", "least_a_route_can_do", "route"]
    report = ablation.compare(variants, database_url, rounds=1, seconds=1, starts=2)
    assert list(report) == variants and report["empty"]["ratio_by_start"] == [1.0, 1.0]
    for figures in report.values():
        assert figures["runs"] == 2 and figures["non_2xx"] == 0 and figures["rps"] > 0
        assert len(figures["ratio_by_start"]) == 2
        assert figures["median_ratio_of_starts"] == round(sum(figures["ratio_by_start"]) / 2, 3)
        assert figures["user_us_per_request"] + figures["system_us_per_request"] > 0
    [(stored,)] = query(database_url, "SELECT coalesce(sum(count), 0) FROM clicks")
    # all answers were 2xx; the route stored each of them, and perhaps clicks
    # still in flight when wrk stopped; the other variants stored nothing
    assert 0 < report["route"]["answered"] <= stored <= report["route"]["sent"]


def test_the_ablation_serves_its_variants_on_granian_too(database_url):
    from loadtest import ablation

    report = ablation.compare(["empty", "route"], database_url, rounds=1, seconds=1, starts=1,
                              stack="granian")
    for figures in report.values():
        assert figures["runs"] == 1 and figures["non_2xx"] == 0 and figures["answered"] > 0
        assert figures["user_us_per_request"] + figures["system_us_per_request"] > 0


def test_the_cold_route_measure_times_every_call_of_each_app(tmp_path):
    from counter.shm import segment
    from counter.web.click_route import click_route
    from loadtest import cold_route

    writer = segment.SegmentWriter(tmp_path, 2048, 1 << 24)
    apps = {"nothing": cold_route._nothing, "route": click_route(writer, cold_route._nothing)}
    times = cold_route.measure(apps, clicks=600, rounds=2, evict_bytes=4096)
    assert {name: len(calls) for name, calls in times.items()} == {"nothing": 600, "route": 600}
    assert all(calls == sorted(calls) and calls[0] > 0 for calls in times.values())
    mapped = segment.SegmentFile(writer.path)
    assert sum(mapped.stage().values()) == 600 + 600  # the warm-up (all 600 paths) and the timed calls
    mapped.close()


def test_the_http_benchmark_takes_the_ratio_within_each_start(database_url):
    """Two fresh starts of the empty callable and the service, one short round
    each: a ratio per start, their median as the headline, and every answered
    click stored."""
    pytest.importorskip("meinheld")
    args = argparse.Namespace(stacks=["gunicorn"], workers=1, starts=2, rounds=1, seconds=1,
                              connections=16)
    report = bench.bench_stack("gunicorn", database_url, args)
    assert len(report["ratio_by_start"]) == 2 and all(r > 0 for r in report["ratio_by_start"])
    # one round per start: each start's ratio is that start's pair of runs
    assert report["ratio_by_start"] == report["round_ratios"]
    assert report["ratio_to_own_ceiling"] == round(statistics.median(report["ratio_by_start"]), 3)
    assert len(report["rounds_rps"]["empty_wsgi"]) == len(report["rounds_rps"]["click_route"]) == 2
    assert report["stats_one_day"]["buckets"] == 1440
    counted = report["stored_vs_answered"]
    assert counted["answered_2xx"] > 0 and counted["ok"]


def _report(gunicorn_ratio, granian_ratio, flush_rates):
    """A report as bench.main makes it, with the given headline figures."""
    def stack(ratio):
        run = {"rps": 10_000.0, "p50_ms": 1.0, "p99_ms": 2.0}
        return {"ratio_to_own_ceiling": ratio, "ratio_by_start": [ratio] * 8, "empty_wsgi": run,
                "click_route": dict(run, rps=10_000.0 * ratio), "click_ratio_to_nginx": 0.2,
                "stats_one_day": {"p50_ms": 11.0, "p99_ms": 19.0},
                "stored_vs_answered": {"answered_2xx": 5, "stored": 6, "sent": 7, "ok": True}}
    return {"nginx_return_204": {"rps": 50_000.0}, "gunicorn": stack(gunicorn_ratio),
            "granian": stack(granian_ratio), "took": "6 minutes",
            "flush": {"rows": 100_000, "rounds": 5,
                      "new_rows": {"rows_per_s": flush_rates[0]}, "existing_rows": {"rows_per_s": flush_rates[1]}}}


def test_the_benchmark_ends_with_each_target_met_or_not():
    args = bench.parse_args(["--skip-http"])
    args.skip_http = False  # the report below has the HTTP part
    report = _report(0.86, 0.89, (200_000, 140_000))
    report["targets"] = bench.targets(report)
    met = {t["target"].split(",")[0]: t["met"] for t in report["targets"]}
    assert met == {"gunicorn: click route / empty WSGI": True, "gunicorn: answered 2xx <= stored <= sent": True,
                   "granian: click route / empty WSGI": False, "granian: answered 2xx <= stored <= sent": True,
                   "flusher: new rows": True, "flusher: existing rows": False}
    lines = bench.summary(report, args).splitlines()
    table = {line.split("  ")[0]: line.split() for line in lines
             if line.startswith(("gunicorn: click", "granian: click"))}
    assert table["gunicorn: click route / empty WSGI, median of 8 starts"][-3:] == [">=", "0.85", "yes"]
    assert table["granian: click route / empty WSGI, median of 8 starts"][-3:] == [">=", "0.9", "NO"]
    assert "4 of 6 targets met" in lines
    assert len(lines) < 20


def test_the_benchmark_reports_progress_and_json_and_its_duration_in_help(database_url):
    import json
    import os
    import subprocess
    import sys

    from conftest import ROOT

    command = [sys.executable, "-m", "loadtest.bench", "--skip-http", "--flush-rounds", "1", "--flush-keys", "3000"]
    env = dict(os.environ, DATABASE_URL=database_url)
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "expected to take about" in done.stderr and "flusher: round 1 of 1, 3,000 keys" in done.stderr
    assert done.stdout.startswith("click-counter benchmark: ") and "flusher, 3,000 keys" in done.stdout
    machine = subprocess.run(command + ["--json"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    report = json.loads(machine.stdout)
    assert report["flush"]["rows"] == 3000 and report["targets"] == []  # the targets are for 100,000 keys
    usage = subprocess.run([sys.executable, "-m", "loadtest.bench", "--help"], cwd=ROOT, capture_output=True,
                           text=True, timeout=60).stdout
    assert "(default: 8)" in usage and "takes about 6 minutes" in " ".join(usage.split())
