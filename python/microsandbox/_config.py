"""Maps the keyword arguments of ``Sandbox.create`` and the exec calls onto the wire's
JSON (docs/bindings.md): types are checked here (``TypeError``), values the core could
not take are refused here (``InvalidArgumentError``, a ``ValueError``), and everything
else -- what a valid configuration is -- is the core's to decide."""

from __future__ import annotations

import enum
import os
from typing import Any, Dict, List, Mapping, Optional, Tuple

from microsandbox import _wire
from microsandbox.errors import InvalidArgumentError
from microsandbox.types import (
    ImageSource,
    InitConfig,
    LogLevel,
    MountConfig,
    Network,
    PatchConfig,
    PortBinding,
    PullPolicy,
    RegistryAuth,
    Rlimit,
    SecretEntry,
    SecurityProfile,
    Stdin,
    check_bool,
    check_int,
    check_path,
    check_seconds,
    check_str,
    check_str_list,
    check_str_map,
    enum_value,
)

#: Keyword arguments of ``Sandbox.create`` that go into the wire's ``config`` object.
CONFIG_KWARGS = (
    "image",
    "snapshot",
    "cpus",
    "memory",
    "workdir",
    "shell",
    "hostname",
    "user",
    "entrypoint",
    "init",
    "replace",
    "replace_with_timeout",
    "max_duration",
    "idle_timeout",
    "env",
    "scripts",
    "labels",
    "pull_policy",
    "log_level",
    "quiet_logs",
    "ephemeral",
    "security_profile",
    "registry_auth",
    "volumes",
    "patches",
    "ports",
    "network",
    "secrets",
)


def _as_dict(value: Any, what: str) -> Dict[str, Any]:
    """A plain mapping passed through as the wire object (the core checks its fields)."""
    if not isinstance(value, Mapping):
        raise TypeError(f"{what} must be a mapping, not {type(value).__name__}")
    out = dict(value)
    for k in out:
        if not isinstance(k, str):
            raise TypeError(f"{what} keys must be str; got {k!r}")
    return out


def _image(value: Any) -> Any:
    if isinstance(value, ImageSource):
        return value._to_wire()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, str):
        if not value:
            raise InvalidArgumentError("image must not be empty")
        return value
    if isinstance(value, Mapping):
        return _as_dict(value, "image")
    raise TypeError(f"image must be a str, os.PathLike or ImageSource, not {type(value).__name__}")


def _init(value: Any) -> Any:
    if isinstance(value, InitConfig):
        return value._to_wire()
    if isinstance(value, str):
        if value == "auto":
            return "auto"
        if not value:
            raise InvalidArgumentError("init must not be empty")
        return {"cmd": value}
    if isinstance(value, Mapping):
        d = _as_dict(value, "init")
        unknown = set(d) - {"cmd", "args", "env"}
        if unknown:
            raise TypeError(f"init has unknown keys: {', '.join(sorted(unknown))}")
        if "cmd" not in d:
            raise TypeError("init needs a 'cmd'")
        return InitConfig(
            cmd=d["cmd"], args=tuple(check_str_list(d.get("args", []), "init args")), env=d.get("env", {})
        )._to_wire()
    raise TypeError(f"init must be a str, dict or InitConfig, not {type(value).__name__}")


def _registry_auth(value: Any) -> Dict[str, Any]:
    if isinstance(value, RegistryAuth):
        return value._to_wire()
    if isinstance(value, Mapping):
        d = _as_dict(value, "registry_auth")
        if set(d) != {"username", "password"}:
            raise TypeError("registry_auth takes exactly 'username' and 'password'")
        return RegistryAuth(d["username"], d["password"])._to_wire()
    raise TypeError(f"registry_auth must be a RegistryAuth, not {type(value).__name__}")


def _volumes(value: Any) -> Dict[str, Any]:
    if not isinstance(value, Mapping):
        raise TypeError(f"volumes must be a mapping of guest path to MountConfig, not {type(value).__name__}")
    out: Dict[str, Any] = {}
    for guest, mount in value.items():
        check_str(guest, "volume guest path")
        if isinstance(mount, MountConfig):
            out[guest] = mount._to_wire()
        elif isinstance(mount, Mapping):
            out[guest] = _as_dict(mount, f"volume {guest}")
        else:
            raise TypeError(f"volume {guest} must be a MountConfig (see Volume), not {type(mount).__name__}")
    return out


