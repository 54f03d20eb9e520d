"""The benchmark's flusher measurement, small: it must run, time the path it
names, and the rows it times must hold exactly the clicks it counted."""

import pytest

from conftest import query
from counter import storage
from loadtest import bench


def test_the_flush_benchmark_stores_exactly_what_it_counted(database_url, monkeypatch):
    upserts = []
    add_to_rows = storage._add_to_rows
    monkeypatch.setattr(storage, "_add_to_rows",
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
