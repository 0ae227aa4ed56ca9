"""`berth deploy` tests: the CLI in a subprocess, services in a private BERTH_SERVICES_DIR (the model
cache, $BERTH_CACHE, stays the real one: the default model is there), every process stopped after."""
from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from tests.conftest import ROOT


def run_berth(services: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, BERTH_SERVICES_DIR=str(services))
    return subprocess.run([sys.executable, "-m", "server.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def processes_with(marker: str) -> list[psutil.Process]:
    """Live processes whose command line holds marker (a config's unique path) or whose $BERTH_TOKEN is
    marker (replicas get their token from the environment, never from argv)."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        with contextlib.suppress(psutil.Error):
            if proc.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            if marker in " ".join(proc.info["cmdline"] or ()) or proc.environ().get("BERTH_TOKEN") == marker:
                found.append(proc)
    return found


class Service:
    """One `berth deploy`ed service: its printed endpoint and token, its state, `berth stop`."""

    def __init__(self, services: Path, config: dict, tmp_path: Path, timeout: float = 300):
        self.services, self.name = services, config["name"]
        path = tmp_path / f"{self.name}.json"
        path.write_text(json.dumps(config))
        self.deploy = run_berth(services, "deploy", str(path), timeout=timeout)
        state = self.state()
        self.pids = state["pids"] if state else []
        assert self.deploy.returncode == 0, self.deploy.stderr[-3000:]
        self.endpoint = re.search(r"endpoint:\s+(\S+)", self.deploy.stdout).group(1)
        self.token = re.search(r"token:\s+(\S+)", self.deploy.stdout).group(1)

    def state(self) -> dict | None:
        try:
            return json.loads((self.services / self.name / "service.json").read_text())
        except OSError:
            return None

    def log(self, index: int) -> str:
        return (self.services / self.name / f"replica-{index}.log").read_text()

    def access_ids(self, index: int) -> set[str]:
        """Request ids of replica index's access-log lines (berth.access JSON)."""
        ids = set()
        for line in self.log(index).splitlines():
            if "berth.access: {" in line:
                ids.add(json.loads(line.split("berth.access: ", 1)[1])["request_id"])
        return ids

    def stop(self) -> subprocess.CompletedProcess:
        return run_berth(self.services, "stop", self.name, timeout=120)

    def cleanup(self) -> None:
        """Whatever a failed test left: berth stop, then SIGKILL any process group still there."""
        if self.state() is not None:
            with contextlib.suppress(Exception):
                self.stop()
        for pid in self.pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)


@pytest.fixture
def services_dir(tmp_path) -> Path:
    return tmp_path / "services"


@pytest.fixture
def berth(services_dir):
    return lambda *args, **kw: run_berth(services_dir, *args, **kw)
