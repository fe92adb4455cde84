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
