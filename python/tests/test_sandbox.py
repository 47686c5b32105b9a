"""Sandbox, SandboxHandle and SandboxFs calls -> the wire, and answers -> values."""

from __future__ import annotations

import asyncio
import base64
import gc
import json
from pathlib import Path

import pytest

from conftest import FakeCore, err, ok, sandbox_ref
from microsandbox import (
    BusyError,
    ExecOutput,
    InternalError,
    OperationCancelledError,
    OperationTimeoutError,
    FilesystemError,
    InvalidArgumentError,
    InvalidHandleError,
    PathNotFoundError,
    Rlimit,
    Sandbox,
    SandboxHandle,
    SandboxNotRunningError,
    SandboxStillRunningError,
    Stdin,
    all_sandbox_metrics,
    ensure_installed,
    is_installed,
    sdk_version,
)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def exec_output(stdout: bytes = b"", stderr: bytes = b"", code: int = 0, signal=None, timed_out=False):
    return ok({
        "exit_code": code,
        "success": code == 0,
        "signal": signal,
        "timed_out": timed_out,
        "stdout_b64": b64(stdout),
        "stderr_b64": b64(stderr),
    })


METRICS = {
    "cpu_percent": 12.5,
    "vcpu_time_ns": 1_000_000,
    "memory_bytes": 64 << 20,
    "memory_available_bytes": 100 << 20,
    "memory_host_resident_bytes": None,
    "memory_limit_bytes": 256 << 20,
    "disk_read_bytes": 10,
    "disk_write_bytes": 20,
    "net_rx_bytes": 0,
    "net_tx_bytes": 0,
    "upper_used_bytes": None,
    "upper_free_bytes": None,
    "upper_host_allocated_bytes": None,
    "timestamp_ms": 1_700_000_000_123.5,
    "uptime_secs": 4.25,
    "status": "running",
}

HANDLE_INFO = {
    "name": "web",
    "status": "stopped",
    "config": {"memory": 256, "env": {"A": "1"}},
    "labels": {"team": "a"},
    "created_at_ms": 1_700_000_000_000,
    "updated_at_ms": 1_700_000_001_000,
    "vmm_pid": None,
    "detached": False,
    "exit_reason": "stopped",
    "ephemeral": False,
}

LOG = {"source": "stdout", "session_id": 3, "timestamp_ms": 1_700_000_000_500, "data_b64": b64(b"hi\n"), "cursor": "c1"}


@pytest.fixture
async def sb(core: FakeCore) -> Sandbox:
    core.on("create", sandbox_ref(handle=7, name="sb"))
    return await Sandbox.create("sb")


async def test_exec_maps_options(core: FakeCore, sb: Sandbox) -> None:
    core.on("sandbox.exec", exec_output(b"out\xff", b"err", code=3))
    out = await sb.exec(
        "python",
        ["-c", "print(1)"],
        cwd="/app",
        user="nobody",
        env={"PYTHONPATH": "/lib"},
        timeout=30.0,
        stdin=b"input",
        tty=True,
        rlimits=[Rlimit.nofile(64), Rlimit("NPROC", 10, 20)],
    )
    assert core.last("sandbox.exec") == {
        "handle": 7,
        "cmd": "python",
        "args": ["-c", "print(1)"],
        "cwd": "/app",
        "user": "nobody",
        "env": {"PYTHONPATH": "/lib"},
        "timeout": 30.0,
        "stdin_b64": b64(b"input"),
        "tty": True,
        "rlimits": [
            {"resource": "nofile", "soft": 64, "hard": 64},
            {"resource": "nproc", "soft": 10, "hard": 20},
        ],
    }
    assert isinstance(out, ExecOutput)
    assert out.exit_code == 3 and out.success is False
    assert out.stdout_bytes == b"out\xff" and out.stdout_text == "out\ufffd"
    assert out.stderr_bytes == b"err" and out.stderr_text == "err"
    assert out.signal is None and out.timed_out is False


