"""One log format for every process of the service: the gunicorn master and
workers, the flusher, the granian supervisor, granian and its workers.

    2026-12-02 10:00:00 +0000 [4242] [flusher] [INFO] counter.flusher: flusher started ...

Each line names its process (pid and role). LOG_FORMAT=json writes one JSON
object per line instead (python-json-logger), for log shippers. gunicorn gets
the same configuration through `logconfig_dict`, granian through
`--log-config` (a file written by `write_config`), so their own lines look
like ours.
"""

import json
import logging
import logging.config
import os
import tempfile

TEXT = "%(asctime)s [%(process)d] [%(role)s] [%(levelname)s] %(name)s: %(message)s"
DATE = "%Y-%m-%d %H:%M:%S %z"
JSON_FIELDS = "%(asctime)s %(process)d %(role)s %(levelname)s %(name)s %(message)s"

_role = None  # this process's role, once named
_named_pid = None  # ... in this process: a forked child has not named itself yet


def set_role(role: str):
    """Name this process in every later log line (master, worker, flusher, ...)."""
    global _role, _named_pid
    _role, _named_pid = role, os.getpid()


class RoleFilter(logging.Filter):
    """Adds `role` to every record: this process's, once named, else the
    configuration's default."""

    def __init__(self, role=None):
        super().__init__()
        self.role = role or "counter"

    def filter(self, record):
        if _role is None:
            record.role = self.role
        elif _named_pid == os.getpid():
            record.role = _role
        else:
            record.role = f"{_role} child"
        return True


def dict_config(level: str, fmt: str = "text", role=None) -> dict:
    """A logging.config dictionary: everything to stderr in one format.
    `role` names the lines of a process that does not name itself."""
    level = level.upper()
    if fmt == "json":
        formatter = {"()": "pythonjsonlogger.json.JsonFormatter", "fmt": JSON_FIELDS,
                     "datefmt": DATE, "rename_fields": {"asctime": "time", "levelname": "level",
                                                        "name": "logger"}}
    else:
        formatter = {"format": TEXT, "datefmt": DATE}
    # the servers' own loggers pass their lines to ours
    passed_on = {"level": level, "handlers": [], "propagate": True}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"role": {"()": "counter.logs.RoleFilter", "role": role}},
        "formatters": {"generic": formatter},
        "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "generic",
                                 "filters": ["role"], "stream": "ext://sys.stderr"}},
        "root": {"level": level, "handlers": ["console"]},
        "loggers": {name: dict(passed_on) for name in
                    ("gunicorn.error", "gunicorn.access", "_granian", "granian.access")},
    }


def setup(level: str, fmt: str = "text", role: str = "counter"):
    """Configure this process's logging and name it."""
    set_role(role)
    logging.config.dictConfig(dict_config(level, fmt))


def write_config(level: str, fmt: str, role: str) -> str:
    """The configuration as a JSON file (granian's --log-config); returns its path.
    The caller removes it."""
    fd, path = tempfile.mkstemp(prefix="click-counter-log-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(dict_config(level, fmt, role), f)
    return path
