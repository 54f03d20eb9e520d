"""The embedded PostgreSQL (DATABASE_URL unset): one major, data of another
major never touched, one line for every failure to start, and shared by the
CLI and `counter serve` under one rule (counter.storage.embedded's docstring): the
last counter process to leave stops it, and only then."""

import os
import pathlib
import shlex
import subprocess
import sys

import pytest
from conftest import ROOT, query, wait_until

from counter.storage import connection, embedded, schema

pytestmark = pytest.mark.processes  # the CLI and PostgreSQL servers of its own

ROWS = 100_000  # an export of these outgrows a pipe nobody reads: it waits, mid-stream


def env_for(data_dir):
    env = dict(os.environ, DATA_DIR=str(data_dir))
    env.pop("DATABASE_URL", None)
    return env


def cli(data_dir, *args):
    return subprocess.run([sys.executable, "-m", "cli", *args], env=env_for(data_dir), cwd=str(ROOT),
                          capture_output=True, text=True, timeout=120)


def running(data_dir):
    return embedded.EmbeddedPostgres(data_dir).running_port() is not None


def snapshot(root: pathlib.Path):
    """Everything about a directory tree that a write, chmod or chown would change."""
    found = {}
    for path in [root, *sorted(root.rglob("*"))]:
        st = path.lstat()
        found[str(path.relative_to(root))] = (st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns,
                                              path.read_bytes() if path.is_file() else None)
    return found


def old_major_dir(data_dir, major="16"):
    """A data directory that says another major made it, not private (0750)
    and owned by the caller: any chmod or chown would show."""
    pgdata = data_dir / "pgdata"
    (pgdata / "base" / "1").mkdir(parents=True)
    (pgdata / "PG_VERSION").write_text(f"{major}\n")
    (pgdata / "base" / "1" / "1259").write_bytes(b"\x00" * 8192)
    (pgdata / "postgresql.conf").write_text("port = 5432\n")
    pgdata.chmod(0o750)
    return pgdata


def test_data_of_another_major_is_left_untouched_with_one_line_saying_how_to_get_it(
        data_dir, service_factory):
    pgdata = old_major_dir(data_dir)
    before = snapshot(data_dir)
    ours = embedded.binaries_major(embedded._binaries())
    assert ours != "16"

    for args in (["stats", "1", "--from", "-1h"], ["db", "migrate"], ["export", "--from", "-1d"]):
        done = cli(data_dir, *args)
        assert done.returncode == 1, (args, done.stderr)
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1, (args, done.stderr)
        assert f"{pgdata} holds data of PostgreSQL 16 and this install runs PostgreSQL {ours}" in lines[0]
        assert "left untouched" in lines[0] and "-m counter.storage.embedded upgrade" in lines[0]

    with pytest.raises(RuntimeError) as refused:
        service_factory(None, workers=1, extra_env={"DATA_DIR": str(data_dir)})
    log = str(refused.value)
    lines = [line for line in log.splitlines() if "cannot start" in line]
    assert len(lines) == 1 and f"PostgreSQL 16 and this install runs PostgreSQL {ours}" in lines[0], log
    assert "Traceback" not in log

    assert snapshot(data_dir) == before  # not a byte, mode or owner changed; no lock file either
    assert not running(data_dir)


def test_a_server_that_does_not_start_is_one_line_with_the_cause_and_the_log(data_dir, service_factory):
    assert cli(data_dir, "db", "migrate").returncode == 0
    with open(data_dir / "pgdata" / "postgresql.conf", "a") as conf:
        conf.write("shared_buffers = lots\n")

    done = cli(data_dir, "top", "--from", "-1h")
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "did not start" in lines[0] and "configuration file" in lines[0]
    assert f"(log: {data_dir / 'pgdata' / 'server.log'})" in lines[0]

    with pytest.raises(RuntimeError) as refused:
        service_factory(None, workers=1, extra_env={"DATA_DIR": str(data_dir)})
    log = str(refused.value)
    lines = [line for line in log.splitlines() if "cannot start" in line]
    assert len(lines) == 1 and "configuration file" in lines[0] and "server.log" in lines[0], log
    assert "Traceback" not in log


def test_a_read_without_a_cluster_says_so_in_one_line_and_creates_nothing(data_dir):
    done = cli(data_dir, "stats", "1", "--from", "-1h")
    assert done.returncode == 1 and done.stderr.strip().splitlines() == [
        f"Error: no embedded database in {data_dir / 'pgdata'} yet "
        f"(`counter serve` or `counter db migrate` creates it)"]
    assert not data_dir.exists()
    url = cli(data_dir, "db", "url")
    assert url.returncode == 1 and "no embedded PostgreSQL is running" in url.stderr


def test_a_cli_read_starts_the_embedded_database_for_itself_and_stops_it(data_dir):
    assert cli(data_dir, "db", "migrate").returncode == 0
    assert not running(data_dir)
    server = embedded.EmbeddedPostgres(data_dir)
    query(server.acquire(), "INSERT INTO clicks VALUES (7, '2024-01-01T10:00Z', 3)")
    server.release()
    assert not running(data_dir)

    done = cli(data_dir, "stats", "7", "--from", "2024-01-01", "--to", "2024-01-02", "-g", "day")
    assert done.returncode == 0, done.stderr
    assert "total 3 clicks of banner 7" in done.stdout
    assert not running(data_dir)


