"""Apply a unified diff (git or GNU diff format, paths a/... b/...) to a
source tree, strictly: every hunk must match its context exactly, at its line
number plus the drift of the hunks before it, or nothing is written.

usage: python apply_patch.py PATCH DIRECTORY

deploy/install.sh uses this instead of patch(1) or git, neither of which a
slim Debian image has; Python is there because the virtualenv is.
"""

import pathlib
import re
import sys

HUNK = re.compile(r"@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@")


def parse(text):
    """[(path, [(old_start, old_lines, new_lines), ...]), ...]"""
    files, lines, i = [], text.splitlines(keepends=True), 0
    while i < len(lines):
        if lines[i].startswith("--- ") and i + 1 < len(lines) and lines[i + 1].startswith("+++ "):
            path = lines[i + 1][4:].split("\t")[0].strip()
            if not path.startswith("b/"):
                raise SystemExit(f"expected a b/ path, got {path!r}")
            files.append((path[2:], []))
            i += 2
            continue
        match = HUNK.match(lines[i])
        if match:
            if not files:
                raise SystemExit("a hunk before any file header")
            old_count = int(match.group(2) or 1)
            new_count = int(match.group(4) or 1)
            old, new = [], []
            i += 1
            while len(old) < old_count or len(new) < new_count:
                line = lines[i]
                tag, body = line[:1], line[1:]
                if tag in (" ", "\n"):  # an empty context line may lose its space
                    body = body if tag == " " else "\n"
                    old.append(body)
                    new.append(body)
                elif tag == "-":
                    old.append(body)
                elif tag == "+":
                    new.append(body)
                elif tag != "\\":  # "\ No newline at end of file"
                    raise SystemExit(f"bad line in hunk: {line!r}")
                i += 1
            files[-1][1].append((int(match.group(1)), old, new))
            continue
        i += 1  # the header comment, "diff --git", "index ..."
    return files


def apply(directory, files):
    results = {}
    for path, hunks in files:
        target = directory / path
        lines = target.read_text().splitlines(keepends=True)
        drift = 0
        for old_start, old, new in hunks:
            at = old_start - 1 + drift
            if lines[at:at + len(old)] != old:
                raise SystemExit(f"{path}: hunk at line {old_start} does not match; "
                                 "is this the right source, or is it patched already?")
            lines[at:at + len(old)] = new
            drift += len(new) - len(old)
        results[target] = "".join(lines)
    for target, text in results.items():  # all hunks matched: now write
        target.write_text(text)
    return sorted(str(t.relative_to(directory)) for t in results)


def main():
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    patch, directory = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
    changed = apply(directory, parse(patch.read_text()))
    print(f"patched {len(changed)} files in {directory}: {', '.join(changed)}")


if __name__ == "__main__":
    main()
