"""A regular (non-editable) install serves: the wheel carries every package
of the layout and the migrations, found through package resources."""

import json
import os
import shutil
import subprocess
import sys

import pytest
from conftest import clicks_by_banner, wait_until

from counter.testing import clicker

pytestmark = pytest.mark.processes  # pip and the installed package run as processes


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The project built as a wheel and installed into a folder of its own
    (dependencies come from this environment); returns that folder."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    wheels = tmp_path_factory.mktemp("wheel")
    target = tmp_path_factory.mktemp("site")
    # built from a copy: setuptools writes build/ and *.egg-info into its source
    source = tmp_path_factory.mktemp("source") / "click-counter"
    shutil.copytree(root, source, ignore=shutil.ignore_patterns(
        ".venv", ".git", "build", "*.egg-info", "__pycache__"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(pip + ["wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(source)],
                   check=True, cwd=str(wheels), timeout=300)
    (wheel,) = wheels.glob("click_counter-*.whl")
    subprocess.run(pip + ["install", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, timeout=300)
    return target


def test_the_wheel_holds_every_package_and_the_migrations(installed):
    found = subprocess.run(
        [sys.executable, "-c", "import counter, cli; from counter.storage import schema;"
         "import json; print(json.dumps([counter.__file__, [n for _, n, _ in schema._migrations()]]))"],
        env=dict(os.environ, PYTHONPATH=str(installed)), cwd=str(installed.parent),
        capture_output=True, text=True, timeout=60, check=True)
    path, migrations = json.loads(found.stdout)
    assert path.startswith(str(installed)), path  # not the checkout
    assert migrations and migrations[0] == "clicks", migrations
    for package in ("web", "shm", "flush", "storage", "serving", "testing"):
        assert (installed / "counter" / package / "__init__.py").exists(), package


@pytest.mark.service
def test_a_regular_install_serves_and_stores_clicks(installed, make_database, service_factory):
    """`python -m cli serve` from the installed wheel (not the checkout):
    migrations applied on an empty database, clicks counted and flushed."""
    database_url = make_database(migrated=False)
    service = service_factory(database_url, workers=1, extra_env={"PYTHONPATH": str(installed)})
    with open(f"/proc/{service.master_pid}/environ", "rb") as f:  # the same import path as above
        assert f"PYTHONPATH={installed}".encode() in f.read().split(b"\0")
    tally = clicker.drive(service.url, 300, banners=3, connections=2, seconds=30)
    assert tally.statuses[200] == 300
    assert wait_until(lambda: sum(clicks_by_banner(database_url).values()) == 300, timeout=20)
