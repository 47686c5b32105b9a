"""Error kinds of the wire -> exception classes."""

from __future__ import annotations

import builtins
import re
from pathlib import Path

import pytest

import microsandbox
from conftest import FakeCore, err
from microsandbox import (
    ERROR_KINDS,
    ExecOutput,
    ExecTimeoutError,
    FilesystemError,
    InternalError,
    InvalidArgumentError,
    MicrosandboxError,
    OperationTimeoutError,
    PathNotFoundError,
    ProtocolError,
    Sandbox,
    SandboxNotFoundError,
)
from microsandbox._wire import decode_answer

DOC = Path(__file__).resolve().parents[2] / "docs" / "bindings.md"

EXPECTED = {
    "invalid_name": "InvalidNameError",
    "invalid_config": "InvalidConfigError",
    "already_exists": "SandboxAlreadyExistsError",
    "sandbox_not_found": "SandboxNotFoundError",
    "snapshot_not_found": "SnapshotNotFoundError",
    "kernel_not_found": "KernelNotFoundError",
    "state": "StateError",
    "sandbox_still_running": "SandboxStillRunningError",
    "not_running": "SandboxNotRunningError",
    "image_not_found": "ImageNotFoundError",
    "invalid_reference": "InvalidReferenceError",
    "image_not_cached": "ImageNotCachedError",
    "registry_unauthorized": "RegistryUnauthorizedError",
    "registry_unreachable": "RegistryUnreachableError",
    "registry": "RegistryError",
    "invalid_image": "InvalidImageError",
    "digest_mismatch": "DigestMismatchError",
    "patch_target_exists": "PatchTargetExistsError",
    "patch": "PatchError",
    "filesystem": "FilesystemError",
    "untrusted_directory": "UntrustedDirectoryError",
    "vmm_not_found": "VmmNotFoundError",
    "start_failed": "StartFailedError",
    "command_not_found": "CommandNotFoundError",
    "permission_denied": "PermissionDeniedError",
    "invalid_exec_request": "InvalidExecRequestError",
    "exec_timeout": "ExecTimeoutError",
    "too_large": "TooLargeError",
    "agent_unavailable": "AgentUnavailableError",
    "busy": "BusyError",
    "version": "VersionMismatchError",
    "agent": "AgentError",
    "connection_closed": "ConnectionClosedError",
    "protocol": "ProtocolError",
    "invalid_state": "InvalidStateError",
    "paused": "SandboxPausedError",
    "timeout": "OperationTimeoutError",
    "not_a_terminal": "NotATerminalError",
    "io": "IoError",
    "invalid_argument": "InvalidArgumentError",
    "invalid_handle": "InvalidHandleError",
    "too_many_handles": "TooManyHandlesError",
    "cancelled": "OperationCancelledError",
    "not_installed": "NotInstalledError",
    "internal": "InternalError",
}


def test_every_documented_kind_has_its_class() -> None:
    if DOC.exists():  # the wire's table is the source of truth
        text = DOC.read_text()
        table = text[text.index("## Error kinds") : text.index("## Values")]
        documented = set(re.findall(r"^\| `([a-z_]+)` \|", table, re.M))
        assert documented == set(EXPECTED), documented ^ set(EXPECTED)
    assert set(ERROR_KINDS) == set(EXPECTED)
    for kind, name in EXPECTED.items():
        cls = getattr(microsandbox, name)
        assert ERROR_KINDS[kind] is cls
        assert issubclass(cls, MicrosandboxError)
        assert name in microsandbox.__all__
        assert not hasattr(builtins, name), f"{name} shadows a builtin"


@pytest.mark.parametrize("kind", sorted(EXPECTED))
def test_answers_raise_the_kinds_class(kind: str) -> None:
    with pytest.raises(MicrosandboxError) as info:
        decode_answer('{"error": {"kind": "%s", "message": "boom: cause"}}' % kind)
    e = info.value
    assert type(e).__name__ == EXPECTED[kind]
    assert e.kind == kind
    assert e.message == "boom: cause"
    assert str(e) == "boom: cause"
    assert e.fs_kind is None


