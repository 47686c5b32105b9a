"""Snapshots: a stopped sandbox's writable layer frozen into an artifact that new
sandboxes boot from (``Sandbox.create(name, snapshot=...)``)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, List, Optional, Union

from microsandbox import _wire
from microsandbox.types import check_bool, check_path, check_str

__all__ = ["Snapshot"]


@dataclass(frozen=True)
class Snapshot:
    """A snapshot artifact (under ``$MSB_HOME/snapshots``, or at a path)."""

    name: str
    #: The artifact directory.
    path: str
    #: The sandbox it was taken of.
    source_sandbox: str
    #: The image that sandbox was created from, as it named it.
    image: str
    #: The image's pinned digest, when it has one.
    image_digest: Optional[str]
    #: Bytes of the frozen writable layer.
    size_bytes: int
    #: When it was taken, ms since the Unix epoch.
    created_at_ms: float
    #: Its content digest (``sha256:...``).
    digest: str

    @classmethod
    def _from_wire(cls, d: Any) -> "Snapshot":
        f = _wire.field
        return cls(
            name=f(d, "name"),
            path=f(d, "path"),
            source_sandbox=f(d, "source_sandbox"),
            image=f(d, "image"),
            image_digest=d.get("image_digest"),
            size_bytes=f(d, "size_bytes"),
            created_at_ms=float(f(d, "created_at_ms")),
            digest=f(d, "digest"),
        )

    @staticmethod
    async def list() -> List["Snapshot"]:
        """Every snapshot under ``$MSB_HOME/snapshots``."""
        return [Snapshot._from_wire(s) for s in await _wire.call("snapshot.list", {})]

    @staticmethod
    async def get(name_or_path: Union[str, "os.PathLike[str]"]) -> "Snapshot":
        """A snapshot by name (or artifact path)."""
        d = await _wire.call("snapshot.get", {"name": check_path(name_or_path, "name")})
        return Snapshot._from_wire(d)

    @staticmethod
    async def remove(name_or_path: Union[str, "os.PathLike[str]"]) -> None:
        """Deletes a snapshot."""
        await _wire.call("snapshot.remove", {"name": check_path(name_or_path, "name")})

    @staticmethod
    async def export(
        name_or_path: Union[str, "os.PathLike[str]"],
        path: Union[str, "os.PathLike[str]"],
        *,
        with_image: bool = False,
    ) -> None:
        """Writes the snapshot as an archive at ``path`` (with its image if asked)."""
        await _wire.call(
            "snapshot.export",
            {
                "name": check_path(name_or_path, "name"),
                "path": check_path(path, "path"),
                "with_image": check_bool(with_image, "with_image"),
            },
        )

    @staticmethod
    async def import_(path: Union[str, "os.PathLike[str]"], *, name: Optional[str] = None) -> "Snapshot":
        """Brings in an exported archive (as ``name``, else its own name)."""
        args = {"path": check_path(path, "path")}
        if name is not None:
            args["name"] = check_str(name, "name")
        return Snapshot._from_wire(await _wire.call("snapshot.import", args))
