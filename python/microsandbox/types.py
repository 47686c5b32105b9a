"""Configuration values: enums, factories and frozen dataclasses that
:meth:`Sandbox.create` and the exec calls accept, each with the wire form it maps to
(docs/bindings.md, "The sandbox configuration")."""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Literal, Mapping, Optional, Sequence, Tuple, Union

from microsandbox.errors import InvalidArgumentError

__all__ = [
    "PullPolicy",
    "LogLevel",
    "SecurityProfile",
    "SandboxStatus",
    "ViolationAction",
    "PortProtocol",
    "FsEntryKind",
    "LogSource",
    "LogReadSource",
    "ImageSource",
    "Image",
    "PatchConfig",
    "Patch",
    "MountConfig",
    "Volume",
    "PortBinding",
    "DnsConfig",
    "TlsConfig",
    "Network",
    "SecretInjection",
    "SecretEntry",
    "Secret",
    "Rlimit",
    "Stdin",
    "InitConfig",
    "RegistryAuth",
]


class _StrEnum(str, enum.Enum):
    """A string enum whose ``str()`` is its value (``enum.StrEnum`` needs 3.11)."""

    def __str__(self) -> str:
        return str(self.value)


class PullPolicy(_StrEnum):
    """When the image is fetched from its registry."""

    ALWAYS = "always"
    IF_MISSING = "if-missing"
    NEVER = "never"


class LogLevel(_StrEnum):
    """The sandbox process's log verbosity."""

    ERROR = "error"
    WARN = "warn"
    INFO = "info"
    DEBUG = "debug"
    TRACE = "trace"


class SecurityProfile(_StrEnum):
    """How much the VMM confines itself."""

    DEFAULT = "default"
    RESTRICTED = "restricted"


class SandboxStatus(_StrEnum):
    """A sandbox's status as the state database holds it."""

    RUNNING = "running"
    STOPPED = "stopped"
    CRASHED = "crashed"
    DRAINING = "draining"
    PAUSED = "paused"


class ViolationAction(_StrEnum):
    """What happens when a secret is sent to a host it is not allowed for."""

    BLOCK = "block"
    BLOCK_AND_LOG = "block-and-log"
    BLOCK_AND_TERMINATE = "block-and-terminate"


class PortProtocol(_StrEnum):
    TCP = "tcp"
    UDP = "udp"


class FsEntryKind(_StrEnum):
    FILE = "file"
    DIRECTORY = "directory"
    SYMLINK = "symlink"
    OTHER = "other"


class LogSource(_StrEnum):
    """Where a log entry came from (``"all"`` is accepted by ``logs(sources=...)``)."""

    STDOUT = "stdout"
    STDERR = "stderr"
    OUTPUT = "output"
    SYSTEM = "system"


#: What ``logs(sources=[...])`` takes: a :class:`LogSource` value or ``"all"``.
LogReadSource = Literal["stdout", "stderr", "output", "system", "all"]


# -------------------------------------------------------------------------------------
# Validation helpers (shared by the config and exec mappings)
# -------------------------------------------------------------------------------------


def enum_value(enum_cls: type, value: Any, what: str) -> str:
    """The wire string of an enum member or one of its string values."""
    if isinstance(value, enum_cls):
        return str(value.value)  # type: ignore[attr-defined]
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a str or {enum_cls.__name__}, not {type(value).__name__}")
    allowed = [str(m.value) for m in enum_cls]  # type: ignore[attr-defined]
    if value not in allowed:
        raise InvalidArgumentError(f"{what} must be one of {', '.join(allowed)}; got {value!r}")
    return value


