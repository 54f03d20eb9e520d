"""Writing rows as CSV, NDJSON or JSON, to a stream or to a file that appears
whole or not at all; small results as a table, JSON or CSV."""

import contextlib
import csv
import io
import json
import os
import sys
import tempfile

from counter import times

FIELDS = ("banner_id", "ts", "clicks")


def write_rows(rows, fmt, out, tz, on_row=None):
    """Stream (banner_id, ts, clicks) rows to `out`; return how many."""
    count = 0
    if fmt == "csv":
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(FIELDS)
    elif fmt == "json":
        out.write("[")
    for banner_id, ts, clicks in rows:
        if fmt == "csv":
            writer.writerow((banner_id, times.show(ts, tz), clicks))
        else:
            line = json.dumps({"banner_id": banner_id, "ts": times.show(ts, tz), "clicks": clicks})
            if fmt == "json":
                out.write(",\n" if count else "\n")
                out.write(line)
            else:
                out.write(line + "\n")
        count += 1
        if on_row is not None:
            on_row()
    if fmt == "json":
        out.write("\n]\n" if count else "]\n")
    return count


@contextlib.contextmanager
def destination(path):
    """stdout for None or '-'; otherwise a temporary file beside `path` that is
    renamed into place only when the block succeeds."""
    if path in (None, "-"):
        yield sys.stdout
        sys.stdout.flush()
        return
    folder = os.path.dirname(os.path.abspath(path))
    fd, temporary = tempfile.mkstemp(prefix=".counter-export-", dir=folder)
    try:
        with os.fdopen(fd, "w", newline="") as out:
            yield out
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


def table(headers, rows):
    """A plain aligned text table."""
    cells = [list(map(str, headers))] + [list(map(str, r)) for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = []
    for n, row in enumerate(cells):
        lines.append("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def show(headers, rows, fmt):
    """A small result as text: an aligned table, a JSON list of objects, or CSV."""
    if fmt == "json":
        return json.dumps([dict(zip(headers, row)) for row in rows], indent=2)
    if fmt == "csv":
        text = io.StringIO()
        writer = csv.writer(text, lineterminator="\n")
        writer.writerow(headers)
        writer.writerows(rows)
        return text.getvalue().rstrip("\n")
    return table(headers, rows)
