"""Store fixtures: every store test runs on SQLite (a file in tmp_path) and on a real PostgreSQL.

PostgreSQL: one private server per session, `initdb` into a temporary folder and `pg_ctl start` on a free
port, listening on 127.0.0.1 only, trust auth, its socket in that folder; each test gets a fresh database.
PostgreSQL refuses to run as root, so as root the server runs as the `postgres` system user (runuser) in
a folder chowned to it. Without the binaries (Debian: apt-get install postgresql) the PostgreSQL half skips.
"""
from __future__ import annotations

import glob
import itertools
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest

from server.knowledge import KnowledgeBase

BACKENDS = ["sqlite", "postgres"]


def find_postgres_bin() -> Path | None:
    """The folder with initdb and pg_ctl: from PATH, else Debian's /usr/lib/postgresql/<newest>/bin."""
    on_path = shutil.which("initdb")
    debian = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: [int(s) for s in re.findall(r"\d+", p)])
    for folder in ([Path(on_path).resolve().parent] if on_path else []) + [Path(p) for p in reversed(debian)]:
        if (folder / "initdb").exists() and (folder / "pg_ctl").exists():
            return folder
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_as(user_prefix: list[str], *args) -> subprocess.CompletedProcess:
    return subprocess.run([*user_prefix, *map(str, args)], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="session")
def postgres_server():
    """The base URL (no database) of a private PostgreSQL server for this session."""
    bindir = find_postgres_bin()
    if bindir is None:
        pytest.skip("PostgreSQL binaries not found (Debian: apt-get install postgresql)")
    tmp = Path(tempfile.mkdtemp(prefix="berth-pg-"))   # not under /tmp/pytest-of-root: that is root-only (0700)
    prefix: list[str] = []
    if os.geteuid() == 0:
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no 'postgres' user to run PostgreSQL as")
        os.chown(tmp, user.pw_uid, user.pw_gid)
        prefix = ["runuser", "-u", "postgres", "--"]
    data, port = tmp / "data", _free_port()
    init = _run_as(prefix, bindir / "initdb", "-D", data, "-A", "trust", "-U", "postgres", "-E", "UTF8",
                   "--no-locale", "--no-sync")
    assert init.returncode == 0, init.stdout + init.stderr
    options = f"-p {port} -k {tmp} -c listen_addresses=127.0.0.1 -c fsync=off -c full_page_writes=off"
    start = _run_as(prefix, bindir / "pg_ctl", "-D", data, "-l", tmp / "log", "-w", "-t", "60", "-o", options, "start")
    log = (tmp / "log").read_text(errors="replace") if (tmp / "log").exists() else ""
    assert start.returncode == 0, start.stdout + start.stderr + log[-2000:]
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}"
    finally:
        _run_as(prefix, bindir / "pg_ctl", "-D", data, "-m", "immediate", "stop")
        shutil.rmtree(tmp, ignore_errors=True)


_db_numbers = itertools.count()


@pytest.fixture
def postgres_url(postgres_server) -> str:
    """A fresh, empty database on the session's server."""
    import psycopg

    name = f"kb_{os.getpid()}_{next(_db_numbers)}"
    with psycopg.connect(f"{postgres_server}/postgres", autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return f"{postgres_server}/{name}"


@pytest.fixture(params=BACKENDS)
def kb_url(request, tmp_path) -> str:
    """The store URL KnowledgeBase.open gets: a SQLite file path, or a PostgreSQL database URL."""
    if request.param == "sqlite":
        return str(tmp_path / "kb.sqlite3")
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def open_kb(kb_url, tmp_path):
    """Opens KnowledgeBases on this test's store (several = restarts or replicas); closes them all after."""
    opened: list[KnowledgeBase] = []

    def open_(**kw) -> KnowledgeBase:
        kb = KnowledgeBase.open(kb_url, tmp_path, **kw)
        opened.append(kb)
        return kb

    yield open_
    for kb in opened:
        kb.close()
