"""The database password never shows: not in logs, error answers, /health,
/metrics, nor the command line's output -- with the database up or away."""

import json
import time

import pytest
from click.testing import CliRunner
from conftest import wait_until

from cli.main import main
from counter.testing import clicker

PASSWORD = "pw-s3cret-Zq81"


def with_password(url):
    # the embedded server trusts local connections, so any password is accepted
    return url.replace("postgresql://postgres@", f"postgresql://postgres:{PASSWORD}@")


@pytest.mark.service
def test_no_password_in_logs_answers_health_or_metrics(database_url, service_factory):
    up = service_factory(with_password(database_url), workers=1, extra_env={"LOG_LEVEL": "debug"})
    # a URL libpq cannot parse: its error message quotes the whole URL, password and all
    away = service_factory(f"postgresql://postgres:{PASSWORD}@[::1/nowhere", workers=1,
                           extra_env={"LOG_LEVEL": "debug"})
    seen = []
    for service in (up, away):
        clicker.drive(service.url, 200, banners=5, connections=2, seconds=30)
        for path in ("/health", "/metrics", "/openapi.json", "/stats/1?from=2024-01-01&to=2024-01-02",
                     "/stats/x", "/nope", f"/api/v1/campaigns/{'0' * 8}-0000-0000-0000-{'0' * 12}"):
            seen.append(service.get(path)[1])
        seen.append(service.post("/api/v1/impressions", {"campaign_id": "3f1a1d5e-0000-4000-8000-000000000000",
                                                         "user_id": "u", "ad_id": "a"})[1])
    # the unreachable one has logged its flush failures by now
    assert wait_until(lambda: "flush failed" in away.log(), timeout=20)
    health = json.loads(away.get("/health")[1])
    assert health["database"]["reachable"] is False and health["database"]["error"]
    time.sleep(0.5)
    for text in [b.decode(errors="replace") for b in seen] + [up.log(), away.log()]:
        assert PASSWORD not in text


def test_no_password_in_command_line_output(database_url):
    runner = CliRunner()
    for args in (["db", "status"], ["stats", "1", "--from", "-1h"], ["top", "--from", "-1h"]):
        ok = runner.invoke(main, args, env={"DATABASE_URL": with_password(database_url)})
        assert ok.exit_code == 0 and PASSWORD not in ok.output, ok.output
        failed = runner.invoke(main, args, env={"DATABASE_URL": f"postgresql://u:{PASSWORD}@127.0.0.1:1/x"})
        assert failed.exit_code == 1 and PASSWORD not in failed.output
    bad = runner.invoke(main, ["db", "migrate"], env={"DATABASE_URL": f"postgresql://u:{PASSWORD}@[::1"})
    assert bad.exit_code != 0 and PASSWORD not in bad.output
