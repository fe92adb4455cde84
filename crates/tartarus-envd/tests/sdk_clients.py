"""The E2B Python SDK's own clients (Commands, Pty, Filesystem on its generated Connect stubs) against
tartarus-envd on the host.

Run (the venv has e2b==2.45.1):
    cargo build -p tartarus-envd --example envd
    /opt/e2b/venv/bin/python crates/tartarus-envd/tests/sdk_clients.py [PATH_TO_DAEMON]

PATH_TO_DAEMON defaults to the `envd` example in $CARGO_TARGET_DIR (or ./target); `tartarus` (the
binary) works too, in which case `envd --listen` is passed. The daemon runs with HOME (and cwd) a
temporary directory; the checks mirror the SDK's integration tests in
tests/sync/sandbox_sync/{commands,files,pty}, with /home/user replaced by that directory and the
owner by the current user. Exits non-zero on the first failure.
"""

import gzip
import io
import os
import pwd
import grp
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid

from packaging.version import Version

from e2b.api.client_sync import get_envd_api
from e2b.connection_config import ConnectionConfig
from e2b import CommandExitException
from e2b.exceptions import (
    FileNotFoundException,
    NotFoundException,
    SandboxException,
    InvalidArgumentException,
    TimeoutException,
)
from e2b.sandbox.commands.command_handle import PtySize
from e2b.sandbox.filesystem.filesystem import FileType, WriteEntry
from e2b.sandbox.filesystem.watch_handle import FilesystemEventType
from e2b.sandbox_sync.commands.command import Commands
from e2b.sandbox_sync.commands.pty import Pty
from e2b.sandbox_sync.filesystem.filesystem import Filesystem

ENVD_VERSION = Version("0.6.4")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def daemon_path():
    if len(sys.argv) > 1:
        return sys.argv[1]
    target = os.environ.get("CARGO_TARGET_DIR", "target")
    for p in (
        f"{target}/x86_64-unknown-linux-gnu/debug/examples/envd",
        f"{target}/debug/examples/envd",
    ):
        if os.path.exists(p):
            return p
    sys.exit("build the daemon first: cargo build -p tartarus-envd --example envd")


class Box:
    """What the SDK's tests call `sandbox`: files, commands, pty."""

    def __init__(self, url):
        config = ConnectionConfig(sandbox_url=url, api_key="e2b_" + "0" * 40, request_timeout=30)
        api = get_envd_api(config, url)
        self.files = Filesystem(url, ENVD_VERSION, config, api)
        self.commands = Commands(url, config, ENVD_VERSION, api)
        self.pty = Pty(url, config, ENVD_VERSION, api)


CHECKS = []


def check(f):
    CHECKS.append(f)
    return f


# ---- commands ----


@check
def run_and_exit_code(sb, home):
    r = sb.commands.run('echo "Hello, World!"')
    assert r.exit_code == 0 and r.stdout == "Hello, World!\n", r
    try:
        sb.commands.run("echo oops >&2; exit 3")
        raise AssertionError("expected CommandExitException")
    except CommandExitException as e:
        assert e.exit_code == 3 and e.stderr == "oops\n", e
    r = sb.commands.run("pwd")
    assert r.stdout.strip() == home, r.stdout


@check
def broken_utf8(sb, home):
    r = sb.commands.run('printf "' + "a" * 8191 + '\\xe2"')
    assert r.stdout == "a" * 8191 + "\ufffd"


@check
def env_vars_and_cwd(sb, home):
    r = sb.commands.run("echo $FOO; pwd", envs={"FOO": "bar"}, cwd="/tmp")
    assert r.stdout == "bar\n/tmp\n", r.stdout


@check
def too_short_timeout(sb, home):
    try:
        sb.commands.run("sleep 10", timeout=2)
        raise AssertionError("expected TimeoutException")
    except TimeoutException:
        pass


