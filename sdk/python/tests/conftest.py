"""Fixtures: one real Tartarus server for the whole session, started from the built binaries.

The binaries come from ``TARTARUS_BIN_DIR``, else ``../../target/x86_64-unknown-linux-gnu/debug`` relative to
``sdk/python`` (what ``cargo test --workspace`` builds). The server listens on 127.0.0.1 port 0 with a fresh
data directory (mode 0711, so the sandbox user can reach its sockets); the tests get a user key of tenant
``sdk-a``, one of ``sdk-b`` and the admin key. At the end every sandbox is killed and the server stopped.
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

import tartarus

SDK_DIR = Path(__file__).resolve().parent.parent
REPO_DIR = SDK_DIR.parent.parent
DEFAULT_BIN_DIR = SDK_DIR / "../../target/x86_64-unknown-linux-gnu/debug"


@dataclass
class Server:
    host: str
    admin_key: str
    user_key: str
    other_key: str
    data_dir: Path
    bin_dir: Path

    def client(self, key: str = "") -> tartarus.Client:
        return tartarus.Client(self.host, key or self.user_key)


def _bin_dir() -> Path:
    d = Path(os.environ.get("TARTARUS_BIN_DIR") or DEFAULT_BIN_DIR).resolve()
    if not (d / "tartarus-control").is_file():
        pytest.exit(
            f"no tartarus-control in {d}: build it (cargo test --workspace) or set TARTARUS_BIN_DIR",
            returncode=2,
        )
    return d


def _key(bin_dir: Path, data: Path, tenant: str) -> str:
    out = subprocess.run(
        [str(bin_dir / "tartarus-control"), "apikey", "create", "--data-dir", str(data),
         "--tenant", tenant, "--role", "user"],
        check=True, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    return out.stdout.strip().splitlines()[0].strip()


@pytest.fixture(scope="session")
def server() -> Iterator[Server]:
    bin_dir = _bin_dir()
    work = Path(tempfile.mkdtemp(prefix="tartarus-sdk-"))
    os.chmod(work, 0o711)
    data = work / "data"
    log = open(work / "server.log", "wb")
    proc = subprocess.Popen(
        [str(bin_dir / "tartarus-control"), "server", "--listen", "127.0.0.1:0", "--data-dir", str(data)],
        stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert proc.stdout is not None
    addr = None
    deadline = time.monotonic() + 60
    buf = b""
    while addr is None and time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        ready, _, _ = select.select([proc.stdout], [], [], 0.5)
        if ready:
            chunk = os.read(proc.stdout.fileno(), 4096)
            if not chunk:
                break
            buf += chunk
            for line in buf.decode(errors="replace").splitlines():
                if line.startswith("listening on "):
                    addr = line.split()[2]
    if addr is None:
        proc.kill()
        proc.wait()
        log.close()
        tail = (work / "server.log").read_text(errors="replace")[-4000:]
        pytest.exit(f"the server did not start (stdout {buf!r}); log:\n{tail}", returncode=2)

    # Keep reading stdout so that a chatty server never blocks on a full pipe.
    threading.Thread(target=lambda: [None for _ in iter(lambda: os.read(proc.stdout.fileno(), 65536), b"")],
                     daemon=True).start()  # fmt: skip
    srv = Server(
        host=f"http://{addr}",
        admin_key=(data / "admin.key").read_text().strip(),
        user_key=_key(bin_dir, data, "sdk-a"),
        other_key=_key(bin_dir, data, "sdk-b"),
        data_dir=data,
        bin_dir=bin_dir,
    )
    old_env = {k: os.environ.get(k) for k in ("TARTARUS_HOST", "TARTARUS_API_KEY")}
    os.environ["TARTARUS_HOST"] = srv.host
    os.environ["TARTARUS_API_KEY"] = srv.user_key
    try:
        yield srv
    finally:
        for k, v in old_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        leftover = []
        try:
            with tartarus.Client(srv.host, srv.admin_key) as admin:
                for sb in admin.list_sandboxes():
                    if not sb.has_ended:
                        leftover.append(sb.id)
                    try:
                        admin.request("DELETE", f"/v1/sandboxes/{sb.id}")
                    except tartarus.NotFoundError:
                        pass
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log.close()
            if leftover:
                print(f"\nkilled sandboxes the tests left running: {leftover}")
            text = (work / "server.log").read_text(errors="replace")
            if "panicked" in text:
                print("\nthe server panicked; its log is kept in", work)
            else:
                shutil.rmtree(work, ignore_errors=True)


@pytest.fixture
def client(server: Server) -> Iterator[tartarus.Client]:
    with server.client() as c:
        yield c


@pytest.fixture
def sandbox(client: tartarus.Client) -> Iterator[tartarus.Sandbox]:
    with tartarus.Sandbox.create(timeout=300, labels={"test": "sdk"}, client=client) as sb:
        yield sb