async def test_exec_defaults_and_stdin_forms(core: FakeCore, sb: Sandbox) -> None:
    core.on("sandbox.exec", exec_output(), exec_output(), exec_output(), exec_output())
    await sb.exec("true")
    assert core.last("sandbox.exec") == {"handle": 7, "cmd": "true", "args": []}
    await sb.exec("cat", stdin="héllo")
    assert core.last("sandbox.exec")["stdin_b64"] == b64("héllo".encode())
    await sb.exec("cat", stdin=Stdin.bytes(b"\x00\x01"))
    assert core.last("sandbox.exec")["stdin_b64"] == b64(b"\x00\x01")
    await sb.exec("cat", stdin=Stdin.null())
    assert "stdin_b64" not in core.last("sandbox.exec")


async def test_exec_accepts_the_older_options_dict(core: FakeCore, sb: Sandbox) -> None:
    core.on("sandbox.exec", exec_output())
    await sb.exec("ls", {"args": ["-l"], "cwd": "/tmp", "env": {"A": "b"}})
    assert core.last("sandbox.exec") == {"handle": 7, "cmd": "ls", "args": ["-l"], "cwd": "/tmp", "env": {"A": "b"}}
    with pytest.raises(TypeError):
        await sb.exec("ls", {"cwd": "/tmp"}, cwd="/var")
    with pytest.raises(TypeError):
        await sb.exec("ls", {"bogus": 1})


async def test_exec_option_validation(core: FakeCore, sb: Sandbox) -> None:
    n = len(core.calls)
    for bad in [
        dict(args="-l"),
        dict(env={"A": 1}),
        dict(timeout="5"),
        dict(stdin=123),
        dict(tty="yes"),
        dict(rlimits=[("nofile", 1, 1)]),
        dict(cwd=Path("/tmp")),
    ]:
        with pytest.raises(TypeError):
            await sb.exec("ls", **bad)
    for bad in [
        dict(timeout=0),
        dict(timeout=-1),
        dict(stdin=Stdin.pipe()),  # nobody could write it
        dict(rlimits=[Rlimit("nofile", 10, 5)]),
        dict(rlimits=[Rlimit("nofile", -1, 5)]),
    ]:
        with pytest.raises(InvalidArgumentError):
            await sb.exec("ls", **bad)
    with pytest.raises(TypeError):
        await sb.exec("ls", bogus=1)  # type: ignore[call-arg]
    assert len(core.calls) == n


async def test_shell(core: FakeCore, sb: Sandbox) -> None:
    core.on("sandbox.shell", exec_output(b"hello\n"))
    out = await sb.shell("echo hello | cat", env={"X": "1"}, timeout=5)
    assert core.last("sandbox.shell") == {"handle": 7, "script": "echo hello | cat", "env": {"X": "1"}, "timeout": 5}
    assert out.stdout_text == "hello\n" and out.success


