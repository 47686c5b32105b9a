"""The type stubs cover the public API: every exported name, and every public member
of every exported class."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import microsandbox

PKG = Path(microsandbox.__file__).resolve().parent
STUB = PKG / "__init__.pyi"


def stub_tree():
    tree = ast.parse(STUB.read_text())
    names, classes = set(), {}
    for node in tree.body:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            names.add(node.name)
            if isinstance(node, ast.ClassDef):
                members = set()
                for item in node.body:
                    if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                        members.add(item.name)
                    elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                        members.add(item.target.id)
                    elif isinstance(item, ast.Assign):
                        members.update(t.id for t in item.targets if isinstance(t, ast.Name))
                classes[node.name] = members
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
    return names, classes


def public_members(cls: type) -> set:
    out = set()
    for klass in cls.__mro__:
        if klass.__module__.split(".")[0] != "microsandbox":
            continue
        for name in vars(klass):
            if not name.startswith("_") or name in ("__aenter__", "__aexit__", "__aiter__", "__anext__", "__await__"):
                out.add(name)
        out.update(n for n in getattr(klass, "__slots__", ()) if not n.startswith("_"))
        out.update(n for n in getattr(klass, "__annotations__", {}) if not n.startswith("_"))
    return out


def test_marker_and_stub_exist() -> None:
    assert (PKG / "py.typed").exists()
    assert STUB.exists()


def test_every_export_is_in_the_stub() -> None:
    names, _ = stub_tree()
    missing = [n for n in microsandbox.__all__ if n not in names]
    assert missing == []


def test_every_public_member_is_in_the_stub() -> None:
    _, classes = stub_tree()
    problems = []
    for name in microsandbox.__all__:
        obj = getattr(microsandbox, name)
        if not inspect.isclass(obj):
            continue
        stub_members = classes.get(name, set())
        runtime = public_members(obj)
        if issubclass(obj, BaseException):
            runtime -= {"KIND"}  # in the base class's stub
            stub_members = stub_members | classes["MicrosandboxError"]
        for m in sorted(runtime - stub_members):
            if obj.__module__ == "microsandbox.types" and hasattr(obj, "__members__"):
                continue  # enum members are listed by value
            problems.append(f"{name}.{m}")
    assert problems == []
