# Type stubs of the public API of microsandbox (the runtime modules are annotated too).

import builtins
import enum
import os
from collections.abc import AsyncIterator, Awaitable, Generator, Mapping, Sequence
from typing import Any, Literal

__version__: str
__all__: list[str]

_StrPath = str | os.PathLike[str]
_BytesLike = bytes | bytearray | memoryview

# ------------------------------------------------------------------------------------
# Setup
# ------------------------------------------------------------------------------------

async def sdk_version() -> str: ...
async def is_installed() -> bool: ...
async def ensure_installed() -> None: ...
async def all_sandbox_metrics() -> dict[str, SandboxMetrics]: ...

# ------------------------------------------------------------------------------------
# Enums
# ------------------------------------------------------------------------------------

class PullPolicy(str, enum.Enum):
    ALWAYS = "always"
    IF_MISSING = "if-missing"
    NEVER = "never"

class LogLevel(str, enum.Enum):
    ERROR = "error"
    WARN = "warn"
    INFO = "info"
    DEBUG = "debug"
    TRACE = "trace"

class SecurityProfile(str, enum.Enum):
    DEFAULT = "default"
    RESTRICTED = "restricted"

class SandboxStatus(str, enum.Enum):
    RUNNING = "running"
    STOPPED = "stopped"
    CRASHED = "crashed"
    DRAINING = "draining"
    PAUSED = "paused"

class ViolationAction(str, enum.Enum):
    BLOCK = "block"
    BLOCK_AND_LOG = "block-and-log"
    BLOCK_AND_TERMINATE = "block-and-terminate"

class PortProtocol(str, enum.Enum):
    TCP = "tcp"
    UDP = "udp"

class FsEntryKind(str, enum.Enum):
    FILE = "file"
    DIRECTORY = "directory"
    SYMLINK = "symlink"
    OTHER = "other"

class LogSource(str, enum.Enum):
    STDOUT = "stdout"
    STDERR = "stderr"
    OUTPUT = "output"
    SYSTEM = "system"

LogReadSource = Literal["stdout", "stderr", "output", "system", "all"]

# ------------------------------------------------------------------------------------
# Configuration values
# ------------------------------------------------------------------------------------

class ImageSource:
    kind: str
    reference: str | None
    path: str | None
    upper_size_mib: int | None
    fstype: str | None
    def __init__(
        self,
        kind: str,
        reference: str | None = None,
        path: str | None = None,
        upper_size_mib: int | None = None,
        fstype: str | None = None,
    ) -> None: ...

class Image:
    @staticmethod
    def oci(reference: str, *, upper_size_mib: int | None = None) -> ImageSource: ...
    @staticmethod
    def bind(path: _StrPath) -> ImageSource: ...
    @staticmethod
    def disk(path: _StrPath, *, fstype: str | None = None) -> ImageSource: ...

class PatchConfig:
    kind: str
    path: str | None
    content: str | None
    src: str | None
    dst: str | None
    target: str | None
    link: str | None
    mode: int | None
    replace: bool
    def __init__(
        self,
        kind: str,
        path: str | None = None,
        content: str | None = None,
        src: str | None = None,
        dst: str | None = None,
        target: str | None = None,
        link: str | None = None,
        mode: int | None = None,
        replace: bool = False,
    ) -> None: ...

class Patch:
    @staticmethod
    def text(path: str, content: str, *, mode: int | None = None, replace: bool = False) -> PatchConfig: ...
    @staticmethod
    def append(path: str, content: str) -> PatchConfig: ...
    @staticmethod
    def mkdir(path: str, *, mode: int | None = None) -> PatchConfig: ...
    @staticmethod
    def remove(path: str) -> PatchConfig: ...
    @staticmethod
    def symlink(target: str, link: str, *, replace: bool = False) -> PatchConfig: ...
    @staticmethod
    def copy_file(src: str, dst: str, *, mode: int | None = None, replace: bool = False) -> PatchConfig: ...
    @staticmethod
    def copy_dir(src: str, dst: str, *, replace: bool = False) -> PatchConfig: ...

class MountConfig:
    kind: str
    bind: str | None
    named: str | None
    disk: str | None
    fstype: str | None
    size_mib: int | None
    readonly: bool
    def __init__(
        self,
        kind: str,
        bind: str | None = None,
        named: str | None = None,
        disk: str | None = None,
        fstype: str | None = None,
        size_mib: int | None = None,
        readonly: bool = False,
    ) -> None: ...

