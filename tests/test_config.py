"""Settings are validated at start with a message that names the setting."""

import dataclasses
import pathlib

import pytest

from counter import config


def test_defaults_are_sane():
    s = config.load({})
    assert s.database_url is None and s.flush_interval == 1.0 and s.bind == "127.0.0.1:8000"
    assert str(s.shm_dir) == "/dev/shm/click-counter-8000"
    assert s.workers >= 1 and s.segment_slots == 16384


@pytest.mark.parametrize("env,fragment", [
    ({"FLUSH_INTERVAL": "soon"}, "FLUSH_INTERVAL"),
    ({"FLUSH_INTERVAL": "0"}, "FLUSH_INTERVAL"),
    ({"FLUSH_INTERVAL": "nan"}, "FLUSH_INTERVAL"),
    ({"WORKERS": "0"}, "WORKERS"),
    ({"WORKERS": "2.5"}, "WORKERS"),
    ({"BIND": "8000"}, "BIND"),
    ({"BIND": "127.0.0.1:99999"}, "BIND"),
    ({"DATABASE_URL": "mysql://x"}, "DATABASE_URL"),
    ({"LOG_LEVEL": "loud"}, "LOG_LEVEL"),
    ({"SEGMENT_SLOTS": "4"}, "SEGMENT_SLOTS"),
    ({"SHM_MAX_BYTES": "2000000", "SEGMENT_SLOTS": "1000000"}, "SHM_MAX_BYTES"),
    ({"SHM_MAX_BYTES": str(64 << 20), "WORKERS": "64"}, "too small for WORKERS=64"),
    ({"SERVER": "granian", "WORKERS": "48"}, "each of its 5 threads"),  # a segment per thread
    ({"DB_WAITERS_PER_WORKER": "0"}, "DB_WAITERS_PER_WORKER"),
    ({"DB_WAITERS_PER_WORKER": "many"}, "DB_WAITERS_PER_WORKER"),
    ({"DEDUP_TTL": "0"}, "DEDUP_TTL"),
    ({"USER_HASH_KEY": "xyz"}, "USER_HASH_KEY"),
    ({"USER_HASH_KEY": "abcd"}, "USER_HASH_KEY"),
])
def test_bad_settings_are_refused_by_name(env, fragment):
    with pytest.raises(config.ConfigError, match=fragment):
        config.load(env)


def test_every_settings_field_is_declared_once():
    fields = [s.field for s in config.SETTINGS]
    assert sorted(fields) == sorted(f.name for f in dataclasses.fields(config.Settings))
    assert len({s.env for s in config.SETTINGS}) == len(config.SETTINGS)


def test_every_written_default_is_accepted_when_given():
    """The defaults the README shows pass the checks an operator's value does."""
    for setting in config.SETTINGS:
        if isinstance(setting.default, str):
            assert config.load({setting.env: setting.default}) == config.load({}), setting.env


def test_the_readme_table_is_the_generated_one():
    """The README's configuration table is exactly `python -m counter.config
    --markdown`: the docs cannot drift from what load() accepts."""
    lines = (pathlib.Path(__file__).parent.parent / "README.md").read_text().splitlines()
    start = lines.index("## Configuration")
    start += next(i for i, line in enumerate(lines[start:]) if line.startswith("|"))
    end = next(i for i in range(start, len(lines) + 1) if i == len(lines) or not lines[i].startswith("|"))
    table = "\n".join(lines[start:end]) + "\n"
    assert table == config.markdown_table(), (
        "README.md's configuration table differs from the settings declared in "
        "counter/config.py; paste the output of `python -m counter.config --markdown`")
