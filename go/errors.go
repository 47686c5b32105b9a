package microsandbox

import (
	"errors"
	"io/fs"
)

// ErrorKind is the category of an *Error: one per error kind of the core's wire
// (docs/bindings.md), its value the wire's name ("sandbox_not_found", ...). A kind is
// itself an error value, so both forms work:
//
//	if errors.Is(err, m.ErrSandboxNotFound) { ... }
//	var e *m.Error
//	if errors.As(err, &e) && e.Kind == m.ErrSandboxNotFound { ... }
//
// A kind this version does not know arrives unchanged (ErrorKind(wireName)); switch
// statements over kinds should have a default case.
type ErrorKind string

// Error makes a kind usable as an errors.Is target.
func (k ErrorKind) Error() string { return string(k) }

// String returns the wire name of the kind.
func (k ErrorKind) String() string { return string(k) }

// The error kinds. Each is produced by the core (or, for ErrInvalidArgument and
// ErrCancelled, also by this package's own checks); see docs/bindings.md.
const (
	// ErrInvalidName: the sandbox name is not acceptable.
	ErrInvalidName ErrorKind = "invalid_name"
	// ErrInvalidConfig: the sandbox configuration was rejected.
	ErrInvalidConfig ErrorKind = "invalid_config"
	// ErrSandboxAlreadyExists: a sandbox of that name exists (create without WithReplace).
	ErrSandboxAlreadyExists ErrorKind = "already_exists"
	// ErrSandboxNotFound: no sandbox of that name.
	ErrSandboxNotFound ErrorKind = "sandbox_not_found"
	// ErrSnapshotNotFound: no snapshot of that name or at that path.
	ErrSnapshotNotFound ErrorKind = "snapshot_not_found"
	// ErrKernelNotFound: no guest kernel is installed (see EnsureInstalled).
	ErrKernelNotFound ErrorKind = "kernel_not_found"
	// ErrState: the state database failed.
	ErrState ErrorKind = "state"
	// ErrSandboxStillRunning: the operation needs a stopped sandbox (RemoveSandbox).
	ErrSandboxStillRunning ErrorKind = "sandbox_still_running"
	// ErrSandboxNotRunning: the operation needs a running sandbox.
	ErrSandboxNotRunning ErrorKind = "not_running"
	// ErrImageNotFound: the image reference could not be resolved.
	ErrImageNotFound ErrorKind = "image_not_found"
	// ErrInvalidReference: the image reference is malformed.
	ErrInvalidReference ErrorKind = "invalid_reference"
	// ErrImageNotCached: the image is not cached and the pull policy forbids pulling.
	ErrImageNotCached ErrorKind = "image_not_cached"
	// ErrRegistryUnauthorized: the registry refused the credentials.
	ErrRegistryUnauthorized ErrorKind = "registry_unauthorized"
	// ErrRegistryUnreachable: the registry could not be reached.
	ErrRegistryUnreachable ErrorKind = "registry_unreachable"
	// ErrRegistry: any other registry failure.
	ErrRegistry ErrorKind = "registry"
	// ErrInvalidImage: the image's content is not usable.
	ErrInvalidImage ErrorKind = "invalid_image"
	// ErrDigestMismatch: downloaded content did not match its digest.
	ErrDigestMismatch ErrorKind = "digest_mismatch"
	// ErrPatchTargetExists: a rootfs patch targets an existing path without Replace.
	ErrPatchTargetExists ErrorKind = "patch_target_exists"
	// ErrPatchFailed: a rootfs patch could not be applied.
	ErrPatchFailed ErrorKind = "patch"
	// ErrFilesystem: a filesystem operation in the sandbox failed; Error.FsKind says how.
	ErrFilesystem ErrorKind = "filesystem"
	// ErrUntrustedDirectory: a host directory is not trusted (permissions).
	ErrUntrustedDirectory ErrorKind = "untrusted_directory"
	// ErrVMMNotFound: the msb-vmm program is missing (EnsureInstalled builds it).
	ErrVMMNotFound ErrorKind = "vmm_not_found"
	// ErrStartFailed: the VM did not start.
	ErrStartFailed ErrorKind = "start_failed"
	// ErrCommandNotFound: the command to execute does not exist in the guest.
	ErrCommandNotFound ErrorKind = "command_not_found"
	// ErrPermissionDenied: the guest refused the operation.
	ErrPermissionDenied ErrorKind = "permission_denied"
	// ErrInvalidExecRequest: the guest rejected the exec request (e.g. an unknown rlimit).
	ErrInvalidExecRequest ErrorKind = "invalid_exec_request"
	// ErrExecTimeout: a command ran past its WithExecTimeout and was killed;
	// Error.Output holds what it printed until then.
	ErrExecTimeout ErrorKind = "exec_timeout"
	// ErrTooLarge: a message or output exceeded its limit.
	ErrTooLarge ErrorKind = "too_large"
	// ErrAgentUnavailable: the guest agent cannot be reached.
	ErrAgentUnavailable ErrorKind = "agent_unavailable"
	// ErrBusy: the sandbox is busy (e.g. draining).
	ErrBusy ErrorKind = "busy"
	// ErrVersion: the guest agent speaks another protocol version.
	ErrVersion ErrorKind = "version"
	// ErrAgent: the guest agent reported a failure.
	ErrAgent ErrorKind = "agent"
	// ErrConnectionClosed: the connection to the guest closed.
	ErrConnectionClosed ErrorKind = "connection_closed"
	// ErrProtocol: the guest agent broke the protocol.
	ErrProtocol ErrorKind = "protocol"
	// ErrInvalidState: the sandbox is in the wrong state for the operation.
	ErrInvalidState ErrorKind = "invalid_state"
	// ErrPaused: the sandbox is paused.
	ErrPaused ErrorKind = "paused"
	// ErrTimeout: a runtime wait (stop, kill, boot) ran out of time.
	ErrTimeout ErrorKind = "timeout"
	// ErrNotATerminal: a terminal operation without a terminal (Attach with a stdin
	// that is not a TTY).
	ErrNotATerminal ErrorKind = "not_a_terminal"
	// ErrIO: a host-side I/O error.
	ErrIO ErrorKind = "io"
	// ErrInvalidArgument: the arguments of a call were rejected (by this package or by
	// the core: a field, a value, a type).
	ErrInvalidArgument ErrorKind = "invalid_argument"
	// ErrInvalidHandle: the object was closed, detached or otherwise spent.
	ErrInvalidHandle ErrorKind = "invalid_handle"
	// ErrTooManyHandles: the core's handle table is full (65,536 live objects).
	ErrTooManyHandles ErrorKind = "too_many_handles"
	// ErrCancelled: the call's context was cancelled or its deadline passed; the error
	// also matches ctx.Err() (context.Canceled or context.DeadlineExceeded).
	ErrCancelled ErrorKind = "cancelled"
	// ErrNotInstalled: the runtime is not installed (EnsureInstalled with
	// WithSkipDownload) or installing it failed.
	ErrNotInstalled ErrorKind = "not_installed"
	// ErrInternal: a bug in the core or in this package (an unreadable answer).
	ErrInternal ErrorKind = "internal"
)

