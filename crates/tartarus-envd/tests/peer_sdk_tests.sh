#!/bin/bash
# Runs the E2B Python SDK's own sync integration tests for commands, files and pty, unmodified,
# against tartarus-envd on the host, with the SDK's clients pointed at the daemon (no control plane).
#
#   sudo bash crates/tartarus-envd/tests/peer_sdk_tests.sh PATH_TO_DAEMON [pytest args...]
#
# PATH_TO_DAEMON: the `tartarus` binary (run as `tartarus envd --listen`) or the `envd` example.
# Needs root for a private mount namespace, in which /home is a fresh tmpfs with /home/user in it and
# /etc/passwd and /etc/group name the current uid and gid `user` (as in an E2B sandbox). Nothing on
# the host changes. Tests that need the control plane (secured sandboxes, sandbox env vars, killing
# the sandbox) are skipped with their reason, and so is the one that needs `sudo` on a host without.
set -euo pipefail
daemon=$(readlink -f "${1:?usage: peer_sdk_tests.sh PATH_TO_DAEMON [pytest args...]}")
shift
peer=${PEER:-/work/shared/peer/e2b-python-sdk}
python=${PYTHON:-/opt/e2b/venv/bin/python}
here=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/tests"
cp -r "$peer"/tests/sync/sandbox_sync/{commands,files,pty} "$work/tests/"
cat > "$work/pytest.ini" <<'INI'
[pytest]
markers =
    skip_debug: skip test if E2B_DEBUG is set.
asyncio_mode=auto
asyncio_default_fixture_loop_scope=session
asyncio_default_test_loop_scope=session
addopts = --import-mode=importlib
INI
cat > "$work/tests/conftest.py" <<PY
import os, sys
import pytest
sys.path.insert(0, "$here")
from sdk_clients import Box

@pytest.fixture
def sandbox():
    return Box(os.environ["E2B_SANDBOX_URL"])

@pytest.fixture
def debug():
    return False

@pytest.fixture
def sandbox_factory():
    def factory(**kwargs):
        if kwargs.get("secure") or kwargs.get("envs"):
            pytest.skip("needs the control plane (secured sandbox or sandbox env vars)")
        return Box(os.environ["E2B_SANDBOX_URL"])
    return factory

SKIPS = {
    "test_kill_sandbox_while_command_is_running": "needs the control plane (sandbox.kill)",
}

def pytest_collection_modifyitems(config, items):
    import shutil
    if shutil.which("sudo") is None:
        SKIPS["test_bash_command_scoped_env_vars"] = "this host has no sudo"
    for item in items:
        if item.name in SKIPS:
            item.add_marker(pytest.mark.skip(reason=SKIPS[item.name]))
PY
port=$("$python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
export daemon work port python
exec unshare -m --propagation private bash -euo pipefail -c '
  mount -t tmpfs -o mode=0755 tmpfs /home
  mkdir /home/user
  { echo "user:x:$(id -u):$(id -g)::/home/user:/bin/bash"; cat /etc/passwd; } > "$work/passwd"
  { echo "user:x:$(id -g):"; cat /etc/group; } > "$work/group"
  mount --bind "$work/passwd" /etc/passwd
  mount --bind "$work/group" /etc/group
  args=("$daemon" "127.0.0.1:$port")
  [ "$(basename "$daemon")" = tartarus ] && args=("$daemon" envd --listen "127.0.0.1:$port")
  (cd /home/user && HOME=/home/user exec "${args[@]}") &
  pid=$!
  for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null && break; sleep 0.05; done
  cd "$work"
  rc=0
  E2B_SANDBOX_URL=http://127.0.0.1:$port "$python" -m pytest -q -p no:cacheprovider tests "$@" || rc=$?
  if ! kill "$pid" 2>/dev/null; then
    wait "$pid" || echo "envd died during the tests (status $?)"
    rc=1
  fi
  exit $rc
' bash "$@"