async def test_fs(core: FakeCore, sb: Sandbox, tmp_path: Path) -> None:
    meta = {"kind": "file", "size": 5, "mode": 0o644, "uid": 0, "gid": 0, "modified_ms": 1.5, "symlink_target": None}
    core.on("fs.write", ok(None), ok(None))
    core.on("fs.read", ok({"data_b64": b64(b"hello")}), ok({"data_b64": b64("ü".encode())}))
    core.on("fs.list", ok([{"path": "/d/f", "name": "f", "kind": "file", "size": 5, "metadata": meta}]))
    core.on("fs.stat", ok(meta))
    core.on("fs.exists", ok(True))
    for m in ["fs.mkdir", "fs.remove", "fs.remove_dir", "fs.rename", "fs.copy", "fs.copy_from_host", "fs.copy_to_host"]:
        core.on(m, ok(None))
    fs = sb.fs
    await fs.write("/d/f", b"hello")
    await fs.write("/d/g", "text")
    assert core.args_of("fs.write") == [
        {"handle": 7, "path": "/d/f", "data_b64": b64(b"hello")},
        {"handle": 7, "path": "/d/g", "data_b64": b64(b"text")},
    ]
    assert await fs.read("/d/f") == b"hello"
    assert await fs.read_text("/d/u") == "ü"
    [entry] = await fs.list("/d")
    assert (entry.path, entry.name, entry.kind, entry.size) == ("/d/f", "f", "file", 5)
    assert entry.metadata.mode == 0o644 and entry.metadata.is_file
    st = await fs.stat("/d/f")
    assert st.size == 5 and st.modified_ms == 1.5 and not st.is_dir
    assert await fs.exists("/d/f") is True
    await fs.mkdir("/e")
    await fs.remove("/d/f")
    await fs.remove_dir("/e")
    await fs.rename("/a", "/b")
    await fs.copy("/b", "/c")
    await fs.copy_from_host(tmp_path / "h", "/g")
    await fs.copy_to_host("/g", tmp_path / "h2")
    assert core.last("fs.rename") == {"handle": 7, "from": "/a", "to": "/b"}
    assert core.last("fs.copy") == {"handle": 7, "from": "/b", "to": "/c"}
    assert core.last("fs.copy_from_host") == {"handle": 7, "from": str(tmp_path / "h"), "to": "/g"}
    assert core.last("fs.copy_to_host") == {"handle": 7, "from": "/g", "to": str(tmp_path / "h2")}
    assert core.last("fs.mkdir") == {"handle": 7, "path": "/e"}
    with pytest.raises(TypeError):
        await fs.write("/x", 5)  # type: ignore[arg-type]


async def test_fs_errors(core: FakeCore, sb: Sandbox) -> None:
    core.on("fs.read", err("filesystem", "no such file /nope", fs_kind="not_found"))
    core.on("fs.remove_dir", err("filesystem", "not empty", fs_kind="directory_not_empty"))
    with pytest.raises(PathNotFoundError) as e:
        await sb.fs.read("/nope")
    assert e.value.fs_kind == "not_found"
    with pytest.raises(FilesystemError) as e2:
        await sb.fs.remove_dir("/d")
    assert e2.value.fs_kind == "directory_not_empty"


async def test_metrics_and_logs(core: FakeCore, sb: Sandbox) -> None:
    core.on("sandbox.metrics", ok(METRICS))
    m = await sb.metrics()
    assert m.cpu_percent == 12.5 and m.memory_limit_bytes == 256 << 20
    assert m.timestamp_ms == 1_700_000_000_123.5 and m.uptime_ms == 4250 and m.status == "running"
    assert m.memory_host_resident_bytes is None
    core.on("sandbox.logs", ok([LOG]), ok([]))
    [entry] = await sb.logs()
    assert core.last("sandbox.logs") == {"handle": 7}
    assert entry.source == "stdout" and entry.session_id == 3 and entry.cursor == "c1"
    assert entry.data == b"hi\n" and entry.text() == "hi\n"
    assert isinstance(entry.timestamp_ms, float)
    await sb.logs(tail=50, since_ms=1.0, until_ms=2, sources=["stdout", "system"])
    assert core.last("sandbox.logs") == {"handle": 7, "tail": 50, "since_ms": 1.0, "until_ms": 2,
                                         "sources": ["stdout", "system"]}
    with pytest.raises(InvalidArgumentError):
        await sb.logs(sources=["everything"])
    with pytest.raises(InvalidArgumentError):
        await sb.logs(tail=-1)
    with pytest.raises(TypeError):
        await sb.logs(sources="stdout")  # type: ignore[arg-type]


