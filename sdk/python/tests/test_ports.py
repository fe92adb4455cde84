"""Preview URLs and port forwarding into a `python3 -m http.server` inside a sandbox."""

from __future__ import annotations

import httpx
import pytest

import tartarus
from tartarus import ConflictError, Sandbox


@pytest.fixture
def web(client: tartarus.Client):  # type: ignore[no-untyped-def]
    with Sandbox.create(ports=[8000], timeout=300, client=client) as sb:
        sb.commands.run("mkdir -p /tmp/www && echo 'hello from the sandbox' > /tmp/www/hello.txt")
        sb.commands.run(
            "cd /tmp/www && nohup python3 -m http.server 8000 --bind 127.0.0.1 >/tmp/http.log 2>&1 &"
        )
        # Poll until the server answers: no sleeps as synchronisation.
        sb.ports.wait_until_ready(8000, "/hello.txt", timeout=30)
        yield sb


def test_ports_get_with_api_key(web: Sandbox) -> None:
    r = web.ports.get(8000, "/hello.txt")
    assert r.status_code == 200 and r.text == "hello from the sandbox\n"
    assert web.ports.get(8000, "/missing").status_code == 404  # the sandbox's own 404 is returned
    assert web.last_info.ports == [8000]


def test_preview_url_works_without_a_key(web: Sandbox) -> None:
    url = web.preview_url(8000, ttl_s=120)
    assert url.url.startswith(web.client.config.host) and "tartarus_token=" in url.url
    assert url.expires_at.timestamp() > 0
    base = url.url.split("?")[0]
    token = url.url.split("?", 1)[1]
    # The token covers the sandbox and port; any path under it.
    r = httpx.get(f"{base}hello.txt?{token}", timeout=10)
    assert r.status_code == 200 and r.text == "hello from the sandbox\n"
    r = httpx.get(url.url, timeout=10)
    assert r.status_code == 200 and "hello.txt" in r.text  # the directory listing
    assert httpx.get(base + "hello.txt", timeout=10).status_code == 401  # no token, no key


def test_port_not_opened_is_conflict(web: Sandbox) -> None:
    with pytest.raises(ConflictError):
        web.ports.get(8001, "/")
    with pytest.raises((ConflictError, tartarus.InvalidRequestError)):
        web.preview_url(8001)
