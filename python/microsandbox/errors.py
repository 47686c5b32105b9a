"""Typed exceptions: one class per error kind of the bindings' wire (docs/bindings.md).

Every error the core reports arrives as ``{"kind", "message", "fs_kind"?}`` and is raised
as the class registered for its ``kind`` (an unknown kind raises the base class
:class:`MicrosandboxError`, with ``.kind`` still telling it).
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Type

__all__ = [
    "MicrosandboxError",
    "InvalidNameError",
    "InvalidConfigError",
    "SandboxAlreadyExistsError",
    "SandboxNotFoundError",
    "SnapshotNotFoundError",
    "KernelNotFoundError",
    "StateError",
    "SandboxStillRunningError",
    "SandboxNotRunningError",
    "ImageNotFoundError",
    "InvalidReferenceError",
    "ImageNotCachedError",
    "RegistryUnauthorizedError",
    "RegistryUnreachableError",
    "RegistryError",
    "InvalidImageError",
    "DigestMismatchError",
    "PatchTargetExistsError",
    "PatchError",
    "FilesystemError",
    "PathNotFoundError",
    "UntrustedDirectoryError",
    "VmmNotFoundError",
    "StartFailedError",
    "CommandNotFoundError",
    "PermissionDeniedError",
    "InvalidExecRequestError",
    "ExecTimeoutError",
    "TooLargeError",
    "AgentUnavailableError",
    "BusyError",
    "VersionMismatchError",
    "AgentError",
    "ConnectionClosedError",
    "ProtocolError",
    "InvalidStateError",
    "SandboxPausedError",
    "OperationTimeoutError",
    "NotATerminalError",
    "IoError",
    "InvalidArgumentError",
    "InvalidHandleError",
    "TooManyHandlesError",
    "OperationCancelledError",
    "NotInstalledError",
    "InternalError",
    "ERROR_KINDS",
]


class MicrosandboxError(Exception):
    """Base class of every error the SDK raises for the core.

    Attributes:
        kind: the wire's error kind (``"sandbox_not_found"``, ``"filesystem"``, ...).
        message: one line: the error and its causes.
        fs_kind: for kind ``"filesystem"``, what went wrong (``"not_found"``,
            ``"is_a_directory"``, ...); ``None`` otherwise.
    """

    #: The wire kind this class stands for (the base class: none in particular).
    KIND: str = "unknown"

    def __init__(
        self,
        message: str = "",
        *,
        kind: Optional[str] = None,
        fs_kind: Optional[str] = None,
    ) -> None:
        super().__init__(message)
        self.message: str = message
        self.kind: str = kind if kind is not None else type(self).KIND
        self.fs_kind: Optional[str] = fs_kind

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        extra = f", fs_kind={self.fs_kind!r}" if self.fs_kind is not None else ""
        return f"{type(self).__name__}({self.message!r}, kind={self.kind!r}{extra})"



class InvalidNameError(MicrosandboxError):
    """The sandbox name is not valid (empty, too long, or with ``/``, control characters)."""

    KIND = "invalid_name"


class InvalidConfigError(MicrosandboxError):
    """The sandbox configuration is not valid."""

    KIND = "invalid_config"


class SandboxAlreadyExistsError(MicrosandboxError):
    """A sandbox with this name already exists."""

    KIND = "already_exists"


class SandboxNotFoundError(MicrosandboxError):
    """No sandbox of that name."""

    KIND = "sandbox_not_found"


class SnapshotNotFoundError(MicrosandboxError):
    """No snapshot of that name or at that path."""

    KIND = "snapshot_not_found"


class KernelNotFoundError(MicrosandboxError):
    """The guest kernel was not found."""

    KIND = "kernel_not_found"


class StateError(MicrosandboxError):
    """The state database failed."""

    KIND = "state"


class SandboxStillRunningError(MicrosandboxError):
    """The operation needs a stopped sandbox, and this one is still running."""

    KIND = "sandbox_still_running"


class SandboxNotRunningError(MicrosandboxError):
    """The operation needs a running sandbox, and this one is not."""

    KIND = "not_running"


class ImageNotFoundError(MicrosandboxError):
    """The image reference could not be found."""

    KIND = "image_not_found"


class InvalidReferenceError(MicrosandboxError):
    """The image reference is not valid."""

    KIND = "invalid_reference"


class ImageNotCachedError(MicrosandboxError):
    """The image is not in the local store (and the pull policy forbids pulling)."""

    KIND = "image_not_cached"


class RegistryUnauthorizedError(MicrosandboxError):
    """The registry refused the credentials."""

    KIND = "registry_unauthorized"


class RegistryUnreachableError(MicrosandboxError):
    """The registry could not be reached."""

    KIND = "registry_unreachable"


class RegistryError(MicrosandboxError):
    """The registry answered with an error."""

    KIND = "registry"


class InvalidImageError(MicrosandboxError):
    """The image is not valid (manifest, config or layers)."""

    KIND = "invalid_image"


class DigestMismatchError(MicrosandboxError):
    """Downloaded content does not match its digest."""

    KIND = "digest_mismatch"


class PatchTargetExistsError(MicrosandboxError):
    """A rootfs patch targets a path that exists (pass ``replace=True``)."""

    KIND = "patch_target_exists"


class PatchError(MicrosandboxError):
    """A rootfs patch failed."""

    KIND = "patch"


class FilesystemError(MicrosandboxError):
    """A filesystem operation in the sandbox failed; ``fs_kind`` tells how."""

    KIND = "filesystem"


class PathNotFoundError(FilesystemError):
    """A filesystem operation's path does not exist (``fs_kind == "not_found"``)."""

    KIND = "filesystem"