async def test_all_metrics_and_setup(core: FakeCore) -> None:
    core.on("all_metrics", ok({"a": METRICS}))
    core.on("version", ok({"sdk": "0.1.0"}))
    core.on("is_installed", ok(False))
    core.on("ensure_installed", ok(None), err("not_installed", "could not build msb-vmm"))
    ms = await all_sandbox_metrics()
    assert list(ms) == ["a"] and ms["a"].disk_write_bytes == 20
    assert await sdk_version() == "0.1.0"
    assert await is_installed() is False
    assert await ensure_installed() is None
    from microsandbox import NotInstalledError

    with pytest.raises(NotInstalledError):
        await ensure_installed()
    assert [m for m in core.methods()] == ["all_metrics", "version", "is_installed", "ensure_installed", "ensure_installed"]
    assert all(a == {} for _, a in core.calls)


async def test_lifecycle_calls(core: FakeCore, sb: Sandbox) -> None:
    for m in ["sandbox.stop", "sandbox.kill", "sandbox.drain", "sandbox.pause", "sandbox.resume"]:
        core.on(m, ok(None), ok(None))
    core.on("sandbox.stop_and_wait", ok({"exit_code": 0, "success": True}))
    core.on("sandbox.wait", ok({"exit_code": -1, "success": False}))
    core.on("sandbox.wait_until_stopped", ok({"name": "sb", "status": "stopped", "exit_code": 0, "signal": None,
                                              "reason": "stopped", "observed_at_ms": 5}))
    core.on("sandbox.info", ok({"name": "sb", "owns_lifecycle": True, "config": {"memory": 512}}))
    await sb.stop()
    await sb.stop(timeout=3)
    await sb.kill()
    await sb.kill(timeout=0)
    assert core.args_of("sandbox.stop") == [{"handle": 7}, {"handle": 7, "timeout": 3}]
    assert core.args_of("sandbox.kill") == [{"handle": 7}, {"handle": 7, "timeout": 0}]
    await sb.drain()
    await sb.pause()
    await sb.resume()
    assert await sb.stop_and_wait() == (0, True)
    assert await sb.wait() == (-1, False)
    r = await sb.wait_until_stopped()
    assert r.status == "stopped" and r.exit_code == 0 and r.observed_at_ms == 5.0
    assert await sb.config() == {"memory": 512}


async def test_a_busy_refusal_leaves_the_handle_usable(core: FakeCore) -> None:
    core.on("create", sandbox_ref(handle=7))
    core.on("sandbox.detach", err("busy", "handle 7 is in use by another call"), ok(None))
    core.on("sandbox.remove_persisted", err("busy", "in use"), err("invalid_argument", "bad field"))
    core.on("sandbox.shell", exec_output(b"still here\n"), exec_output(b"and here\n"))
    sb = await Sandbox.create("b")
    with pytest.raises(BusyError):
        await sb.detach()
    assert await sb.owns_lifecycle is True
    assert (await sb.shell("echo still here")).stdout_text == "still here\n"
    assert core.last("sandbox.shell") == {"handle": 7, "script": "echo still here"}
    with pytest.raises(BusyError):
        await sb.remove_persisted()
    with pytest.raises(InvalidArgumentError):
        await sb.remove_persisted()
    assert (await sb.shell("echo and here")).stdout_text == "and here\n"
    await sb.detach()  # now it goes through
    assert await sb.owns_lifecycle is False
    with pytest.raises(InvalidHandleError, match="detached"):
        await sb.shell("true")
    await sb.close()  # nothing left to release
    assert "release" not in core.methods()


async def test_a_failed_consuming_call_spends_the_handle(core: FakeCore) -> None:
    # Past busy and argument checks the core has taken the object: an error of the
    # removal itself (still running) leaves nothing to release.
    core.on("create", sandbox_ref(handle=8))
    core.on("sandbox.remove_persisted", err("sandbox_still_running", "b is running"))
    sb = await Sandbox.create("b")
    with pytest.raises(SandboxStillRunningError):
        await sb.remove_persisted()
    with pytest.raises(InvalidHandleError, match="removed"):
        await sb.metrics()
    await sb.close()
    assert "release" not in core.methods()


