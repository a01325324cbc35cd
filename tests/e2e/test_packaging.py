"""Packaging for running swarm as a service. This machine has the docker CLI but no daemon and cannot
pull a base image, so the images are not built here; what can be tested is: the systemd units pass
``systemd-analyze verify`` (and a broken one does not), the compose file has the three services wired
to health checks and env files, both Dockerfiles install through deploy/install-image.sh, and that
script, run as the CPU image runs it, gives a venv where swarm imports and ``swarm --help`` runs."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
UNITS = ROOT / "deploy" / "systemd"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze") or "/usr/bin/systemd-analyze"


def _verify(unit_dir: Path, names: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([SYSTEMD_ANALYZE, "verify", *(str(unit_dir / n) for n in names)],
                          capture_output=True, text=True, timeout=120)


def _units_here(tmp_path: Path) -> Path:
    """The units with ExecStart pointing at this checkout's swarm (verify checks the binary exists);
    nothing else changes."""
    swarm = Path(sys.executable).parent / "swarm"
    assert swarm.is_file(), swarm
    for unit in UNITS.glob("*.service"):
        text = unit.read_text().replace("/opt/swarm/venv/bin/swarm", str(swarm))
        (tmp_path / unit.name).write_text(text)
    shutil.copy(tmp_path / "swarm-join@.service", tmp_path / "swarm-join@myrun.service")
    return tmp_path


@pytest.mark.skipif(not Path(SYSTEMD_ANALYZE).exists(), reason="systemd-analyze is not installed")
def test_the_systemd_units_verify_and_restart_on_failure(tmp_path: Path):
    units = _units_here(tmp_path)
    checked = _verify(units, ["swarm-bootstrap.service", "swarm-join@myrun.service"])
    assert checked.returncode == 0 and checked.stderr.strip() == "", checked.stderr
    for name in ("swarm-bootstrap.service", "swarm-join@.service"):
        text = (UNITS / name).read_text()
        assert re.search(r"^Restart=on-failure$", text, re.M), name
        assert re.search(r"^EnvironmentFile=/etc/swarm/\S+\.env$", text, re.M), name
        assert re.search(r"^KillSignal=SIGTERM$", text, re.M), name
    assert "--run %i" in (UNITS / "swarm-join@.service").read_text()
    broken = units / "swarm-broken.service"
    broken.write_text((units / "swarm-bootstrap.service").read_text().replace("Type=simple", "Type=sometimes"))
    refused = _verify(units, ["swarm-broken.service"])
    assert "sometimes" in refused.stderr  # the check can fail


def test_the_compose_file_runs_bootstrap_peer_and_api_with_health_checks():
    compose = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"bootstrap", "peer", "serve-api"}
    commands = {name: s["command"][0] for name, s in services.items()}
    assert commands == {"bootstrap": "bootstrap", "peer": "join", "serve-api": "serve-api"}
    for name, service in services.items():
        assert service["restart"] == "on-failure" and service["stop_signal"] == "SIGTERM", name
        assert service["build"]["dockerfile"] == "Dockerfile", name
        env_file = ROOT / "deploy" / f"{service['env_file']}.example"
        assert env_file.is_file(), env_file
        probe = " ".join(service["healthcheck"]["test"])
        assert re.search(r"http://127\.0\.0\.1:\d+/(health|ready)", probe), (name, probe)
    assert services["peer"]["depends_on"] == {"bootstrap": {"condition": "service_healthy"}}
    assert services["serve-api"]["depends_on"] == {"peer": {"condition": "service_healthy"}}
    assert "SWARM_ADMIN_PASSWORD" in (ROOT / "deploy" / "bootstrap.env.example").read_text()
    assert "SWARM_KEY" in (ROOT / "deploy" / "swarm.env.example").read_text()


@pytest.mark.parametrize("dockerfile, base, mode", [("Dockerfile", "python:3.11-slim", "cpu"),
                                                    ("Dockerfile.cuda", "pytorch/pytorch:", "system")])
def test_the_dockerfiles_install_through_the_shared_script(dockerfile: str, base: str, mode: str):
    text = (ROOT / dockerfile).read_text()
    assert re.search(rf"^FROM {re.escape(base)}", text, re.M)
    assert re.search(rf"^RUN deploy/install-image.sh /opt/swarm/venv {mode}\b", text, re.M)
    copied = set(re.findall(r"^COPY (\S+) ", text, re.M))
    packages = {p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file() and p.name != "tests"}
    assert packages <= copied, packages - copied  # every package of the layers is in the image
    assert {"deploy/install-image.sh", "scripts/install-torch.sh", "pyproject.toml"} <= copied
    assert "scripts/install-torch.sh" in (ROOT / "scripts" / "install.sh").read_text()  # one torch step for both


@pytest.mark.slow
def test_the_image_install_runs_as_a_script(tmp_path: Path):
    """What the CPU image's build does, outside Docker: only what its COPY lines bring, then its RUN
    line's script (so a file missing from the image fails here too, and the checkout is not touched)."""
    image = tmp_path / "image"
    for line in re.findall(r"^COPY (.+)$", (ROOT / "Dockerfile").read_text(), re.M):
        *sources, target = line.split()
        for source in sources:
            destination = image / (source if target.endswith("/") else target)
            destination.parent.mkdir(parents=True, exist_ok=True)
            if (ROOT / source).is_dir():
                shutil.copytree(ROOT / source, destination, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy2(ROOT / source, destination)
    venv = tmp_path / "venv"
    env = {**os.environ, "PYTHON": shutil.which("python3.11") or "python3"}  # the image's Python: 3.11
    done = subprocess.run([str(image / "deploy" / "install-image.sh"), str(venv), "cpu"], capture_output=True,
                          text=True, timeout=280, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "swarm installed; torch" in done.stdout
    version = subprocess.run([str(venv / "bin" / "swarm"), "keys", "create", "--help"], capture_output=True,
                             text=True, timeout=60)
    assert version.returncode == 0 and "--scope" in version.stdout
    wrong = subprocess.run([str(image / "deploy" / "install-image.sh"), str(tmp_path / "v2"), "gpu"],
                           capture_output=True, text=True, timeout=60, env=env)
    assert wrong.returncode == 2 and "must be cpu or system" in wrong.stderr