class Volume:
    @staticmethod
    def bind(path: _StrPath, *, readonly: bool = False) -> MountConfig: ...
    @staticmethod
    def named(name: str, *, readonly: bool = False, size_mib: int | None = None) -> MountConfig: ...
    @staticmethod
    def tmpfs(*, size_mib: int | None = None, readonly: bool = False) -> MountConfig: ...
    @staticmethod
    def disk(path: _StrPath, *, fstype: str | None = None, readonly: bool = False) -> MountConfig: ...

class PortBinding:
    host_port: int
    guest_port: int
    bind: str
    protocol: PortProtocol | str
    def __init__(
        self, host_port: int, guest_port: int, bind: str = "127.0.0.1", protocol: PortProtocol | str = ...
    ) -> None: ...
    @classmethod
    def tcp(cls, host_port: int, guest_port: int, *, bind: str = "127.0.0.1") -> PortBinding: ...
    @classmethod
    def udp(cls, host_port: int, guest_port: int, *, bind: str = "127.0.0.1") -> PortBinding: ...

class DnsConfig:
    nameservers: tuple[str, ...]
    rebind_protection: bool | None
    query_timeout_ms: int | None
    def __init__(
        self,
        nameservers: tuple[str, ...] = (),
        rebind_protection: bool | None = None,
        query_timeout_ms: int | None = None,
    ) -> None: ...

class TlsConfig:
    enabled: bool | None
    bypass: tuple[str, ...]
    verify_upstream: bool | None
    intercepted_ports: tuple[int, ...] | None
    block_quic: bool | None
    upstream_ca_cert: str | None
    intercept_ca_cert: str | None
    intercept_ca_key: str | None
    def __init__(
        self,
        enabled: bool | None = None,
        bypass: tuple[str, ...] = (),
        verify_upstream: bool | None = None,
        intercepted_ports: tuple[int, ...] | None = None,
        block_quic: bool | None = None,
        upstream_ca_cert: str | None = None,
        intercept_ca_cert: str | None = None,
        intercept_ca_key: str | None = None,
    ) -> None: ...

class Network:
    policy: str | None
    rules: tuple[str, ...]
    enabled: bool | None
    dns: DnsConfig | None
    max_connections: int | None
    mtu: int | None
    tls: TlsConfig | None
    def __init__(
        self,
        policy: str | None = None,
        rules: tuple[str, ...] = (),
        enabled: bool | None = None,
        dns: DnsConfig | None = None,
        max_connections: int | None = None,
        mtu: int | None = None,
        tls: TlsConfig | None = None,
    ) -> None: ...
    @classmethod
    def public_only(cls) -> Network: ...
    @classmethod
    def none(cls) -> Network: ...
    @classmethod
    def allow_all(cls) -> Network: ...
    @classmethod
    def disabled(cls) -> Network: ...

class SecretInjection:
    headers: bool
    basic_auth: bool
    query_params: bool
    body: bool
    def __init__(
        self, headers: bool = True, basic_auth: bool = True, query_params: bool = False, body: bool = False
    ) -> None: ...

class SecretEntry:
    env_var: str
    value: str | None
    host_env: str | None
    file: str | None
    allow_hosts: tuple[str, ...]
    allow_host_patterns: tuple[str, ...]
    allow_any_host_dangerous: bool
    placeholder: str | None
    on_violation: ViolationAction | str | None
    require_tls: bool | None
    injection: SecretInjection | None
    def __init__(
        self,
        env_var: str,
        value: str | None = None,
        host_env: str | None = None,
        file: str | None = None,
        allow_hosts: tuple[str, ...] = (),
        allow_host_patterns: tuple[str, ...] = (),
        allow_any_host_dangerous: bool = False,
        placeholder: str | None = None,
        on_violation: ViolationAction | str | None = None,
        require_tls: bool | None = None,
        injection: SecretInjection | None = None,
    ) -> None: ...

class Secret:
    @staticmethod
    def env(
        env_var: str,
        *,
        value: str | None = None,
        host_env: str | None = None,
        file: _StrPath | None = None,
        allow_hosts: Sequence[str] = (),
        allow_host_patterns: Sequence[str] = (),
        allow_any_host_dangerous: bool = False,
        placeholder: str | None = None,
        on_violation: ViolationAction | str | None = None,
        require_tls: bool | None = None,
        injection: SecretInjection | None = None,
    ) -> SecretEntry: ...