async def test_a_cancelled_consuming_call_keeps_the_handle(core: FakeCore) -> None:
    core.on("create", sandbox_ref(handle=9), sandbox_ref(handle=10))
    started = asyncio.Event()

    async def slow(args):
        started.set()
        await asyncio.sleep(3600)
        return ok(None)

    core.on("sandbox.detach", slow, err("cancelled", "sandbox.detach was cancelled"))
    sb = await Sandbox.create("c")
    task = asyncio.ensure_future(sb.detach())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # Whether the core took it is unknown: the handle is kept, and released on close
    # (a handle the core had taken answers invalid_handle there, which is ignored).
    core.on("release", err("invalid_handle", "handle 9 does not name an object"))
    await sb.close()
    assert core.args_of("release") == [{"handle": 9}]
    sb2 = await Sandbox.create("c2")
    with pytest.raises(OperationCancelledError):
        await sb2.detach()
    assert await sb2.owns_lifecycle is True
    del sb2
    await spin()
    assert core.args_of("release") == [{"handle": 9}, {"handle": 10}]


async def test_an_unreadable_create_answer_releases_its_handle(core: FakeCore) -> None:
    core.on("create", ok({"sandbox": 77, "owns_lifecycle": True}))  # no name
    with pytest.raises(InternalError, match="name") as info:
        await Sandbox.create("x")
    await spin()
    # Released at once, even while the error (and its traceback) is still held.
    assert core.args_of("release") == [{"handle": 77}]
    del info


async def test_detach_and_remove_persisted_spend_the_handle(core: FakeCore) -> None:
    core.on("create", sandbox_ref(handle=7), sandbox_ref(handle=8))
    core.on("sandbox.detach", ok(None))
    core.on("sandbox.remove_persisted", ok(None))
    a = await Sandbox.create("a")
    await a.detach()
    assert await a.owns_lifecycle is False
    with pytest.raises(InvalidHandleError, match="detached"):
        await a.shell("true")
    b = await Sandbox.create("b")
    await b.remove_persisted()
    with pytest.raises(InvalidHandleError):
        await b.metrics()
    with pytest.raises(InvalidHandleError):
        await b.fs.read("/x")
    del a, b
    gc.collect()
    await asyncio.sleep(0)
    assert "release" not in core.methods()  # the core already dropped both


async def spin(n: int = 5) -> None:
    """A few iterations of the loop (a release scheduled by a finalizer runs)."""
    for _ in range(n):
        await asyncio.sleep(0)


async def test_dropping_the_sandbox_releases_the_handle_without_gc(core: FakeCore) -> None:
    # Plain reference counting: no cycle keeps a sandbox alive, sb.fs used or not.
    core.on("create", sandbox_ref(handle=41), sandbox_ref(handle=43))
    core.on("fs.exists", ok(True))
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        sb = await Sandbox.create("gc")
        assert await sb.fs.exists("/") is True
        fs = sb.fs  # the object of one access, not kept by the sandbox
        del fs
        del sb
        await spin()
        assert core.args_of("release") == [{"handle": 41}]
        # A SandboxFs held on keeps its sandbox (and handle) alive, and only that.
        sb2 = await Sandbox.create("gc2")
        fs2 = sb2.fs
        del sb2
        await spin()
        assert core.args_of("release") == [{"handle": 41}]
        del fs2
        await spin()
        assert core.args_of("release") == [{"handle": 41}, {"handle": 43}]
    finally:
        if was_enabled:
            gc.enable()


async def test_close_releases_once(core: FakeCore) -> None:
    core.on("create", sandbox_ref(handle=42))
    sb = await Sandbox.create("c")
    await sb.close()
    await sb.close()
    del sb
    gc.collect()
    await asyncio.sleep(0)
    assert core.args_of("release") == [{"handle": 42}]


