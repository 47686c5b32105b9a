"""The rest of the wire: attach, SSH, snapshots, request_*, handle metrics and log stream,
terminal resize, mkdir_all."""

from __future__ import annotations

import asyncio
import base64
import gc
from pathlib import Path

import pytest

from conftest import FakeCore, err, ok, sandbox_ref
from microsandbox import (
    InvalidArgumentError,
    InvalidHandleError,
    NotATerminalError,
    Sandbox,
    SandboxHandle,
    Snapshot,
    SshOutput,
)
from test_sandbox import HANDLE_INFO, LOG, METRICS

SNAP = {
    "name": "base",
    "path": "/home/u/.microsandbox/snapshots/base",
    "source_sandbox": "web",
    "image": "default",
    "image_digest": None,
    "size_bytes": 4096,
    "created_at_ms": 1_700_000_000_000,
    "digest": "sha256:ab",
}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture
async def sb(core: FakeCore) -> Sandbox:
    core.on("create", sandbox_ref(handle=7, name="sb"))
    return await Sandbox.create("sb")


async def test_attach(core: FakeCore, sb: Sandbox) -> None:
    core.on("sandbox.attach", ok(0), ok(3), err("not_a_terminal", "stdin is not a terminal"))
    core.on("sandbox.attach_shell", ok(130))
    assert await sb.attach("vi") == 0
    assert core.last("sandbox.attach") == {"handle": 7, "cmd": "vi"}
    assert await sb.attach("sh", ["-c", "exit 3"]) == 3
    assert core.last("sandbox.attach") == {"handle": 7, "cmd": "sh", "args": ["-c", "exit 3"]}
    with pytest.raises(NotATerminalError):
        await sb.attach("top")
    assert await sb.attach_shell() == 130
    assert core.last("sandbox.attach_shell") == {"handle": 7}
    with pytest.raises(TypeError):
        await sb.attach("vi", cwd="/")  # type: ignore[call-arg]  (the wire takes no options)


async def test_request_calls(core: FakeCore, sb: Sandbox) -> None:
    for m in ["request_stop", "request_kill", "request_drain"]:
        core.on(f"sandbox.{m}", ok(None))
        core.on(f"handle.{m}", ok(None))
    h = SandboxHandle(HANDLE_INFO)
    for m in ["request_stop", "request_kill", "request_drain"]:
        await getattr(sb, m)()
        await getattr(h, m)()
        assert core.last(f"sandbox.{m}") == {"handle": 7}
        assert core.last(f"handle.{m}") == {"name": "web"}


async def test_handle_metrics_log_stream_and_snapshots(core: FakeCore, tmp_path: Path) -> None:
    h = SandboxHandle(HANDLE_INFO)
    core.on("handle.metrics", ok(METRICS))
    core.on("handle.log_stream", ok({"stream": 80}))
    core.on("stream.next", ok(LOG), ok(None))
    core.on("handle.snapshot", ok(SNAP))
    core.on("handle.snapshot_to", ok({**SNAP, "name": "x", "path": str(tmp_path / "x")}))
    m = await h.metrics()
    assert core.last("handle.metrics") == {"name": "web"} and m.cpu_percent == 12.5
    s = await h.log_stream(sources=["all"], follow=True)
    assert core.last("handle.log_stream") == {"name": "web", "sources": ["all"], "follow": True}
    assert [e.text() async for e in s] == ["hi\n"]
    snap = await h.snapshot("base")
    assert core.last("handle.snapshot") == {"name": "web", "snapshot": "base"}
    assert snap == Snapshot(**{**SNAP, "created_at_ms": 1.7e12})
    snap2 = await h.snapshot_to(tmp_path / "x")
    assert core.last("handle.snapshot_to") == {"name": "web", "path": str(tmp_path / "x")}
    assert snap2.path == str(tmp_path / "x")


async def test_snapshot_statics(core: FakeCore, tmp_path: Path) -> None:
    core.on("snapshot.list", ok([SNAP]))
    core.on("snapshot.get", ok(SNAP), err("snapshot_not_found", "no snapshot named nope"))
    core.on("snapshot.remove", ok(None))
    core.on("snapshot.export", ok(None))
    core.on("snapshot.import", ok({**SNAP, "name": "copy"}), ok(SNAP))
    [s] = await Snapshot.list()
    assert s.name == "base" and s.size_bytes == 4096 and s.image_digest is None
    assert (await Snapshot.get("base")).digest == "sha256:ab"
    assert core.last("snapshot.get") == {"name": "base"}
    from microsandbox import SnapshotNotFoundError

    with pytest.raises(SnapshotNotFoundError, match="nope") as info:
        await Snapshot.get("nope")
    assert info.value.kind == "snapshot_not_found"
    await Snapshot.remove("base")
    assert core.last("snapshot.remove") == {"name": "base"}
    await Snapshot.export("base", tmp_path / "b.tar", with_image=True)
    assert core.last("snapshot.export") == {"name": "base", "path": str(tmp_path / "b.tar"), "with_image": True}
    c = await Snapshot.import_(tmp_path / "b.tar", name="copy")
    assert core.last("snapshot.import") == {"path": str(tmp_path / "b.tar"), "name": "copy"}
    assert c.name == "copy"
    await Snapshot.import_(tmp_path / "b.tar")
    assert core.last("snapshot.import") == {"path": str(tmp_path / "b.tar")}


