"""``microsandbox._native`` over a fake ``_core``: answers nobody takes any more (the
awaiting task was cancelled after the core had finished) have their new handles released,
and nothing else is."""

from __future__ import annotations

import asyncio
import importlib
import json
import sys
import threading
import types
from typing import Any, Dict, List, Optional, Tuple

import pytest


class BlockingCore:
    """``_core``'s functions: ``call_blocking`` blocks its thread until the test opens the
    method's gate, and then answers as the real core would when it had finished before
    the cancel token fired (the answer it had)."""

    def __init__(self) -> None:
        self.answers: Dict[str, str] = {}
        self.gates: Dict[str, threading.Event] = {}
        self.calls: List[Tuple[str, Any, int]] = []
        self.cancelled: List[int] = []
        self.released = threading.Condition()
        self.release_args: List[Dict[str, Any]] = []
        self.on_return: Optional[Any] = None
        self._next = 0

    def answer(self, method: str, doc: Any, gated: bool = False) -> None:
        self.answers[method] = json.dumps(doc)
        if gated:
            self.gates[method] = threading.Event()

    def cancel_new(self) -> int:
        self._next += 1
        return self._next

    def cancel(self, token: int) -> None:
        self.cancelled.append(token)

    def cancel_free(self, token: int) -> None:
        pass

    def version(self) -> str:
        return "0.1.0"

    def call_blocking(self, method: str, args_json: str, token: int) -> str:
        self.calls.append((method, json.loads(args_json), token))
        if method == "release":
            with self.released:
                self.release_args.append(json.loads(args_json))
                self.released.notify_all()
            return '{"ok":null}'
        gate = self.gates.get(method)
        if gate is not None:
            assert gate.wait(10), f"{method}'s gate never opened"
        if self.on_return is not None:
            self.on_return()
        return self.answers[method]

    def wait_for_releases(self, n: int, timeout: float = 5.0) -> List[Dict[str, Any]]:
        with self.released:
            self.released.wait_for(lambda: len(self.release_args) >= n, timeout)
            return list(self.release_args)


@pytest.fixture
def native(monkeypatch: pytest.MonkeyPatch):
    fake = BlockingCore()
    try:
        mod = importlib.import_module("microsandbox._native")
    except ImportError:  # the extension is not built: the fake stands in for it
        stub = types.ModuleType("microsandbox._core")
        for name in ("call_blocking", "cancel_new", "cancel", "cancel_free", "version"):
            setattr(stub, name, getattr(fake, name))
        monkeypatch.setitem(sys.modules, "microsandbox._core", stub)
        mod = importlib.import_module("microsandbox._native")
    monkeypatch.setattr(mod, "_core", fake)
    return mod, fake


SANDBOX_REF = {"ok": {"sandbox": 5, "name": "sb", "owns_lifecycle": True}}


async def started(fake: BlockingCore, method: str) -> None:
    for _ in range(500):
        if any(m == method for m, _, _ in fake.calls):
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{method} never reached the core")


async def test_an_answer_taken_is_not_released(native) -> None:
    mod, fake = native
    fake.answer("create", SANDBOX_REF)
    answer = await mod.call("create", "{}")
    assert json.loads(answer) == SANDBOX_REF
    await asyncio.sleep(0.05)
    assert fake.release_args == [] and fake.cancelled == []


async def test_cancelled_before_the_answer_came(native) -> None:
    # The awaiting task is cancelled while the core works; the core had already finished
    # (its answer holds a new sandbox): nobody owns that sandbox, so it is released.
    mod, fake = native
    fake.answer("create", SANDBOX_REF, gated=True)
    task = asyncio.ensure_future(mod.call("create", "{}"))
    await started(fake, "create")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert fake.cancelled == [fake.calls[0][2]]  # the call's token fired
    fake.gates["create"].set()
    assert fake.wait_for_releases(1) == [{"handle": 5}]


@pytest.mark.parametrize(
    "method, ok, handles",
    [
        ("sandbox.exec_stream", {"exec": 11, "pid": 3}, [11]),
        ("sandbox.metrics_stream", {"stream": 12}, [12]),
        ("handle.log_stream", {"stream": 13}, [13]),
        ("create_with_progress", {"pull": 14}, [14]),
        ("ssh.open_client", {"client": 15}, [15]),
        ("ssh.serve", {"endpoint": 16, "addr": "127.0.0.1", "port": 2222}, [16]),
        ("pull.result", {"sandbox": 17, "name": "p", "owns_lifecycle": True}, [17]),
    ],
)
async def test_every_kind_of_new_handle_is_released(native, method, ok, handles) -> None:
    mod, fake = native
    fake.answer(method, {"ok": ok}, gated=True)
    task = asyncio.ensure_future(mod.call(method, "{}"))
    await started(fake, method)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    fake.gates[method].set()
    assert [a["handle"] for a in fake.wait_for_releases(len(handles))] == handles


async def test_answers_without_a_new_handle_are_not_released(native) -> None:
    mod, fake = native
    for method, doc in [
        ("sandbox.exec", {"ok": {"exit_code": 0, "success": True, "stdout_b64": ""}}),
        ("create", {"error": {"kind": "cancelled", "message": "create was cancelled"}}),
        ("list", {"ok": [{"name": "x", "sandbox": 3}]}),
        ("snapshot.get", {"ok": {"name": "s", "source_sandbox": "web"}}),
        ("sandbox.detach", {"ok": None}),
    ]:
        fake.answer(method, doc, gated=True)
        task = asyncio.ensure_future(mod.call(method, "{}"))
        await started(fake, method)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        fake.gates[method].set()
    await asyncio.sleep(0.2)
    assert fake.release_args == []


async def test_cancelled_as_the_answer_was_being_handed_over(native) -> None:
    # The worker has queued the answer on the loop, and the task is cancelled before that
    # runs: the answer is dropped on the loop, and its handle released there.
    mod, fake = native
    loop = asyncio.get_running_loop()
    fake.answer("start", SANDBOX_REF)
    task: "asyncio.Future[str]"

    def cancel_first() -> None:  # on the worker, just before it hands the answer over
        loop.call_soon_threadsafe(task.cancel)

    fake.on_return = cancel_first
    task = asyncio.ensure_future(mod.call("start", "{}"))
    with pytest.raises(asyncio.CancelledError):
        await task
    assert fake.wait_for_releases(1) == [{"handle": 5}]


async def test_cancelled_after_the_answer_was_handed_over(native) -> None:
    # The answer has resolved the call's future, but the task is cancelled before it
    # resumes: it raises CancelledError instead of returning the answer, whose handle is
    # then released.
    mod, fake = native
    loop = asyncio.get_running_loop()
    fake.answer("connect", {"ok": {"sandbox": 6, "name": "sb", "owns_lifecycle": False}})
    task: "asyncio.Future[str]"
    real = loop.call_soon_threadsafe

    def then_cancel(callback, *args, **kwargs):  # the worker's hand-over, then a cancel
        # Both in one callback: two separate ones could fall in different loop iterations,
        # letting the task resume with the answer between them.
        def hand_over_and_cancel() -> None:
            callback(*args)
            task.cancel()

        return real(hand_over_and_cancel, **kwargs)

    loop.call_soon_threadsafe = then_cancel  # type: ignore[method-assign]
    try:
        task = asyncio.ensure_future(mod.call("connect", "{}"))
        with pytest.raises(asyncio.CancelledError):
            await task
    finally:
        del loop.call_soon_threadsafe
    assert fake.wait_for_releases(1) == [{"handle": 6}]
    await asyncio.sleep(0.05)
    assert fake.release_args == [{"handle": 6}]  # once