class Rlimit:
    resource: str
    soft: int
    hard: int
    def __init__(self, resource: str, soft: int, hard: int) -> None: ...
    @classmethod
    def nofile(cls, limit: int) -> Rlimit: ...
    @classmethod
    def nproc(cls, limit: int) -> Rlimit: ...
    @classmethod
    def cpu(cls, secs: int) -> Rlimit: ...
    @classmethod
    def fsize(cls, limit: int) -> Rlimit: ...
    @classmethod
    def stack(cls, limit: int) -> Rlimit: ...
    @classmethod
    def memlock(cls, limit: int) -> Rlimit: ...
    @classmethod
    def as_(cls, *, soft: int, hard: int) -> Rlimit: ...

class Stdin:
    mode: str
    data: bytes | None
    def __init__(self, mode: str, data: bytes | None = None) -> None: ...
    @classmethod
    def null(cls) -> Stdin: ...
    @classmethod
    def pipe(cls) -> Stdin: ...
    @classmethod
    def bytes(cls, data: _BytesLike | str) -> Stdin: ...

class InitConfig:
    cmd: str
    args: tuple[str, ...]
    env: Mapping[str, str]
    def __init__(self, cmd: str, args: tuple[str, ...] = (), env: Mapping[str, str] = ...) -> None: ...

class RegistryAuth:
    username: str
    password: str
    def __init__(self, username: str, password: str) -> None: ...
    @classmethod
    def basic(cls, username: str, password: str) -> RegistryAuth: ...

# ------------------------------------------------------------------------------------
# Commands
# ------------------------------------------------------------------------------------

class ExecStatus(tuple[int, bool]):
    signal: int | None
    timed_out: bool
    def __new__(
        cls, exit_code: int, success: bool, signal: int | None = None, timed_out: bool = False
    ) -> ExecStatus: ...
    @property
    def exit_code(self) -> int: ...
    @property
    def success(self) -> bool: ...

class ExecOutput:
    def __init__(self, stdout: bytes, stderr: bytes, status: ExecStatus) -> None: ...
    @property
    def exit_code(self) -> int: ...
    @property
    def success(self) -> bool: ...
    @property
    def signal(self) -> int | None: ...
    @property
    def timed_out(self) -> bool: ...
    @property
    def status(self) -> ExecStatus: ...
    @property
    def stdout_bytes(self) -> bytes: ...
    @property
    def stderr_bytes(self) -> bytes: ...
    @property
    def stdout_text(self) -> str: ...
    @property
    def stderr_text(self) -> str: ...

class ExecEvent:
    event_type: Literal["started", "stdout", "stderr", "exited"]
    pid: int | None
    data: bytes | None
    exit_code: int | None
    success: bool | None
    signal: int | None
    timed_out: bool | None
    def __init__(
        self,
        event_type: str,
        *,
        pid: int | None = None,
        data: bytes | None = None,
        exit_code: int | None = None,
        success: bool | None = None,
        signal: int | None = None,
        timed_out: bool | None = None,
    ) -> None: ...
    @property
    def code(self) -> int | None: ...
    @property
    def text(self) -> str | None: ...

class ExecSink:
    async def write(self, data: _BytesLike | str) -> None: ...
    async def close(self) -> None: ...

class ExecHandle:
    @property
    def stdin_piped(self) -> bool: ...
    @property
    def pid(self) -> int | None: ...
    async def recv(self) -> ExecEvent | None: ...
    def __aiter__(self) -> AsyncIterator[ExecEvent]: ...
    async def __anext__(self) -> ExecEvent: ...
    def take_stdin(self) -> ExecSink | None: ...
    async def write(self, data: _BytesLike | str) -> None: ...
    async def close_stdin(self) -> None: ...
    async def signal(self, sig: int) -> None: ...
    async def resize(self, rows: int, cols: int) -> None: ...
    async def kill(self) -> None: ...
    async def wait(self) -> ExecStatus: ...
    async def collect(self) -> ExecOutput: ...
    async def close(self) -> None: ...
    async def __aenter__(self) -> ExecHandle: ...
    async def __aexit__(self, *exc: object) -> None: ...

# ------------------------------------------------------------------------------------
# Files
# ------------------------------------------------------------------------------------