async def test_ssh(core: FakeCore, sb: Sandbox) -> None:
    core.on("ssh.open_client", ok({"client": 90}))
    core.on("ssh.exec", ok({"stdout_b64": b64(b"hi\n"), "stderr_b64": "", "exit_status": 0, "exit_signal": None}),
            ok({"stdout_b64": "", "stderr_b64": "", "exit_status": None, "exit_signal": "KILL"}))
    core.on("ssh.close", ok(None))
    client = await sb.ssh().open_client()
    assert core.last("ssh.open_client") == {"handle": 7}
    out = await client.exec("echo hi")
    assert isinstance(out, SshOutput)
    assert core.last("ssh.exec") == {"handle": 90, "command": "echo hi"}
    assert (out.stdout_text, out.exit_status, out.success) == ("hi\n", 0, True)
    out = await client.exec("kill -9 $$")
    assert out.exit_signal == "KILL" and not out.success
    await client.close()
    await client.close()  # once
    assert core.args_of("ssh.close") == [{"handle": 90}]
    with pytest.raises(InvalidHandleError):
        await client.exec("true")

    core.on("ssh.serve", ok({"endpoint": 91, "addr": "127.0.0.1", "port": 2222, "host_key": "ssh-ed25519 AAA",
                             "fingerprint": "SHA256:x", "known_hosts_line": "[127.0.0.1]:2222 ssh-ed25519 AAA"}))
    core.on("ssh.authorize", ok(None))
    core.on("ssh.endpoint_client", ok({"client": 92}))
    core.on("ssh.shutdown", ok(None))
    async with await sb.ssh().serve(port=2222, authorized_keys=["ssh-ed25519 KEY a@b"]) as ep:
        assert core.last("ssh.serve") == {"handle": 7, "port": 2222, "authorized_keys": ["ssh-ed25519 KEY a@b"]}
        assert (ep.addr, ep.port, ep.fingerprint) == ("127.0.0.1", 2222, "SHA256:x")
        await ep.authorize("ssh-ed25519 OTHER")
        assert core.last("ssh.authorize") == {"handle": 91, "key": "ssh-ed25519 OTHER"}
        c2 = await ep.client(user="root")
        assert core.last("ssh.endpoint_client") == {"handle": 91, "user": "root"}
    assert core.last("ssh.shutdown") == {"handle": 91}
    core.on("ssh.serve", ok({"endpoint": 93, "addr": "127.0.0.1", "port": 40000, "host_key": "k",
                             "fingerprint": "f", "known_hosts_line": "l"}))
    ep2 = await sb.ssh().serve()
    assert core.last("ssh.serve") == {"handle": 7}
    with pytest.raises(InvalidArgumentError):
        await sb.ssh().serve(port=70000)
    del c2, ep2
    gc.collect()
    for _ in range(3):
        await asyncio.sleep(0)
    assert {a["handle"] for a in core.args_of("release")} >= {92, 93}


async def test_resize_and_mkdir_all(core: FakeCore, sb: Sandbox) -> None:
    core.on("sandbox.exec_stream", ok({"exec": 95, "pid": 3}))
    core.on("exec.resize", ok(None))
    core.on("fs.mkdir_all", ok(None))
    h = await sb.exec_stream("top", tty=True)
    assert core.last("sandbox.exec_stream") == {"handle": 7, "cmd": "top", "args": [], "tty": True}
    await h.resize(40, 120)
    assert core.last("exec.resize") == {"handle": 95, "rows": 40, "cols": 120}
    with pytest.raises(InvalidArgumentError):
        await h.resize(0, 80)
    with pytest.raises(TypeError):
        await h.resize(24.0, 80)  # type: ignore[arg-type]
    await sb.fs.mkdir_all("/a/b/c")
    assert core.last("fs.mkdir_all") == {"handle": 7, "path": "/a/b/c"}


async def test_ssh_busy_refusals_leave_the_objects_usable(core: FakeCore, sb: Sandbox) -> None:
    from microsandbox import BusyError

    core.on("ssh.open_client", ok({"client": 96}))
    core.on("ssh.close", err("busy", "handle 96 is in use by another call"), ok(None))
    core.on("ssh.exec", ok({"stdout_b64": b64(b"ok\n"), "stderr_b64": "", "exit_status": 0, "exit_signal": None}))
    client = await sb.ssh().open_client()
    with pytest.raises(BusyError):
        await client.close()
    assert (await client.exec("echo ok")).stdout_text == "ok\n"
    assert core.last("ssh.exec") == {"handle": 96, "command": "echo ok"}
    await client.close()
    assert core.args_of("ssh.close") == [{"handle": 96}, {"handle": 96}]
    with pytest.raises(InvalidHandleError, match="closed"):
        await client.exec("true")

    core.on("ssh.serve", ok({"endpoint": 97, "addr": "127.0.0.1", "port": 2200, "host_key": "k",
                             "fingerprint": "f", "known_hosts_line": "l"}))
    core.on("ssh.shutdown", err("busy", "handle 97 is in use by another call"), ok(None))
    core.on("ssh.authorize", ok(None))
    ep = await sb.ssh().serve(authorized_keys=["ssh-ed25519 KEY"])
    with pytest.raises(BusyError):
        await ep.shutdown()
    await ep.authorize("ssh-ed25519 OTHER")
    assert core.last("ssh.authorize") == {"handle": 97, "key": "ssh-ed25519 OTHER"}
    await ep.shutdown()
    await ep.shutdown()  # once
    assert core.args_of("ssh.shutdown") == [{"handle": 97}, {"handle": 97}]
    del client, ep
    gc.collect()
    await asyncio.sleep(0)
    assert "release" not in core.methods()  # both were spent by the core
