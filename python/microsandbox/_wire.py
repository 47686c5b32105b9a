"""The one door to the core: ``call(method, args)`` over ``microsandbox._native``.

Every operation of the SDK is one call of :func:`call` (tests replace it with a fake);
this module also holds the helpers every object shares: base64 for ``*_b64`` fields and
:class:`HandleRef`, which releases a core handle when its Python owner is collected.
"""

from __future__ import annotations

import asyncio
import base64
import importlib
import json
import weakref
from typing import Any, Mapping, Optional, Set

from microsandbox.errors import (
    BusyError,
    InternalError,
    InvalidArgumentError,
    InvalidHandleError,
    MicrosandboxError,
    OperationCancelledError,
    error_from_wire,
)

_native: Any = None


def _load_native() -> Any:
    global _native
    if _native is None:
        _native = importlib.import_module("microsandbox._native")
    return _native


def decode_answer(raw: Any) -> Any:
    """The ``ok`` value of one answer document, or raise its typed error.

    An answer the SDK cannot read is a bug of the binding: :class:`InternalError` (kind
    ``protocol`` is the guest agent's, not the binding's)."""
    if isinstance(raw, (bytes, bytearray)):
        raw = bytes(raw).decode("utf-8")
    try:
        doc = json.loads(raw)
    except (TypeError, ValueError) as e:
        raise InternalError(f"the core's answer is not JSON: {e}") from None
    if isinstance(doc, dict):
        if "ok" in doc:
            return doc["ok"]
        if "error" in doc:
            raise error_from_wire(doc["error"])
    raise InternalError(f"the core's answer has neither ok nor error: {raw!r:.200}")


async def call(method: str, args: Mapping[str, Any]) -> Any:
    """Runs ``method`` with ``args`` in the core; the ``ok`` value, or raises.

    Raises the :class:`~microsandbox.errors.MicrosandboxError` subclass of the answer's
    error kind.
    """
    try:
        text = json.dumps(dict(args), separators=(",", ":"), allow_nan=False)
    except ValueError as e:  # NaN or infinity somewhere
        raise InvalidArgumentError(f"{method}: {e}") from None
    native = _load_native()
    raw = await native.call(method, text)
    return decode_answer(raw)


# -------------------------------------------------------------------------------------
# Bytes
# -------------------------------------------------------------------------------------


def b64encode(data: bytes) -> str:
    return base64.b64encode(bytes(data)).decode("ascii")


def b64decode(text: Any, field: str = "data_b64") -> bytes:
    if text is None:
        return b""
    if not isinstance(text, str):
        raise InternalError(f"{field} is not a string: {text!r:.80}")
    try:
        return base64.b64decode(text, validate=True)
    except ValueError as e:
        raise InternalError(f"{field} is not base64: {e}") from None


def field(d: Any, key: str) -> Any:
    """A required field of a value from the core (a missing one is an internal error)."""
    if not isinstance(d, Mapping):
        raise InternalError(f"expected an object from the core, got {d!r:.200}")
    try:
        return d[key]
    except KeyError:
        raise InternalError(f"the core's answer lacks {key!r}: {d!r:.200}") from None


# -------------------------------------------------------------------------------------
# Handles
# -------------------------------------------------------------------------------------

# Release tasks in flight (a task only weakly held by its loop could be collected early).
_pending: Set["asyncio.Task[Any]"] = set()


async def _release_quietly(handle: int) -> None:
    try:
        await call("release", {"handle": handle})
    except MicrosandboxError:
        pass


def _release_on(loop: Optional[asyncio.AbstractEventLoop], handle: int) -> None:
    """Finalizer: schedules ``release`` on the loop the handle was made on, if it runs."""
    if loop is None or loop.is_closed() or not loop.is_running():
        return

    def start() -> None:
        task = loop.create_task(_release_quietly(handle))
        _pending.add(task)
        task.add_done_callback(_pending.discard)

    try:
        loop.call_soon_threadsafe(start)
    except RuntimeError:  # closed meanwhile
        pass


def release_soon(handle: int) -> None:
    """Releases ``handle`` in the background on the running loop (a handle the core gave
    out that no Python object took, e.g. the answer of a start nobody awaits any more)."""
    try:
        loop: Optional[asyncio.AbstractEventLoop] = asyncio.get_running_loop()
    except RuntimeError:
        loop = None
    _release_on(loop, handle)


class HandleRef:
    """A core handle owned by a Python object: released when the owner is collected
    (on the loop it was made on, if that loop still runs), when :meth:`release` is
    awaited, or never when :meth:`spend` says the core has already dropped it."""

    __slots__ = ("_value", "_finalizer", "_what", "_why", "__weakref__")

    def __init__(self, owner: object, value: Any, what: str) -> None:
        if isinstance(value, bool) or not isinstance(value, int):
            raise InternalError(f"the core's {what} handle is not an integer: {value!r}")
        self._value = value
        self._what = what
        self._why = "released"
        try:
            loop: Optional[asyncio.AbstractEventLoop] = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        self._finalizer = weakref.finalize(owner, _release_on, loop, value)
        self._finalizer.atexit = False

    @property
    def alive(self) -> bool:
        return self._finalizer.alive

    @property
    def value(self) -> int:
        """The handle, or :class:`InvalidHandleError` once it is released or spent."""
        if not self._finalizer.alive:
            raise InvalidHandleError(f"this {self._what} was {self._why}")
        return self._value

    @property
    def raw(self) -> int:
        return self._value

    def spend(self, why: str) -> None:
        """The core has dropped the handle (a consuming call): never release it."""
        if self._finalizer.detach() is not None:
            self._why = why

    def release_soon(self) -> None:
        """Schedules the release on the handle's loop now, without waiting for it (for a
        handle whose owner cannot be used, e.g. made from an unreadable answer)."""
        if self._finalizer.alive:
            self._why = "released"
            self._finalizer()

    async def release(self) -> None:
        """Releases the handle now (a no-op once released or spent). A handle the core has
        already dropped (a consuming call that went through although its caller gave up)
        answers ``invalid_handle``, which is no error here."""
        if self._finalizer.detach() is not None:
            self._why = "released"
            try:
                await call("release", {"handle": self._value})
            except InvalidHandleError:
                pass

    async def consume(self, method: str, why: str, **args: Any) -> Any:
        """Runs ``method``, a call that consumes the handle (``detach``, ``ssh.close``,
        ``exec.wait``, ...), and marks the handle spent once the core has taken it.

        The core refuses such a call with ``busy`` while another call holds the object,
        and with ``invalid_argument`` before looking at the object: it still names the
        object then, and stays ours to use or release. A cancelled call may or may not have
        reached the core; the handle is kept, and releasing it later at worst answers
        ``invalid_handle`` (ignored). Any other outcome, success or error, means the core
        has dropped it."""
        h = self.value
        try:
            result = await call(method, {"handle": h, **args})
        except (BusyError, InvalidArgumentError, OperationCancelledError, asyncio.CancelledError):
            raise
        except Exception:
            self.spend(why)
            raise
        self.spend(why)
        return result


class Ready:
    """An awaitable that resolves to a value at once (the async properties)."""

    __slots__ = ("_value",)

    def __init__(self, value: Any) -> None:
        self._value = value

    def __repr__(self) -> str:
        return f"<awaitable {self._value!r}>"

    def __await__(self):  # type: ignore[no-untyped-def]
        return self._value
        yield  # pragma: no cover - makes this a generator
