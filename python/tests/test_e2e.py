"""End to end: real sandboxes through the real extension (set MSB_E2E=1; boots take
~30-60 s under software KVM). The default busybox root, no image, no network device:
nothing here can reach the network. Nothing is installed either: without the runtime
(``is_installed()``) the tests fail at once, saying so, rather than build it."""

from __future__ import annotations

import asyncio
import importlib
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from microsandbox import (
    CommandNotFoundError,
    MicrosandboxError,
    ExecTimeoutError,
    Network,
    NotATerminalError,
    PathNotFoundError,
    Sandbox,
    SandboxNotFoundError,
    SandboxStillRunningError,
    Snapshot,
    is_installed,
    sdk_version,
)

pytestmark = pytest.mark.skipif(os.environ.get("MSB_E2E") != "1", reason="set MSB_E2E=1 to boot real sandboxes")

ROOT = Path(__file__).resolve().parent.parent
BOOT = 600.0  # seconds allowed for one boot (software KVM, first boot may build artifacts)
STEP = 120.0  # seconds allowed for any other call


def log(msg: str) -> None:
    print(f"e2e: {msg}", file=sys.stderr, flush=True)


@pytest.fixture(scope="module")
def msb_home(tmp_path_factory: pytest.TempPathFactory):
    """The real extension, and sandbox state in a private MSB_HOME for this run."""
    native = importlib.import_module("microsandbox._native")  # fails loudly if not built
    assert not getattr(native, "__fake__", False)
    if not asyncio.run(is_installed()):
        pytest.fail(
            "the microsandbox runtime is not installed (msb-vmm, the guest kernel, initramfs, "
            "agent or default root is missing): run `await microsandbox.ensure_installed()` "
            "or scripts/setup first; the tests do not build it",
            pytrace=False,
        )
    home = tmp_path_factory.mktemp("msb-home")
    home.chmod(0o700)
    old = os.environ.get("MSB_HOME")
    os.environ["MSB_HOME"] = str(home)
    yield home
    if old is None:
        os.environ.pop("MSB_HOME", None)
    else:
        os.environ["MSB_HOME"] = old


async def step(aw, timeout: float = STEP):
    return await asyncio.wait_for(aw, timeout)


