"""Resource metrics (:class:`SandboxMetrics`) and their stream (:class:`MetricsStream`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, AsyncIterator, Optional

from microsandbox import _wire

__all__ = ["SandboxMetrics", "MetricsStream"]


@dataclass(frozen=True)
class SandboxMetrics:
    """A point-in-time resource snapshot of a sandbox."""

    cpu_percent: float
    vcpu_time_ns: int
    memory_bytes: int
    memory_available_bytes: Optional[int]
    memory_host_resident_bytes: Optional[int]
    memory_limit_bytes: int
    disk_read_bytes: int
    disk_write_bytes: int
    net_rx_bytes: int
    net_tx_bytes: int
    upper_used_bytes: Optional[int]
    upper_free_bytes: Optional[int]
    upper_host_allocated_bytes: Optional[int]
    #: When the measurement was taken, ms since the Unix epoch.
    timestamp_ms: float
    #: Time since the VM started, seconds.
    uptime_secs: float
    #: ``"running"``, ``"draining"`` or ``"paused"`` when the snapshot was taken.
    status: str

    @property
    def uptime_ms(self) -> int:
        """Time since the VM started, ms."""
        return int(round(self.uptime_secs * 1000))

    @classmethod
    def _from_wire(cls, d: Any) -> "SandboxMetrics":
        f = _wire.field
        return cls(
            cpu_percent=float(f(d, "cpu_percent")),
            vcpu_time_ns=f(d, "vcpu_time_ns"),
            memory_bytes=f(d, "memory_bytes"),
            memory_available_bytes=d.get("memory_available_bytes"),
            memory_host_resident_bytes=d.get("memory_host_resident_bytes"),
            memory_limit_bytes=f(d, "memory_limit_bytes"),
            disk_read_bytes=f(d, "disk_read_bytes"),
            disk_write_bytes=f(d, "disk_write_bytes"),
            net_rx_bytes=f(d, "net_rx_bytes"),
            net_tx_bytes=f(d, "net_tx_bytes"),
            upper_used_bytes=d.get("upper_used_bytes"),
            upper_free_bytes=d.get("upper_free_bytes"),
            upper_host_allocated_bytes=d.get("upper_host_allocated_bytes"),
            timestamp_ms=float(f(d, "timestamp_ms")),
            uptime_secs=float(f(d, "uptime_secs")),
            status=f(d, "status"),
        )


class _Stream:
    """A core stream (``stream.next``) of values made by ``_make``."""

    _what = "stream"

    def __init__(self, handle: int) -> None:
        self._ref = _wire.HandleRef(self, handle, self._what)
        self._done = False

    @staticmethod
    def _make(d: Any) -> Any:  # pragma: no cover - overridden
        raise NotImplementedError

    async def recv(self) -> Any:
        """The next item, or ``None`` once the stream has ended."""
        if self._done:
            return None
        item = await _wire.call("stream.next", {"handle": self._ref.value})
        if item is None:
            self._done = True
            await self._ref.release()
            return None
        return self._make(item)

    def __aiter__(self) -> AsyncIterator[Any]:
        return self

    async def __anext__(self) -> Any:
        item = await self.recv()
        if item is None:
            raise StopAsyncIteration
        return item

    async def close(self) -> None:
        """Ends the stream and releases it."""
        self._done = True
        await self._ref.release()

    async def aclose(self) -> None:
        await self.close()

    async def __aenter__(self) -> Any:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()


class MetricsStream(_Stream):
    """A metrics snapshot every interval until the sandbox stops: ``await s.recv()``
    (``None`` at the end) or ``async for m in s``."""

    _what = "metrics stream"
    _make = staticmethod(SandboxMetrics._from_wire)

    async def recv(self) -> Optional[SandboxMetrics]:
        return await super().recv()

    def __aiter__(self) -> AsyncIterator[SandboxMetrics]:
        return self

    async def __anext__(self) -> SandboxMetrics:
        return await super().__anext__()

    async def __aenter__(self) -> "MetricsStream":
        return self
