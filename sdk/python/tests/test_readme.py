"""Every ```python block of README.md runs against the test server (TARTARUS_HOST/TARTARUS_API_KEY are
set by the server fixture), so the docs cannot rot."""

from __future__ import annotations

import re
from pathlib import Path
from typing import List, Tuple

import pytest

import tartarus

README = Path(__file__).resolve().parent.parent / "README.md"


def _blocks() -> List[Tuple[str, str]]:
    text = README.read_text()
    out = []
    heading = "top"
    n = 0
    for m in re.finditer(r"^(#+ [^\n]*)$|^```python\n(.*?)^```$", text, re.M | re.S):
        if m.group(1):
            heading = re.sub(r"[^a-z0-9]+", "-", m.group(1).lstrip("# ").lower()).strip("-")
            n = 0
        else:
            n += 1
            out.append((f"{heading}-{n}", m.group(2)))
    return out


BLOCKS = _blocks()


def test_readme_has_examples() -> None:
    assert len(BLOCKS) >= 8


@pytest.fixture(scope="module")
def echo_tool(server):  # type: ignore[no-untyped-def]
    # The receipts example calls a tool named "echo", as an operator would have declared it.
    with tartarus.Client(server.host, server.admin_key) as admin:
        admin.request("POST", "/v1/tools", json={"name": "echo", "kind": "command", "command": ["/bin/cat"]})
        yield
        admin.request("DELETE", "/v1/tools/echo")


@pytest.mark.parametrize("name,code", BLOCKS, ids=[b[0] for b in BLOCKS])
def test_readme_example_runs(server, echo_tool, name: str, code: str) -> None:  # type: ignore[no-untyped-def]
    exec(compile(code, f"README.md:{name}", "exec"), {"__name__": f"readme_{name}"})