class FsMetadata:
    kind: str
    size: int
    mode: int
    uid: int
    gid: int
    modified_ms: float | None
    symlink_target: str | None
    @property
    def is_dir(self) -> bool: ...
    @property
    def is_file(self) -> bool: ...
    @property
    def is_symlink(self) -> bool: ...

class FsEntry:
    path: str
    name: str
    kind: str
    size: int
    metadata: FsMetadata

class SandboxFs:
    async def read(self, path: str) -> bytes: ...
    async def read_text(self, path: str, encoding: str = "utf-8") -> str: ...
    async def write(self, path: str, data: _BytesLike | str) -> None: ...
    async def list(self, path: str) -> builtins.list[FsEntry]: ...
    async def stat(self, path: str) -> FsMetadata: ...
    async def exists(self, path: str) -> bool: ...
    async def mkdir(self, path: str) -> None: ...
    async def mkdir_all(self, path: str) -> None: ...
    async def remove(self, path: str) -> None: ...
    async def remove_dir(self, path: str) -> None: ...
    async def rename(self, src: str, dst: str) -> None: ...
    async def copy(self, src: str, dst: str) -> None: ...
    async def copy_from_host(self, host_path: _StrPath, guest_path: str) -> None: ...
    async def copy_to_host(self, guest_path: str, host_path: _StrPath) -> None: ...

# ------------------------------------------------------------------------------------
# Observation
# ------------------------------------------------------------------------------------

class SandboxMetrics:
    cpu_percent: float
    vcpu_time_ns: int
    memory_bytes: int
    memory_available_bytes: int | None
    memory_host_resident_bytes: int | None
    memory_limit_bytes: int
    disk_read_bytes: int
    disk_write_bytes: int
    net_rx_bytes: int
    net_tx_bytes: int
    upper_used_bytes: int | None
    upper_free_bytes: int | None
    upper_host_allocated_bytes: int | None
    timestamp_ms: float
    uptime_secs: float
    status: str
    @property
    def uptime_ms(self) -> int: ...

class MetricsStream:
    async def recv(self) -> SandboxMetrics | None: ...
    def __aiter__(self) -> AsyncIterator[SandboxMetrics]: ...
    async def __anext__(self) -> SandboxMetrics: ...
    async def close(self) -> None: ...
    async def aclose(self) -> None: ...
    async def __aenter__(self) -> MetricsStream: ...
    async def __aexit__(self, *exc: object) -> None: ...

class LogEntry:
    source: str
    session_id: int | None
    timestamp_ms: float
    data: bytes
    cursor: str
    def text(self) -> str: ...

class LogStream:
    async def recv(self) -> LogEntry | None: ...
    def __aiter__(self) -> AsyncIterator[LogEntry]: ...
    async def __anext__(self) -> LogEntry: ...
    async def close(self) -> None: ...
    async def aclose(self) -> None: ...
    async def __aenter__(self) -> LogStream: ...
    async def __aexit__(self, *exc: object) -> None: ...

# ------------------------------------------------------------------------------------
# Sandboxes
# ------------------------------------------------------------------------------------

class PullEvent:
    event_type: str
    fields: dict[str, Any]
    reference: str | None
    manifest_digest: str | None
    layer_count: int | None
    total_download_bytes: int | None
    layer_index: int | None
    digest: str | None
    downloaded_bytes: int | None
    total_bytes: int | None
    diff_id: str | None
    bytes_read: int | None
    def __init__(self, event_type: str, fields: dict[str, Any] | None = None) -> None: ...
    def __getattr__(self, name: str) -> Any: ...

class PullSession:
    @property
    def progress(self) -> AsyncIterator[PullEvent]: ...
    async def start(self) -> None: ...
    async def recv(self) -> PullEvent | None: ...
    async def result(self) -> Sandbox: ...
    def __await__(self) -> Generator[Any, None, Sandbox]: ...
    async def close(self) -> None: ...
    async def __aenter__(self) -> PullSession: ...
    async def __aexit__(self, *exc: object) -> None: ...

class Snapshot:
    name: str
    path: str
    source_sandbox: str
    image: str
    image_digest: str | None
    size_bytes: int
    created_at_ms: float
    digest: str
    @staticmethod
    async def list() -> builtins.list[Snapshot]: ...
    @staticmethod
    async def get(name_or_path: _StrPath) -> Snapshot: ...
    @staticmethod
    async def remove(name_or_path: _StrPath) -> None: ...
    @staticmethod
    async def export(name_or_path: _StrPath, path: _StrPath, *, with_image: bool = False) -> None: ...
    @staticmethod
    async def import_(path: _StrPath, *, name: str | None = None) -> Snapshot: ...

