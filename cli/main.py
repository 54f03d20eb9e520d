"""`counter`: run the service and look after its database.

Settings come from the environment (see README, "Configuration"); options
given here override them for this run.
"""

import contextlib
import datetime
import json
import os
import re
import sys
import uuid

import click

from cli import output
from counter import config, times, version
from counter.storage import connection, embedded, queries, retention, schema
from counter.web import campaigns as campaign_rules  # `campaigns` is the command group
from counter.web import stats_request


def _settings(env=None):
    """Load settings from `env` (None: the process's environment)."""
    try:
        return config.load(env)
    except config.ConfigError as exc:
        raise click.UsageError(str(exc))


def _database_url(settings, create=False):
    """DATABASE_URL; unset, the embedded database of DATA_DIR (the one
    `counter serve` uses): attached to when it runs, else started for this
    command and stopped after it unless another user came meanwhile (the rule
    in counter.embedded). A cluster is created only when `create`."""
    if settings.database_url is not None:
        return settings.database_url
    root = click.get_current_context().find_root()
    server = root.meta.get("counter.embedded")
    if server is None:
        server = embedded.EmbeddedPostgres(settings.data_dir)
        try:
            server.acquire(create=create)
        except embedded.EmbeddedError as exc:
            raise click.ClickException(str(exc))
        root.meta["counter.embedded"] = server
        root.call_on_close(server.release)  # also after an error or Ctrl-C
    return server.url


@contextlib.contextmanager
def _database(failure="database error", create=False):
    """A connection to the database; any database error ends the command with
    one line (password masked)."""
    url = _database_url(_settings(), create)
    try:
        conn = connection.connect(url)
    except connection.DatabaseError as exc:
        raise click.ClickException(f"cannot reach the database: {connection.describe_error(exc, url)}")
    try:
        yield conn
    except connection.DatabaseError as exc:
        raise click.ClickException(f"{failure}: {connection.describe_error(exc, url)}")
    finally:
        conn.close()


def _query(fn, *args):
    """Run one storage function on a fresh connection."""
    with _database() as conn:
        return fn(conn, *args)


def _time(text, tz, now, option):
    """times.parse, its error naming the option the time came from."""
    try:
        return times.parse(text, tz, now)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint=option)


def _zone(name):
    try:
        return times.zone(name)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--tz")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(version.VERSION, "--version", prog_name="counter")
def main():
    """Count ad banner clicks at high rates and read the statistics."""


@main.command()
@click.option("--bind", help="HOST:PORT to listen on (env BIND, default 127.0.0.1:8000).")
@click.option("--workers", type=int, help="Worker processes (env WORKERS, default: CPUs).")
@click.option("--server", type=click.Choice(["auto", "gunicorn", "granian"]),
              help="Serving stack (env SERVER, default auto: gunicorn + meinheld, or granian "
                   "where meinheld does not import).")
def serve(bind, workers, server):
    """Run the whole service: the web workers, the flusher, and (when
    DATABASE_URL is unset) an embedded PostgreSQL.

    \b
    Examples:
      DATABASE_URL=postgresql://user:pw@db/clicks counter serve --bind 0.0.0.0:8000
      counter serve --server granian --workers 2
    """
    from counter.serving import lifecycle

    env, settings = _serve_settings({"--bind": ("BIND", bind), "--workers": ("WORKERS", workers),
                                     "--server": ("SERVER", server)})
    lifecycle.setup_logging(settings, "serve")
    if lifecycle.choose_server(settings) == "granian":
        from counter.serving import granian_serve

        # checked again for granian (a segment per thread), and told to its workers
        env = dict(env, SERVER="granian")
        sys.exit(granian_serve.run(_settings(env), env))
    argv = [sys.executable, "-m", "gunicorn", "-c", "python:counter.serving.gunicorn_hooks"]
    os.execve(sys.executable, argv, env)  # gunicorn loads its settings from this environment


