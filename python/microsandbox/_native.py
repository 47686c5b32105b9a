"""The asyncio face of the extension ``microsandbox._core``.

``await call(method, args_json)`` runs one call of the Rust core (``docs/bindings.md``) on a
thread of its own, which blocks in the extension with the GIL released, and resolves a
future on the caller's event loop: the loop never blocks, and no thread of the core's
runtime ever holds Python state. Cancelling the awaiting task fires the call's cancel token,
which ends the call in the core at once. At exit, calls still in flight (a stream nobody
reads to its end) are cancelled and their threads joined before the interpreter finalizes.

An answer nobody takes any more (the awaiting task was cancelled, or its loop closed, after
the core had already finished the call) may hold a new handle -- a sandbox, a running
command, a stream, a pull session, an SSH client or endpoint. Nothing in Python owns it, so
it is released here, on a thread of its own; otherwise an owned sandbox would run until
the process exits.
"""

from __future__ import annotations

import asyncio
import atexit
import json
import threading
from typing import Dict, List, Optional, Set

from microsandbox import _core

_lock = threading.Lock()
_in_flight: Dict[int, threading.Thread] = {}
_releasers: Set[threading.Thread] = set()
_exiting = False

#: The fields of an ``ok`` object that carry a new handle (docs/bindings.md: SandboxRef,
#: ``{"exec"}``, ``{"stream"}``, ``{"pull"}``, ``{"client"}``, ``{"endpoint", ...}``).
HANDLE_FIELDS = ("sandbox", "exec", "stream", "pull", "client", "endpoint")


def handles_in(answer: Optional[str]) -> List[int]:
    """The handles an answer document hands over (none for an error or a plain value)."""
    if not answer:
        return []
    try:
        doc = json.loads(answer)
    except (TypeError, ValueError):
        return []
    if not isinstance(doc, dict) or not isinstance(doc.get("ok"), dict):
        return []
    ok = doc["ok"]
    return [
        v
        for v in (ok.get(f) for f in HANDLE_FIELDS)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0
    ]


def _release_now(handles: List[int]) -> None:
    for h in handles:
        try:
            # Not cancellable (0): a release is quick, and must happen. A handle already
            # gone answers invalid_handle, which is fine: there is nothing to drop.
            _core.call_blocking("release", json.dumps({"handle": h}), 0)
        except BaseException:  # noqa: BLE001 - nobody to tell; never raise on a bare thread
            pass


def release_abandoned(answer: Optional[str]) -> None:
    """Releases the handles of an answer nobody takes, on a thread of its own (the
    caller may be the event loop's, which must not block)."""
    handles = handles_in(answer)
    if not handles:
        return

    def run() -> None:
        try:
            _release_now(handles)
        finally:
            with _lock:
                _releasers.discard(threading.current_thread())

    thread = threading.Thread(target=run, name="microsandbox:release", daemon=True)
    with _lock:
        _releasers.add(thread)
    thread.start()


async def call(method: str, args_json: str) -> str:
    """The answer document of ``method`` with ``args_json`` (``{"ok"}`` or ``{"error"}``)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[str] = loop.create_future()
    token = _core.cancel_new()
    # Set (under _lock) once the awaiting side has given up; the worker then releases what
    # the answer holds itself rather than handing it to a loop that may never run again.
    abandoned = [False]

    def settle(answer: Optional[str], error: Optional[BaseException]) -> None:
        if future.done():  # cancelled meanwhile: nobody takes this answer
            release_abandoned(answer)
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(answer or "")

    def run() -> None:
        answer: Optional[str] = None
        error: Optional[BaseException] = None
        try:
            answer = _core.call_blocking(method, args_json, token)
        except BaseException as e:  # noqa: BLE001 - handed to the awaiting task
            error = e
        finally:
            with _lock:
                _in_flight.pop(token, None)
                gone = abandoned[0] or _exiting
            _core.cancel_free(token)
        if gone:
            _release_now(handles_in(answer))
            return
        try:
            loop.call_soon_threadsafe(settle, answer, error)
        except RuntimeError:  # the loop is closed: nobody waits any more
            _release_now(handles_in(answer))

    thread = threading.Thread(target=run, name=f"microsandbox:{method}", daemon=True)
    with _lock:
        _in_flight[token] = thread
    thread.start()
    try:
        return await future
    except asyncio.CancelledError:
        with _lock:
            abandoned[0] = True
        _core.cancel(token)
        if future.done() and not future.cancelled() and future.exception() is None:
            # The answer had arrived, but the task was cancelled before it could take it.
            release_abandoned(future.result())
        raise


def version() -> str:
    """The version of the core."""
    return _core.version()


@atexit.register
def _cancel_in_flight() -> None:
    global _exiting
    with _lock:
        _exiting = True
        calls = list(_in_flight.items())
    for token, _ in calls:
        _core.cancel(token)
    for _, thread in calls:
        thread.join(timeout=5)
    with _lock:
        releasers = list(_releasers)
    for thread in releasers:
        thread.join(timeout=5)