class SshOutput:
    stdout_bytes: bytes
    stderr_bytes: bytes
    exit_status: int | None
    exit_signal: str | None
    @property
    def success(self) -> bool: ...
    @property
    def stdout_text(self) -> str: ...
    @property
    def stderr_text(self) -> str: ...

class SshClient:
    async def exec(self, command: str) -> SshOutput: ...
    async def close(self) -> None: ...
    async def __aenter__(self) -> SshClient: ...
    async def __aexit__(self, *exc: object) -> None: ...

class SshEndpoint:
    addr: str
    port: int
    host_key: str
    fingerprint: str
    known_hosts_line: str
    async def authorize(self, key: str) -> None: ...
    async def client(self, *, user: str | None = None) -> SshClient: ...
    async def shutdown(self) -> None: ...
    async def __aenter__(self) -> SshEndpoint: ...
    async def __aexit__(self, *exc: object) -> None: ...

class SandboxSsh:
    async def serve(self, *, port: int | None = None, authorized_keys: Sequence[str] = ()) -> SshEndpoint: ...
    async def open_client(self) -> SshClient: ...

class SandboxStopResult:
    name: str
    status: str
    exit_code: int | None
    signal: int | None
    reason: str | None
    observed_at_ms: float

_ExecArgs = Sequence[str] | Mapping[str, Any] | None
_StdinLike = Stdin | bytes | str | None

