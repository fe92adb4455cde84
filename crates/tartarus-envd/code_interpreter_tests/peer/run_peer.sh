#!/bin/sh
# Runs the unmodified peer acceptance tests (e2b-code-interpreter
# python/tests/sync) with the real SDK against local code-interpreter
# servers (see peer_conftest.py).  Usage:
#   crates/tartarus-envd/code_interpreter_tests/peer/run_peer.sh [pytest args]
# PEER_TESTS overrides the location of the peer "sync" directory.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
peer=${PEER_TESTS:-/work/shared/peer/e2b-code-interpreter/python/tests/sync}
sdk_python=${SDK_PYTHON:-/opt/e2b/venv/bin/python}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cp -r "$peer" "$work/sync"
find "$work/sync" -name '__pycache__' -prune -exec rm -rf {} +
cp "$here/peer_conftest.py" "$work/sync/conftest.py"
cd "$work"
PYTHONDONTWRITEBYTECODE=1 CI_TESTS_DIR="$here/.." "$sdk_python" -m pytest sync --import-mode=importlib -p no:cacheprovider -rsx "$@"