def _patches(value: Any) -> List[Any]:
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, (list, tuple)):
        raise TypeError(f"patches must be a list of PatchConfig, not {type(value).__name__}")
    out: List[Any] = []
    for p in value:
        if isinstance(p, PatchConfig):
            out.append(p._to_wire())
        elif isinstance(p, Mapping):
            out.append(_as_dict(p, "patch"))
        else:
            raise TypeError(f"patches must hold PatchConfig (see Patch), not {type(p).__name__}")
    return out


def _ports(value: Any) -> List[Any]:
    out: List[Any] = []
    if isinstance(value, Mapping):
        for host, guest in value.items():
            out.append(PortBinding(host, guest)._to_wire())
        return out
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        raise TypeError(f"ports must be a dict of host to guest port or a list of PortBinding, not {type(value).__name__}")
    for p in value:
        if isinstance(p, PortBinding):
            out.append(p._to_wire())
        elif isinstance(p, Mapping):
            out.append(_as_dict(p, "port"))
        else:
            raise TypeError(f"ports must hold PortBinding, not {type(p).__name__}")
    return out


def _network(value: Any) -> Dict[str, Any]:
    if isinstance(value, Network):
        return value._to_wire()
    if isinstance(value, Mapping):
        return _as_dict(value, "network")
    raise TypeError(f"network must be a Network, not {type(value).__name__}")


def _secrets(value: Any) -> List[Any]:
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, (list, tuple)):
        raise TypeError(f"secrets must be a list of SecretEntry, not {type(value).__name__}")
    out: List[Any] = []
    for s in value:
        if isinstance(s, SecretEntry):
            out.append(s._to_wire())
        elif isinstance(s, Mapping):
            out.append(_as_dict(s, "secret"))
        else:
            raise TypeError(f"secrets must hold SecretEntry (see Secret), not {type(s).__name__}")
    return out


_MAPPERS = {
    "image": _image,
    "snapshot": lambda v: check_path(v, "snapshot"),
    "cpus": lambda v: check_int(v, "cpus"),
    "memory": lambda v: check_int(v, "memory"),
    "workdir": lambda v: check_str(v, "workdir"),
    "shell": lambda v: check_str(v, "shell"),
    "hostname": lambda v: check_str(v, "hostname"),
    "user": lambda v: check_str(v, "user"),
    "entrypoint": lambda v: check_str_list(v, "entrypoint"),
    "init": _init,
    "replace": lambda v: check_bool(v, "replace"),
    "replace_with_timeout": lambda v: check_seconds(v, "replace_with_timeout"),
    "max_duration": lambda v: check_seconds(v, "max_duration"),
    "idle_timeout": lambda v: check_seconds(v, "idle_timeout"),
    "env": lambda v: check_str_map(v, "env"),
    "scripts": lambda v: check_str_map(v, "scripts"),
    "labels": lambda v: check_str_map(v, "labels"),
    "pull_policy": lambda v: enum_value(PullPolicy, v, "pull_policy"),
    "log_level": lambda v: enum_value(LogLevel, v, "log_level"),
    "quiet_logs": lambda v: check_bool(v, "quiet_logs"),
    "ephemeral": lambda v: check_bool(v, "ephemeral"),
    "security_profile": lambda v: enum_value(SecurityProfile, v, "security_profile"),
    "registry_auth": _registry_auth,
    "volumes": _volumes,
    "patches": _patches,
    "ports": _ports,
    "network": _network,
    "secrets": _secrets,
}
assert set(_MAPPERS) == set(CONFIG_KWARGS)


def create_args(name: Any, kwargs: Mapping[str, Any]) -> Dict[str, Any]:
    """The wire arguments of ``create`` / ``create_with_progress`` for
    ``Sandbox.create(name, **kwargs)``; ``None`` values are left out (the core's default)."""
    check_str(name, "name")
    unknown = [k for k in kwargs if k not in _MAPPERS and k != "detached"]
    if unknown:
        raise TypeError(
            f"Sandbox.create() got unexpected keyword argument(s): {', '.join(sorted(unknown))}"
        )
    config: Dict[str, Any] = {}
    for key in CONFIG_KWARGS:
        value = kwargs.get(key)
        if value is not None:
            config[key] = _MAPPERS[key](value)
    detached = kwargs.get("detached")
    return {
        "name": name,
        "config": config,
        "detached": False if detached is None else check_bool(detached, "detached"),
    }


# -------------------------------------------------------------------------------------
# Exec options
# -------------------------------------------------------------------------------------