def _serve_settings(options):
    """(env, settings): the environment with the options' values (for the
    processes serve starts, too) and the settings loaded from it; an error
    about a value given as an option names the option (--workers 0), not the
    variable it overrides."""
    env = dict(os.environ)
    env.update((name, str(value)) for name, value in options.values() if value is not None)
    try:
        return env, _settings(env)
    except click.UsageError as exc:
        message = exc.message
        for option, (name, value) in options.items():
            if value is not None:
                message = re.sub(rf"\b{name}=(?:'([^']*)'|(\S+))",
                                 lambda m, option=option: f"{option} {m[1] if m[1] is not None else m[2]}", message)
        raise click.UsageError(message)


@main.command()
@click.option("--parent-pid", type=int, hidden=True,
              help="Exit (after a final flush) when this process is no longer the parent.")
@click.option("--drain", is_flag=True,
              help="Flush what SHM_DIR holds, then exit (e.g. clicks a stopped node left behind).")
def flusher(parent_pid, drain):
    """Run the flusher alone (for deployments that supervise it separately).

    \b
    Example:
      SHM_DIR=/dev/shm/click-counter-8000 counter flusher
      SHM_DIR=/dev/shm/click-counter-8000 DATABASE_URL=postgresql://db/clicks counter flusher --drain
    """
    from counter.flush import flusher as flusher_module
    from counter.serving import lifecycle

    settings = _settings()
    lifecycle.setup_logging(settings, "flusher")
    if settings.database_url is None:
        raise click.UsageError("DATABASE_URL is not set (`counter serve` sets it for the flusher it starts)")
    sys.exit(flusher_module.main(settings, parent_pid=parent_pid, drain=drain))


@main.group()
def db():
    """Database schema and retention: migrate, status, prune, url."""


@db.command()
def migrate():
    """Apply pending migrations (safe to run from several nodes at once).

    \b
    Example:
      DATABASE_URL=postgresql://localhost/clicks counter db migrate
    """
    with _database("migration failed", create=True) as conn:
        applied = schema.migrate(conn)
    click.echo("applied: " + ", ".join(applied) if applied else "schema is up to date")


@db.command()
def status():
    """List migrations and whether each is applied.

    \b
    Example:
      counter db status
    """
    for number, name, applied_at in _query(schema.migration_status):
        state = f"applied {applied_at:%Y-%m-%d %H:%M:%S}" if applied_at else "pending"
        click.echo(f"{number:04d}_{name}  {state}")


@db.command("url")
def db_url():
    """Print the database's URL, for psql: DATABASE_URL (password masked), or,
    when it is unset, the embedded database's while its server runs (its port
    changes at every start). Starts nothing.

    \b
    Example:
      psql "$(counter db url)"
    """
    settings = _settings()
    if settings.database_url is not None:
        click.echo(connection.redact(settings.database_url))
        return
    server = embedded.EmbeddedPostgres(settings.data_dir)
    server.port = server.running_port()
    if server.port is None:
        raise click.ClickException(f"no embedded PostgreSQL is running on {server.pgdata} "
                                   f"(it runs while `counter serve` does)")
    click.echo(server.url)


@db.command()
@click.option("--before", required=True, help="Delete minute rows older than this. "
              "ISO-8601, or e.g. -90d.")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def prune(before, yes):
    """Delete click and campaign rows older than --before (retention), and the
    impression dedup windows that closed before it and over a day ago. Run it
    with the service's DEDUP_TTL.

    \b
    Example:
      counter db prune --before -90d --yes
    """
    cutoff = _time(before, datetime.timezone.utc, datetime.datetime.now(datetime.timezone.utc), "--before")
    dedup_ttl = _settings().dedup_ttl
    counts = _query(retention.prune, cutoff, dedup_ttl, True)
    click.echo(f"rows before {times.show(cutoff, datetime.timezone.utc)}: "
               + ", ".join(f"{table} {n}" for table, n in counts.items()))
    if not yes and not click.confirm("delete them?", default=False):
        raise click.ClickException("nothing deleted")
    counts = _query(retention.prune, cutoff, dedup_ttl)
    click.echo("deleted: " + ", ".join(f"{table} {n}" for table, n in counts.items()))