def test_another_client_keeps_the_server_running_until_it_leaves(data_dir):
    server = embedded.EmbeddedPostgres(data_dir)
    url = server.acquire()
    psql = connection.connect(url, application_name="psql")
    server.release()  # the last counter user, but somebody else is connected
    assert running(data_dir)
    psql.close()
    again = embedded.EmbeddedPostgres(data_dir)
    assert again.acquire(create=False) == url  # attached to the same server
    assert wait_until(lambda: not query(url, "SELECT 1 FROM pg_stat_activity WHERE application_name = 'psql'"))
    again.release()
    assert not running(data_dir)


@pytest.fixture
def long_export():
    """long_export(data_dir): a CLI export that stops mid-stream until its
    stdout is read. Any still running after the test is killed (by pid)."""
    started = []

    def start(data_dir):
        export = _long_export(data_dir)
        started.append(export)
        return export

    yield start
    for export in started:
        if export.poll() is None:
            export.kill()
            export.wait()


def _long_export(data_dir):
    export = subprocess.Popen([sys.executable, "-m", "cli", "export", "--from", "2024-01-01", "--to", "2024-02-01"],
                              env=env_for(data_dir), cwd=str(ROOT), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    assert export.stdout.readline().startswith("banner_id")  # it has the server and is streaming
    return export


def finish(export):
    out, err = export.communicate(timeout=120)
    assert export.returncode == 0, err
    return len(out.splitlines()) + 1  # with the header line read already


@pytest.mark.service
def test_serve_and_a_long_export_share_the_server_and_the_last_one_out_stops_it(data_dir, service_factory,
                                                                                 long_export):
    assert cli(data_dir, "db", "migrate").returncode == 0
    server = embedded.EmbeddedPostgres(data_dir)
    query(server.acquire(), "INSERT INTO clicks"
                            " SELECT g, '2024-01-01T00:00Z'::timestamptz + g * interval '1 second', 1 "
                            "FROM generate_series(1, %s) g", (ROWS,))
    server.release()
    assert not running(data_dir)

    # an export starts the server; serve attaches to it in the middle of the export
    export = long_export(data_dir)
    postmaster = (data_dir / "pgdata" / "postmaster.pid").read_text().split()[0]
    service = service_factory(None, workers=1, extra_env={"DATA_DIR": str(data_dir)})
    assert "already running" in service.log()
    assert finish(export) == ROWS + 1
    # the export has left; the server stays for serve, which still stores clicks
    assert (data_dir / "pgdata" / "postmaster.pid").read_text().split()[0] == postmaster
    url = cli(data_dir, "db", "url")
    assert url.returncode == 0 and url.stdout.strip().startswith("postgresql://postgres@127.0.0.1:")
    url = url.stdout.strip()
    for _ in range(3):
        assert service.get("/counter/424242")[0] == 200
    assert wait_until(lambda: query(url, "SELECT sum(count) FROM clicks WHERE banner_id = 424242") == [(3,)])

    # another export attaches; serve stops first and leaves the server to it
    export = long_export(data_dir)
    assert service.terminate() == 0
    assert running(data_dir)
    assert finish(export) == ROWS + 1
    assert not running(data_dir)  # the export was the last user: it stopped the server
    assert cli(data_dir, "db", "url").returncode == 1


def test_the_upgrade_command_of_the_one_line_copies_the_data_and_keeps_the_old_directory(data_dir):
    ours = embedded.binaries_major(embedded._binaries())
    majors = [m for m in ("15", "16", "17") if m != ours and embedded.find_binaries(m)]
    if not majors:
        pytest.skip("no PostgreSQL binaries of another major on this machine")
    old = embedded.EmbeddedPostgres(data_dir, binaries=embedded.find_binaries(majors[0]))
    url = old.start()
    try:
        conn = connection.connect(url)
        schema.migrate(conn)
        conn.close()
        query(url, "INSERT INTO clicks VALUES (5, '2024-01-01T10:00Z', 11)")
    finally:
        old.stop()

    line = cli(data_dir, "stats", "5", "--from", "2024-01-01", "--to", "2024-01-02").stderr.strip()
    command = line.split("run: ", 1)[1]
    upgraded = subprocess.run(shlex.split(command), cwd=str(ROOT), capture_output=True, text=True, timeout=300)
    assert upgraded.returncode == 0, upgraded.stderr
    assert (data_dir / "pgdata" / "PG_VERSION").read_text().strip() == ours
    assert (data_dir / f"pgdata-{majors[0]}" / "PG_VERSION").read_text().strip() == majors[0]
    done = cli(data_dir, "stats", "5", "--from", "2024-01-01", "--to", "2024-01-02", "-g", "day")
    assert done.returncode == 0 and "total 11 clicks of banner 5" in done.stdout, done.stderr
