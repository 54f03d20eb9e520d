"""`counter`: run the service and look after its database.

Settings come from the environment (see README, "Configuration"); options
given here override them for this run.
"""

import os
import sys

import click

from counter import config, storage


def _settings(**overrides):
    """Load settings with command-line overrides applied to the environment,
    so processes started from here (gunicorn, the flusher) see the same."""
    for name, value in overrides.items():
        if value is not None:
            os.environ[name] = str(value)
    try:
        return config.load()
    except config.ConfigError as exc:
        raise click.UsageError(str(exc))


def _database_url(settings):
    if settings.database_url is None:
        raise click.UsageError("DATABASE_URL is not set (only `counter serve` starts an embedded database)")
    return settings.database_url


def _connect(url):
    try:
        return storage.connect(url)
    except storage.DatabaseError as exc:
        raise click.ClickException(f"cannot reach the database: {storage.describe_error(exc, url)}")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main():
    """Count ad banner clicks at high rates and read the statistics."""


@main.command()
@click.option("--bind", help="HOST:PORT to listen on (env BIND, default 127.0.0.1:8000).")
@click.option("--workers", type=int, help="Worker processes (env WORKERS, default: CPUs).")
def serve(bind, workers):
    """Run the whole service: gunicorn workers, the flusher, and (when
    DATABASE_URL is unset) an embedded PostgreSQL.

    \b
    Example:
      DATABASE_URL=postgresql://user:pw@db/clicks counter serve --bind 0.0.0.0:8000
    """
    _settings(BIND=bind, WORKERS=workers)
    argv = [sys.executable, "-m", "gunicorn", "-c", "python:counter.gunicorn_config"]
    os.execv(sys.executable, argv)


@main.command()
@click.option("--parent-pid", type=int, hidden=True,
              help="Exit (after a final flush) when this process is no longer the parent.")
def flusher(parent_pid):
    """Run the flusher alone (for deployments that supervise it separately).

    \b
    Example:
      SHM_DIR=/dev/shm/click-counter-8000 counter flusher
    """
    from counter import flusher as flusher_module, service

    settings = _settings()
    service.setup_logging(settings.log_level)
    _database_url(settings)
    sys.exit(flusher_module.main(settings, parent_pid=parent_pid))


@main.group()
def db():
    """Database schema: migrate, status."""


@db.command()
def migrate():
    """Apply pending migrations (safe to run from several nodes at once).

    \b
    Example:
      DATABASE_URL=postgresql://localhost/clicks counter db migrate
    """
    url = _database_url(_settings())
    conn = _connect(url)
    try:
        applied = storage.migrate(conn)
    except storage.DatabaseError as exc:
        raise click.ClickException(f"migration failed: {storage.describe_error(exc, url)}")
    finally:
        conn.close()
    click.echo("applied: " + ", ".join(applied) if applied else "schema is up to date")


@db.command()
def status():
    """List migrations and whether each is applied.

    \b
    Example:
      counter db status
    """
    url = _database_url(_settings())
    conn = _connect(url)
    try:
        for version, name, applied_at in storage.migration_status(conn):
            state = f"applied {applied_at:%Y-%m-%d %H:%M:%S}" if applied_at else "pending"
            click.echo(f"{version:04d}_{name}  {state}")
    finally:
        conn.close()
