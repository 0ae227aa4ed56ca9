"""`berth kb add|list|rm` against a live server (the session's, whose knowledge base is tests/data/knowledge)."""
from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT


def kb(live_server, *args: str, token: str = "test-token") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "server.cli", "kb", *args, "--url", live_server.url,
                           "--token", token], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_add_list_remove_from_the_shell(live_server, tmp_path):
    good = tmp_path / "falcons.md"
    good.write_text("Peregrine falcons dive at more than 300 km/h.")
    bad = tmp_path / "blob.exe"
    bad.write_bytes(b"MZ\x00\x01")
    added = kb(live_server, "add", str(good), str(bad))
    assert added.returncode == 1                                  # one file failed: exit 1, the other indexed
    assert "added falcons.md" in added.stdout and "failed blob.exe" in added.stderr
    listed = kb(live_server, "list")
    assert listed.returncode == 0 and "falcons.md" in listed.stdout and "mnn.md" in listed.stdout
    assert kb(live_server, "rm", "falcons.md").returncode == 0
    assert "falcons.md" not in kb(live_server, "list").stdout
    gone = kb(live_server, "rm", "falcons.md")
    assert gone.returncode == 1 and "404" in gone.stderr
    denied = kb(live_server, "list", token="wrong")
    assert denied.returncode == 1 and "401" in denied.stderr