def check_str(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a str, not {type(value).__name__}")
    return value


def check_path(value: Any, what: str) -> str:
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if isinstance(value, bytes):
        raise TypeError(f"{what} must be a str or os.PathLike[str], not bytes")
    return check_str(value, what)


def check_bool(value: Any, what: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{what} must be a bool, not {type(value).__name__}")
    return value


def check_int(value: Any, what: str, minimum: Optional[int] = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} must be an int, not {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise InvalidArgumentError(f"{what} must be at least {minimum}; got {value}")
    return value


def check_seconds(value: Any, what: str, positive: bool = False) -> Union[int, float]:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{what} must be a number of seconds, not {type(value).__name__}")
    if value != value or value in (float("inf"), float("-inf")):
        raise InvalidArgumentError(f"{what} must be a finite number of seconds; got {value}")
    if value < 0 or (positive and value == 0):
        bound = "positive" if positive else "non-negative"
        raise InvalidArgumentError(f"{what} must be {bound}; got {value}")
    return value


def check_str_map(value: Any, what: str) -> Dict[str, str]:
    if not isinstance(value, Mapping):
        raise TypeError(f"{what} must be a mapping of str to str, not {type(value).__name__}")
    out: Dict[str, str] = {}
    for k, v in value.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise TypeError(f"{what} must map str to str; got {k!r}: {v!r}")
        out[k] = v
    return out


def check_str_list(value: Any, what: str) -> List[str]:
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        raise TypeError(f"{what} must be a list of str, not {type(value).__name__}")
    for v in value:
        if not isinstance(v, str):
            raise TypeError(f"{what} must be a list of str; got {v!r}")
    return list(value)


def _put(d: Dict[str, Any], key: str, value: Any) -> None:
    if value is not None:
        d[key] = value


# -------------------------------------------------------------------------------------
# Images
# -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageSource:
    """An explicit root filesystem source (see :class:`Image`)."""

    kind: str
    reference: Optional[str] = None
    path: Optional[str] = None
    upper_size_mib: Optional[int] = None
    fstype: Optional[str] = None

    def _to_wire(self) -> Any:
        if self.kind == "oci":
            ref = check_str(self.reference, "Image.oci reference")
            if self.upper_size_mib is None:
                return ref
            return {"oci": ref, "upper_size_mib": check_int(self.upper_size_mib, "upper_size_mib")}
        if self.kind == "bind":
            return check_path(self.path, "Image.bind path")
        if self.kind == "disk":
            d: Dict[str, Any] = {"disk": check_path(self.path, "Image.disk path")}
            _put(d, "fstype", self.fstype)
            return d
        raise InvalidArgumentError(f"unknown image source kind {self.kind!r}")


class Image:
    """Factory for explicit image sources (a bare string is auto-detected)."""

    @staticmethod
    def oci(reference: str, *, upper_size_mib: Optional[int] = None) -> ImageSource:
        """An OCI image, with an optional size limit on the writable layer (MiB)."""
        check_str(reference, "reference")
        if upper_size_mib is not None:
            check_int(upper_size_mib, "upper_size_mib", 1)
        return ImageSource("oci", reference=reference, upper_size_mib=upper_size_mib)

    @staticmethod
    def bind(path: Union[str, "os.PathLike[str]"]) -> ImageSource:
        """A local directory (or archive) as the root filesystem."""
        return ImageSource("bind", path=check_path(path, "path"))

    @staticmethod
    def disk(path: Union[str, "os.PathLike[str]"], *, fstype: Optional[str] = None) -> ImageSource:
        """A disk image as the root filesystem (``fstype`` when it cannot be detected)."""
        if fstype is not None:
            check_str(fstype, "fstype")
        return ImageSource("disk", path=check_path(path, "path"), fstype=fstype)


# -------------------------------------------------------------------------------------
# Patches
# -------------------------------------------------------------------------------------

_PATCH_FIELDS: Dict[str, Tuple[str, ...]] = {
    "text": ("path", "content", "mode", "replace"),
    "append": ("path", "content"),
    "mkdir": ("path", "mode"),
    "remove": ("path",),
    "symlink": ("target", "link", "replace"),
    "copy_file": ("src", "dst", "mode", "replace"),
    "copy_dir": ("src", "dst", "replace"),
}


@dataclass(frozen=True)
class PatchConfig:
    """A rootfs patch applied before boot (made by the :class:`Patch` factory)."""

    kind: str
    path: Optional[str] = None
    content: Optional[str] = None
    src: Optional[str] = None
    dst: Optional[str] = None
    target: Optional[str] = None
    link: Optional[str] = None
    mode: Optional[int] = None
    replace: bool = False

    def _to_wire(self) -> Dict[str, Any]:
        fields = _PATCH_FIELDS.get(self.kind)
        if fields is None:
            raise InvalidArgumentError(
                f"patch kind must be one of {', '.join(_PATCH_FIELDS)}; got {self.kind!r}"
            )
        d: Dict[str, Any] = {"op": self.kind}
        for name in fields:
            value = getattr(self, name)
            if name == "replace":
                d[name] = check_bool(value, "replace")
            elif name == "mode":
                d[name] = None if value is None else check_int(value, "mode")
            else:
                d[name] = check_str(value, f"{self.kind} patch {name}")
        return d


class Patch:
    """Factory for rootfs patches (``Sandbox.create(..., patches=[...])``)."""

    @staticmethod
    def text(path: str, content: str, *, mode: Optional[int] = None, replace: bool = False) -> PatchConfig:
        """Write UTF-8 ``content`` at ``path``."""
        return PatchConfig("text", path=path, content=content, mode=mode, replace=replace)

    @staticmethod
    def append(path: str, content: str) -> PatchConfig:
        """Append ``content`` to the file at ``path``."""
        return PatchConfig("append", path=path, content=content)

    @staticmethod
    def mkdir(path: str, *, mode: Optional[int] = None) -> PatchConfig:
        """Create a directory (a no-op if it exists)."""
        return PatchConfig("mkdir", path=path, mode=mode)

    @staticmethod
    def remove(path: str) -> PatchConfig:
        """Delete a file or directory (a no-op if it does not exist)."""
        return PatchConfig("remove", path=path)

    @staticmethod
    def symlink(target: str, link: str, *, replace: bool = False) -> PatchConfig:
        """Create a symlink at ``link`` pointing to ``target``."""
        return PatchConfig("symlink", target=target, link=link, replace=replace)

    @staticmethod
    def copy_file(src: str, dst: str, *, mode: Optional[int] = None, replace: bool = False) -> PatchConfig:
        """Copy the host file ``src`` to ``dst`` in the guest rootfs."""
        return PatchConfig("copy_file", src=src, dst=dst, mode=mode, replace=replace)

    @staticmethod
    def copy_dir(src: str, dst: str, *, replace: bool = False) -> PatchConfig:
        """Copy the host directory ``src`` to ``dst`` in the guest rootfs, recursively."""
        return PatchConfig("copy_dir", src=src, dst=dst, replace=replace)


# -------------------------------------------------------------------------------------
# Volumes
# -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MountConfig:
    """A volume mount (made by the :class:`Volume` factory)."""

    kind: str
    bind: Optional[str] = None
    named: Optional[str] = None
    disk: Optional[str] = None
    fstype: Optional[str] = None
    size_mib: Optional[int] = None
    readonly: bool = False

    def _to_wire(self) -> Dict[str, Any]:
        d: Dict[str, Any]
        if self.kind == "bind":
            d = {"bind": check_path(self.bind, "bind mount host path")}
        elif self.kind == "named":
            d = {"named": check_str(self.named, "named volume name")}
        elif self.kind == "tmpfs":
            d = {"tmpfs": True}
        elif self.kind == "disk":
            d = {"disk": check_path(self.disk, "disk mount image path")}
            if self.fstype is not None:
                d["fstype"] = check_str(self.fstype, "fstype")
        else:
            raise InvalidArgumentError(
                f"mount kind must be bind, named, tmpfs or disk; got {self.kind!r}"
            )
        if self.readonly:
            d["readonly"] = check_bool(self.readonly, "readonly")
        if self.size_mib is not None:
            d["size_mib"] = check_int(self.size_mib, "size_mib", 1)
        return d


class Volume:
    """Factory for volume mounts (``Sandbox.create(..., volumes={guest_path: ...})``)."""

    @staticmethod
    def bind(path: Union[str, "os.PathLike[str]"], *, readonly: bool = False) -> MountConfig:
        """A host directory shared at the guest path."""
        return MountConfig("bind", bind=check_path(path, "path"), readonly=readonly)

    @staticmethod
    def named(name: str, *, readonly: bool = False, size_mib: Optional[int] = None) -> MountConfig:
        """A named volume of the state directory (created on first use)."""
        return MountConfig("named", named=check_str(name, "name"), readonly=readonly, size_mib=size_mib)

    @staticmethod
    def tmpfs(*, size_mib: Optional[int] = None, readonly: bool = False) -> MountConfig:
        """A tmpfs in guest memory."""
        return MountConfig("tmpfs", size_mib=size_mib, readonly=readonly)

    @staticmethod
    def disk(
        path: Union[str, "os.PathLike[str]"], *, fstype: Optional[str] = None, readonly: bool = False
    ) -> MountConfig:
        """A disk image mounted at the guest path."""
        return MountConfig("disk", disk=check_path(path, "path"), fstype=fstype, readonly=readonly)


# -------------------------------------------------------------------------------------
# Network
# -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PortBinding:
    """A published port: the host's ``bind:host_port`` to the guest's ``guest_port``."""

    host_port: int
    guest_port: int
    bind: str = "127.0.0.1"
    protocol: Union[PortProtocol, str] = PortProtocol.TCP

    @classmethod
    def tcp(cls, host_port: int, guest_port: int, *, bind: str = "127.0.0.1") -> "PortBinding":
        return cls(host_port, guest_port, bind, PortProtocol.TCP)

    @classmethod
    def udp(cls, host_port: int, guest_port: int, *, bind: str = "127.0.0.1") -> "PortBinding":
        return cls(host_port, guest_port, bind, PortProtocol.UDP)

    def _to_wire(self) -> Dict[str, Any]:
        host = check_int(self.host_port, "host_port")
        guest = check_int(self.guest_port, "guest_port")
        for what, port in (("host_port", host), ("guest_port", guest)):
            if port > 65535:
                raise InvalidArgumentError(f"{what} must be at most 65535; got {port}")
        return {
            "host": host,
            "guest": guest,
            "protocol": enum_value(PortProtocol, self.protocol, "protocol"),
            "bind": check_str(self.bind, "bind"),
        }


@dataclass(frozen=True)
class DnsConfig:
    """DNS of a sandbox's network (``None``: the core's default)."""

    nameservers: Tuple[str, ...] = ()
    rebind_protection: Optional[bool] = None
    query_timeout_ms: Optional[int] = None

    def _to_wire(self) -> Dict[str, Any]:
        d: Dict[str, Any] = {}
        if self.nameservers:
            d["nameservers"] = check_str_list(list(self.nameservers), "nameservers")
        if self.rebind_protection is not None:
            d["rebind_protection"] = check_bool(self.rebind_protection, "rebind_protection")
        if self.query_timeout_ms is not None:
            d["query_timeout_ms"] = check_int(self.query_timeout_ms, "query_timeout_ms", 1)
        return d


@dataclass(frozen=True)
class TlsConfig:
    """TLS interception (``None``: the core's default; secrets turn it on)."""

    enabled: Optional[bool] = None
    bypass: Tuple[str, ...] = ()
    verify_upstream: Optional[bool] = None
    intercepted_ports: Optional[Tuple[int, ...]] = None
    block_quic: Optional[bool] = None
    upstream_ca_cert: Optional[str] = None
    intercept_ca_cert: Optional[str] = None
    intercept_ca_key: Optional[str] = None

    def _to_wire(self) -> Dict[str, Any]:
        d: Dict[str, Any] = {}
        if self.enabled is not None:
            d["enabled"] = check_bool(self.enabled, "tls enabled")
        if self.bypass:
            d["bypass"] = check_str_list(list(self.bypass), "bypass")
        if self.verify_upstream is not None:
            d["verify_upstream"] = check_bool(self.verify_upstream, "verify_upstream")
        if self.intercepted_ports is not None:
            d["intercepted_ports"] = [check_int(p, "intercepted port") for p in self.intercepted_ports]
        if self.block_quic is not None:
            d["block_quic"] = check_bool(self.block_quic, "block_quic")
        for name in ("upstream_ca_cert", "intercept_ca_cert", "intercept_ca_key"):
            value = getattr(self, name)
            if value is not None:
                d[name] = check_path(value, name)
        return d


_POLICY_ALIASES = {"public_only": "public-only", "allow_all": "allow-all"}


@dataclass(frozen=True)
class Network:
    """A sandbox's network: policy preset, rules, DNS, limits and TLS interception.

    ``policy`` is ``"public-only"`` (the default), ``"none"``, ``"allow-all"`` or a profile
    list such as ``"public,private,host"``; ``rules`` are rule lines tried before the
    preset's, e.g. ``"deny egress tcp any 25"`` or ``"allow egress tcp 10.0.5.10 443"``.
    ``enabled=False`` gives the guest no network device at all.
    """

    policy: Optional[str] = None
    rules: Tuple[str, ...] = ()
    enabled: Optional[bool] = None
    dns: Optional[DnsConfig] = None
    max_connections: Optional[int] = None
    mtu: Optional[int] = None
    tls: Optional[TlsConfig] = None

    @classmethod
    def public_only(cls) -> "Network":
        return cls(policy="public-only")

    @classmethod
    def none(cls) -> "Network":
        """A network device, but every connection refused."""
        return cls(policy="none")

    @classmethod
    def allow_all(cls) -> "Network":
        return cls(policy="allow-all")

    @classmethod
    def disabled(cls) -> "Network":
        """No network device at all."""
        return cls(enabled=False)

    def _to_wire(self) -> Dict[str, Any]:
        d: Dict[str, Any] = {}
        if self.enabled is not None:
            d["enabled"] = check_bool(self.enabled, "network enabled")
        if self.policy is not None:
            policy = check_str(self.policy, "network policy")
            d["policy"] = _POLICY_ALIASES.get(policy, policy)
        if self.rules:
            d["rules"] = check_str_list(list(self.rules), "network rules")
        if self.dns is not None:
            if not isinstance(self.dns, DnsConfig):
                raise TypeError("network dns must be a DnsConfig")
            d["dns"] = self.dns._to_wire()
        if self.max_connections is not None:
            d["max_connections"] = check_int(self.max_connections, "max_connections", 1)
        if self.mtu is not None:
            d["mtu"] = check_int(self.mtu, "mtu", 1)
        if self.tls is not None:
            if not isinstance(self.tls, TlsConfig):
                raise TypeError("network tls must be a TlsConfig")
            d["tls"] = self.tls._to_wire()
        return d


# -------------------------------------------------------------------------------------
# Secrets
# -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SecretInjection:
    """Where in an HTTP request the secret's placeholder is replaced by its value."""

    headers: bool = True
    basic_auth: bool = True
    query_params: bool = False
    body: bool = False


@dataclass(frozen=True)
class SecretEntry:
    """A secret: the guest sees ``env_var`` set to a placeholder that the proxy replaces
    by the value in TLS requests to the allowed hosts only. Exactly one of ``value``,
    ``host_env`` (a host environment variable) or ``file`` (a host file) gives the value."""

    env_var: str
    value: Optional[str] = None
    host_env: Optional[str] = None
    file: Optional[str] = None
    allow_hosts: Tuple[str, ...] = ()
    allow_host_patterns: Tuple[str, ...] = ()
    allow_any_host_dangerous: bool = False
    placeholder: Optional[str] = None
    on_violation: Optional[Union[ViolationAction, str]] = None
    require_tls: Optional[bool] = None
    injection: Optional[SecretInjection] = None

    def _to_wire(self) -> Dict[str, Any]:
        d: Dict[str, Any] = {"env": check_str(self.env_var, "secret env_var")}
        sources = [
            (k, v)
            for k, v in (("value", self.value), ("host_env", self.host_env), ("file", self.file))
            if v is not None
        ]
        if len(sources) != 1:
            raise InvalidArgumentError(
                f"secret {self.env_var}: give exactly one of value, host_env or file"
            )
        key, src = sources[0]
        d[key] = check_path(src, f"secret {key}") if key == "file" else check_str(src, f"secret {key}")
        if self.allow_hosts:
            d["allow_hosts"] = check_str_list(list(self.allow_hosts), "allow_hosts")
        if self.allow_host_patterns:
            d["allow_host_patterns"] = check_str_list(list(self.allow_host_patterns), "allow_host_patterns")
        if self.allow_any_host_dangerous:
            d["allow_any_host_dangerous"] = check_bool(self.allow_any_host_dangerous, "allow_any_host_dangerous")
        if self.placeholder is not None:
            d["placeholder"] = check_str(self.placeholder, "placeholder")
        if self.on_violation is not None:
            d["on_violation"] = enum_value(ViolationAction, self.on_violation, "on_violation")
        if self.require_tls is not None:
            d["require_tls_identity"] = check_bool(self.require_tls, "require_tls")
        if self.injection is not None:
            inj = self.injection
            if not isinstance(inj, SecretInjection):
                raise TypeError("injection must be a SecretInjection")
            d["inject_headers"] = check_bool(inj.headers, "injection.headers")
            d["inject_basic_auth"] = check_bool(inj.basic_auth, "injection.basic_auth")
            d["inject_query"] = check_bool(inj.query_params, "injection.query_params")
            d["inject_body"] = check_bool(inj.body, "injection.body")
        return d


class Secret:
    """Factory for secrets (``Sandbox.create(..., secrets=[...])``)."""

    @staticmethod
    def env(
        env_var: str,
        *,
        value: Optional[str] = None,
        host_env: Optional[str] = None,
        file: Optional[Union[str, "os.PathLike[str]"]] = None,
        allow_hosts: Sequence[str] = (),
        allow_host_patterns: Sequence[str] = (),
        allow_any_host_dangerous: bool = False,
        placeholder: Optional[str] = None,
        on_violation: Optional[Union[ViolationAction, str]] = None,
        require_tls: Optional[bool] = None,
        injection: Optional[SecretInjection] = None,
    ) -> SecretEntry:
        entry = SecretEntry(
            env_var=env_var,
            value=value,
            host_env=host_env,
            file=None if file is None else check_path(file, "file"),
            allow_hosts=tuple(check_str_list(list(allow_hosts), "allow_hosts")),
            allow_host_patterns=tuple(check_str_list(list(allow_host_patterns), "allow_host_patterns")),
            allow_any_host_dangerous=allow_any_host_dangerous,
            placeholder=placeholder,
            on_violation=on_violation,
            require_tls=require_tls,
            injection=injection,
        )
        entry._to_wire()  # checks now, not at create()
        return entry


# -------------------------------------------------------------------------------------
# Exec options
# -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rlimit:
    """A resource limit for a command (``setrlimit`` in the guest), e.g.
    ``Rlimit("nofile", 256, 256)`` or ``Rlimit.nofile(256)``."""

    resource: str
    soft: int
    hard: int

    @classmethod
    def nofile(cls, limit: int) -> "Rlimit":
        return cls("nofile", limit, limit)

    @classmethod
    def nproc(cls, limit: int) -> "Rlimit":
        return cls("nproc", limit, limit)

    @classmethod
    def cpu(cls, secs: int) -> "Rlimit":
        return cls("cpu", secs, secs)

    @classmethod
    def fsize(cls, limit: int) -> "Rlimit":
        return cls("fsize", limit, limit)

    @classmethod
    def stack(cls, limit: int) -> "Rlimit":
        return cls("stack", limit, limit)

    @classmethod
    def memlock(cls, limit: int) -> "Rlimit":
        return cls("memlock", limit, limit)

    @classmethod
    def as_(cls, *, soft: int, hard: int) -> "Rlimit":
        """Address space, bytes."""
        return cls("as", soft, hard)

    def _to_wire(self) -> Dict[str, Any]:
        soft = check_int(self.soft, "rlimit soft")
        hard = check_int(self.hard, "rlimit hard")
        if soft > hard:
            raise InvalidArgumentError(f"rlimit {self.resource}: soft {soft} is above hard {hard}")
        return {"resource": check_str(self.resource, "rlimit resource").lower(), "soft": soft, "hard": hard}


@dataclass(frozen=True)
class Stdin:
    """Where a command's stdin comes from: ``Stdin.null()`` (the default),
    ``Stdin.bytes(data)`` (fed, then end of file) or ``Stdin.pipe()`` (streaming calls
    only: write through ``ExecHandle.take_stdin()``)."""

    mode: str
    data: Optional[bytes] = None

    @classmethod
    def null(cls) -> "Stdin":
        return cls("null")

    @classmethod
    def pipe(cls) -> "Stdin":
        return cls("pipe")

    @classmethod
    def bytes(cls, data: Union[bytes, bytearray, memoryview, str]) -> "Stdin":
        if isinstance(data, str):
            data = data.encode("utf-8")
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"Stdin.bytes takes bytes or str, not {type(data).__name__}")
        return cls("bytes", bytes(data))


# -------------------------------------------------------------------------------------
# Init, registry
# -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InitConfig:
    """Hands PID 1 off to a guest init binary (``cmd``: a path in the guest, or
    ``"auto"`` to let the core find one; ``"auto"`` takes no ``args`` or ``env``)."""

    cmd: str
    args: Tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)

    def _to_wire(self) -> Any:
        cmd = check_str(self.cmd, "init cmd")
        if cmd == "auto":
            # The wire's "auto" is a bare string: it carries no argv or env.
            if self.args or self.env:
                raise InvalidArgumentError(
                    'init "auto" takes no args or env (the core picks the init and how to run '
                    "it); give the init's path as cmd to pass them"
                )
            return "auto"
        if not cmd:
            raise InvalidArgumentError("init cmd must not be empty")
        d: Dict[str, Any] = {"cmd": cmd}
        if self.args:
            d["args"] = check_str_list(list(self.args), "init args")
        if self.env:
            d["env"] = check_str_map(self.env, "init env")
        return d


@dataclass(frozen=True)
class RegistryAuth:
    """Credentials for a private registry."""

    username: str
    password: str

    @classmethod
    def basic(cls, username: str, password: str) -> "RegistryAuth":
        return cls(username, password)

    def __repr__(self) -> str:  # never print the password
        return f"RegistryAuth(username={self.username!r}, password='***')"

    def _to_wire(self) -> Dict[str, Any]:
        return {
            "username": check_str(self.username, "registry username"),
            "password": check_str(self.password, "registry password"),
        }