async def test_context_manager_kills_and_removes(core: FakeCore) -> None:
    core.on("create", sandbox_ref(handle=9), sandbox_ref(handle=10), sandbox_ref(handle=11))
    core.on("sandbox.shell", exec_output(b"hello\n"))
    core.on("sandbox.kill", ok(None), err("not_running", "not running"), err("busy", "busy"))
    core.on("sandbox.remove_persisted", ok(None), ok(None), ok(None))
    async with await Sandbox.create("cm") as sb:
        assert (await sb.shell("echo hello")).stdout_text == "hello\n"
    assert core.methods()[-2:] == ["sandbox.kill", "sandbox.remove_persisted"]
    assert core.last("sandbox.remove_persisted") == {"handle": 9}
    # Already stopped: the kill's not_running is fine, the state still goes.
    async with await Sandbox.create("cm2"):
        pass
    assert core.last("sandbox.remove_persisted") == {"handle": 10}
    # The body's own error wins over a cleanup error; the state is still removed.
    with pytest.raises(KeyError):
        async with await Sandbox.create("cm3"):
            raise KeyError("body")
    assert core.methods()[-2:] == ["sandbox.kill", "sandbox.remove_persisted"]
    assert core.last("sandbox.remove_persisted") == {"handle": 11}
    assert "release" not in core.methods()  # remove_persisted spent it


async def test_context_manager_cleanup_errors(core: FakeCore, caplog: pytest.LogCaptureFixture) -> None:
    core.on("create", sandbox_ref(handle=12), sandbox_ref(handle=13), sandbox_ref(handle=14))
    # A kill that fails: remove_persisted is still tried, and refused busy, so the
    # handle (still ours) is released; the body had no error: the cleanup error is raised.
    core.on("sandbox.kill", err("busy", "agent busy"), err("agent", "kill failed"), err("not_running", "stopped"))
    core.on("sandbox.remove_persisted", err("busy", "in use"), ok(None),
            err("sandbox_still_running", "still running"))
    with pytest.raises(BusyError, match="in use") as info:
        async with await Sandbox.create("c1"):
            pass
    assert isinstance(info.value.__context__, BusyError) and "agent busy" in str(info.value.__context__)
    assert core.last("sandbox.remove_persisted") == {"handle": 12}
    assert core.args_of("release") == [{"handle": 12}]
    # The kill failed but the removal went through: the kill's error is raised.
    from microsandbox import AgentError, SandboxStillRunningError

    with pytest.raises(AgentError):
        async with await Sandbox.create("c2"):
            pass
    assert core.last("sandbox.remove_persisted") == {"handle": 13}
    assert core.args_of("release") == [{"handle": 12}]
    # The body raised: its exception goes on, the cleanup error is logged (and noted).
    with caplog.at_level("WARNING", logger="microsandbox"):
        with pytest.raises(KeyError) as body:
            async with await Sandbox.create("c3"):
                raise KeyError("body")
    assert "still running" in caplog.text
    if hasattr(body.value, "__notes__"):
        assert any("SandboxStillRunningError" in n for n in body.value.__notes__)
    assert core.last("sandbox.remove_persisted") == {"handle": 14}
    del SandboxStillRunningError


