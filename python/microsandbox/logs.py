"""Captured command output: :class:`LogEntry` and the following :class:`LogStream`."""

from __future__ import annotations

from typing import Any, AsyncIterator, Optional

from microsandbox import _wire
from microsandbox.metrics import _Stream

__all__ = ["LogEntry", "LogStream"]


class LogEntry:
    """One chunk of output as the sandbox relayed it."""

    __slots__ = ("source", "session_id", "timestamp_ms", "data", "cursor")

    def __init__(
        self, source: str, session_id: Optional[int], timestamp_ms: float, data: bytes, cursor: str
    ) -> None:
        #: ``"stdout"``, ``"stderr"``, ``"output"`` (a tty's merged output) or ``"system"``.
        self.source = source
        #: The command's session, ``None`` for ``system`` entries.
        self.session_id = session_id
        #: Capture time, ms since the Unix epoch (UTC).
        self.timestamp_ms = timestamp_ms
        #: The bytes, exactly as produced.
        self.data = data
        #: Opaque position, for ``log_stream(from_cursor=...)``.
        self.cursor = cursor

    def text(self) -> str:
        """``data`` decoded as UTF-8 (invalid bytes replaced)."""
        return self.data.decode("utf-8", errors="replace")

    @classmethod
    def _from_wire(cls, d: Any) -> "LogEntry":
        f = _wire.field
        return cls(
            source=f(d, "source"),
            session_id=d.get("session_id"),
            timestamp_ms=float(f(d, "timestamp_ms")),
            data=_wire.b64decode(f(d, "data_b64")),
            cursor=str(f(d, "cursor")),
        )

    def __repr__(self) -> str:
        return (
            f"LogEntry(source={self.source!r}, session_id={self.session_id}, "
            f"timestamp_ms={self.timestamp_ms}, data={self.data[:80]!r})"
        )


class LogStream(_Stream):
    """Log entries as they are written (``follow=True``) or up to now:
    ``await s.recv()`` (``None`` at the end) or ``async for e in s``."""

    _what = "log stream"
    _make = staticmethod(LogEntry._from_wire)

    async def recv(self) -> Optional[LogEntry]:
        return await super().recv()

    def __aiter__(self) -> AsyncIterator[LogEntry]:
        return self

    async def __anext__(self) -> LogEntry:
        return await super().__anext__()

    async def __aenter__(self) -> "LogStream":
        return self
