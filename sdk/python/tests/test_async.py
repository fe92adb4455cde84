"""The async client: same API, awaited."""

from __future__ import annotations

import asyncio

import pytest

import tartarus
from tartarus import AsyncClient, AsyncSandbox, ConflictError, NotFoundError


async def test_async_context_manager_run_and_kill(server) -> None:  # type: ignore[no-untyped-def]
    async with AsyncSandbox.create(labels={"test": "async"}) as sb:
        sid = sb.id
        r = await sb.commands.run("echo hi; echo err >&2; exit 2")
        assert (r.exit_code, r.stdout, r.stderr) == (2, "hi\n", "err\n")
        assert (await sb.info()).status == "running"
    async with AsyncClient() as c:
        assert (await c.connect(sid)).last_info.status == "killed"


async def test_async_await_create_streaming_and_files(server) -> None:  # type: ignore[no-untyped-def]
    async with AsyncClient(server.host, server.user_key) as c:
        sb = await AsyncSandbox.create(timeout=120, client=c)
        try:
            chunks: list = []

            async def on_out(s: str) -> None:  # coroutine callbacks are awaited
                chunks.append(s)

            r = await sb.commands.run(
                "for i in $(seq 1 50); do echo $i; done", on_stdout=on_out, stdin=None
            )
            assert "".join(chunks) == "".join(f"{i}\n" for i in range(1, 51)) == r.stdout
            await sb.files.write("/tmp/a.bin", b"\x00\xff" * 1000)
            assert await sb.files.read("/tmp/a.bin") == b"\x00\xff" * 1000
            assert [e.name for e in await sb.files.list("/tmp") if e.name == "a.bin"] == ["a.bin"]
            assert (await sb.commands.run("cat", stdin="in")).stdout == "in"
        finally:
            await sb.kill()
        with pytest.raises(NotFoundError):
            await c.connect("sb_does_not_exist")


async def test_async_concurrent_commands(server) -> None:  # type: ignore[no-untyped-def]
    async with AsyncSandbox.create() as sb:
        results = await asyncio.gather(*(sb.commands.run(f"sleep 0.3; echo {i}") for i in range(3)))
        assert [r.stdout for r in results] == ["0\n", "1\n", "2\n"]


async def test_async_pause_resume_wait(server) -> None:  # type: ignore[no-untyped-def]
    async with AsyncSandbox.create() as sb:
        assert (await sb.pause()).status == "paused"
        with pytest.raises(ConflictError):
            await sb.commands.run("true")
        assert (await sb.resume()).status == "running"
        with pytest.raises(tartarus.TimeoutError):
            await sb.wait(timeout=1)
    sb2 = await AsyncSandbox.create(cmd="echo bye")
    try:
        assert (await sb2.wait(timeout=30)).exit_code == 0
        assert "bye" in await sb2.logs()
    finally:
        await sb2.kill()
        await sb2.close()
    assert any(s.id == sb2.id for s in await AsyncSandbox.list(status="exited"))


async def test_async_ports_preview_logs_receipts(server) -> None:  # type: ignore[no-untyped-def]
    import httpx

    async with AsyncClient(server.host, server.user_key) as c:
        async with AsyncSandbox.create(ports=[8000], client=c) as sb:
            await sb.commands.run(
                "mkdir -p /tmp/w && echo async-web > /tmp/w/i.txt && cd /tmp/w && "
                "nohup python3 -m http.server 8000 --bind 127.0.0.1 >/dev/null 2>&1 &"
            )
            r = await sb.ports.wait_until_ready(8000, "/i.txt", timeout=30)
            assert r.status_code == 200 and r.text == "async-web\n"
            url = await sb.preview_url(8000, ttl_s=60)
            async with httpx.AsyncClient() as plain:
                assert (await plain.get(url.url, timeout=10)).status_code == 200
            assert await sb.files.exists("/tmp/w/i.txt")
            assert await sb.receipts() == []
            assert isinstance(await c.receipts.list(), list)
            assert (await c.receipts.public_keys())["keys"]
            assert any(t.name == "process" for t in await c.runtimes())
        job = await c.create_sandbox(cmd="for i in 1 2; do echo t$i; sleep 0.2; done")
        try:
            text = "".join([chunk async for chunk in job.follow_logs(timeout=30)])
            assert text.split() == ["t1", "t2"]
        finally:
            await job.kill()


async def test_async_commands_stream(server) -> None:  # type: ignore[no-untyped-def]
    async with AsyncSandbox.create() as sb:
        async with sb.commands.stream("echo x; echo y >&2") as events:
            got = [(ev.stream, ev.text) async for ev in events]
        assert sorted(got) == [("stderr", "y\n"), ("stdout", "x\n")]
        assert events.result is not None and events.result.exit_code == 0