class UntrustedDirectoryError(MicrosandboxError):
    """A state directory belongs to someone else or is writable by others."""

    KIND = "untrusted_directory"


class VmmNotFoundError(MicrosandboxError):
    """``msb-vmm`` was not found (``ensure_installed()`` builds it)."""

    KIND = "vmm_not_found"


class StartFailedError(MicrosandboxError):
    """The sandbox failed to start."""

    KIND = "start_failed"


class CommandNotFoundError(MicrosandboxError):
    """The command does not exist in the guest."""

    KIND = "command_not_found"


class PermissionDeniedError(MicrosandboxError):
    """The guest refused the command (permission denied)."""

    KIND = "permission_denied"


class InvalidExecRequestError(MicrosandboxError):
    """The guest refused the exec request (a bad user, rlimit, cwd, ...)."""

    KIND = "invalid_exec_request"


class ExecTimeoutError(MicrosandboxError):
    """A command ran past its timeout.

    Attributes:
        output: what the command printed before it was killed (an
            :class:`~microsandbox.ExecOutput`), when the core sent it.
    """

    KIND = "exec_timeout"
    output: Any = None


class TooLargeError(MicrosandboxError):
    """Output or a file is larger than the limit."""

    KIND = "too_large"


class AgentUnavailableError(MicrosandboxError):
    """The guest agent is not available."""

    KIND = "agent_unavailable"


class BusyError(MicrosandboxError):
    """The sandbox is busy (draining, or a conflicting operation is under way)."""

    KIND = "busy"


class VersionMismatchError(MicrosandboxError):
    """The guest agent speaks another protocol version."""

    KIND = "version"


class AgentError(MicrosandboxError):
    """The guest agent reported an error."""

    KIND = "agent"


class ConnectionClosedError(MicrosandboxError):
    """The connection to the sandbox closed."""

    KIND = "connection_closed"


class ProtocolError(MicrosandboxError):
    """The guest agent broke the protocol (kind ``protocol``). An answer of the core the
    SDK cannot read is an :class:`InternalError` instead: a bug of the binding."""

    KIND = "protocol"


class InvalidStateError(MicrosandboxError):
    """The sandbox is in a state that does not allow the operation."""

    KIND = "invalid_state"


class SandboxPausedError(MicrosandboxError):
    """The sandbox is paused."""

    KIND = "paused"


