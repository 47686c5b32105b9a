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


def _stub_params(fn: ast.AST, is_method: bool) -> dict:
    """A stub def's parameters: positional names in order, keyword-only names, and
    whether it has *args / **kwargs (``self`` / ``cls`` left out)."""
    assert isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
    decorators = {d.id for d in fn.decorator_list if isinstance(d, ast.Name)}
    positional = [a.arg for a in fn.args.posonlyargs + fn.args.args]
    if is_method and "staticmethod" not in decorators and positional:
        positional = positional[1:]
    return {
        "positional": positional,
        "keyword": sorted(a.arg for a in fn.args.kwonlyargs),
        "varargs": fn.args.vararg is not None,
        "varkw": fn.args.kwarg is not None,
    }


def _runtime_params(obj) -> dict:
    sig = inspect.signature(obj)
    P = inspect.Parameter
    return {
        "positional": [p.name for p in sig.parameters.values() if p.kind in (P.POSITIONAL_ONLY, P.POSITIONAL_OR_KEYWORD)],
        "keyword": sorted(p.name for p in sig.parameters.values() if p.kind is P.KEYWORD_ONLY),
        "varargs": any(p.kind is P.VAR_POSITIONAL for p in sig.parameters.values()),
        "varkw": any(p.kind is P.VAR_KEYWORD for p in sig.parameters.values()),
    }


def _compatible(stub: dict, runtime: dict) -> bool:
    if stub["positional"] != runtime["positional"] or stub["varargs"] != runtime["varargs"]:
        return False
    if runtime["varkw"] and not stub["varkw"]:
        # ``create(name, **kwargs)``: the stub spells the accepted keywords out.
        return set(runtime["keyword"]) <= set(stub["keyword"])
    return stub["keyword"] == runtime["keyword"] and stub["varkw"] == runtime["varkw"]


def test_stub_signatures_match_the_runtime() -> None:
    """Every public function and method the stub declares takes the parameters (names,
    positional or keyword-only) the runtime does."""
    tree = ast.parse(STUB.read_text())
    problems = []
    checked = 0
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            runtime_obj = getattr(microsandbox, node.name)
            pairs = [(node.name, node, runtime_obj, False)]
        elif isinstance(node, ast.ClassDef) and hasattr(microsandbox, node.name):
            cls = getattr(microsandbox, node.name)
            pairs = []
            for item in node.body:
                if not isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    continue
                if any(isinstance(d, ast.Name) and d.id == "property" for d in item.decorator_list):
                    continue
                if item.name.startswith("_") and item.name not in ("__init__", "__aenter__", "__aexit__", "__new__"):
                    continue
                attr = inspect.getattr_static(cls, item.name, None)
                if attr is None:
                    problems.append(f"{node.name}.{item.name}: not at runtime")
                    continue
                func = getattr(cls, item.name)
                if item.name == "__init__" and func is object.__init__:
                    continue
                pairs.append((f"{node.name}.{item.name}", item, attr, True))
        else:
            continue
        for label, stub_fn, attr, is_method in pairs:
            target = attr.__func__ if isinstance(attr, (staticmethod, classmethod)) else attr
            try:
                runtime = _runtime_params(target)
            except (TypeError, ValueError):
                continue  # a builtin without a signature
            bound = not isinstance(attr, staticmethod) or label.endswith(".__new__")
            if is_method and bound and runtime["positional"]:
                runtime["positional"] = runtime["positional"][1:]  # self / cls
            stub = _stub_params(stub_fn, is_method)
            checked += 1
            if not _compatible(stub, runtime):
                problems.append(f"{label}: stub {stub} != runtime {runtime}")
    assert checked > 150, checked
    assert problems == []
