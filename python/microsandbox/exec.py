"""Commands: collected output (:class:`ExecOutput`) and running commands
(:class:`ExecHandle`, whose events are :class:`ExecEvent`)."""

from __future__ import annotations

from typing import Any, AsyncIterator, Optional, Tuple, Union

from microsandbox import _wire
from microsandbox.errors import InternalError, InvalidArgumentError

__all__ = ["ExecStatus", "ExecOutput", "ExecEvent", "ExecSink", "ExecHandle"]


class ExecStatus(Tuple[int, bool]):
    """How a command ended: a tuple ``(exit_code, success)`` that also carries ``signal``
    (the signal that killed it, or ``None``) and ``timed_out``.

    ``exit_code`` is 128+N when killed by signal N, -1 when there was none.
    """

    signal: Optional[int]
    timed_out: bool

    def __new__(
        cls, exit_code: int, success: bool, signal: Optional[int] = None, timed_out: bool = False
    ) -> "ExecStatus":
        self = super().__new__(cls, (exit_code, success))
        self.signal = signal
        self.timed_out = timed_out
        return self

    @property
    def exit_code(self) -> int:  # type: ignore[override]
        return self[0]

    @property
    def success(self) -> bool:  # type: ignore[override]
        return self[1]

    @classmethod
    def _from_wire(cls, d: Any) -> "ExecStatus":
        return cls(
            int(_wire.field(d, "exit_code")),
            bool(_wire.field(d, "success")),
            d.get("signal"),
            bool(d.get("timed_out", False)),
        )

    def __repr__(self) -> str:
        return (
            f"ExecStatus(exit_code={self[0]}, success={self[1]}, signal={self.signal}, "
            f"timed_out={self.timed_out})"
        )


class ExecOutput:
    """A finished command's output and status."""

    __slots__ = ("_stdout", "_stderr", "_status")

    def __init__(self, stdout: bytes, stderr: bytes, status: ExecStatus) -> None:
        self._stdout = stdout
        self._stderr = stderr
        self._status = status

    @classmethod
    def _from_wire(cls, d: Any) -> "ExecOutput":
        return cls(
            _wire.b64decode(_wire.field(d, "stdout_b64"), "stdout_b64"),
            _wire.b64decode(_wire.field(d, "stderr_b64"), "stderr_b64"),
            ExecStatus._from_wire(d),
        )

    @property
    def exit_code(self) -> int:
        """The exit code (128+N when killed by signal N, -1 when none)."""
        return self._status.exit_code

    @property
    def success(self) -> bool:
        """True when the command exited with code 0."""
        return self._status.success

    @property
    def signal(self) -> Optional[int]:
        return self._status.signal

    @property
    def timed_out(self) -> bool:
        return self._status.timed_out

    @property
    def status(self) -> ExecStatus:
        return self._status

    @property
    def stdout_bytes(self) -> bytes:
        return self._stdout

    @property
    def stderr_bytes(self) -> bytes:
        return self._stderr

    @property
    def stdout_text(self) -> str:
        """Stdout decoded as UTF-8 (invalid bytes replaced)."""
        return self._stdout.decode("utf-8", errors="replace")

    @property
    def stderr_text(self) -> str:
        """Stderr decoded as UTF-8 (invalid bytes replaced)."""
        return self._stderr.decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return (
            f"ExecOutput(exit_code={self.exit_code}, success={self.success}, "
            f"stdout={self._stdout[:80]!r}, stderr={self._stderr[:80]!r})"
        )


class ExecEvent:
    """One event of a streaming command: ``event_type`` is ``"started"`` (``pid``),
    ``"stdout"`` / ``"stderr"`` (``data``) or ``"exited"`` (``exit_code``, ``success``,
    ``signal``, ``timed_out``); fields that do not apply are ``None``."""

    __slots__ = ("event_type", "pid", "data", "exit_code", "success", "signal", "timed_out")

    def __init__(
        self,
        event_type: str,
        *,
        pid: Optional[int] = None,
        data: Optional[bytes] = None,
        exit_code: Optional[int] = None,
        success: Optional[bool] = None,
        signal: Optional[int] = None,
        timed_out: Optional[bool] = None,
    ) -> None:
        self.event_type = event_type
        self.pid = pid
        self.data = data
        self.exit_code = exit_code
        self.success = success
        self.signal = signal
        self.timed_out = timed_out

    @property
    def code(self) -> Optional[int]:
        """The exit code of an ``exited`` event (alias of ``exit_code``)."""
        return self.exit_code

    @property
    def text(self) -> Optional[str]:
        """``data`` decoded as UTF-8 (invalid bytes replaced), for output events."""
        return None if self.data is None else self.data.decode("utf-8", errors="replace")

    @classmethod
    def _from_wire(cls, d: Any) -> "ExecEvent":
        t = _wire.field(d, "type")
        if t == "started":
            return cls("started", pid=d.get("pid"))
        if t in ("stdout", "stderr"):
            return cls(t, data=_wire.b64decode(_wire.field(d, "data_b64")))
        if t == "exited":
            s = ExecStatus._from_wire(d)
            return cls("exited", exit_code=s.exit_code, success=s.success, signal=s.signal, timed_out=s.timed_out)
        raise InternalError(f"unknown exec event type {t!r} from the core")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ExecEvent):
            return NotImplemented
        return all(getattr(self, k) == getattr(other, k) for k in self.__slots__)

    def __repr__(self) -> str:
        parts = [f"{k}={getattr(self, k)!r}" for k in self.__slots__[1:] if getattr(self, k) is not None]
        return f"ExecEvent({self.event_type!r}{', ' if parts else ''}{', '.join(parts)})"