class Sandbox:
    @staticmethod
    async def create(
        name: str,
        *,
        image: str | os.PathLike[str] | ImageSource | None = None,
        snapshot: _StrPath | None = None,
        cpus: int | None = None,
        memory: int | None = None,
        workdir: str | None = None,
        shell: str | None = None,
        hostname: str | None = None,
        user: str | None = None,
        entrypoint: Sequence[str] | None = None,
        init: str | Mapping[str, Any] | InitConfig | None = None,
        replace: bool | None = None,
        replace_with_timeout: float | None = None,
        max_duration: float | None = None,
        idle_timeout: float | None = None,
        env: Mapping[str, str] | None = None,
        scripts: Mapping[str, str] | None = None,
        labels: Mapping[str, str] | None = None,
        pull_policy: PullPolicy | str | None = None,
        log_level: LogLevel | str | None = None,
        quiet_logs: bool | None = None,
        ephemeral: bool | None = None,
        security_profile: SecurityProfile | str | None = None,
        registry_auth: RegistryAuth | Mapping[str, str] | None = None,
        volumes: Mapping[str, MountConfig] | None = None,
        patches: Sequence[PatchConfig] | None = None,
        ports: Mapping[int, int] | Sequence[PortBinding] | None = None,
        network: Network | None = None,
        secrets: Sequence[SecretEntry] | None = None,
        detached: bool = False,
    ) -> Sandbox: ...
    @staticmethod
    def create_with_progress(
        name: str,
        *,
        image: str | os.PathLike[str] | ImageSource | None = None,
        snapshot: _StrPath | None = None,
        cpus: int | None = None,
        memory: int | None = None,
        workdir: str | None = None,
        shell: str | None = None,
        hostname: str | None = None,
        user: str | None = None,
        entrypoint: Sequence[str] | None = None,
        init: str | Mapping[str, Any] | InitConfig | None = None,
        replace: bool | None = None,
        replace_with_timeout: float | None = None,
        max_duration: float | None = None,
        idle_timeout: float | None = None,
        env: Mapping[str, str] | None = None,
        scripts: Mapping[str, str] | None = None,
        labels: Mapping[str, str] | None = None,
        pull_policy: PullPolicy | str | None = None,
        log_level: LogLevel | str | None = None,
        quiet_logs: bool | None = None,
        ephemeral: bool | None = None,
        security_profile: SecurityProfile | str | None = None,
        registry_auth: RegistryAuth | Mapping[str, str] | None = None,
        volumes: Mapping[str, MountConfig] | None = None,
        patches: Sequence[PatchConfig] | None = None,
        ports: Mapping[int, int] | Sequence[PortBinding] | None = None,
        network: Network | None = None,
        secrets: Sequence[SecretEntry] | None = None,
        detached: bool = False,
    ) -> PullSession: ...
    @staticmethod
    async def start(name: str, *, detached: bool = False) -> Sandbox: ...
    @staticmethod
    async def connect(name: str) -> Sandbox: ...
    @staticmethod
    async def get(name: str) -> SandboxHandle: ...
    @staticmethod
    async def list() -> builtins.list[SandboxHandle]: ...
    @staticmethod
    async def list_with(
        *, labels: Mapping[str, str] | None = None, status: SandboxStatus | str | None = None
    ) -> builtins.list[SandboxHandle]: ...
    @staticmethod
    async def remove(name: str) -> None: ...
    @property
    def name(self) -> Awaitable[str]: ...
    @property
    def owns_lifecycle(self) -> Awaitable[bool]: ...
    @property
    def fs(self) -> SandboxFs: ...
    async def config(self) -> dict[str, Any]: ...
    async def exec(
        self,
        cmd: str,
        args: _ExecArgs = None,
        *,
        cwd: str | None = None,
        user: str | None = None,
        env: Mapping[str, str] | None = None,
        timeout: float | None = None,
        stdin: _StdinLike = None,
        tty: bool = False,
        rlimits: Sequence[Rlimit] | None = None,
    ) -> ExecOutput: ...
    async def exec_stream(
        self,
        cmd: str,
        args: _ExecArgs = None,
        *,
        cwd: str | None = None,
        user: str | None = None,
        env: Mapping[str, str] | None = None,
        timeout: float | None = None,
        stdin: _StdinLike = None,
        tty: bool = False,
        rlimits: Sequence[Rlimit] | None = None,
    ) -> ExecHandle: ...
    async def shell(
        self,
        script: str,
        *,
        cwd: str | None = None,
        user: str | None = None,
        env: Mapping[str, str] | None = None,
        timeout: float | None = None,
        stdin: _StdinLike = None,
        tty: bool = False,
        rlimits: Sequence[Rlimit] | None = None,
    ) -> ExecOutput: ...
    async def shell_stream(
        self,
        script: str,
        *,
        cwd: str | None = None,
        user: str | None = None,
        env: Mapping[str, str] | None = None,
        timeout: float | None = None,
        stdin: _StdinLike = None,
        tty: bool = False,
        rlimits: Sequence[Rlimit] | None = None,
    ) -> ExecHandle: ...
    async def attach(self, cmd: str, args: Sequence[str] | None = None) -> int: ...
    async def attach_shell(self) -> int: ...
    def ssh(self) -> SandboxSsh: ...
    async def metrics(self) -> SandboxMetrics: ...
    async def metrics_stream(self, interval: float = 1.0) -> MetricsStream: ...
    async def logs(
        self,
        tail: int | None = None,
        since_ms: float | None = None,
        until_ms: float | None = None,
        sources: Sequence[LogReadSource | LogSource] | None = None,
    ) -> builtins.list[LogEntry]: ...
    async def log_stream(
        self,
        sources: Sequence[LogReadSource | LogSource] | None = None,
        since_ms: float | None = None,
        from_cursor: str | None = None,
        until_ms: float | None = None,
        follow: bool = False,
    ) -> LogStream: ...
    async def stop(self, timeout: float | None = None) -> None: ...
    async def kill(self, timeout: float | None = None) -> None: ...
    async def stop_and_wait(self) -> tuple[int, bool]: ...
    async def wait(self) -> tuple[int, bool]: ...
    async def wait_until_stopped(self) -> SandboxStopResult: ...
    async def drain(self) -> None: ...
    async def request_stop(self) -> None: ...
    async def request_kill(self) -> None: ...
    async def request_drain(self) -> None: ...
    async def pause(self) -> None: ...
    async def resume(self) -> None: ...
    async def detach(self) -> None: ...
    async def remove_persisted(self) -> None: ...
    async def close(self) -> None: ...
    async def __aenter__(self) -> Sandbox: ...
    async def __aexit__(self, exc_type: Any, exc: Any, tb: Any) -> None: ...