@check
def stdin_send_and_close(sb, home):
    cmd = sb.commands.run("cat", background=True, stdin=True)
    sb.commands.send_stdin(cmd.pid, "Hello,\nWorld!")
    for stdout, _, _ in cmd:
        assert stdout == "Hello,\nWorld!", stdout
        break
    cmd = sb.commands.run("cat", background=True, stdin=True)
    cmd.send_stdin("Hello, World!")
    cmd.close_stdin()
    r = cmd.wait()
    assert r.exit_code == 0 and r.stdout == "Hello, World!", r


@check
def kill_list_connect(sb, home):
    c1 = sb.commands.run("sleep 10", background=True)
    c2 = sb.commands.run("sleep 10", background=True)
    pids = [p.pid for p in sb.commands.list()]
    assert c1.pid in pids and c2.pid in pids, pids
    info = [p for p in sb.commands.list() if p.pid == c1.pid][0]
    assert info.cmd == "/bin/bash" and info.args == ["-l", "-c", "sleep 10"], info
    h = sb.commands.connect(c1.pid)
    assert h.pid == c1.pid
    assert sb.commands.kill(c1.pid)
    assert sb.commands.kill(c2.pid)
    try:
        sb.commands.run(f"kill -0 {c1.pid}")
        raise AssertionError("process still alive")
    except CommandExitException:
        pass
    assert not sb.commands.kill(999999)
    try:
        sb.commands.connect(999999)
        raise AssertionError("expected NotFoundException")
    except NotFoundException:
        pass


@check
def connect_replays_output(sb, home):
    cmd = sb.commands.run("echo early; sleep 1; echo late", background=True)
    cmd.disconnect()
    h = sb.commands.connect(cmd.pid)
    r = h.wait()
    assert r.stdout == "early\nlate\n", r.stdout


# ---- pty ----


@check
def pty_basic(sb, home):
    out = []
    t = sb.pty.create(PtySize(80, 24), envs={"ABC": "123"}, cwd="/")
    sb.pty.send_stdin(t.pid, b"echo $ABC\nexit\n")
    r = t.wait(on_pty=lambda x: out.append(x.decode()))
    assert r.exit_code == 0 and "123" in "".join(out), out


@check
def pty_resize(sb, home):
    for cols in (80, 100):
        out = []
        t = sb.pty.create(PtySize(cols=80, rows=24))
        if cols != 80:
            sb.pty.resize(t.pid, PtySize(cols=cols, rows=24))
        sb.pty.send_stdin(t.pid, b"tput cols\nexit\n")
        r = t.wait(on_pty=lambda x: out.append(x.decode()))
        assert r.exit_code == 0 and str(cols) in "".join(out), out


@check
def pty_connect_and_kill(sb, home):
    out = []
    t = sb.pty.create(PtySize(80, 24), envs={"FOO": "bar"})
    sb.pty.send_stdin(t.pid, b"echo $FOO\n")
    t.disconnect()
    h = sb.pty.connect(t.pid)
    sb.pty.send_stdin(t.pid, b"echo $FOO\nexit\n")
    r = h.wait(on_pty=lambda x: out.append(x.decode()))
    assert r.exit_code == 0 and "bar" in "".join(out)
    t = sb.pty.create(PtySize(80, 24))
    assert sb.pty.kill(t.pid)
    time.sleep(0.2)
    try:
        sb.commands.run(f"kill -0 {t.pid}")
        raise AssertionError("pty still alive")
    except CommandExitException:
        pass
    assert not sb.pty.kill(999999)


# ---- files ----