class OperationTimeoutError(MicrosandboxError):
    """An operation timed out (kind ``timeout``; not the builtin ``TimeoutError``)."""

    KIND = "timeout"


class NotATerminalError(MicrosandboxError):
    """A terminal operation on a command that has none."""

    KIND = "not_a_terminal"


class IoError(MicrosandboxError):
    """An I/O error on the host."""

    KIND = "io"


class InvalidArgumentError(MicrosandboxError, ValueError):
    """An argument is not valid (also a :class:`ValueError`)."""

    KIND = "invalid_argument"


class InvalidHandleError(MicrosandboxError):
    """The object was released, spent (``detach()``, ``wait()``, ...) or is unknown."""

    KIND = "invalid_handle"


class TooManyHandlesError(MicrosandboxError):
    """The core's handle table is full (65,536 live objects)."""

    KIND = "too_many_handles"


class OperationCancelledError(MicrosandboxError):
    """The call was cancelled (kind ``cancelled``; not ``asyncio.CancelledError``)."""

    KIND = "cancelled"


class NotInstalledError(MicrosandboxError):
    """Installing the runtime (``msb-vmm`` or a guest artifact) failed."""

    KIND = "not_installed"


class InternalError(MicrosandboxError):
    """A bug in the binding: a panic caught at the boundary, or an answer of the core
    this package cannot read."""

    KIND = "internal"


#: Wire error kind -> exception class.
ERROR_KINDS: Dict[str, Type[MicrosandboxError]] = {
    cls.KIND: cls
    for cls in (
        InvalidNameError,
        InvalidConfigError,
        SandboxAlreadyExistsError,
        SandboxNotFoundError,
        SnapshotNotFoundError,
        KernelNotFoundError,
        StateError,
        SandboxStillRunningError,
        SandboxNotRunningError,
        ImageNotFoundError,
        InvalidReferenceError,
        ImageNotCachedError,
        RegistryUnauthorizedError,
        RegistryUnreachableError,
        RegistryError,
        InvalidImageError,
        DigestMismatchError,
        PatchTargetExistsError,
        PatchError,
        FilesystemError,
        UntrustedDirectoryError,
        VmmNotFoundError,
        StartFailedError,
        CommandNotFoundError,
        PermissionDeniedError,
        InvalidExecRequestError,
        ExecTimeoutError,
        TooLargeError,
        AgentUnavailableError,
        BusyError,
        VersionMismatchError,
        AgentError,
        ConnectionClosedError,
        ProtocolError,
        InvalidStateError,
        SandboxPausedError,
        OperationTimeoutError,
        NotATerminalError,
        IoError,
        InvalidArgumentError,
        InvalidHandleError,
        TooManyHandlesError,
        OperationCancelledError,
        NotInstalledError,
        InternalError,
    )
}


def error_from_wire(err: Any) -> MicrosandboxError:
    """The exception for the wire's ``{"kind", "message", "fs_kind"?}`` object."""
    if not isinstance(err, Mapping):
        return InternalError(f"malformed error from the core: {err!r:.200}")
    kind = err.get("kind")
    message = err.get("message")
    fs_kind = err.get("fs_kind")
    if not isinstance(kind, str):
        kind = "unknown"
    if not isinstance(message, str):
        message = "" if message is None else str(message)
    if not isinstance(fs_kind, str):
        fs_kind = None
    cls: Type[MicrosandboxError] = ERROR_KINDS.get(kind, MicrosandboxError)
    if cls is FilesystemError and fs_kind == "not_found":
        cls = PathNotFoundError
    error = cls(message, kind=kind, fs_kind=fs_kind)
    if isinstance(error, ExecTimeoutError) and isinstance(err.get("output"), Mapping):
        from microsandbox.exec import ExecOutput  # exec imports this module

        try:
            error.output = ExecOutput._from_wire(err["output"])
        except MicrosandboxError as e:  # an unreadable output: the timeout is still the news
            error.__cause__ = e
    return error
