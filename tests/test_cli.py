"""The `counter` command line against a real PostgreSQL."""

import subprocess
import sys

import pytest
from click.testing import CliRunner
from conftest import query

from cli.main import main
from counter.storage import schema


def run(args, env):
    return CliRunner().invoke(main, args, env=env, catch_exceptions=False)


def test_db_migrate_then_status(database_url):
    env = {"DATABASE_URL": database_url}
    first = run(["db", "migrate"], env)
    assert first.exit_code == 0 and "up to date" in first.output
    status = run(["db", "status"], env)
    assert status.exit_code == 0 and "0001_clicks  applied" in status.output
    assert query(database_url, "SELECT count(*) FROM schema_migrations") == [(len(schema._migrations()),)]


@pytest.mark.database
def test_unreachable_database_is_one_line_without_the_password():
    result = run(["db", "migrate"], {"DATABASE_URL": "postgresql://me:hunter2@127.0.0.1:1/db"})
    assert result.exit_code != 0
    assert "cannot reach the database" in result.output and "hunter2" not in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_bad_setting_is_a_usage_error():
    result = run(["db", "migrate"], {"DATABASE_URL": "postgresql://x/y", "FLUSH_INTERVAL": "never"})
    assert result.exit_code == 2 and "FLUSH_INTERVAL" in result.output


def test_every_command_has_help():
    for args in (["--help"], ["serve", "--help"], ["flusher", "--help"], ["db", "--help"],
                 ["db", "migrate", "--help"], ["db", "status", "--help"]):
        result = run(args, {})
        assert result.exit_code == 0 and "Usage:" in result.output, args


