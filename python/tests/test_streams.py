"""Streaming objects over fake events: ExecHandle, MetricsStream, LogStream, PullSession."""

from __future__ import annotations

import asyncio
import base64
import gc

import pytest

from conftest import FakeCore, err, ok, sandbox_ref
from microsandbox import (
    ExecEvent,
    InvalidArgumentError,
    InvalidHandleError,
    PullEvent,
    Sandbox,
    SandboxMetrics,
    Stdin,
)
from test_sandbox import LOG, METRICS


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


EXITED = {"type": "exited", "exit_code": 0, "success": True, "signal": None, "timed_out": False}


@pytest.fixture
async def sb(core: FakeCore) -> Sandbox:
    core.on("create", sandbox_ref(handle=7, name="sb"))
    return await Sandbox.create("sb")


async def test_exec_stream_events_by_async_for(core: FakeCore, sb: Sandbox) -> None:
    core.on("sandbox.exec_stream", ok({"exec": 20, "pid": 42}))
    core.on(
        "exec.recv",
        ok({"type": "started", "pid": 42}),
        ok({"type": "stdout", "data_b64": b64(b"one\n")}),
        ok({"type": "stderr", "data_b64": b64(b"warn\n")}),
        ok({"type": "stdout", "data_b64": b64(b"two\n")}),
        ok(EXITED),
        ok(None),
    )
    h = await sb.exec_stream("sh", ["-c", "echo one; echo warn >&2; echo two"], env={"A": "1"})
    assert core.last("sandbox.exec_stream") == {
        "handle": 7, "cmd": "sh", "args": ["-c", "echo one; echo warn >&2; echo two"], "env": {"A": "1"}}
    assert h.pid == 42
    events = [e async for e in h]
    assert [e.event_type for e in events] == ["started", "stdout", "stderr", "stdout", "exited"]
    assert events[0].pid == 42
    assert b"".join(e.data for e in events if e.event_type == "stdout") == b"one\ntwo\n"
    assert events[2].text == "warn\n"
    assert events[-1] == ExecEvent("exited", exit_code=0, success=True, timed_out=False)
    assert events[-1].code == 0
    assert await h.recv() is None  # over: no further call
    assert core.args_of("exec.recv") == [{"handle": 20}] * 6
    await h.close()
    assert core.last("release") == {"handle": 20}


async def test_exec_stream_stdin_pipe_signal_and_collect(core: FakeCore, sb: Sandbox) -> None:
    core.on("sandbox.shell_stream", ok({"exec": 21}))
    for m in ["exec.write", "exec.close_stdin", "exec.signal", "exec.kill"]:
        core.on(m, ok(None), ok(None))
    core.on("exec.recv", ok({"type": "started", "pid": 1}))
    core.on("exec.collect", ok({**EXITED, "exit_code": 143, "success": False, "signal": 15,
                                "stdout_b64": b64(b"abc"), "stderr_b64": ""}))
    h = await sb.shell_stream("cat", stdin=Stdin.pipe(), timeout=10)
    assert core.last("sandbox.shell_stream") == {"handle": 7, "script": "cat", "stdin_pipe": True, "timeout": 10}
    assert h.pid is None
    assert (await h.recv()).event_type == "started"
    assert h.pid == 1
    sink = h.take_stdin()
    assert sink is not None and h.take_stdin() is None
    await sink.write(b"ab")
    await h.write("c")
    await sink.close()
    assert core.args_of("exec.write") == [{"handle": 21, "data_b64": b64(b"ab")}, {"handle": 21, "data_b64": b64(b"c")}]
    assert core.last("exec.close_stdin") == {"handle": 21}
    await h.signal(15)
    await h.kill()
    assert core.last("exec.signal") == {"handle": 21, "signal": 15}
    assert core.last("exec.kill") == {"handle": 21}
    out = await h.collect()
    assert out.stdout_text == "abc" and out.exit_code == 143 and out.signal == 15 and not out.success
    with pytest.raises(InvalidHandleError):
        await h.recv()
    del h
    gc.collect()
    await asyncio.sleep(0)
    assert "release" not in core.methods()  # collect spent it