# -- reading statistics ----------------------------------------------------------

_TIME_HELP = "ISO-8601 (no offset: --tz), now, today, yesterday, -30m/-1h/-7d/-2w, or +1m (ahead)."


def _range(start, end, tz_name):
    """Parse --from/--to (and --tz) into UTC datetimes, from before to."""
    tz = _zone(tz_name)
    now = datetime.datetime.now(datetime.timezone.utc)
    first = _time(start, tz, now, "--from")
    last = _time(end, tz, now, "--to")
    if not first < last:
        raise click.BadParameter("--from must be before --to", param_hint="--from")
    return first, last, tz


def _banner_id(ctx, param, value):
    if value is None:
        return None
    values = value if isinstance(value, tuple) else (value,)
    try:
        parsed = tuple(stats_request.banner_id(str(v)) for v in values)
    except stats_request.BadRequest as exc:
        raise click.BadParameter(str(exc))
    return parsed if isinstance(value, tuple) else parsed[0]


_from = click.option("--from", "start", required=True, help="Start of the range. " + _TIME_HELP)
_to = click.option("--to", "end", default="now", show_default=True, help="End of the range. " + _TIME_HELP)
_tz = click.option("--tz", default="UTC", show_default=True,
                   help="Time zone for output and for times typed without an offset.")
_granularity = click.option("--granularity", "-g", type=click.Choice(list(queries.GRANULARITIES)),
                            default="minute", show_default=True, help="Bucket size.")


@main.command()
@click.argument("banner", callback=_banner_id)
@_from
@_to
@_granularity
@click.option("--format", "fmt", type=click.Choice(["table", "json", "csv"]), default="table",
              show_default=True)
@_tz
def stats(banner, start, end, granularity, fmt, tz):
    """Clicks of one banner per minute, hour or day (the numbers of the HTTP
    stats route). A banner with no clicks is not an error: its total is 0.

    \b
    Examples:
      counter stats 42 --from -1h
      counter stats 42 --from -5m
      counter stats 42 --from -7d --to today -g day --format csv
    """
    first, last, zone = _range(start, end, tz)
    try:
        query = stats_request.stats_query(banner, {"from": first.isoformat(), "to": last.isoformat(),
                                                   "granularity": granularity})
    except stats_request.BadRequest as exc:
        raise click.UsageError(str(exc))
    buckets = _query(queries.click_stats, banner, query.start, query.end, granularity)
    if fmt == "json":
        click.echo(json.dumps(query.answer(buckets), indent=2))
        return
    click.echo(output.show(["ts", "clicks"], [(times.show(ts, zone), c) for ts, c in buckets], fmt))
    if fmt == "table":
        click.echo(f"total {sum(c for _, c in buckets)} clicks of banner {banner}, "
                   f"{times.show(first, zone)} .. {times.show(last, zone)}")