// The values of Error.FsKind when Kind is ErrFilesystem.
const (
	FsKindNotFound          = "not_found"
	FsKindAlreadyExists     = "already_exists"
	FsKindNotADirectory     = "not_a_directory"
	FsKindIsADirectory      = "is_a_directory"
	FsKindDirectoryNotEmpty = "directory_not_empty"
	FsKindPermissionDenied  = "permission_denied"
	FsKindReadOnly          = "read_only"
	FsKindNoSpace           = "no_space"
	FsKindInvalidPath       = "invalid_path"
	FsKindOther             = "other"
)

// Error is the error type of every operation of this package.
type Error struct {
	// Kind is the category; compare it with the Err* constants.
	Kind ErrorKind
	// Message is the core's one-line description (the error and its causes).
	Message string
	// FsKind refines ErrFilesystem (FsKind* constants); empty for other kinds.
	FsKind string
	// Output is what the command printed before it was killed, for ErrExecTimeout
	// (Exec or Shell past its WithExecTimeout; a streamed command's timeout shows in
	// its ExecStatus.TimedOut instead); nil for other kinds.
	Output *ExecOutput

	cause error // ctx.Err() for ErrCancelled
	early bool  // ErrCancelled before the call reached the core
}

// Error returns "kind: message".
func (e *Error) Error() string {
	if e.Message == "" {
		return string(e.Kind)
	}
	return string(e.Kind) + ": " + e.Message
}

// Unwrap returns the context's error of a cancelled call (context.Canceled or
// context.DeadlineExceeded), nil otherwise.
func (e *Error) Unwrap() error { return e.cause }

// Is reports whether target is e's kind (an ErrorKind, or an *Error of the same Kind
// and, when the target has one, FsKind). Filesystem errors also match the io/fs
// sentinels: fs.ErrNotExist, fs.ErrExist and fs.ErrPermission.
func (e *Error) Is(target error) bool {
	switch t := target.(type) {
	case ErrorKind:
		return e.Kind == t
	case *Error:
		return t != nil && e.Kind == t.Kind && (t.FsKind == "" || t.FsKind == e.FsKind)
	}
	if e.Kind == ErrFilesystem {
		switch target {
		case fs.ErrNotExist:
			return e.FsKind == FsKindNotFound
		case fs.ErrExist:
			return e.FsKind == FsKindAlreadyExists
		case fs.ErrPermission:
			return e.FsKind == FsKindPermissionDenied
		}
	}
	return false
}

// IsKind reports whether err, or an error it wraps, is an *Error of the given kind.
func IsKind(err error, kind ErrorKind) bool {
	var e *Error
	return errors.As(err, &e) && e.Kind == kind
}

func newError(kind ErrorKind, message string) *Error {
	return &Error{Kind: kind, Message: message}
}

func invalidArgument(message string) *Error {
	return newError(ErrInvalidArgument, message)
}

func cancelledError(ctxErr error) *Error {
	return &Error{Kind: ErrCancelled, Message: ctxErr.Error(), cause: ctxErr}
}
