"""docs/architecture.md tells the truth about where each invariant lives."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "architecture.md"


def invariant_rows():
    """{number: [backticked names of its "where" cell]} of the doc's table."""
    rows = {}
    for line in DOC.read_text().splitlines():
        match = re.match(r"^\| (\d+) \| [^|]+ \| (.+) \|$", line)
        if match:
            rows[int(match[1])] = re.findall(r"`([^`]+)`", match[2])
    return rows


def defined_names(source: str) -> set:
    names = set(re.findall(r"^\s*(?:def|class) (\w+)", source, re.M))
    names |= set(re.findall(r"^\s*(\w+) = ", source, re.M))
    return names


def test_every_design_invariant_has_a_row():
    design = (ROOT.parent / "shared" / "DESIGN.md")
    count = 13
    if design.exists():  # the design document sits beside the checkout here, not in CI's clone
        count = len(re.findall(r"^\d+\. \*\*", design.read_text().split("## Invariants")[1].split("##")[0], re.M))
    assert sorted(invariant_rows()) == list(range(1, count + 1))


def test_each_row_names_files_and_functions_that_exist_and_state_the_invariant():
    for number, names in invariant_rows().items():
        files, current = [], None
        for name in names:
            if name.endswith(".py"):
                current = ROOT / "counter" / name
                assert current.exists(), (number, name)
                files.append(current)
            elif current is not None:  # a function or Class.method of the last file named
                assert name.split(".")[-1] in defined_names(current.read_text()), (number, name, current)
            else:  # config.bytes_per_worker and the like: module.function
                module, _, function = name.partition(".")
                source = (ROOT / "counter" / f"{module}.py").read_text()
                assert function in defined_names(source), (number, name)
        assert files, number
        assert any(re.search(rf"\binvariants? {number}\b", f.read_text(), re.I) for f in files), \
            f"no file of row {number} states 'invariant {number}': {[str(f) for f in files]}"