class ExecSink:
    """Writes a streaming command's stdin (``stdin=Stdin.pipe()``)."""

    __slots__ = ("_owner",)

    def __init__(self, owner: "ExecHandle") -> None:
        self._owner = owner

    async def write(self, data: Union[bytes, bytearray, memoryview, str]) -> None:
        await self._owner.write(data)

    async def close(self) -> None:
        """End of file for the command's stdin."""
        await self._owner.close_stdin()


class ExecHandle:
    """A running command: its events (``await h.recv()`` or ``async for ev in h``), its
    stdin (``write`` / ``close_stdin`` or ``take_stdin()``), signals, and its end
    (``wait()`` or ``collect()``, each of which spends the handle). Closing the handle
    (``await h.close()``, leaving ``async with``, or garbage collection) ends the command.
    """

    def __init__(self, handle: int, stdin_pipe: bool = False, pid: Optional[int] = None) -> None:
        self._ref = _wire.HandleRef(self, handle, "command handle")
        self._stdin_pipe = stdin_pipe
        self._pid = pid
        self._stdin_taken = False
        self._done = False

    @property
    def stdin_piped(self) -> bool:
        return self._stdin_pipe

    @property
    def pid(self) -> Optional[int]:
        """The command's pid in the guest (once known)."""
        return self._pid

    async def recv(self) -> Optional[ExecEvent]:
        """The next event, or ``None`` once the stream is over (after ``exited``)."""
        if self._done:
            return None
        ev = await _wire.call("exec.recv", {"handle": self._ref.value})
        if ev is None:
            self._done = True
            return None
        event = ExecEvent._from_wire(ev)
        if event.event_type == "started" and event.pid is not None:
            self._pid = event.pid
        return event

    def __aiter__(self) -> AsyncIterator[ExecEvent]:
        return self

    async def __anext__(self) -> ExecEvent:
        ev = await self.recv()
        if ev is None:
            raise StopAsyncIteration
        return ev

    def take_stdin(self) -> Optional[ExecSink]:
        """The command's stdin writer (once; ``None`` without ``Stdin.pipe()``)."""
        if not self._stdin_pipe or self._stdin_taken:
            return None
        self._stdin_taken = True
        return ExecSink(self)

    async def write(self, data: Union[bytes, bytearray, memoryview, str]) -> None:
        """Writes to the command's stdin (needs ``stdin=Stdin.pipe()``)."""
        if isinstance(data, str):
            data = data.encode("utf-8")
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"write takes bytes or str, not {type(data).__name__}")
        if not self._stdin_pipe:
            raise InvalidArgumentError("this command's stdin is not a pipe (pass stdin=Stdin.pipe())")
        await _wire.call("exec.write", {"handle": self._ref.value, "data_b64": _wire.b64encode(bytes(data))})

    async def close_stdin(self) -> None:
        """End of file for the command's stdin."""
        if not self._stdin_pipe:
            raise InvalidArgumentError("this command's stdin is not a pipe (pass stdin=Stdin.pipe())")
        await _wire.call("exec.close_stdin", {"handle": self._ref.value})

    async def signal(self, sig: int) -> None:
        """Sends signal ``sig`` (e.g. ``signal.SIGTERM``) to the command."""
        if isinstance(sig, bool) or not isinstance(sig, int):
            raise TypeError("signal must be an int")
        await _wire.call("exec.signal", {"handle": self._ref.value, "signal": int(sig)})

    async def resize(self, rows: int, cols: int) -> None:
        """Sets the size of the command's terminal (``tty=True``)."""
        for what, v in (("rows", rows), ("cols", cols)):
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"{what} must be an int")
            if not 0 < v <= 0xFFFF:
                raise InvalidArgumentError(f"{what} must be from 1 to 65535; got {v}")
        await _wire.call("exec.resize", {"handle": self._ref.value, "rows": rows, "cols": cols})

    async def kill(self) -> None:
        """Kills the command (SIGKILL)."""
        await _wire.call("exec.kill", {"handle": self._ref.value})

    async def wait(self) -> ExecStatus:
        """Waits for the end, discarding output not yet received; spends the handle.
        Unpacks as ``(exit_code, success)``."""
        return ExecStatus._from_wire(await self._ref.consume("exec.wait", "spent by wait()"))

    async def collect(self) -> ExecOutput:
        """Waits for the end and returns the output not yet received; spends the handle."""
        return ExecOutput._from_wire(await self._ref.consume("exec.collect", "spent by collect()"))

    async def close(self) -> None:
        """Releases the handle (ends the command if it still runs)."""
        await self._ref.release()

    async def __aenter__(self) -> "ExecHandle":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"<ExecHandle {self._ref.raw}{'' if self._ref.alive else ' (closed)'}>"
