"""The `counter` command line against a real PostgreSQL."""

import subprocess
import sys

from click.testing import CliRunner

from cli.main import main
from conftest import query


def run(args, env):
    return CliRunner().invoke(main, args, env=env, catch_exceptions=False)


def test_db_migrate_then_status(database_url):
    env = {"DATABASE_URL": database_url}
    first = run(["db", "migrate"], env)
    assert first.exit_code == 0 and "up to date" in first.output
    status = run(["db", "status"], env)
    assert status.exit_code == 0 and "0001_clicks  applied" in status.output
    assert query(database_url, "SELECT count(*) FROM schema_migrations") == [(1,)]


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


def test_serve_refuses_a_bad_setting_before_starting():
    done = subprocess.run([sys.executable, "-m", "cli", "serve", "--bind", "nowhere"],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and "BIND" in done.stderr
