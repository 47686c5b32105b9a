"""Files inside a running sandbox: ``sb.fs`` (:class:`SandboxFs`)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, List, Optional, Union

from microsandbox import _wire
from microsandbox.types import check_path, check_str

if TYPE_CHECKING:  # pragma: no cover
    from microsandbox.sandbox import Sandbox

__all__ = ["FsMetadata", "FsEntry", "SandboxFs"]


@dataclass(frozen=True)
class FsMetadata:
    """What ``stat`` tells of a path: ``kind`` is ``"file"``, ``"directory"``,
    ``"symlink"`` or ``"other"``; ``modified_ms`` is ms since the Unix epoch."""

    kind: str
    size: int
    mode: int
    uid: int
    gid: int
    modified_ms: Optional[float]
    symlink_target: Optional[str]

    @property
    def is_dir(self) -> bool:
        return self.kind == "directory"

    @property
    def is_file(self) -> bool:
        return self.kind == "file"

    @property
    def is_symlink(self) -> bool:
        return self.kind == "symlink"

    @classmethod
    def _from_wire(cls, d: Any) -> "FsMetadata":
        f = _wire.field
        return cls(
            kind=f(d, "kind"),
            size=f(d, "size"),
            mode=f(d, "mode"),
            uid=f(d, "uid"),
            gid=f(d, "gid"),
            modified_ms=d.get("modified_ms"),
            symlink_target=d.get("symlink_target"),
        )


@dataclass(frozen=True)
class FsEntry:
    """One entry of a directory listing."""

    path: str
    name: str
    kind: str
    size: int
    metadata: FsMetadata

    @classmethod
    def _from_wire(cls, d: Any) -> "FsEntry":
        f = _wire.field
        return cls(
            path=f(d, "path"),
            name=f(d, "name"),
            kind=f(d, "kind"),
            size=f(d, "size"),
            metadata=FsMetadata._from_wire(f(d, "metadata")),
        )


class SandboxFs:
    """Reads and writes files in the running sandbox (``sb.fs``). Paths are guest paths;
    errors are :class:`~microsandbox.FilesystemError` with ``fs_kind`` telling what went
    wrong (:class:`~microsandbox.PathNotFoundError` for a missing path)."""

    __slots__ = ("_sandbox",)

    def __init__(self, sandbox: "Sandbox") -> None:
        self._sandbox = sandbox

    async def _call(self, method: str, **args: Any) -> Any:
        return await _wire.call(method, {"handle": self._sandbox._handle(), **args})

    async def read(self, path: str) -> bytes:
        """The file's bytes."""
        d = await self._call("fs.read", path=check_str(path, "path"))
        return _wire.b64decode(_wire.field(d, "data_b64"))

    async def read_text(self, path: str, encoding: str = "utf-8") -> str:
        """The file decoded as text (``encoding``, strict)."""
        return (await self.read(path)).decode(encoding)

    async def write(self, path: str, data: Union[bytes, bytearray, memoryview, str]) -> None:
        """Creates or replaces the file with ``data`` (a str is written as UTF-8)."""
        if isinstance(data, str):
            data = data.encode("utf-8")
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"data must be bytes or str, not {type(data).__name__}")
        await self._call("fs.write", path=check_str(path, "path"), data_b64=_wire.b64encode(bytes(data)))

    async def list(self, path: str) -> List[FsEntry]:
        """The entries of a directory."""
        entries = await self._call("fs.list", path=check_str(path, "path"))
        return [FsEntry._from_wire(e) for e in entries]

    async def stat(self, path: str) -> FsMetadata:
        """The path's metadata."""
        return FsMetadata._from_wire(await self._call("fs.stat", path=check_str(path, "path")))

    async def exists(self, path: str) -> bool:
        return bool(await self._call("fs.exists", path=check_str(path, "path")))

    async def mkdir(self, path: str) -> None:
        await self._call("fs.mkdir", path=check_str(path, "path"))

    async def mkdir_all(self, path: str) -> None:
        """Creates a directory and its missing parents."""
        await self._call("fs.mkdir_all", path=check_str(path, "path"))

    async def remove(self, path: str) -> None:
        """Removes a file."""
        await self._call("fs.remove", path=check_str(path, "path"))

    async def remove_dir(self, path: str) -> None:
        """Removes a directory."""
        await self._call("fs.remove_dir", path=check_str(path, "path"))

    async def rename(self, src: str, dst: str) -> None:
        await self._call("fs.rename", **{"from": check_str(src, "src"), "to": check_str(dst, "dst")})

    async def copy(self, src: str, dst: str) -> None:
        """Copies a file inside the guest."""
        await self._call("fs.copy", **{"from": check_str(src, "src"), "to": check_str(dst, "dst")})

    async def copy_from_host(self, host_path: Union[str, "os.PathLike[str]"], guest_path: str) -> None:
        """Copies the host file ``host_path`` to ``guest_path``."""
        await self._call(
            "fs.copy_from_host",
            **{"from": check_path(host_path, "host_path"), "to": check_str(guest_path, "guest_path")},
        )

    async def copy_to_host(self, guest_path: str, host_path: Union[str, "os.PathLike[str]"]) -> None:
        """Copies the guest file ``guest_path`` to ``host_path``."""
        await self._call(
            "fs.copy_to_host",
            **{"from": check_str(guest_path, "guest_path"), "to": check_path(host_path, "host_path")},
        )