@check
def write_read_info(sb, home):
    me = pwd.getpwuid(os.getuid()).pw_name
    group = grp.getgrgid(os.getgid()).gr_name
    info = sb.files.write("test_file.txt", "test")
    assert info.path == f"{home}/test_file.txt" and info.type == FileType.FILE
    assert sb.files.read("test_file.txt") == "test"
    i = sb.files.get_info("test_file.txt")
    assert (i.name, i.type, i.size, i.mode, i.permissions) == ("test_file.txt", FileType.FILE, 4, 0o644, "-rw-r--r--"), i
    assert i.owner == me and i.group == group, i
    assert i.modified_time is not None and i.modified_time.tzinfo is not None
    sb.files.make_dir("test_dir")
    d = sb.files.get_info("test_dir")
    assert d.type == FileType.DIR and d.mode == 0o755 and d.permissions == "drwxr-xr-x", d
    try:
        sb.files.get_info("nope.txt")
        raise AssertionError("expected FileNotFoundException")
    except FileNotFoundException:
        pass
    try:
        sb.files.read("nope.txt")
        raise AssertionError("expected FileNotFoundException")
    except FileNotFoundException:
        pass


@check
def symlink(sb, home):
    sb.files.make_dir("test-simlink-entry")
    sb.files.write("test-simlink-entry/test.txt", "Hello, World!")
    sb.commands.run("ln -s test.txt symlink_to_test.txt", cwd="test-simlink-entry")
    f = sb.files.get_info("test-simlink-entry/symlink_to_test.txt")
    assert f.type == FileType.FILE and f.symlink_target == f"{home}/test-simlink-entry/test.txt", f


@check
def write_files_and_nested(sb, home):
    infos = sb.files.write_files([WriteEntry(path=f"test_write_{i}.txt", data=f"File {i}") for i in range(3)])
    assert [i.path for i in infos] == [f"{home}/test_write_{i}.txt" for i in range(3)], infos
    for i in range(3):
        assert sb.files.read(f"test_write_{i}.txt") == f"File {i}"
    sb.files.write("non_existing_dir/test_write.txt", "x")
    assert sb.files.read("non_existing_dir/test_write.txt") == "x"
    sb.files.write("ow.txt", "Initial content.")
    sb.files.write("ow.txt", "New")
    assert sb.files.read("ow.txt") == "New"


@check
def octet_stream_gzip_and_big(sb, home):
    data = os.urandom(3 << 20)
    sb.files.write("big.bin", io.BytesIO(data))  # file-like → octet-stream
    assert bytes(sb.files.read("big.bin", format="bytes")) == data
    sb.files.write("gz.txt", "compressed content", gzip=True)
    assert sb.files.read("gz.txt") == "compressed content"
    got = b"".join(sb.files.read("big.bin", format="stream"))
    assert got == data
    got = b"".join(sb.files.read("big.bin", format="stream", gzip=True))
    assert got == data
    assert bytes(sb.files.read("big.bin", format="bytes", gzip=True)) == data


@check
def metadata(sb, home):
    md = {"author": "mish", "purpose": "upload"}
    assert sb.files.write("m.txt", "c", metadata=md).metadata == md
    assert sb.files.get_info("m.txt").metadata == md
    assert sb.files.write("m2.txt", "c", metadata=md, use_octet_stream=True).metadata == md
    assert sb.files.get_info("m2.txt").metadata == md
    assert sb.files.write("m.txt", "second").metadata is None
    assert sb.files.get_info("m.txt").metadata is None
    assert sb.files.rename("m2.txt", "m3.txt").metadata == md
    for bad in ({"": "v"}, {"good": "bad\nvalue"}):
        try:
            sb.files.write("invalid_md.txt", "x", metadata=bad)
            raise AssertionError(f"expected InvalidArgumentException for {bad}")
        except InvalidArgumentException:
            pass
    assert not sb.files.exists("invalid_md.txt")


