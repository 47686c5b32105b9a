"""Image pull progress: ``Sandbox.create_with_progress`` returns a :class:`PullSession`."""

from __future__ import annotations

import asyncio
import weakref
from typing import TYPE_CHECKING, Any, AsyncIterator, Dict, Generator, Optional

from microsandbox import _wire
from microsandbox.errors import MicrosandboxError

if TYPE_CHECKING:  # pragma: no cover
    from microsandbox.sandbox import Sandbox

__all__ = ["PullEvent", "PullSession"]

_PULL_FIELDS = (
    "reference",
    "manifest_digest",
    "layer_count",
    "total_download_bytes",
    "layer_index",
    "digest",
    "downloaded_bytes",
    "total_bytes",
    "diff_id",
    "bytes_read",
)


class PullEvent:
    """One pull progress event. ``event_type`` is ``"resolving"``, ``"resolved"``,
    ``"layer_download_progress"``, ... (snake_case); the fields of that event are
    attributes, and those that do not apply are ``None``."""

    __slots__ = ("event_type", "fields")

    def __init__(self, event_type: str, fields: Optional[Dict[str, Any]] = None) -> None:
        self.event_type = event_type
        #: Every field the core sent with the event.
        self.fields: Dict[str, Any] = dict(fields or {})

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        fields = object.__getattribute__(self, "fields")
        if name in fields:
            return fields[name]
        if name in _PULL_FIELDS:
            return None
        raise AttributeError(f"PullEvent has no field {name!r}")

    @classmethod
    def _from_wire(cls, d: Any) -> "PullEvent":
        t = _wire.field(d, "type")
        return cls(str(t), {k: v for k, v in d.items() if k != "type"})

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PullEvent):
            return NotImplemented
        return self.event_type == other.event_type and self.fields == other.fields

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}={v!r}" for k, v in self.fields.items())
        return f"PullEvent({self.event_type!r}{', ' if inner else ''}{inner})"


class PullSession:
    """An image pull and the boot after it. Iterate ``session.progress`` for
    :class:`PullEvent`\\ s, then ``await session.result()`` (once) for the running
    :class:`~microsandbox.Sandbox`. ``async with session:`` releases the session when the
    result was not taken (which cancels the create). ``await session`` is ``result()``.
    """

    def __init__(self, args: Dict[str, Any]) -> None:
        self._args = args
        self._ref: Optional[_wire.HandleRef] = None
        self._starting: Optional["asyncio.Future[Any]"] = None
        self._done = False
        self._result_taken = False

    def _adopt(self, answer: Any) -> None:
        """Owns the session handle of ``create_with_progress``'s answer (once)."""
        if self._ref is None:
            self._ref = _wire.HandleRef(self, _wire.field(answer, "pull"), "pull session")

    async def _handle(self) -> int:
        if self._ref is None:
            if self._starting is None:
                self._starting = asyncio.ensure_future(_wire.call("create_with_progress", self._args))
                # The start runs on even when the task awaiting it is cancelled (it is
                # shielded, so that another use of the session can take it up): its handle
                # is owned as soon as it comes, by this session, or released if the
                # session is gone.
                self._starting.add_done_callback(_adopt_started(weakref.ref(self)))
            answer = await asyncio.shield(self._starting)
            self._adopt(answer)
        assert self._ref is not None
        return self._ref.value

    async def start(self) -> None:
        """Starts the pull now (the first use of the session does it otherwise)."""
        await self._handle()

    async def recv(self) -> Optional[PullEvent]:
        """The next event, or ``None`` once the pull has finished."""
        if self._done:
            return None
        h = await self._handle()
        ev = await _wire.call("pull.next", {"handle": h})
        if ev is None:
            self._done = True
            return None
        return PullEvent._from_wire(ev)

    @property
    def progress(self) -> AsyncIterator[PullEvent]:
        """The pull's events, until it has finished."""
        return self._progress()

    async def _progress(self) -> AsyncIterator[PullEvent]:
        while True:
            ev = await self.recv()
            if ev is None:
                return
            yield ev

    async def result(self) -> "Sandbox":
        """The running sandbox, once the pull and the boot are done (await it once)."""
        from microsandbox.sandbox import Sandbox

        if self._result_taken:
            raise RuntimeError("PullSession.result() was already awaited")
        self._result_taken = True
        await self._handle()
        assert self._ref is not None
        return Sandbox._from_ref(await self._ref.consume("pull.result", "spent by result()"))

    def __await__(self) -> Generator[Any, None, "Sandbox"]:
        return self.result().__await__()

    async def close(self) -> None:
        """Releases the session (a create still under way is dropped)."""
        if self._ref is None and self._starting is not None:
            try:
                await self._handle()
            except Exception:
                return
        if self._ref is not None:
            await self._ref.release()

    async def __aenter__(self) -> "PullSession":
        await self._handle()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        # A no-op once result() has taken the session; releases it otherwise (also when
        # result() was cancelled before the core took it).
        await self.close()


def _adopt_started(session_ref: "weakref.ReferenceType[PullSession]") -> Any:
    """The done-callback of a session's start: the new handle goes to the session, or,
    when nobody holds the session any more, back to the core."""

    def done(task: "asyncio.Future[Any]") -> None:
        if task.cancelled() or task.exception() is not None:
            return  # no handle came (the error is the awaiting caller's, if any)
        answer = task.result()
        session = session_ref()
        if session is not None:
            try:
                session._adopt(answer)
            except MicrosandboxError:
                pass  # an unreadable answer: raised to whoever awaits the start
            return
        handle = answer.get("pull") if isinstance(answer, dict) else None
        if isinstance(handle, int) and not isinstance(handle, bool):
            _wire.release_soon(handle)

    return done
