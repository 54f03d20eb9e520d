"""The deploy files cannot run here (no Docker engine, no systemd as PID 1),
so they are validated: compose parses, nginx accepts its config, systemd
accepts the units, and every path and command they name exists."""

import os
import re
import shutil
import subprocess

import pytest
from conftest import ROOT

DEPLOY = ROOT / "deploy"


def _tool(name, package):
    path = shutil.which(name) or f"/usr/sbin/{name}"
    assert os.path.exists(path), f"{name} is needed: apt-get install {package}"
    return path


@pytest.mark.processes
def test_compose_file_parses_with_every_profile():
    compose = _tool("docker-compose", "docker-compose")
    for extra in ([], ["--profile", "monitoring"]):
        done = subprocess.run([compose, "-f", str(DEPLOY / "docker-compose.yml"), *extra, "config"],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
    services = subprocess.run([compose, "-f", str(DEPLOY / "docker-compose.yml"), "--profile", "monitoring",
                               "config", "--services"], capture_output=True, text=True, timeout=60).stdout.split()
    assert set(services) == {"postgres", "migrate", "counter", "prometheus", "grafana"}
    text = (DEPLOY / "docker-compose.yml").read_text()
    for mounted in re.findall(r"- \./([\w./-]+):", text):
        assert (DEPLOY / mounted).exists(), mounted


def test_dockerfile_copies_what_exists_and_runs_a_real_command():
    text = (DEPLOY / "Dockerfile").read_text()
    for source in re.findall(r"^COPY (?!--from)(\S+)", text, re.M):
        assert (ROOT / source).exists(), source
    assert 'CMD ["counter", "serve"]' in text and "USER counter" in text
    assert "counter = cli.main:main" in (ROOT / "setup.py").read_text()
    assert "INSTALL_MODE" in (DEPLOY / "install.sh").read_text()
    # everything install.sh reads from deploy/ is in the image (e.g. the meinheld patch)
    copied = [dest.removeprefix("./").rstrip("/") for dest in re.findall(r"^COPY (?!--from)\S+ (\S+)", text, re.M)]
    for needed in set(re.findall(r"(deploy/[\w./-]+)", (DEPLOY / "install.sh").read_text())):
        assert any(dest and needed.startswith(dest) for dest in copied), needed


@pytest.mark.processes
def test_nginx_accepts_the_upstream_config(tmp_path):
    nginx = _tool("nginx", "nginx-light")
    (tmp_path / "nginx.conf").write_text(
        f"pid {tmp_path}/nginx.pid;\nerror_log {tmp_path}/error.log;\nevents {{}}\n"
        f"http {{ include {DEPLOY}/nginx/click-counter.conf; }}\n")
    done = subprocess.run([nginx, "-t", "-c", str(tmp_path / "nginx.conf")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@pytest.mark.processes
@pytest.mark.parametrize("unit", ["click-counter.service", "click-counter-flusher.service"])
def test_systemd_accepts_the_units_and_their_commands_exist(unit, tmp_path):
    analyze = _tool("systemd-analyze", "systemd")
    # the units name the install location; point them at this checkout to check the commands
    text = (DEPLOY / "systemd" / unit).read_text().replace("/opt/click-counter", str(ROOT))
    (tmp_path / unit).write_text(text)
    done = subprocess.run([analyze, "verify", str(tmp_path / unit)], capture_output=True, text=True)
    assert done.returncode == 0 and "not executable" not in done.stderr, done.stderr
    for command in re.findall(r"^Exec\w+=(\S+)", text, re.M):
        assert os.access(command, os.X_OK), command


def test_grafana_dashboard_uses_only_metrics_the_service_exposes(tmp_path):
    import json

    from counter.web import metrics

    dashboard = json.loads((DEPLOY / "grafana/click-counter.json").read_text())
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p["targets"])
    used = set(re.findall(r"click_counter_\w+", exprs))
    # what /metrics answers (names per event kind are made from the registry)
    _, body = metrics.exposition(tmp_path)
    exposed = set(re.findall(r"click_counter_\w+", body.decode()))  # samples and # TYPE lines
    assert used and used <= exposed, used - exposed
