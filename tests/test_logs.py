"""One log format for every process of the service, on both stacks: text
lines with a timestamp, pid and role by default; one JSON object a line with
LOG_FORMAT=json."""

import json
import re

import pytest
from conftest import wait_until

pytestmark = pytest.mark.service

TEXT_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d [+-]\d{4} \[\d+\] \[[\w ]+\] \[[A-Z]+\] \S+: ")


def _run(service_factory, database_url, stack, fmt):
    service = service_factory(database_url, server=stack, workers=1, extra_env={"LOG_FORMAT": fmt})
    assert service.get("/counter/5")[0] == 200
    assert wait_until(lambda: "flusher started" in service.log())
    assert service.terminate() == 0
    return [line for line in service.log_path.read_text().splitlines() if line.strip()]


def test_every_process_logs_text_lines_with_time_pid_and_role(database_url, service_factory, stack):
    lines = _run(service_factory, database_url, stack, "text")
    assert lines and all(TEXT_LINE.match(line) for line in lines), [
        line for line in lines if not TEXT_LINE.match(line)][:5]
    roles = {re.search(r"\] \[([\w ]+)\] \[", line)[1] for line in lines}
    assert {"flusher", "worker"} <= roles and roles & {"master", "granian", "supervisor"}, roles


def test_log_format_json_gives_one_object_a_line(database_url, service_factory, stack):
    lines = _run(service_factory, database_url, stack, "json")
    records = [json.loads(line) for line in lines]  # every line parses
    assert all({"time", "process", "role", "level", "logger", "message"} <= set(r) for r in records)
    assert {"flusher", "worker"} <= {r["role"] for r in records}