@check
def list_make_remove_rename(sb, home):
    p = f"test_directory_{uuid.uuid4()}"
    assert sb.files.make_dir(p)
    assert not sb.files.make_dir(p)
    for d in ("subdir1/subdir1_1", "subdir1/subdir1_2", "subdir2/subdir2_1", "subdir2/subdir2_2"):
        sb.files.make_dir(f"{p}/{d}")
    sb.files.write(f"{p}/file1.txt", "Hello, world!")
    names = [e.name for e in sb.files.list(p)]
    assert names == ["file1.txt", "subdir1", "subdir2"], names
    names = [e.name for e in sb.files.list(p, depth=2)]
    assert names == ["file1.txt", "subdir1", "subdir1_1", "subdir1_2", "subdir2", "subdir2_1", "subdir2_2"], names
    e = sb.files.list(p)[0]
    assert e.path == f"{home}/{p}/file1.txt" and e.size == 13 and e.symlink_target is None
    info = sb.files.rename(f"{p}/file1.txt", "renamed.txt")
    assert info.path == f"{home}/renamed.txt"
    assert not sb.files.exists(f"{p}/file1.txt") and sb.files.exists("renamed.txt")
    try:
        sb.files.rename("non_existing_file.txt", "x.txt")
        raise AssertionError("expected FileNotFoundException")
    except FileNotFoundException:
        pass
    sb.files.remove(p)
    assert not sb.files.exists(p)
    sb.files.remove("non_existing_file.txt")


@check
def watch(sb, home):
    sb.files.make_dir("wd")
    sb.files.write("wd/w.txt", "one")
    h = sb.files.watch_dir("wd", include_entry=True)
    sb.files.write("wd/w.txt", "two")
    evs = h.get_new_events()
    w = [e for e in evs if e.type == FilesystemEventType.WRITE and e.name == "w.txt"]
    assert w and w[0].entry is not None and w[0].entry.path == f"{home}/wd/w.txt", evs
    h.stop()
    sb.files.make_dir("wi")
    h = sb.files.watch_dir("wi", allow_network_mounts=True)
    sb.files.write("wi/new.txt", "content")
    evs = h.get_new_events()
    assert len(evs) == 3 and evs[0].type == FilesystemEventType.CREATE, evs
    h.stop()
    sb.files.make_dir("wr/nested")
    h = sb.files.watch_dir("wr", recursive=True)
    sb.files.write("wr/nested/f.txt", "content")
    evs = h.get_new_events()
    assert len(evs) == 3 and evs[0].type == FilesystemEventType.CREATE and evs[0].name == "nested/f.txt", evs
    h.stop()
    sb.files.make_dir("wa")
    h = sb.files.watch_dir("wa", recursive=True)
    sb.files.make_dir("wa/n2")
    sb.files.write("wa/n2/f.txt", "content")
    evs = h.get_new_events()
    kinds = {(e.type, e.name) for e in evs}
    assert (FilesystemEventType.CREATE, "n2") in kinds and (FilesystemEventType.WRITE, "n2/f.txt") in kinds, evs
    h.stop()
    try:
        sb.files.watch_dir("non_existing_watch_dir")
        raise AssertionError("expected FileNotFoundException")
    except FileNotFoundException:
        pass
    try:
        sb.files.watch_dir("wd/w.txt")
        raise AssertionError("expected SandboxException")
    except SandboxException:
        pass


def main():
    home = tempfile.mkdtemp(prefix="envd-sdk-")
    port = free_port()
    exe = os.path.abspath(daemon_path())
    args = [exe, f"127.0.0.1:{port}"]
    if os.path.basename(exe) == "tartarus":
        args = [exe, "envd", "--listen", f"127.0.0.1:{port}"]
    env = dict(os.environ, HOME=home)
    proc = subprocess.Popen(args, env=env, cwd=home)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
                break
            except OSError:
                time.sleep(0.05)
        sb = Box(url)
        passed = failed = 0
        for c in CHECKS:
            try:
                c(sb, home)
                passed += 1
                print(f"ok   {c.__name__}")
            except Exception as e:  # report every check, then fail
                failed += 1
                print(f"FAIL {c.__name__}: {type(e).__name__}: {e}")
        assert proc.poll() is None, "the daemon died"
        print(f"{passed} passed, {failed} failed")
        return 1 if failed else 0
    finally:
        proc.terminate()
        proc.wait()
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