async def test_sandbox_lifecycle(msb_home: Path) -> None:
    assert await sdk_version() == "0.1.0"
    assert await is_installed() is True
    name = f"py-e2e-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    content = b"kept across a restart\n"
    t = time.monotonic()
    sb = await step(
        Sandbox.create(
            name,
            memory=256,
            network=Network.disabled(),
            env={"GREETING": "hello"},
            scripts={"greet": "#!/bin/sh\necho \"greetings, $1\"\n"},
        ),
        BOOT,
    )
    log(f"create (boot to ready): {time.monotonic() - t:.1f} s")
    sb2 = None
    try:
        assert await sb.name == name
        assert await sb.owns_lifecycle is True

        # shell: the sandbox's env, stdout and stderr apart, the exit code
        out = await step(sb.shell('echo "$GREETING from the shell"; echo oops >&2; exit 3'))
        assert out.stdout_text == "hello from the shell\n"
        assert out.stderr_text == "oops\n"
        assert (out.exit_code, out.success) == (3, False)

        # exec with env, cwd and stdin
        out = await step(
            sb.exec("sh", ["-c", 'pwd; echo "$FOO"; cat'], cwd="/tmp", env={"FOO": "bar"}, stdin=b"piped input\n")
        )
        assert out.stdout_text == "/tmp\nbar\npiped input\n", out
        assert out.success and out.exit_code == 0
        out = await step(sb.shell("greet world"))
        assert out.stdout_text == "greetings, world\n", out

        # typed errors
        with pytest.raises(CommandNotFoundError):
            await step(sb.exec("/no/such/command"))
        t = time.monotonic()
        with pytest.raises(ExecTimeoutError):
            await step(sb.exec("sh", ["-c", "echo before; sleep 60"], timeout=3))
        assert time.monotonic() - t < 50

        # streaming
        h = await step(sb.exec_stream("sh", ["-c", "echo one; echo two >&2; exit 4"]))
        events = [e async for e in h]
        assert events[0].event_type == "started" and events[0].pid
        assert events[-1].event_type == "exited" and events[-1].exit_code == 4
        assert b"".join(e.data for e in events if e.event_type == "stdout") == b"one\n"
        assert b"".join(e.data for e in events if e.event_type == "stderr") == b"two\n"
        await h.close()

        # files
        await step(sb.fs.write("/persist.txt", content))
        assert await step(sb.fs.read("/persist.txt")) == content
        assert await step(sb.fs.exists("/persist.txt")) is True
        st = await step(sb.fs.stat("/persist.txt"))
        assert st.is_file and st.size == len(content)
        assert "persist.txt" in [e.name for e in await step(sb.fs.list("/"))]
        assert (await step(sb.shell("cat /persist.txt"))).stdout_bytes == content
        with pytest.raises(PathNotFoundError):
            await step(sb.fs.read("/no/such/file"))

        # metrics
        m = await step(sb.metrics())
        assert m.status == "running"
        assert 200 << 20 <= m.memory_limit_bytes <= 300 << 20, m
        assert 0 < m.memory_bytes <= m.memory_limit_bytes, m
        assert m.uptime_ms > 0 and m.cpu_percent >= 0
        assert abs(m.timestamp_ms / 1000 - time.time()) < 120
        stream = await step(sb.metrics_stream(0.5))
        first = await step(stream.recv())
        assert first is not None and first.memory_limit_bytes == m.memory_limit_bytes
        await stream.close()

        # SSH, in process
        async with await step(sb.ssh().open_client()) as client:
            ssh_out = await step(client.exec("echo over ssh; id -u"))
        assert ssh_out.stdout_text == "over ssh\n0\n" and ssh_out.success, ssh_out

        # attach needs a terminal
        if not os.isatty(0):
            with pytest.raises(NotATerminalError):
                await step(sb.attach("true"))

        # the record
        handle = await step(Sandbox.get(name))
        assert handle.status == "running"
        # connect (10 s at most) gives a second, non-owning object over the same sandbox
        other = await step(handle.connect())
        assert await other.owns_lifecycle is False
        assert (await step(other.shell("echo via connect"))).stdout_text == "via connect\n"
        await other.close()  # does not stop it
        other = await step(handle.connect_with_timeout(30))
        await other.close()
        assert (await step(sb.shell("echo still up"))).stdout_text == "still up\n"
        hm = await step(handle.metrics())
        assert hm.memory_limit_bytes == m.memory_limit_bytes
        assert name in [x.name for x in await step(Sandbox.list())]
        with pytest.raises(SandboxStillRunningError):
            await step(Sandbox.remove(name))

        # stop, then the logs of a stopped sandbox
        t = time.monotonic()
        code, success = await step(sb.stop_and_wait())
        log(f"stop_and_wait: {time.monotonic() - t:.1f} s -> ({code}, {success})")
        assert success, code
        await sb.close()
        handle = await step(Sandbox.get(name))
        assert handle.status == "stopped"
        text = "".join(e.text() for e in await step(handle.logs()))
        assert "hello from the shell" in text and "piped input" in text, text[-2000:]

        # a snapshot of the stopped sandbox
        snap = await step(handle.snapshot(f"{name}-snap"))
        assert snap.name == f"{name}-snap" and snap.source_sandbox == name and snap.size_bytes > 0
        assert snap.digest.startswith("sha256:")
        assert f"{name}-snap" in [x.name for x in await step(Snapshot.list())]
        assert (await step(Snapshot.get(f"{name}-snap"))).digest == snap.digest
        await step(Snapshot.remove(f"{name}-snap"))
        assert f"{name}-snap" not in [x.name for x in await step(Snapshot.list())]

        # start again: the files are still there, the logs go on
        t = time.monotonic()
        sb2 = await step(Sandbox.start(name), BOOT)
        log(f"start again: {time.monotonic() - t:.1f} s")
        assert await sb2.owns_lifecycle is True
        assert await step(sb2.fs.read("/persist.txt")) == content
        assert (await step(sb2.shell("echo second boot"))).stdout_text == "second boot\n"
        entries = await step(sb2.logs())
        text = "".join(e.text() for e in entries)
        assert "hello from the shell" in text and "second boot" in text, text[-2000:]
        assert {e.source for e in entries} <= {"stdout", "stderr", "output"}
        assert "oops" in "".join(e.text() for e in entries if e.source == "stderr")
        assert all(e.timestamp_ms > 1.7e12 for e in entries)
        assert entries == sorted(entries, key=lambda e: e.timestamp_ms)
        tail = await step(sb2.logs(tail=1))
        assert len(tail) == 1 and tail[0].text() == entries[-1].text()
        streamed = [e async for e in await step(sb2.log_stream())]
        assert [e.cursor for e in streamed][: len(entries)] == [e.cursor for e in entries]

        code, success = await step(sb2.stop_and_wait())
        assert success, code
        await sb2.close()
        await step(Sandbox.remove(name))
        with pytest.raises(SandboxNotFoundError):
            await step(Sandbox.get(name))
    finally:
        # Whatever failed, leave nothing running: kill through the objects still held,
        # then remove the record.
        for held in (sb, sb2):
            if held is not None:
                try:
                    await held.kill()
                except MicrosandboxError:
                    pass
                await held.close()
        try:
            await Sandbox.remove(name)
        except MicrosandboxError:
            pass