def test_unknown_kind_is_the_base_class() -> None:
    with pytest.raises(MicrosandboxError) as info:
        decode_answer('{"error": {"kind": "brand_new", "message": "m"}}')
    assert type(info.value) is MicrosandboxError
    assert info.value.kind == "brand_new"


def test_filesystem_errors_carry_fs_kind() -> None:
    with pytest.raises(FilesystemError) as info:
        decode_answer('{"error": {"kind": "filesystem", "message": "m", "fs_kind": "is_a_directory"}}')
    assert type(info.value) is FilesystemError
    assert info.value.fs_kind == "is_a_directory"
    with pytest.raises(PathNotFoundError) as info2:
        decode_answer('{"error": {"kind": "filesystem", "message": "m", "fs_kind": "not_found"}}')
    assert isinstance(info2.value, FilesystemError)
    assert info2.value.kind == "filesystem"


def test_malformed_answers_are_internal_errors() -> None:
    # An answer the package cannot read is a bug of the binding, not the guest agent's
    # protocol error (kind "protocol").
    for raw in ["not json", "[]", '{"neither": 1}', '{"error": "text"}']:
        with pytest.raises(InternalError) as info:
            decode_answer(raw)
        assert not isinstance(info.value, ProtocolError)
    assert decode_answer('{"ok": null}') is None
    assert decode_answer(b'{"ok": [1]}') == [1]


def test_class_properties() -> None:
    assert issubclass(InvalidArgumentError, ValueError)
    assert not issubclass(OperationTimeoutError, TimeoutError)
    e = SandboxNotFoundError("no sandbox x")
    assert e.kind == "sandbox_not_found" and e.message == "no sandbox x"
    assert "SandboxNotFoundError" in repr(e)


async def test_errors_come_through_calls(core: FakeCore) -> None:
    core.on("get", err("sandbox_not_found", "no sandbox named ghost"))
    with pytest.raises(SandboxNotFoundError, match="ghost"):
        await Sandbox.get("ghost")
    assert core.calls == [("get", {"name": "ghost"})]


async def test_non_json_numbers_never_cross(core: FakeCore) -> None:
    from microsandbox import _wire

    with pytest.raises(InvalidArgumentError):
        await _wire.call("list", {"x": float("nan")})
    assert core.calls == []


async def test_exec_timeout_carries_the_output(core: FakeCore) -> None:
    import base64

    from conftest import sandbox_ref

    output = {"exit_code": 137, "success": False, "signal": 9, "timed_out": True,
              "stdout_b64": base64.b64encode(b"before\n").decode(), "stderr_b64": ""}
    core.on("create", sandbox_ref(handle=3))
    core.on("sandbox.exec", {"error": {"kind": "exec_timeout", "message": "timed out after 3 s",
                                       "output": output}})
    core.on("sandbox.shell", err("exec_timeout", "timed out"))
    sb = await Sandbox.create("t")
    with pytest.raises(ExecTimeoutError) as info:
        await sb.exec("sh", ["-c", "echo before; sleep 60"], timeout=3)
    out = info.value.output
    assert isinstance(out, ExecOutput)
    assert out.stdout_text == "before\n" and out.stderr_bytes == b""
    assert (out.exit_code, out.success, out.signal, out.timed_out) == (137, False, 9, True)
    assert info.value.message == "timed out after 3 s"
    # Without an output in the error (an older core), it is None.
    with pytest.raises(ExecTimeoutError) as info2:
        await sb.shell("sleep 60", timeout=1)
    assert info2.value.output is None


def test_an_unreadable_exec_timeout_output_keeps_the_timeout() -> None:
    with pytest.raises(ExecTimeoutError) as info:
        decode_answer('{"error": {"kind": "exec_timeout", "message": "m", "output": {"stdout_b64": 5}}}')
    assert info.value.output is None
    assert isinstance(info.value.__cause__, InternalError)