async def test_exec_stream_without_pipe_refuses_writes(core: FakeCore, sb: Sandbox) -> None:
    core.on("sandbox.exec_stream", ok({"exec": 22}))
    core.on("exec.wait", ok({"exit_code": 137, "success": False, "signal": 9, "timed_out": True}))
    h = await sb.exec_stream("sleep", ["100"], stdin=b"x")
    assert core.last("sandbox.exec_stream")["stdin_b64"] == b64(b"x")
    assert "stdin_pipe" not in core.last("sandbox.exec_stream")
    assert h.take_stdin() is None
    with pytest.raises(InvalidArgumentError):
        await h.write(b"more")
    status = await h.wait()
    code, success = status
    assert (code, success) == (137, False)
    assert status.signal == 9 and status.timed_out is True
    assert core.last("exec.wait") == {"handle": 22}


async def test_exec_handle_context_manager_releases(core: FakeCore, sb: Sandbox) -> None:
    core.on("sandbox.exec_stream", ok({"exec": 23}))
    async with await sb.exec_stream("yes") as h:
        assert h is not None
    assert core.last("release") == {"handle": 23}


async def test_exec_stream_unknown_event_is_an_internal_error(core: FakeCore, sb: Sandbox) -> None:
    from microsandbox import InternalError

    core.on("sandbox.exec_stream", ok({"exec": 24}))
    core.on("exec.recv", ok({"type": "teleported"}))
    h = await sb.exec_stream("x")
    with pytest.raises(InternalError):
        await h.recv()


async def test_metrics_stream(core: FakeCore, sb: Sandbox) -> None:
    core.on("sandbox.metrics_stream", ok({"stream": 30}), ok({"stream": 31}))
    core.on("stream.next", ok(METRICS), ok({**METRICS, "cpu_percent": 50.0}), ok(None), ok(METRICS))
    s = await sb.metrics_stream(0.5)
    assert core.last("sandbox.metrics_stream") == {"handle": 7, "interval": 0.5}
    first = await s.recv()
    assert isinstance(first, SandboxMetrics) and first.cpu_percent == 12.5
    rest = [m async for m in s]
    assert [m.cpu_percent for m in rest] == [50.0]
    assert await s.recv() is None
    assert core.last("release") == {"handle": 30}  # released at the end
    s2 = await sb.metrics_stream()
    assert core.last("sandbox.metrics_stream") == {"handle": 7, "interval": 1.0}
    async with s2:
        assert (await s2.recv()).status == "running"
    assert core.last("release") == {"handle": 31}
    with pytest.raises(InvalidArgumentError):
        await sb.metrics_stream(0)


async def test_log_stream(core: FakeCore, sb: Sandbox) -> None:
    core.on("sandbox.log_stream", ok({"stream": 40}))
    core.on("stream.next", ok(LOG), ok({**LOG, "source": "stderr", "data_b64": b64(b"e")}), ok(None))
    s = await sb.log_stream(sources=["stdout", "stderr"], from_cursor="c0")
    assert core.last("sandbox.log_stream") == {"handle": 7, "sources": ["stdout", "stderr"], "from_cursor": "c0",
                                               "follow": False}
    entries = [e async for e in s]
    assert [(e.source, e.data) for e in entries] == [("stdout", b"hi\n"), ("stderr", b"e")]
    core.on("sandbox.log_stream", ok({"stream": 41}))
    async with await sb.log_stream(follow=True, since_ms=5) as s2:
        assert s2 is not None
    assert core.last("sandbox.log_stream") == {"handle": 7, "since_ms": 5, "follow": True}
    assert core.last("release") == {"handle": 41}


async def test_pull_session_progress_and_result(core: FakeCore) -> None:
    core.on("create_with_progress", ok({"pull": 50}))
    core.on(
        "pull.next",
        ok({"type": "resolving", "reference": "alpine"}),
        ok({"type": "resolved", "reference": "docker.io/library/alpine:latest", "manifest_digest": "sha256:ab",
            "layer_count": 1, "total_download_bytes": 3000}),
        ok({"type": "layer_download_progress", "layer_index": 0, "digest": "sha256:cd", "downloaded_bytes": 1500,
            "total_bytes": 3000}),
        ok({"type": "stitch_complete"}),
        ok({"type": "complete", "reference": "alpine", "layer_count": 1}),
        ok(None),
    )
    core.on("pull.result", sandbox_ref(handle=51, name="p"))
    session = Sandbox.create_with_progress("p", image="alpine")
    async with session:
        events = [e async for e in session.progress]
        sb = await session.result()
    assert [e.event_type for e in events] == [
        "resolving", "resolved", "layer_download_progress", "stitch_complete", "complete"]
    assert events[1].layer_count == 1 and events[1].total_download_bytes == 3000
    assert events[2].downloaded_bytes == 1500 and events[2].layer_index == 0
    assert events[0].manifest_digest is None  # not this event's field
    assert events[3].fields == {}
    assert events[0] == PullEvent("resolving", {"reference": "alpine"})
    with pytest.raises(AttributeError):
        events[0].no_such_field
    assert await sb.name == "p" and sb._handle() == 51
    assert core.args_of("pull.next") == [{"handle": 50}] * 6
    assert core.last("pull.result") == {"handle": 50}
    with pytest.raises(RuntimeError):
        await session.result()
    assert "release" not in core.methods()  # result() spent the session