async def test_create_with_progress(msb_home: Path) -> None:
    # The default root pulls nothing: the session's progress ends without events, then
    # result() gives the booted sandbox.
    name = f"py-e2e-progress-{os.getpid()}"
    t = time.monotonic()
    session = Sandbox.create_with_progress(name, memory=256, network=Network.disabled())

    async def events():
        return [e async for e in session.progress]

    assert await step(events(), BOOT) == []
    sb = await step(session.result(), BOOT)
    log(f"create_with_progress (boot to ready): {time.monotonic() - t:.1f} s")
    try:
        out = await step(sb.shell("echo booted-with-progress"))
        assert out.stdout_text == "booted-with-progress\n"
        code, success = await step(sb.stop_and_wait())
        assert success, code
    finally:
        try:
            await sb.kill()
        except MicrosandboxError:
            pass
        await sb.close()
        await step(Sandbox.remove(name))

    # A session given up before its result cancels the create: nothing of that name is
    # left running.
    cancelled = name + "-cancelled"
    async with Sandbox.create_with_progress(cancelled, memory=256, network=Network.disabled()):
        await asyncio.sleep(2)  # into the boot
    deadline = time.monotonic() + 30
    while True:
        try:
            h = await step(Sandbox.get(cancelled))
        except SandboxNotFoundError:
            break
        if h.status != "running":
            await step(Sandbox.remove(cancelled))
            break
        assert time.monotonic() < deadline, "the cancelled create is still running 30 s on"
        await asyncio.sleep(0.5)


def test_quickstart_example(msb_home: Path) -> None:
    t = time.monotonic()
    run = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quickstart.py")],
        capture_output=True,
        text=True,
        timeout=BOOT + 300,
        env=dict(os.environ),
    )
    log(f"quickstart: {time.monotonic() - t:.1f} s")
    assert run.returncode == 0, run.stderr[-4000:]
    lines = run.stdout.splitlines()
    assert lines[:3] == ["hello from Linux", "piped in", "written from the host"], run.stdout
    assert lines[3].startswith("memory: ") and lines[3].endswith(" of 256 MiB"), run.stdout
    # `async with` removed it.
    left = asyncio.run(Sandbox.list())
    assert not [h.name for h in left if h.name.startswith("quickstart-")]