@pytest.mark.processes
def test_serve_refuses_a_bad_setting_before_starting():
    done = subprocess.run([sys.executable, "-m", "cli", "serve", "--bind", "nowhere"],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and "--bind nowhere" in done.stderr  # the option given, not BIND=


def test_a_bad_option_is_named_as_typed_and_a_bad_variable_as_set():
    # serve reads its options over the environment; None: WORKERS unset for this run
    given = run(["serve", "--workers", "0"], {"WORKERS": None})
    assert given.exit_code == 2 and "Error: --workers 0 must be between 1 and 1024" in given.output
    assert "WORKERS=" not in given.output
    from_env = run(["serve"], {"WORKERS": "0"})
    assert from_env.exit_code == 2 and "WORKERS='0'" in from_env.output


def test_version_is_the_package_version():
    import importlib.metadata

    result = run(["--version"], {})
    assert result.exit_code == 0
    assert result.output == f"counter, version {importlib.metadata.version('click-counter')}\n"


def test_help_examples_use_times_that_are_never_in_the_past():
    import re

    commands = [["serve"], ["flusher"], ["db", "migrate"], ["db", "status"], ["db", "prune"], ["stats"],
                ["export"], ["top"], ["campaigns", "create"], ["campaigns", "list"], ["campaigns", "stats"]]
    for args in commands:
        text = run([*args, "--help"], {}).output
        examples = text.split("Example", 1)[1].split("Options:")[0]
        assert not re.search(r"\d{4}-\d\d-\d\d", examples), (args, examples)
    assert "--start +1m" in run(["campaigns", "create", "--help"], {}).output


# -- reading statistics --------------------------------------------------------------

import csv  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402

from cli import output  # noqa: E402

ROWS = [  # banner, ts, clicks
    (5, "2024-01-01T10:00:00Z", 2),
    (5, "2024-01-01T10:05:00Z", 1),
    (5, "2024-01-01T11:59:00Z", 4),
    (5, "2024-01-02T00:00:00Z", 8),
    (6, "2024-01-01T10:00:00Z", 100),
    (7, "2024-01-01T12:00:00Z", 50),
]
RANGE = ["--from", "2024-01-01T00:00:00Z", "--to", "2024-01-03T00:00:00Z"]


@pytest.fixture
def known(database_url):
    query(database_url, "INSERT INTO clicks (banner_id, ts, count)"
          " SELECT * FROM unnest(%s::bigint[], %s::timestamptz[], %s::bigint[])",
          ([r[0] for r in ROWS], [r[1] for r in ROWS], [r[2] for r in ROWS]))
    return {"DATABASE_URL": database_url}


def test_stats_table_json_and_csv(known):
    table = run(["stats", "5", *RANGE], known)
    assert table.exit_code == 0, table.output
    assert "2024-01-01T10:05:00Z" in table.output and "total 15 clicks of banner 5" in table.output
    answer = json.loads(run(["stats", "5", *RANGE, "--format", "json", "-g", "hour"], known).output)
    assert answer["total"] == 15 and answer["granularity"] == "hour"
    assert answer["stats"][0] == {"ts": "2024-01-01T10:00:00Z", "v": 3}
    lines = run(["stats", "5", *RANGE, "--format", "csv", "-g", "day"], known).output.splitlines()
    assert lines == ["ts,clicks", "2024-01-01T00:00:00Z,7", "2024-01-02T00:00:00Z,8"]


def test_stats_match_the_http_route(known, tmp_path):
    import falcon.testing

    from counter import config
    from counter.shm import segment
    from counter.storage import db_pool
    from counter.web.app import create_app

    settings = config.load({"DATABASE_URL": known["DATABASE_URL"], "SHM_DIR": str(tmp_path)})
    client = falcon.testing.TestClient(create_app(settings, segment.SegmentWriter(tmp_path, 16, 1 << 20),
                                                  db_pool.Database(known["DATABASE_URL"])))
    for granularity in ("minute", "hour", "day"):
        http = client.simulate_post("/stats/5", json={"from": "2024-01-01T10:30:00Z", "to": "2024-01-02T00:00:01Z",
                                                      "granularity": granularity}).json
        cli = json.loads(run(["stats", "5", "--from", "2024-01-01T10:30:00Z", "--to", "2024-01-02T00:00:01Z",
                              "-g", granularity, "--format", "json"], known).output)
        assert cli == http


def test_stats_in_another_time_zone(known):
    lines = run(["stats", "5", *RANGE, "--format", "csv", "--tz", "Europe/Berlin"], known).output.splitlines()
    assert lines[1] == "2024-01-01T11:00:00+01:00,2"
    # a time without an offset is read in --tz: 11:00 Berlin is 10:00Z
    only = run(["stats", "5", "--from", "2024-01-01T11:00", "--to", "2024-01-01T11:01",
                "--tz", "Europe/Berlin", "--format", "json"], known)
    assert json.loads(only.output)["total"] == 2


def test_an_unknown_banner_has_zero_clicks(known):
    result = run(["stats", "999", *RANGE], known)
    assert result.exit_code == 0 and "total 0 clicks" in result.output


def test_relative_times_are_understood(known):
    query(known["DATABASE_URL"], "INSERT INTO clicks VALUES (9, date_trunc('minute', now()) - interval '5 minutes', 3)")
    for start in ("-1h", "-10m", "today", "-1d", "-2w"):
        result = run(["stats", "9", "--from", start, "--format", "json"], known)
        assert result.exit_code == 0, (start, result.output)
        assert json.loads(result.output)["total"] == 3, start
    assert json.loads(run(["stats", "9", "--from", "-2m", "--format", "json"], known).output)["total"] == 0


@pytest.mark.parametrize("args,fragment", [
    (["stats", "5", "--from", "last tuesday"], "--from"),
    (["stats", "5", "--from", "-1h", "--to", "soon"], "--to"),
    (["stats", "5", "--from", "now", "--to", "-1h"], "before"),
    (["stats", "abc", "--from", "-1h"], "banner id"),
    (["stats", "0", "--from", "-1h"], "banner id"),
    (["stats", "5", "--from", "-1h", "--tz", "Mars/Olympus"], "time zone"),
    (["stats", "5", "--from", "2000-01-01", "--to", "2024-01-01"], "granularity"),
    (["export", "--from", "yesterday-ish"], "--from"),
    (["export", "--from", "-1h", "--banner", "-3"], "banner id"),
    (["top", "--from", "-1h", "--limit", "0"], "limit"),
])
def test_bad_input_is_one_line_and_exit_2(known, args, fragment):
    result = run(args, known)
    assert result.exit_code == 2, result.output
    assert fragment in result.output
    assert "Traceback" not in result.output


@pytest.mark.database
@pytest.mark.parametrize("args", [["stats", "5", "--from", "-1h"], ["export", "--from", "-1h"],
                                  ["top", "--from", "-1h"], ["db", "status"]])
def test_every_reader_reports_an_unreachable_database_in_one_line(args):
    result = run(args, {"DATABASE_URL": "postgresql://me:hunter2@127.0.0.1:1/db"})
    assert result.exit_code == 1
    assert result.output.startswith("Error: cannot reach the database")
    assert "hunter2" not in result.output and len(result.output.strip().splitlines()) == 1


def test_export_csv_to_stdout_every_banner(known):
    result = run(["export", *RANGE], known)
    assert result.exit_code == 0
    rows = list(csv.reader(io.StringIO(result.output)))
    assert rows[0] == ["banner_id", "ts", "clicks"]
    assert len(rows) == 1 + len(ROWS)
    assert rows[1] == ["5", "2024-01-01T10:00:00Z", "2"]
    assert "exporting" not in result.output  # no progress bar when piped


def test_export_ndjson_for_named_banners_by_hour(known):
    result = run(["export", *RANGE, "--banner", "5", "--banner", "7", "-g", "hour", "--format", "ndjson"], known)
    lines = [json.loads(line) for line in result.output.splitlines()]
    assert lines == [
        {"banner_id": 5, "ts": "2024-01-01T10:00:00Z", "clicks": 3},
        {"banner_id": 5, "ts": "2024-01-01T11:00:00Z", "clicks": 4},
        {"banner_id": 5, "ts": "2024-01-02T00:00:00Z", "clicks": 8},
        {"banner_id": 7, "ts": "2024-01-01T12:00:00Z", "clicks": 50},
    ]


def test_export_json_to_a_file(known, tmp_path):
    target = tmp_path / "out.json"
    result = run(["export", *RANGE, "-g", "day", "--format", "json", "-o", str(target)], known)
    assert result.exit_code == 0, result.output
    data = json.loads(target.read_text())
    assert {(r["banner_id"], r["clicks"]) for r in data} == {(5, 7), (5, 8), (6, 100), (7, 50)}
    assert "wrote 4 rows" in result.output
    assert os.listdir(tmp_path) == ["out.json"]  # no temporary left behind


def test_an_empty_export_is_valid_in_every_format(known, tmp_path):
    empty = ["--from", "2030-01-01", "--to", "2030-01-02"]
    assert json.loads(run(["export", *empty, "--format", "json"], known).output) == []
    assert run(["export", *empty, "--format", "ndjson"], known).output == ""
    assert run(["export", *empty], known).output == "banner_id,ts,clicks\n"


def test_export_into_a_missing_directory_is_one_line_and_exit_2(tmp_path):
    # checked before the database is asked: this URL is never reached
    env = {"DATABASE_URL": "postgresql://me:hunter2@127.0.0.1:1/db"}
    result = run(["export", "--from", "-1h", "-o", str(tmp_path / "nowhere" / "x.csv")], env)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert errors == [f"Error: Invalid value for '-o' / '--output': directory '{tmp_path / 'nowhere'}' does not exist"]


def test_an_export_that_cannot_be_written_is_one_line_and_exit_1(known, tmp_path):
    import resource

    target = tmp_path / "out.csv"
    done = subprocess.run([sys.executable, "-m", "cli", "export", *RANGE, "-o", str(target)],
                          env=dict(os.environ, **known), capture_output=True, text=True, timeout=60,
                          # files may not grow past 10 bytes: the write fails (EFBIG)
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (10, 10)))
    assert done.returncode == 1, done.stderr
    assert done.stderr.splitlines() == [f"Error: cannot write {target}: File too large"]
    assert os.listdir(tmp_path) == []  # nothing half-written left behind


