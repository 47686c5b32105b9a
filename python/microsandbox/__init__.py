"""microsandbox: microVM sandboxes from Python.

    import asyncio
    from microsandbox import Sandbox

    async def main():
        async with await Sandbox.create("hello") as sb:
            out = await sb.shell("echo hello")
            print(out.stdout_text)

    asyncio.run(main())

Every call goes to the Rust core (``microsandbox._native``) as a method name and JSON
arguments (docs/bindings.md in the repository).
"""

from __future__ import annotations

from microsandbox import _wire
from microsandbox.errors import (
    ERROR_KINDS,
    AgentError,
    AgentUnavailableError,
    BusyError,
    CommandNotFoundError,
    ConnectionClosedError,
    DigestMismatchError,
    ExecTimeoutError,
    FilesystemError,
    ImageNotCachedError,
    ImageNotFoundError,
    InternalError,
    InvalidArgumentError,
    InvalidConfigError,
    InvalidExecRequestError,
    InvalidHandleError,
    InvalidImageError,
    InvalidNameError,
    InvalidReferenceError,
    InvalidStateError,
    IoError,
    KernelNotFoundError,
    MicrosandboxError,
    NotATerminalError,
    NotInstalledError,
    OperationCancelledError,
    OperationTimeoutError,
    PatchError,
    PatchTargetExistsError,
    PathNotFoundError,
    PermissionDeniedError,
    ProtocolError,
    RegistryError,
    RegistryUnauthorizedError,
    RegistryUnreachableError,
    SandboxAlreadyExistsError,
    SandboxNotFoundError,
    SnapshotNotFoundError,
    SandboxNotRunningError,
    SandboxPausedError,
    SandboxStillRunningError,
    StartFailedError,
    StateError,
    TooLargeError,
    TooManyHandlesError,
    UntrustedDirectoryError,
    VersionMismatchError,
    VmmNotFoundError,
)
from microsandbox import errors as _errors
from microsandbox.exec import ExecEvent, ExecHandle, ExecOutput, ExecSink, ExecStatus
from microsandbox.fs import FsEntry, FsMetadata, SandboxFs
from microsandbox.logs import LogEntry, LogStream
from microsandbox.metrics import MetricsStream, SandboxMetrics
from microsandbox.pull import PullEvent, PullSession
from microsandbox.sandbox import Sandbox, SandboxHandle, SandboxStopResult, all_sandbox_metrics
from microsandbox.snapshot import Snapshot
from microsandbox.ssh import SandboxSsh, SshClient, SshEndpoint, SshOutput
from microsandbox.types import (
    DnsConfig,
    FsEntryKind,
    Image,
    ImageSource,
    InitConfig,
    LogLevel,
    LogReadSource,
    LogSource,
    MountConfig,
    Network,
    Patch,
    PatchConfig,
    PortBinding,
    PortProtocol,
    PullPolicy,
    RegistryAuth,
    Rlimit,
    SandboxStatus,
    Secret,
    SecretEntry,
    SecretInjection,
    SecurityProfile,
    Stdin,
    TlsConfig,
    ViolationAction,
    Volume,
)

__version__ = "0.1.0"


async def sdk_version() -> str:
    """The version of the SDK core this package runs on."""
    d = await _wire.call("version", {})
    return str(_wire.field(d, "sdk"))


async def is_installed() -> bool:
    """Whether the runtime (``msb-vmm`` and the guest artifacts) is in place."""
    return bool(await _wire.call("is_installed", {}))


async def ensure_installed() -> None:
    """Builds the runtime from this source tree if it is not in place (progress on
    stderr): ``cargo build`` of ``msb-vmm``, the guest kernel (whose build may
    ``apt-get install`` its dependencies), initramfs, agent and default root. Nothing is
    downloaded as a release. Check :func:`is_installed` first where building is not wanted.

    Once a build runs it cannot be stopped: cancelling the awaiting task raises at once,
    but the build goes on in the background. Raises :class:`NotInstalledError` when it
    fails.
    """
    await _wire.call("ensure_installed", {})


__all__ = [
    # sandboxes
    "Sandbox",
    "SandboxHandle",
    "SandboxStopResult",
    "SandboxStatus",
    "PullSession",
    "PullEvent",
    # commands
    "ExecOutput",
    "ExecStatus",
    "ExecHandle",
    "ExecEvent",
    "ExecSink",
    "Stdin",
    "Rlimit",
    # files
    "SandboxFs",
    "FsEntry",
    "FsMetadata",
    "FsEntryKind",
    # snapshots, SSH
    "Snapshot",
    "SandboxSsh",
    "SshEndpoint",
    "SshClient",
    "SshOutput",
    # observation
    "SandboxMetrics",
    "MetricsStream",
    "LogEntry",
    "LogStream",
    "LogSource",
    "LogReadSource",
    "all_sandbox_metrics",
    # configuration
    "Image",
    "ImageSource",
    "Patch",
    "PatchConfig",
    "Volume",
    "MountConfig",
    "PortBinding",
    "PortProtocol",
    "Network",
    "DnsConfig",
    "TlsConfig",
    "Secret",
    "SecretEntry",
    "SecretInjection",
    "ViolationAction",
    "InitConfig",
    "RegistryAuth",
    "PullPolicy",
    "LogLevel",
    "SecurityProfile",
    # setup
    "ensure_installed",
    "is_installed",
    "sdk_version",
    "__version__",
    # errors: every name of microsandbox.errors (one class per wire kind)
    "ERROR_KINDS",
]
__all__ += _errors.__all__