async def test_static_calls_and_handles(core: FakeCore) -> None:
    core.on("get", ok(HANDLE_INFO))
    core.on("list", ok([HANDLE_INFO, {**HANDLE_INFO, "name": "db", "status": "running", "vmm_pid": 99}]), ok([]))
    core.on("remove", ok(None), err("sandbox_still_running", "web is running"))
    core.on("start", sandbox_ref(handle=5, name="web"), sandbox_ref(handle=6, name="web"))
    core.on("connect", sandbox_ref(handle=7, name="web", owns=False))
    h = await Sandbox.get("web")
    assert isinstance(h, SandboxHandle)
    assert (h.name, h.status, h.labels, h.created_at, h.updated_at) == (
        "web", "stopped", {"team": "a"}, 1_700_000_000_000, 1_700_000_001_000)
    assert json.loads(h.config_json) == {"memory": 256, "env": {"A": "1"}}
    assert h.config() == {"memory": 256, "env": {"A": "1"}}
    assert h.exit_reason == "stopped" and h.detached is False and h.vmm_pid is None
    hs = await Sandbox.list()
    assert [x.name for x in hs] == ["web", "db"] and hs[1].vmm_pid == 99
    await Sandbox.list_with(labels={"team": "a"}, status="running")
    assert core.last("list") == {"labels": {"team": "a"}, "status": "running"}
    await Sandbox.remove("web")
    with pytest.raises(SandboxStillRunningError):
        await Sandbox.remove("web")
    sb = await Sandbox.start("web")
    assert core.last("start") == {"name": "web", "detached": False}
    assert await sb.owns_lifecycle
    sb2 = await h.start(detached=True)
    assert core.last("start") == {"name": "web", "detached": True}
    c = await h.connect()
    assert core.last("connect") == {"name": "web"} and await c.owns_lifecycle is False
    core.on("connect", sandbox_ref(handle=8, name="web", owns=False))
    c2 = await h.connect_with_timeout(2.5)
    assert core.last("connect") == {"name": "web"} and c2._handle() == 8
    with pytest.raises(InvalidArgumentError):
        await Sandbox.list_with(status="sleeping")
    del sb, sb2, c


async def test_connect_times_out(core: FakeCore, monkeypatch: pytest.MonkeyPatch) -> None:
    import microsandbox.sandbox as sandbox_module

    assert sandbox_module.CONNECT_TIMEOUT == 10.0  # the page: connect() errors after 10 s
    cancelled = []

    async def never(args):
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.append(args)
            raise
        return sandbox_ref()

    h = SandboxHandle(HANDLE_INFO)
    core.on("connect", never, never)
    with pytest.raises(OperationTimeoutError, match="web") as info:
        await h.connect_with_timeout(0.05)
    assert info.value.kind == "timeout"
    assert cancelled == [{"name": "web"}]  # the call itself was cancelled
    monkeypatch.setattr(sandbox_module, "CONNECT_TIMEOUT", 0.05)
    with pytest.raises(OperationTimeoutError):
        await h.connect()
    assert len(cancelled) == 2
    with pytest.raises(InvalidArgumentError):
        await h.connect_with_timeout(0)
    with pytest.raises(TypeError):
        await h.connect_with_timeout("5")  # type: ignore[arg-type]


async def test_handle_lifecycle(core: FakeCore) -> None:
    h = SandboxHandle(HANDLE_INFO)
    for m in ["handle.stop", "handle.kill", "handle.drain", "handle.pause", "handle.resume", "remove"]:
        core.on(m, ok(None), ok(None), ok(None))
    core.on("handle.logs", ok([LOG]))
    core.on("handle.wait_until_stopped", ok({"name": "web", "status": "crashed", "exit_code": None, "signal": 9,
                                             "reason": "killed", "observed_at_ms": 1}))
    core.on("get", ok({**HANDLE_INFO, "status": "running"}))
    await h.stop()
    await h.stop_with_timeout(0)
    await h.kill()
    await h.drain()
    await h.pause()
    await h.resume()
    await h.remove()
    assert core.args_of("handle.stop") == [{"name": "web"}, {"name": "web", "timeout": 0}]
    assert core.last("handle.kill") == {"name": "web"}
    assert core.last("remove") == {"name": "web"}
    [e] = await h.logs(tail=1, sources=["all"])
    assert core.last("handle.logs") == {"name": "web", "tail": 1, "sources": ["all"]}
    assert e.text() == "hi\n"
    r = await h.wait_until_stopped()
    assert r.status == "crashed" and r.signal == 9
    assert (await h.refresh()).status == "running"


async def test_not_running_is_typed(core: FakeCore, sb: Sandbox) -> None:
    core.on("sandbox.metrics", err("not_running", "sb is not running"))
    with pytest.raises(SandboxNotRunningError):
        await sb.metrics()