def test_a_failed_export_leaves_no_file_and_keeps_the_old_one(tmp_path):
    target = tmp_path / "out.csv"
    target.write_text("previous export\n")
    with pytest.raises(RuntimeError):
        with output.destination(str(target)) as out:
            out.write("half of it")
            raise RuntimeError("connection lost")
    assert target.read_text() == "previous export\n"
    assert os.listdir(tmp_path) == ["out.csv"]


def test_top_banners(known):
    result = run(["top", *RANGE, "--limit", "2", "--format", "csv"], known)
    assert result.output.splitlines() == ["banner_id,clicks", "6,100", "7,50"]
    table = run(["top", *RANGE], known).output
    assert table.splitlines()[2].split() == ["6", "100"]
    assert json.loads(run(["top", *RANGE, "--format", "json", "-n", "1"], known).output) == [
        {"banner_id": 6, "clicks": 100}]


def test_export_of_a_million_rows_streams_with_flat_memory(database_url, tmp_path):
    """1,000,000 minute rows to CSV through `counter export`; peak memory of the
    process stays far below what holding the rows would take."""
    query(database_url,
          "INSERT INTO clicks SELECT 1 + i % 1000, timestamptz '2024-01-01' + (i / 1000) * interval '1 minute', 1"
          " FROM generate_series(0, 999999) AS i")
    target = tmp_path / "million.csv"
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "cli", "export", "--from", "2024-01-01", "--to", "2024-02-01",
                             "-o", str(target)], env=dict(os.environ, DATABASE_URL=database_url),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    # The export's own peak (VmHWM of its memory, made at exec). wait4's
    # ru_maxrss would also count the test process's memory, which the child
    # shares between fork and exec.
    peak_kib = 0
    while proc.poll() is None:
        try:
            with open(f"/proc/{proc.pid}/status") as f:
                peak_kib = max([peak_kib] + [int(line.split()[1]) for line in f if line.startswith("VmHWM:")])
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    seconds = time.monotonic() - started
    assert proc.returncode == 0, proc.stderr.read()
    with open(target) as f:
        assert sum(1 for _ in f) == 1_000_001
    peak_mib = peak_kib / 1024
    print(f"\nexport: 1,000,000 rows in {seconds:.1f}s = {1_000_000 / seconds:,.0f} rows/s,"
          f" peak RSS {peak_mib:.0f} MiB")
    assert peak_mib < 120, peak_mib


