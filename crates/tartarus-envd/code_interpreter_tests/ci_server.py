"""Launching the code-interpreter server for tests: a free loopback port,
HOME set to a temporary directory.
CI_SERVER_PYTHON chooses the server's interpreter (default /usr/bin/python3).
"""
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
SERVER = os.path.join(HERE, "..", "src", "code_interpreter", "server.py")
SERVER_PYTHON = os.environ.get("CI_SERVER_PYTHON", "/usr/bin/python3")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url, proc=None, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError("server exited with %s" % proc.returncode)
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError("server not healthy after %ss" % timeout)


class ServerInfo:
    def __init__(self, url, home, log_path):
        self.url = url
        self.home = home
        self.log_path = log_path
        self.host, port = url.split("//", 1)[1].split(":")
        self.port = int(port)

    def log(self):
        try:
            with open(self.log_path) as f:
                return f.read()
        except OSError:
            return ""


import contextlib


@contextlib.contextmanager
def run_server(extra_env=None, home=None):
    """A fresh server (fresh contexts) on a free port; yields ServerInfo.
    HOME (and the default cwd) is ``home``, else a new temporary directory."""
    own_home = home is None
    home = home or tempfile.mkdtemp(prefix="ci-home-")
    port = free_port()
    fd, log_path = tempfile.mkstemp(prefix="ci-server-", suffix=".log")
    os.close(fd)
    env = dict(os.environ)
    env["HOME"] = home
    env["CI_GLOBAL_VAR"] = "from-server-env"
    env.pop("MPLBACKEND", None)
    env.update(extra_env or {})
    logf = open(log_path, "w")
    proc = subprocess.Popen(
        [SERVER_PYTHON, SERVER, "--port", str(port)],
        cwd=home, env=env, stdout=logf, stderr=subprocess.STDOUT,
    )
    url = "http://127.0.0.1:%d" % port
    try:
        wait_healthy(url, proc)
        info = ServerInfo(url, home, log_path)
        info.proc = proc
        yield info
    finally:
        if proc.poll() is None:
            proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        logf.close()
        if proc.returncode not in (0, -15) or os.environ.get("CI_SHOW_SERVER_LOG"):
            sys.stderr.write(open(log_path).read())
        if not os.environ.get("CI_KEEP_SERVER_LOG"):
            os.unlink(log_path)
        if own_home:
            shutil.rmtree(home, ignore_errors=True)


