"""The asyncio face of the extension ``microsandbox._core``.

``await call(method, args_json)`` runs one call of the Rust core (``docs/bindings.md``) on a
thread of its own, which blocks in the extension with the GIL released, and resolves a
future on the caller's event loop: the loop never blocks, and no thread of the core's
runtime ever holds Python state. Cancelling the awaiting task fires the call's cancel token,
which ends the call in the core at once. At exit, calls still in flight (a stream nobody
reads to its end) are cancelled and their threads joined before the interpreter finalizes.
"""

from __future__ import annotations

import asyncio
import atexit
import threading
from typing import Dict, Optional

from microsandbox import _core

_lock = threading.Lock()
_in_flight: Dict[int, threading.Thread] = {}


async def call(method: str, args_json: str) -> str:
    """The answer document of ``method`` with ``args_json`` (``{"ok"}`` or ``{"error"}``)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[str] = loop.create_future()
    token = _core.cancel_new()

    def settle(answer: Optional[str], error: Optional[BaseException]) -> None:
        if future.done():
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
            _core.cancel_free(token)
        try:
            loop.call_soon_threadsafe(settle, answer, error)
        except RuntimeError:
            pass  # the loop is closed: nobody waits any more

    thread = threading.Thread(target=run, name=f"microsandbox:{method}", daemon=True)
    with _lock:
        _in_flight[token] = thread
    thread.start()
    try:
        return await future
    except asyncio.CancelledError:
        _core.cancel(token)
        raise


def version() -> str:
    """The version of the core."""
    return _core.version()


@atexit.register
def _cancel_in_flight() -> None:
    with _lock:
        calls = list(_in_flight.items())
    for token, _ in calls:
        _core.cancel(token)
    for _, thread in calls:
        thread.join(timeout=5)