EXEC_KWARGS = ("cwd", "user", "env", "timeout", "stdin", "tty", "rlimits")


def split_exec_args(
    method: str, args: Any, kwargs: Dict[str, Any]
) -> Tuple[Optional[List[str]], Dict[str, Any]]:
    """``exec(cmd, args)`` takes the argument list, or (older form) an options mapping."""
    if args is None or isinstance(args, (list, tuple)):
        return (None if args is None else check_str_list(args, "args")), kwargs
    if isinstance(args, Mapping):
        opts = dict(args)
        argv = opts.pop("args", None)
        for k, v in opts.items():
            if k in kwargs and kwargs[k] is not None:
                raise TypeError(f"{method}() got {k!r} both in the options dict and as a keyword")
            kwargs = {**kwargs, k: v}
        return (None if argv is None else check_str_list(argv, "args")), kwargs
    raise TypeError(f"{method}() args must be a list of str, not {type(args).__name__}")


def exec_options(method: str, opts: Mapping[str, Any], streaming: bool) -> Dict[str, Any]:
    """The wire's exec options (and ``stdin_pipe`` for the streaming calls)."""
    unknown = [k for k in opts if k not in EXEC_KWARGS]
    if unknown:
        raise TypeError(f"{method}() got unexpected keyword argument(s): {', '.join(sorted(unknown))}")
    out: Dict[str, Any] = {}
    if opts.get("cwd") is not None:
        out["cwd"] = check_str(opts["cwd"], "cwd")
    if opts.get("user") is not None:
        out["user"] = check_str(opts["user"], "user")
    if opts.get("env") is not None:
        out["env"] = check_str_map(opts["env"], "env")
    if opts.get("timeout") is not None:
        out["timeout"] = check_seconds(opts["timeout"], "timeout", positive=True)
    stdin = opts.get("stdin")
    if stdin is not None:
        if isinstance(stdin, str):
            stdin = Stdin.bytes(stdin)
        elif isinstance(stdin, (bytes, bytearray, memoryview)):
            stdin = Stdin.bytes(bytes(stdin))
        if not isinstance(stdin, Stdin):
            raise TypeError(f"stdin must be bytes, str or Stdin, not {type(stdin).__name__}")
        if stdin.mode == "bytes":
            out["stdin_b64"] = _wire.b64encode(stdin.data or b"")
        elif stdin.mode == "pipe":
            if not streaming:
                raise InvalidArgumentError(
                    f"{method}(): Stdin.pipe() needs a streaming call (exec_stream / shell_stream)"
                )
            out["stdin_pipe"] = True
        elif stdin.mode != "null":
            raise InvalidArgumentError(f"unknown stdin mode {stdin.mode!r}")
    if opts.get("tty") is not None:
        tty = check_bool(opts["tty"], "tty")
        if tty:
            out["tty"] = True
    rlimits = opts.get("rlimits")
    if rlimits is not None:
        if not isinstance(rlimits, (list, tuple)):
            raise TypeError(f"rlimits must be a list of Rlimit, not {type(rlimits).__name__}")
        wire = []
        for r in rlimits:
            if not isinstance(r, Rlimit):
                raise TypeError(f"rlimits must hold Rlimit, not {type(r).__name__}")
            wire.append(r._to_wire())
        out["rlimits"] = wire
    return out


LOG_SOURCES = ("stdout", "stderr", "output", "system", "all")


def log_options(
    tail: Any = None, since_ms: Any = None, until_ms: Any = None, sources: Any = None
) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    if tail is not None:
        out["tail"] = check_int(tail, "tail")
    for key, value in (("since_ms", since_ms), ("until_ms", until_ms)):
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{key} must be a number (ms since the Unix epoch)")
            if value != value or value < 0:
                raise InvalidArgumentError(f"{key} must be a non-negative number; got {value}")
            out[key] = value
    if sources is not None:
        if isinstance(sources, (str, bytes)) or not isinstance(sources, (list, tuple)):
            raise TypeError("sources must be a list of str")
        wire = []
        for s in sources:
            if isinstance(s, enum.Enum):
                s = s.value
            if not isinstance(s, str):
                raise TypeError(f"sources must hold str, not {type(s).__name__}")
            if s not in LOG_SOURCES:
                raise InvalidArgumentError(f"log source must be one of {', '.join(LOG_SOURCES)}; got {s!r}")
            wire.append(s)
        out["sources"] = wire
    return out
