"""pytest fixtures: one server for the whole session (``server``).

Run (SDK-backed tests need the e2b-code-interpreter venv; the server itself
always runs with /usr/bin/python3, which has ipykernel):

    /opt/e2b/venv/bin/python -m pytest crates/tartarus-envd/code_interpreter_tests -v

Without the SDK (``/usr/bin/python3 -m pytest ...``) the raw-HTTP tests run and
the SDK ones are skipped.  Environment knobs: CI_SERVER_PYTHON (default
/usr/bin/python3), CI_SERVER_URL + CI_SERVER_HOME (test an already running
server instead).
"""
import os

import pytest

from ci_server import ServerInfo, run_server, wait_healthy


@pytest.fixture(scope="session")
def server():
    external = os.environ.get("CI_SERVER_URL")
    if external:
        wait_healthy(external)
        yield ServerInfo(external, os.environ.get("CI_SERVER_HOME", "/home/user"), "/dev/null")
        return
    with run_server() as info:
        yield info
