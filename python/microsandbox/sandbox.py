"""Sandboxes: :class:`Sandbox` (a running sandbox this process holds) and
:class:`SandboxHandle` (a sandbox's record: status and lifecycle, running or not)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from microsandbox import _config, _wire
from microsandbox._wire import Ready
from microsandbox.errors import MicrosandboxError, OperationTimeoutError, SandboxNotRunningError
from microsandbox.exec import ExecHandle, ExecOutput
from microsandbox.fs import SandboxFs
from microsandbox.logs import LogEntry, LogStream
from microsandbox.metrics import MetricsStream, SandboxMetrics
from microsandbox.pull import PullSession
from microsandbox.snapshot import Snapshot
from microsandbox.ssh import SandboxSsh
from microsandbox.types import (
    Rlimit,
    SandboxStatus,
    Stdin,
    check_bool,
    check_path,
    check_seconds,
    check_str,
    check_str_list,
    check_str_map,
    enum_value,
)

__all__ = ["Sandbox", "SandboxHandle", "SandboxStopResult", "all_sandbox_metrics"]

_log = logging.getLogger("microsandbox")

#: How long ``SandboxHandle.connect()`` waits for the core (the reference page's 10 s).
CONNECT_TIMEOUT = 10.0


def _exit_tuple(d: Any) -> Tuple[int, bool]:
    return int(_wire.field(d, "exit_code")), bool(_wire.field(d, "success"))


def _log_stream_args(
    sources: Any, since_ms: Any, from_cursor: Any, until_ms: Any, follow: Any
) -> Dict[str, Any]:
    args = _config.log_options(None, since_ms, until_ms, sources)
    if from_cursor is not None:
        args["from_cursor"] = check_str(from_cursor, "from_cursor")
    args["follow"] = check_bool(follow, "follow")
    return args


def _timeout_args(timeout: Optional[float]) -> Dict[str, Any]:
    return {} if timeout is None else {"timeout": check_seconds(timeout, "timeout")}


@dataclass(frozen=True)
class SandboxStopResult:
    """How a sandbox ended (``wait_until_stopped``)."""

    name: str
    status: str
    exit_code: Optional[int]
    signal: Optional[int]
    reason: Optional[str]
    #: When the end was observed, ms since the Unix epoch.
    observed_at_ms: float

    @classmethod
    def _from_wire(cls, d: Any) -> "SandboxStopResult":
        f = _wire.field
        return cls(
            name=f(d, "name"),
            status=f(d, "status"),
            exit_code=d.get("exit_code"),
            signal=d.get("signal"),
            reason=d.get("reason"),
            observed_at_ms=float(f(d, "observed_at_ms")),
        )


class Sandbox:
    """A running sandbox this process holds.

    Made by :meth:`create`, :meth:`start`, :meth:`connect` or a
    :class:`~microsandbox.PullSession`. An owned sandbox (``owns_lifecycle``) stops when
    this object is garbage collected, unless :meth:`detach` was called. ``async with`` kills
    it and removes its persisted state on exit.
    """

    def __init__(self, handle: int, name: str, owns_lifecycle: bool) -> None:
        self._ref = _wire.HandleRef(self, handle, "sandbox handle")
        self._name = name
        self._owns = owns_lifecycle

    @classmethod
    def _from_ref(cls, d: Any) -> "Sandbox":
        # The handle is owned first: should the rest of the answer be unreadable, it is
        # released rather than lost.
        sb = cls(_wire.field(d, "sandbox"), "", False)
        try:
            sb._name = str(_wire.field(d, "name"))
            sb._owns = bool(_wire.field(d, "owns_lifecycle"))
        except BaseException:
            sb._ref.release_soon()
            raise
        return sb

    def _handle(self) -> int:
        return self._ref.value

    async def _call(self, method: str, **args: Any) -> Any:
        return await _wire.call(method, {"handle": self._ref.value, **args})

    # -- static ------------------------------------------------------------------------

    @staticmethod
    async def create(name: str, **kwargs: Any) -> "Sandbox":
        """Creates and boots a sandbox; keyword arguments are its configuration (see the
        README). Pulls the image if needed and returns once the guest is ready. With
        ``detached=True`` the sandbox outlives this process from the start: the object
        does not own its lifecycle (the Rust SDK's ``create_detached``)."""
        args = _config.create_args(name, kwargs)
        return Sandbox._from_ref(await _wire.call("create", args))

    @staticmethod
    def create_with_progress(name: str, **kwargs: Any) -> PullSession:
        """As :meth:`create`, returning at once a :class:`~microsandbox.PullSession` that
        reports the image pull and gives the sandbox (not awaitable itself)."""
        return PullSession(_config.create_args(name, kwargs))

    @staticmethod
    async def start(name: str, *, detached: bool = False) -> "Sandbox":
        """Boots a stopped sandbox again with its persisted configuration."""
        args = {"name": check_str(name, "name"), "detached": check_bool(detached, "detached")}
        return Sandbox._from_ref(await _wire.call("start", args))

    @staticmethod
    async def connect(name: str) -> "Sandbox":
        """Attaches to a running sandbox (without owning its lifecycle)."""
        return Sandbox._from_ref(await _wire.call("connect", {"name": check_str(name, "name")}))

    @staticmethod
    async def get(name: str) -> "SandboxHandle":
        """The record of a sandbox, running or not."""
        return SandboxHandle._from_wire(await _wire.call("get", {"name": check_str(name, "name")}))

    @staticmethod
    async def list() -> List["SandboxHandle"]:
        """Every sandbox (running, stopped, crashed, ...)."""
        return [SandboxHandle._from_wire(h) for h in await _wire.call("list", {})]

    @staticmethod
    async def list_with(
        *, labels: Optional[Mapping[str, str]] = None, status: Optional[Union[SandboxStatus, str]] = None
    ) -> List["SandboxHandle"]:
        """The sandboxes with all of ``labels`` and, if given, in ``status``."""
        args: Dict[str, Any] = {}
        if labels is not None:
            args["labels"] = check_str_map(labels, "labels")
        if status is not None:
            args["status"] = enum_value(SandboxStatus, status, "status")
        return [SandboxHandle._from_wire(h) for h in await _wire.call("list", args)]

    @staticmethod
    async def remove(name: str) -> None:
        """Deletes a stopped sandbox and all its state."""
        await _wire.call("remove", {"name": check_str(name, "name")})

    # -- properties --------------------------------------------------------------------

    @property
    def name(self) -> Ready:
        """The sandbox's name (an async property: ``await sb.name``)."""
        return Ready(self._name)

    @property
    def owns_lifecycle(self) -> Ready:
        """Whether this object owns the sandbox's lifecycle (``await sb.owns_lifecycle``)."""
        return Ready(self._owns)

    @property
    def fs(self) -> SandboxFs:
        """Files in the sandbox (a plain property: ``sb.fs.read(...)``). Each access makes
        a small new object that keeps this sandbox alive while it is held (the sandbox
        does not hold it back, so dropping the sandbox frees it at once)."""
        return SandboxFs(self)

    async def config(self) -> Dict[str, Any]:
        """The sandbox's configuration as the core holds it."""
        info = await self._call("sandbox.info")
        return _wire.field(info, "config")

    # -- commands ----------------------------------------------------------------------

    async def exec(
        self,
        cmd: str,
        args: Optional[Union[Sequence[str], Mapping[str, Any]]] = None,
        *,
        cwd: Optional[str] = None,
        user: Optional[str] = None,
        env: Optional[Mapping[str, str]] = None,
        timeout: Optional[float] = None,
        stdin: Optional[Union[Stdin, bytes, str]] = None,
        tty: bool = False,
        rlimits: Optional[Sequence[Rlimit]] = None,
    ) -> ExecOutput:
        """Runs ``cmd`` with ``args`` (no shell) and collects its output."""
        wire = self._exec_args("exec", cmd, args, dict(cwd=cwd, user=user, env=env, timeout=timeout,
                                                       stdin=stdin, tty=tty or None, rlimits=rlimits), False)
        return ExecOutput._from_wire(await self._call("sandbox.exec", **wire))

    async def exec_stream(
        self,
        cmd: str,
        args: Optional[Union[Sequence[str], Mapping[str, Any]]] = None,
        *,
        cwd: Optional[str] = None,
        user: Optional[str] = None,
        env: Optional[Mapping[str, str]] = None,
        timeout: Optional[float] = None,
        stdin: Optional[Union[Stdin, bytes, str]] = None,
        tty: bool = False,
        rlimits: Optional[Sequence[Rlimit]] = None,
    ) -> ExecHandle:
        """Starts ``cmd`` and returns a handle streaming its events."""
        wire = self._exec_args("exec_stream", cmd, args, dict(cwd=cwd, user=user, env=env, timeout=timeout,
                                                              stdin=stdin, tty=tty or None, rlimits=rlimits), True)
        return _exec_handle(await self._call("sandbox.exec_stream", **wire), wire)

    async def shell(
        self,
        script: str,
        *,
        cwd: Optional[str] = None,
        user: Optional[str] = None,
        env: Optional[Mapping[str, str]] = None,
        timeout: Optional[float] = None,
        stdin: Optional[Union[Stdin, bytes, str]] = None,
        tty: bool = False,
        rlimits: Optional[Sequence[Rlimit]] = None,
    ) -> ExecOutput:
        """Runs ``script`` with the sandbox's shell (default ``/bin/sh``) and collects its
        output."""
        wire = _shell_args("shell", script, dict(cwd=cwd, user=user, env=env, timeout=timeout,
                                                 stdin=stdin, tty=tty or None, rlimits=rlimits), False)
        return ExecOutput._from_wire(await self._call("sandbox.shell", **wire))

    async def shell_stream(
        self,
        script: str,
        *,
        cwd: Optional[str] = None,
        user: Optional[str] = None,
        env: Optional[Mapping[str, str]] = None,
        timeout: Optional[float] = None,
        stdin: Optional[Union[Stdin, bytes, str]] = None,
        tty: bool = False,
        rlimits: Optional[Sequence[Rlimit]] = None,
    ) -> ExecHandle:
        """Starts ``script`` with the sandbox's shell and returns a handle streaming its
        events."""
        wire = _shell_args("shell_stream", script, dict(cwd=cwd, user=user, env=env, timeout=timeout,
                                                        stdin=stdin, tty=tty or None, rlimits=rlimits), True)
        return _exec_handle(await self._call("sandbox.shell_stream", **wire), wire)

    async def attach(self, cmd: str, args: Optional[Sequence[str]] = None) -> int:
        """Bridges this process's terminal to ``cmd`` in a guest PTY until it exits; its
        exit code. Raises :class:`~microsandbox.NotATerminalError` when stdin is not a
        terminal."""
        wire: Dict[str, Any] = {"cmd": check_str(cmd, "cmd")}
        if args is not None:
            wire["args"] = check_str_list(args, "args")
        return int(await self._call("sandbox.attach", **wire))

    async def attach_shell(self) -> int:
        """:meth:`attach` to the sandbox's shell."""
        return int(await self._call("sandbox.attach_shell"))

    def ssh(self) -> SandboxSsh:
        """SSH for this sandbox: an endpoint on the host's loopback or an in-process
        client."""
        return SandboxSsh(self)

    def _exec_args(self, method: str, cmd: Any, args: Any, opts: Dict[str, Any], streaming: bool) -> Dict[str, Any]:
        argv, opts = _config.split_exec_args(method, args, opts)
        wire = {"cmd": check_str(cmd, "cmd"), "args": argv or []}
        wire.update(_config.exec_options(method, opts, streaming))
        return wire

    # -- observation -------------------------------------------------------------------

    async def metrics(self) -> SandboxMetrics:
        """A resource snapshot."""
        return SandboxMetrics._from_wire(await self._call("sandbox.metrics"))

    async def metrics_stream(self, interval: float = 1.0) -> MetricsStream:
        """A snapshot every ``interval`` seconds until the sandbox stops."""
        d = await self._call("sandbox.metrics_stream", interval=check_seconds(interval, "interval", positive=True))
        return MetricsStream(_wire.field(d, "stream"))

    async def logs(
        self,
        tail: Optional[int] = None,
        since_ms: Optional[float] = None,
        until_ms: Optional[float] = None,
        sources: Optional[Sequence[str]] = None,
    ) -> List[LogEntry]:
        """Captured output (default sources: stdout, stderr, output), oldest first."""
        d = await self._call("sandbox.logs", **_config.log_options(tail, since_ms, until_ms, sources))
        return [LogEntry._from_wire(e) for e in d]

    async def log_stream(
        self,
        sources: Optional[Sequence[str]] = None,
        since_ms: Optional[float] = None,
        from_cursor: Optional[str] = None,
        until_ms: Optional[float] = None,
        follow: bool = False,
    ) -> LogStream:
        """Captured output as a stream: what is logged up to now, or with ``follow`` also
        new entries as they come, until the sandbox stops."""
        args = _log_stream_args(sources, since_ms, from_cursor, until_ms, follow)
        d = await self._call("sandbox.log_stream", **args)
        return LogStream(_wire.field(d, "stream"))

    # -- lifecycle ---------------------------------------------------------------------

    async def stop(self, timeout: Optional[float] = None) -> None:
        """Shuts down gracefully; killed if still running after ``timeout`` seconds
        (the core's default: 10)."""
        await self._call("sandbox.stop", **_timeout_args(timeout))

    async def kill(self, timeout: Optional[float] = None) -> None:
        """Terminates at once (SIGKILL); ``timeout``: how long to wait for the exit."""
        await self._call("sandbox.kill", **_timeout_args(timeout))

    async def stop_and_wait(self) -> Tuple[int, bool]:
        """Stops the sandbox and waits for it: ``(exit_code, success)``."""
        return _exit_tuple(await self._call("sandbox.stop_and_wait"))

    async def wait(self) -> Tuple[int, bool]:
        """Waits for the sandbox to exit on its own: ``(exit_code, success)``."""
        return _exit_tuple(await self._call("sandbox.wait"))

    async def wait_until_stopped(self) -> SandboxStopResult:
        """Waits until the sandbox has stopped, however it ends."""
        return SandboxStopResult._from_wire(await self._call("sandbox.wait_until_stopped"))

    async def drain(self) -> None:
        """Graceful drain: running commands finish, new ones are refused."""
        await self._call("sandbox.drain")

    async def request_stop(self) -> None:
        """Asks for a graceful stop without waiting for it."""
        await self._call("sandbox.request_stop")

    async def request_kill(self) -> None:
        """Asks for a kill without waiting for it."""
        await self._call("sandbox.request_kill")

    async def request_drain(self) -> None:
        """Asks for a drain without waiting for it."""
        await self._call("sandbox.request_drain")

    async def pause(self) -> None:
        """Parks the vCPUs."""
        await self._call("sandbox.pause")

    async def resume(self) -> None:
        """Resumes a paused sandbox."""
        await self._call("sandbox.resume")

    async def detach(self) -> None:
        """Lets go of the sandbox without stopping it (this object is spent). Refused with
        :class:`~microsandbox.BusyError` while another call on this object runs; the
        object is still usable then."""
        await self._ref.consume("sandbox.detach", "detached")
        self._owns = False

    async def remove_persisted(self) -> None:
        """Removes the (stopped) sandbox and its persisted state (this object is spent).
        Refused with :class:`~microsandbox.BusyError` while another call on this object
        runs; the object is still usable then."""
        await self._ref.consume("sandbox.remove_persisted", "removed")

    async def close(self) -> None:
        """Releases this object now (an owned, attached sandbox stops, as on garbage
        collection)."""
        await self._ref.release()

    async def __aenter__(self) -> "Sandbox":
        return self

    async def __aexit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        """Kills the sandbox and removes its persisted state.

        ``remove_persisted`` is tried whatever the kill did; if the object is still held
        after it (the removal failed), it is released. A cleanup error is raised when the
        body ended normally; when the body raised, the body's exception goes on and the
        cleanup error is logged (logger ``microsandbox``) and noted on it."""
        if not self._ref.alive:  # detached, removed or closed already
            return
        errors: List[BaseException] = []
        try:
            try:
                await self.kill()
            except SandboxNotRunningError:
                pass  # already stopped: only the state is left to remove
            except MicrosandboxError as e:
                errors.append(e)
            try:
                await self.remove_persisted()
            except MicrosandboxError as e:
                errors.append(e)
        finally:
            if self._ref.alive:
                try:
                    await self._ref.release()
                except MicrosandboxError as e:
                    errors.append(e)
        if not errors:
            return
        first = errors[0]
        for later in errors[1:]:
            if later.__context__ is None:
                later.__context__ = first
        if exc_type is None:
            raise errors[-1]
        for cleanup in errors:
            what = f"{type(cleanup).__name__}: {cleanup}"
            _log.warning("cleaning up sandbox %r after an error failed: %s", self._name, what)
            if hasattr(exc, "add_note"):  # Python 3.11+
                exc.add_note(f"while cleaning up sandbox {self._name!r}: {what}")

    def __repr__(self) -> str:
        state = "" if self._ref.alive else " (released)"
        return f"<Sandbox {self._name!r}{state}>"


class SandboxHandle:
    """A sandbox's record (from :meth:`Sandbox.get` / :meth:`Sandbox.list`): status,
    configuration and lifecycle, whether it runs or not. The fields are what the state
    database held when the record was read (:meth:`refresh` reads it again)."""

    __slots__ = (
        "name",
        "status",
        "labels",
        "created_at",
        "updated_at",
        "vmm_pid",
        "detached",
        "exit_reason",
        "ephemeral",
        "_config",
    )

    def __init__(self, info: Mapping[str, Any]) -> None:
        f = _wire.field
        #: The sandbox's name.
        self.name: str = f(info, "name")
        #: ``"running"``, ``"stopped"``, ``"crashed"``, ``"draining"`` or ``"paused"``.
        self.status: str = f(info, "status")
        self._config: Any = info.get("config")
        self.labels: Dict[str, str] = dict(info.get("labels") or {})
        #: Creation time, ms since the Unix epoch.
        self.created_at: Optional[float] = info.get("created_at_ms")
        #: Last update, ms since the Unix epoch.
        self.updated_at: Optional[float] = info.get("updated_at_ms")
        self.vmm_pid: Optional[int] = info.get("vmm_pid")
        self.detached: bool = bool(info.get("detached", False))
        self.exit_reason: Optional[str] = info.get("exit_reason")
        self.ephemeral: bool = bool(info.get("ephemeral", False))

    @classmethod
    def _from_wire(cls, d: Any) -> "SandboxHandle":
        return cls(d)

    @property
    def config_json(self) -> str:
        """The configuration as JSON text."""
        return json.dumps(self._config)

    def config(self) -> Dict[str, Any]:
        """The configuration (a copy of what the state database holds)."""
        return json.loads(json.dumps(self._config))

    async def refresh(self) -> "SandboxHandle":
        """The record read again."""
        return await Sandbox.get(self.name)

    async def connect(self) -> Sandbox:
        """Attaches to the running sandbox (without owning its lifecycle); raises
        :class:`~microsandbox.OperationTimeoutError` if the core has not answered
        within 10 seconds."""
        return await self.connect_with_timeout(CONNECT_TIMEOUT)

    async def connect_with_timeout(self, timeout: float) -> Sandbox:
        """As :meth:`connect`, waiting at most ``timeout`` seconds (then the call is
        cancelled in the core and :class:`~microsandbox.OperationTimeoutError` raised)."""
        secs = check_seconds(timeout, "timeout", positive=True)
        try:
            return await asyncio.wait_for(Sandbox.connect(self.name), secs)
        except asyncio.TimeoutError:
            raise OperationTimeoutError(
                f"connect to sandbox {self.name!r}: no answer within {secs} s", kind="timeout"
            ) from None

    async def start(self, *, detached: bool = False) -> Sandbox:
        """Boots the stopped sandbox again."""
        return await Sandbox.start(self.name, detached=detached)

    async def stop(self, timeout: Optional[float] = None) -> None:
        """Shuts down gracefully (killed after ``timeout`` seconds; default 10)."""
        await _wire.call("handle.stop", {"name": self.name, **_timeout_args(timeout)})

    async def stop_with_timeout(self, timeout: float) -> None:
        """As :meth:`stop` with an explicit timeout; 0 kills at once."""
        if timeout is None:
            raise TypeError("stop_with_timeout needs a timeout")
        await self.stop(timeout)

    async def kill(self, timeout: Optional[float] = None) -> None:
        """Terminates at once (SIGKILL)."""
        await _wire.call("handle.kill", {"name": self.name, **_timeout_args(timeout)})

    async def drain(self) -> None:
        """Graceful drain: running commands finish, new ones are refused."""
        await _wire.call("handle.drain", {"name": self.name})

    async def request_stop(self) -> None:
        """Asks for a graceful stop without waiting for it."""
        await _wire.call("handle.request_stop", {"name": self.name})

    async def request_kill(self) -> None:
        """Asks for a kill without waiting for it."""
        await _wire.call("handle.request_kill", {"name": self.name})

    async def request_drain(self) -> None:
        """Asks for a drain without waiting for it."""
        await _wire.call("handle.request_drain", {"name": self.name})

    async def metrics(self) -> SandboxMetrics:
        """A resource snapshot of the running sandbox."""
        return SandboxMetrics._from_wire(await _wire.call("handle.metrics", {"name": self.name}))

    async def snapshot(self, name: str) -> Snapshot:
        """Freezes the (stopped) sandbox's writable layer as snapshot ``name``."""
        d = await _wire.call("handle.snapshot", {"name": self.name, "snapshot": check_str(name, "name")})
        return Snapshot._from_wire(d)

    async def snapshot_to(self, path: Union[str, "os.PathLike[str]"]) -> Snapshot:
        """As :meth:`snapshot`, the artifact at ``path``."""
        d = await _wire.call("handle.snapshot_to", {"name": self.name, "path": check_path(path, "path")})
        return Snapshot._from_wire(d)

    async def pause(self) -> None:
        await _wire.call("handle.pause", {"name": self.name})

    async def resume(self) -> None:
        await _wire.call("handle.resume", {"name": self.name})

    async def wait_until_stopped(self) -> SandboxStopResult:
        return SandboxStopResult._from_wire(await _wire.call("handle.wait_until_stopped", {"name": self.name}))

    async def remove(self) -> None:
        """Deletes the (stopped) sandbox and its state."""
        await Sandbox.remove(self.name)

    async def logs(
        self,
        tail: Optional[int] = None,
        since_ms: Optional[float] = None,
        until_ms: Optional[float] = None,
        sources: Optional[Sequence[str]] = None,
    ) -> List[LogEntry]:
        """Captured output, without starting the sandbox."""
        args = {"name": self.name, **_config.log_options(tail, since_ms, until_ms, sources)}
        return [LogEntry._from_wire(e) for e in await _wire.call("handle.logs", args)]

    async def log_stream(
        self,
        sources: Optional[Sequence[str]] = None,
        since_ms: Optional[float] = None,
        from_cursor: Optional[str] = None,
        until_ms: Optional[float] = None,
        follow: bool = False,
    ) -> LogStream:
        """Captured output as a stream, without starting the sandbox."""
        args = {"name": self.name, **_log_stream_args(sources, since_ms, from_cursor, until_ms, follow)}
        return LogStream(_wire.field(await _wire.call("handle.log_stream", args), "stream"))

    def __repr__(self) -> str:
        return f"<SandboxHandle {self.name!r} {self.status}>"


async def all_sandbox_metrics() -> Dict[str, SandboxMetrics]:
    """Metrics of every running sandbox, by name."""
    d = await _wire.call("all_metrics", {})
    return {name: SandboxMetrics._from_wire(m) for name, m in d.items()}


def _shell_args(method: str, script: Any, opts: Dict[str, Any], streaming: bool) -> Dict[str, Any]:
    """The wire arguments of ``sandbox.shell`` / ``sandbox.shell_stream``."""
    wire: Dict[str, Any] = {"script": check_str(script, "script")}
    wire.update(_config.exec_options(method, opts, streaming))
    return wire


def _exec_handle(answer: Any, wire: Dict[str, Any]) -> ExecHandle:
    """The :class:`ExecHandle` of a streaming exec's answer (stdin piped when asked)."""
    return ExecHandle(_wire.field(answer, "exec"), bool(wire.get("stdin_pipe", False)), answer.get("pid"))
