"""Shared fixtures: a fake core standing in for ``microsandbox._native``.

Unit tests never need the extension: ``core`` replaces the native module that
``microsandbox._wire.call`` sends every call to, records each call's method and (decoded)
JSON arguments, and answers with canned ``{"ok": ...}`` / ``{"error": ...}`` documents.
"""

from __future__ import annotations

import inspect
import json
import sys
from pathlib import Path
from typing import Any, Awaitable, Callable, Dict, List, Tuple, Union

import pytest

try:
    import microsandbox  # noqa: F401  (installed, e.g. by maturin develop)
except ImportError:  # run from the source tree without installing
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import microsandbox  # noqa: F401

from microsandbox import _wire

Answer = Union[
    Dict[str, Any],
    Callable[[Dict[str, Any]], Dict[str, Any]],
    Callable[[Dict[str, Any]], Awaitable[Dict[str, Any]]],
]


def ok(value: Any = None) -> Dict[str, Any]:
    return {"ok": value}


def err(kind: str, message: str = "it failed", fs_kind: Union[str, None] = None) -> Dict[str, Any]:
    e: Dict[str, Any] = {"kind": kind, "message": message}
    if fs_kind is not None:
        e["fs_kind"] = fs_kind
    return {"error": e}


def sandbox_ref(handle: int = 7, name: str = "sb", owns: bool = True) -> Dict[str, Any]:
    return ok({"sandbox": handle, "name": name, "owns_lifecycle": owns})


class FakeCore:
    """The native module's ``call``: answers queued per method, in order; ``release``
    is answered ``null`` unless something else was queued. An answer may be a function
    of the call's arguments, also an async one (a call that takes its time: cancelling
    the awaiting task cancels it)."""

    __fake__ = True

    def __init__(self) -> None:
        self.calls: List[Tuple[str, Dict[str, Any]]] = []
        self._queue: Dict[str, List[Answer]] = {}

    def on(self, method: str, *answers: Answer) -> "FakeCore":
        self._queue.setdefault(method, []).extend(answers)
        return self

    async def call(self, method: str, args_json: str) -> str:
        assert isinstance(method, str) and isinstance(args_json, str)
        args = json.loads(args_json)  # what crosses is strict JSON
        assert isinstance(args, dict)
        self.calls.append((method, args))
        queue = self._queue.get(method)
        if queue:
            answer = queue.pop(0)
        elif method == "release":
            answer = ok(None)
        else:
            raise AssertionError(f"unexpected call {method} {args}")
        if callable(answer):
            answer = answer(args)
            if inspect.isawaitable(answer):
                answer = await answer
        return json.dumps(answer)

    def version(self) -> str:
        return "0.1.0"

    # -- inspection --------------------------------------------------------------------

    def methods(self) -> List[str]:
        return [m for m, _ in self.calls]

    def last(self, method: str) -> Dict[str, Any]:
        for m, a in reversed(self.calls):
            if m == method:
                return a
        raise AssertionError(f"{method} was not called; calls: {self.methods()}")

    def args_of(self, method: str) -> List[Dict[str, Any]]:
        return [a for m, a in self.calls if m == method]


@pytest.fixture
def core(monkeypatch: pytest.MonkeyPatch) -> FakeCore:
    fake = FakeCore()
    monkeypatch.setattr(_wire, "_native", fake)
    return fake


def pytest_report_header() -> str:
    """The host kind, in every run's header (the e2e figures depend on it)."""
    if Path("/sys/module/kvm_pvm").exists():
        return "host kind: PVM (kvm_pvm: guest kernel code emulated; boots take tens of seconds)"
    return "host kind: hardware KVM"