async def test_pull_session_is_awaitable_and_released_when_abandoned(core: FakeCore) -> None:
    core.on("create_with_progress", ok({"pull": 60}), ok({"pull": 61}))
    core.on("pull.result", sandbox_ref(handle=62))
    core.on("pull.next", ok({"type": "resolving", "reference": "alpine"}))
    sb = await Sandbox.create_with_progress("a", image="alpine")
    assert sb._handle() == 62
    session = Sandbox.create_with_progress("b", image="alpine")
    async with session:
        async for _ in session.progress:
            break  # gave up
    assert core.last("release") == {"handle": 61}


async def test_pull_session_errors_are_typed(core: FakeCore) -> None:
    from microsandbox import ImageNotFoundError

    core.on("create_with_progress", ok({"pull": 70}))
    core.on("pull.next", ok(None))
    core.on("pull.result", err("image_not_found", "no such image nope:1"))
    session = Sandbox.create_with_progress("c", image="nope:1")
    with pytest.raises(ImageNotFoundError):
        async with session:
            async for _ in session.progress:
                pass
            await session.result()


async def spin(n: int = 5) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


def gated(answer):
    """An answer that comes once the returned event is set."""
    gate = asyncio.Event()
    entered = asyncio.Event()

    async def answer_when_open(args):
        entered.set()
        await gate.wait()
        return answer

    return answer_when_open, gate, entered


async def test_a_cancelled_start_leaves_the_session_its_handle(core: FakeCore) -> None:
    # The start is shielded: cancelling the task awaiting it does not stop it, and the
    # handle it brings is the session's (usable, and released when the session goes).
    answer, gate, entered = gated(ok({"pull": 80}))
    core.on("create_with_progress", answer)
    core.on("pull.next", ok({"type": "resolving", "reference": "alpine"}))
    session = Sandbox.create_with_progress("p", image="alpine")
    task = asyncio.ensure_future(session.start())
    await entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    gate.set()
    await spin()
    assert "release" not in core.methods()
    ev = await session.recv()  # the same session, no second start
    assert ev is not None and ev.event_type == "resolving"
    assert core.methods().count("create_with_progress") == 1
    assert core.last("pull.next") == {"handle": 80}
    del session, ev
    await spin()
    assert core.args_of("release") == [{"handle": 80}]


async def test_a_start_nobody_waits_for_is_released(core: FakeCore) -> None:
    # Cancelled, and the session dropped before the core answered: the handle that then
    # comes has no owner, and goes back to the core.
    answer, gate, entered = gated(ok({"pull": 81}))
    core.on("create_with_progress", answer)
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        session = Sandbox.create_with_progress("p", image="alpine")
        task = asyncio.ensure_future(session.start())
        await entered.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        del session, task
        gate.set()
        await spin()
        assert core.args_of("release") == [{"handle": 81}]
    finally:
        if was_enabled:
            gc.enable()


async def test_a_cancelled_result_keeps_the_session_for_release(core: FakeCore) -> None:
    answer, gate, entered = gated(sandbox_ref(handle=83))
    core.on("create_with_progress", ok({"pull": 82}))
    core.on("pull.result", answer)
    session = Sandbox.create_with_progress("p", image="alpine")
    async with session:
        task = asyncio.ensure_future(session.result())
        await entered.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    # Whether the core had taken it is unknown: leaving the block releases it.
    assert core.args_of("release") == [{"handle": 82}]


async def test_a_cancelled_wait_keeps_the_command(core: FakeCore, sb: Sandbox) -> None:
    answer, gate, entered = gated(ok({"exit_code": 0, "success": True, "signal": None, "timed_out": False}))
    core.on("sandbox.exec_stream", ok({"exec": 84}))
    core.on("exec.wait", answer)
    h = await sb.exec_stream("sleep", ["60"])
    task = asyncio.ensure_future(h.wait())
    await entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await h.close()
    assert core.args_of("release") == [{"handle": 84}]