def _output_path(ctx, param, value):
    """-o FILE: its directory must exist and take a file, checked before any
    database work (the file is written beside it, then renamed)."""
    if value in (None, "-"):
        return value
    folder = os.path.dirname(os.path.abspath(value))
    if not os.path.isdir(folder):
        raise click.BadParameter(f"directory {folder!r} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise click.BadParameter(f"directory {folder!r} is not writable")
    return value


@main.command()
@_from
@_to
@click.option("--banner", "banners", multiple=True, callback=_banner_id,
              help="Only this banner (repeatable). Default: every banner.")
@_granularity
@click.option("--format", "fmt", type=click.Choice(["csv", "ndjson", "json"]), default="csv",
              show_default=True)
@click.option("-o", "--output", "path", type=click.Path(dir_okay=False, writable=True), callback=_output_path,
              help="Write to FILE (it appears whole or not at all). Default: stdout.")
@_tz
def export(start, end, banners, granularity, fmt, path, tz):
    """Export clicks per banner and bucket, streamed from PostgreSQL (memory
    stays flat for any size). Shows a progress bar when writing a file from a
    terminal.

    \b
    Examples:
      counter export --from -7d -g hour -o last-week.csv
      counter export --from yesterday --to today --banner 42 --format ndjson | gzip > day.ndjson.gz
    """
    first, last, zone = _range(start, end, tz)
    with _database() as conn:
        show_bar = path not in (None, "-") and sys.stderr.isatty()
        total = queries.export_size(conn, first, last, granularity, banners) if show_bar else 0
        rows = queries.export_rows(conn, first, last, granularity, banners)
        try:
            with output.destination(path) as out:
                if show_bar:
                    with click.progressbar(length=total, label="exporting", file=sys.stderr) as bar:
                        written = output.write_rows(rows, fmt, out, zone, on_row=lambda: bar.update(1))
                else:
                    written = output.write_rows(rows, fmt, out, zone)
        except OSError as exc:  # disk full, directory gone meanwhile: one line, no traceback
            if path in (None, "-"):
                raise
            raise click.ClickException(f"cannot write {path}: {exc.strerror or exc}")
    if path not in (None, "-"):
        click.echo(f"wrote {written} rows to {path}", err=True)


@main.command()
@_from
@_to
@click.option("--limit", "-n", type=click.IntRange(1, 100_000), default=10, show_default=True)
@click.option("--format", "fmt", type=click.Choice(["table", "json", "csv"]), default="table",
              show_default=True)
@_tz
def top(start, end, limit, fmt, tz):
    """The most clicked banners of a range.

    \b
    Examples:
      counter top --from today
      counter top --from -1h --limit 50 --format csv
    """
    first, last, _ = _range(start, end, tz)
    click.echo(output.show(["banner_id", "clicks"], _query(queries.top_banners, first, last, limit), fmt))


# -- campaigns ----------------------------------------------------------------------

@main.group()
def campaigns():
    """Campaigns and their unique impressions: create, list, stats."""


@campaigns.command("create")
@click.argument("name")
@click.option("--start", "start", required=True, help="When it starts (in the future). " + _TIME_HELP)
@_tz
def campaigns_create(name, start, tz):
    """Register a campaign; prints its id.

    \b
    Example:
      counter campaigns create "Black Friday" --start +1m
      counter campaigns create "Next week" --start +7d
    """
    zone = _zone(tz)
    now = datetime.datetime.now(datetime.timezone.utc)
    start_time = _time(start, zone, now, "--start")
    try:
        name, start_time = campaign_rules.new_campaign(
            {"name": name, "start_time": start_time.isoformat()}, now)
    except stats_request.BadRequest as exc:
        raise click.UsageError(str(exc))
    row = _query(queries.create_campaign, uuid.uuid4(), name, start_time)
    click.echo(row[0])


@campaigns.command("list")
@click.option("--format", "fmt", type=click.Choice(["table", "json", "csv"]), default="table",
              show_default=True)
@_tz
def campaigns_list(fmt, tz):
    """All campaigns, by start time.

    \b
    Example:
      counter campaigns list --format json
    """
    zone = _zone(tz)
    rows = [(c, n, times.show(s, zone)) for c, n, s in _query(queries.list_campaigns)]
    click.echo(output.show(["id", "name", "start_time"], rows, fmt))


@campaigns.command("stats")
@click.argument("campaign_id")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table",
              show_default=True)
def campaigns_stats(campaign_id, fmt):
    """Unique impressions of a campaign: last hour, last day, total.

    \b
    Example:
      counter campaigns stats 0b6c3c9e-5f0e-4f43-9d0c-6a1f6d9b1f10
    """
    try:
        key = uuid.UUID(campaign_id)
    except ValueError:
        raise click.BadParameter(f"{campaign_id!r} is not a UUID", param_hint="CAMPAIGN_ID")
    if _query(queries.get_campaign, key) is None:
        raise click.ClickException(f"no campaign {campaign_id}")
    counts = _query(queries.campaign_stats, key)
    if fmt == "json":
        click.echo(json.dumps(campaign_rules.describe_stats(key, counts), indent=2))
    else:
        click.echo(output.table(["last_hour", "last_day", "total"], [counts]))