def test_export_to_a_file_from_a_terminal_shows_a_progress_bar(known, tmp_path):
    import pty

    controller, terminal = pty.openpty()
    target = tmp_path / "out.csv"
    proc = subprocess.Popen([sys.executable, "-m", "cli", "export", *RANGE, "-o", str(target)],
                            env=dict(os.environ, **known), stdin=terminal, stdout=terminal, stderr=terminal)
    os.close(terminal)
    seen = b""
    while True:
        try:
            chunk = os.read(controller, 4096)
        except OSError:  # the terminal closed with the process
            break
        if not chunk:
            break
        seen += chunk
    proc.wait(timeout=30)
    os.close(controller)
    assert proc.returncode == 0, seen
    assert b"exporting" in seen and b"100%" in seen
    assert len(target.read_text().splitlines()) == 1 + len(ROWS)


def test_db_prune_deletes_only_older_rows(known):
    result = run(["db", "prune", "--before", "2024-01-01T12:00:00Z", "--yes"], known)
    assert result.exit_code == 0, result.output
    assert "clicks 4" in result.output and "deleted: clicks 4" in result.output
    remaining = query(known["DATABASE_URL"], "SELECT banner_id, count FROM clicks ORDER BY ts, banner_id")
    assert remaining == [(7, 50), (5, 8)]
    kept = CliRunner().invoke(main, ["db", "prune", "--before", "2030-01-01"], env=known, input="n\n")
    assert kept.exit_code == 1 and "nothing deleted" in kept.output
    assert len(query(known["DATABASE_URL"], "SELECT * FROM clicks")) == 2
    assert run(["db", "prune", "--before", "whenever"], known).exit_code == 2


def test_db_prune_deletes_only_dedup_windows_closed_long_enough(known):
    """A window closes DEDUP_TTL after its start; prune removes those closed
    before the cutoff and over a day ago, whatever the cutoff."""
    campaign = "6f1c3a52-0d47-4c8e-9a51-3f0c2b7d9e10"
    starts = {  # DEDUP_TTL is 2 h here
        b"closed long ago": "timestamptz '2023-12-31T10:00:00Z'",
        b"closed after the cutoff": "timestamptz '2024-01-01T10:30:00Z'",  # at 11:30 with 1 h
        b"closed an hour ago": "now() - interval '3 hours'",
        b"open now": "now() - interval '10 minutes'",
    }
    for user, start in starts.items():
        query(known["DATABASE_URL"],
              "INSERT INTO impression_windows (campaign_id, user_hash, window_start, opened_by)"
              f" VALUES (%s, %s, {start}, 1)", (campaign, user))
    env = dict(known, DEDUP_TTL="7200")

    def kept():
        return sorted(bytes(u) for (u,) in query(known["DATABASE_URL"], "SELECT user_hash FROM impression_windows"))

    result = run(["db", "prune", "--before", "2024-01-01T12:00:00Z", "--yes"], env)
    assert result.exit_code == 0, result.output
    assert "deleted: clicks 4, campaign_impressions 0, impression_windows 1" in result.output
    assert kept() == [b"closed after the cutoff", b"closed an hour ago", b"open now"]
    # a cutoff in the future: what closed over a day ago goes, the rest stays
    result = run(["db", "prune", "--before", "2030-01-01", "--yes"], env)
    assert result.output.splitlines()[-1].endswith("impression_windows 1")
    assert kept() == [b"closed an hour ago", b"open now"]