class SandboxHandle:
    name: str
    status: str
    labels: dict[str, str]
    created_at: float | None
    updated_at: float | None
    vmm_pid: int | None
    detached: bool
    exit_reason: str | None
    ephemeral: bool
    def __init__(self, info: Mapping[str, Any]) -> None: ...
    @property
    def config_json(self) -> str: ...
    def config(self) -> dict[str, Any]: ...
    async def refresh(self) -> SandboxHandle: ...
    async def connect(self) -> Sandbox: ...
    async def connect_with_timeout(self, timeout: float) -> Sandbox: ...
    async def start(self, *, detached: bool = False) -> Sandbox: ...
    async def stop(self, timeout: float | None = None) -> None: ...
    async def stop_with_timeout(self, timeout: float) -> None: ...
    async def kill(self, timeout: float | None = None) -> None: ...
    async def drain(self) -> None: ...
    async def request_stop(self) -> None: ...
    async def request_kill(self) -> None: ...
    async def request_drain(self) -> None: ...
    async def pause(self) -> None: ...
    async def resume(self) -> None: ...
    async def wait_until_stopped(self) -> SandboxStopResult: ...
    async def metrics(self) -> SandboxMetrics: ...
    async def snapshot(self, name: str) -> Snapshot: ...
    async def snapshot_to(self, path: _StrPath) -> Snapshot: ...
    async def remove(self) -> None: ...
    async def logs(
        self,
        tail: int | None = None,
        since_ms: float | None = None,
        until_ms: float | None = None,
        sources: Sequence[LogReadSource | LogSource] | None = None,
    ) -> list[LogEntry]: ...
    async def log_stream(
        self,
        sources: Sequence[LogReadSource | LogSource] | None = None,
        since_ms: float | None = None,
        from_cursor: str | None = None,
        until_ms: float | None = None,
        follow: bool = False,
    ) -> LogStream: ...

# ------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------

class MicrosandboxError(Exception):
    KIND: str
    kind: str
    message: str
    fs_kind: str | None
    def __init__(self, message: str = "", *, kind: str | None = None, fs_kind: str | None = None) -> None: ...

ERROR_KINDS: dict[str, type[MicrosandboxError]]

class InvalidNameError(MicrosandboxError): ...
class InvalidConfigError(MicrosandboxError): ...
class SandboxAlreadyExistsError(MicrosandboxError): ...
class SandboxNotFoundError(MicrosandboxError): ...
class SnapshotNotFoundError(MicrosandboxError): ...
class KernelNotFoundError(MicrosandboxError): ...
class StateError(MicrosandboxError): ...
class SandboxStillRunningError(MicrosandboxError): ...
class SandboxNotRunningError(MicrosandboxError): ...
class ImageNotFoundError(MicrosandboxError): ...
class InvalidReferenceError(MicrosandboxError): ...
class ImageNotCachedError(MicrosandboxError): ...
class RegistryUnauthorizedError(MicrosandboxError): ...
class RegistryUnreachableError(MicrosandboxError): ...
class RegistryError(MicrosandboxError): ...
class InvalidImageError(MicrosandboxError): ...
class DigestMismatchError(MicrosandboxError): ...
class PatchTargetExistsError(MicrosandboxError): ...
class PatchError(MicrosandboxError): ...
class FilesystemError(MicrosandboxError): ...
class PathNotFoundError(FilesystemError): ...
class UntrustedDirectoryError(MicrosandboxError): ...
class VmmNotFoundError(MicrosandboxError): ...
class StartFailedError(MicrosandboxError): ...
class CommandNotFoundError(MicrosandboxError): ...
class PermissionDeniedError(MicrosandboxError): ...
class InvalidExecRequestError(MicrosandboxError): ...
class ExecTimeoutError(MicrosandboxError):
    output: ExecOutput | None
class TooLargeError(MicrosandboxError): ...
class AgentUnavailableError(MicrosandboxError): ...
class BusyError(MicrosandboxError): ...
class VersionMismatchError(MicrosandboxError): ...
class AgentError(MicrosandboxError): ...
class ConnectionClosedError(MicrosandboxError): ...
class ProtocolError(MicrosandboxError): ...
class InvalidStateError(MicrosandboxError): ...
class SandboxPausedError(MicrosandboxError): ...
class OperationTimeoutError(MicrosandboxError): ...
class NotATerminalError(MicrosandboxError): ...
class IoError(MicrosandboxError): ...
class InvalidArgumentError(MicrosandboxError, ValueError): ...
class InvalidHandleError(MicrosandboxError): ...
class TooManyHandlesError(MicrosandboxError): ...
class OperationCancelledError(MicrosandboxError): ...
class NotInstalledError(MicrosandboxError): ...
class InternalError(MicrosandboxError): ...
