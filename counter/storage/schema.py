"""The schema: migrations found through package resources, applied under an advisory lock."""

import importlib.resources
import re

# Any fixed number; every node takes this advisory lock while migrating.
_MIGRATION_LOCK = 0x636C6B73  # "clks"


def _migrations():
    folder = importlib.resources.files("counter.storage") / "migrations"
    found = []
    for item in folder.iterdir():
        match = re.match(r"^(\d{4})_(\w+)\.sql$", item.name)
        if match:
            found.append((int(match[1]), match[2], item.read_text()))
    return sorted(found)


def migrate(conn) -> list:
    """Apply the migrations this database lacks; return the names applied.

    One transaction under an advisory lock, so several nodes may run it at
    once: the first applies, the others wait and then find nothing to do.
    """
    applied = []
    with conn, conn.cursor() as cur:
        cur.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
        cur.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version int PRIMARY KEY, name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        cur.execute("SELECT version FROM schema_migrations")
        done = {row[0] for row in cur.fetchall()}
        for version, name, sql in _migrations():
            if version not in done:
                cur.execute(sql)
                cur.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES (%s, %s)",
                    (version, name),
                )
                applied.append(f"{version:04d}_{name}")
    return applied


def migration_status(conn) -> list:
    """[(version, name, applied_at or None)] for every known migration."""
    with conn, conn.cursor() as cur:
        cur.execute("SELECT to_regclass('schema_migrations') IS NOT NULL")
        rows = {}
        if cur.fetchone()[0]:
            cur.execute("SELECT version, applied_at FROM schema_migrations")
            rows = dict(cur.fetchall())
    return [(v, n, rows.get(v)) for v, n, _ in _migrations()]
