"""SSH into a sandbox: ``sb.ssh()`` serves an endpoint on the host's loopback
(:class:`SshEndpoint`, for ``ssh``/``scp`` clients) or opens an in-process client
(:class:`SshClient`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional, Sequence

from microsandbox import _wire
from microsandbox.types import check_int, check_str, check_str_list

if TYPE_CHECKING:  # pragma: no cover
    from microsandbox.sandbox import Sandbox

__all__ = ["SandboxSsh", "SshEndpoint", "SshClient", "SshOutput"]


class SshOutput:
    """What a command run over SSH printed, and how it ended."""

    __slots__ = ("stdout_bytes", "stderr_bytes", "exit_status", "exit_signal")

    def __init__(
        self, stdout: bytes, stderr: bytes, exit_status: Optional[int], exit_signal: Optional[str]
    ) -> None:
        self.stdout_bytes = stdout
        self.stderr_bytes = stderr
        #: The exit status, when the command exited.
        self.exit_status = exit_status
        #: The signal that ended it (``"TERM"``, ``"KILL"``, ...), when one did.
        self.exit_signal = exit_signal

    @property
    def success(self) -> bool:
        return self.exit_status == 0

    @property
    def stdout_text(self) -> str:
        return self.stdout_bytes.decode("utf-8", errors="replace")

    @property
    def stderr_text(self) -> str:
        return self.stderr_bytes.decode("utf-8", errors="replace")

    @classmethod
    def _from_wire(cls, d: Any) -> "SshOutput":
        return cls(
            _wire.b64decode(_wire.field(d, "stdout_b64"), "stdout_b64"),
            _wire.b64decode(_wire.field(d, "stderr_b64"), "stderr_b64"),
            d.get("exit_status"),
            d.get("exit_signal"),
        )

    def __repr__(self) -> str:
        return (
            f"SshOutput(exit_status={self.exit_status}, exit_signal={self.exit_signal!r}, "
            f"stdout={self.stdout_bytes[:80]!r})"
        )


class SshClient:
    """An SSH session to the sandbox: ``await client.exec("cmd")``, then ``close()``."""

    def __init__(self, handle: int) -> None:
        self._ref = _wire.HandleRef(self, handle, "SSH client")

    async def exec(self, command: str) -> SshOutput:
        """Runs ``command`` (through the guest's shell) and collects its output."""
        d = await _wire.call("ssh.exec", {"handle": self._ref.value, "command": check_str(command, "command")})
        return SshOutput._from_wire(d)

    async def close(self) -> None:
        """Ends the session (refused with :class:`~microsandbox.BusyError` while a
        command of it runs; the client is still usable then)."""
        if not self._ref.alive:
            return
        await self._ref.consume("ssh.close", "closed")

    async def __aenter__(self) -> "SshClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()


class SshEndpoint:
    """An SSH server for the sandbox on the host's loopback (``addr``:``port``), open to
    the authorised keys; ``known_hosts_line`` pins its host key for an ``ssh`` client."""

    def __init__(self, d: Any) -> None:
        # The handle is owned first: should the rest of the answer be unreadable, it is
        # released rather than lost.
        self._ref = _wire.HandleRef(self, _wire.field(d, "endpoint"), "SSH endpoint")
        try:
            #: The address it listens on (loopback).
            self.addr: str = _wire.field(d, "addr")
            self.port: int = _wire.field(d, "port")
            #: Its host key, OpenSSH format.
            self.host_key: str = _wire.field(d, "host_key")
            self.fingerprint: str = _wire.field(d, "fingerprint")
            #: A line for ``~/.ssh/known_hosts``.
            self.known_hosts_line: str = _wire.field(d, "known_hosts_line")
        except BaseException:
            self._ref.release_soon()
            raise

    async def authorize(self, key: str) -> None:
        """Lets in one more OpenSSH public key line."""
        await _wire.call("ssh.authorize", {"handle": self._ref.value, "key": check_str(key, "key")})

    async def client(self, *, user: Optional[str] = None) -> SshClient:
        """A client over TCP to this endpoint (a fresh key is authorised for it)."""
        args: dict = {"handle": self._ref.value}
        if user is not None:
            args["user"] = check_str(user, "user")
        d = await _wire.call("ssh.endpoint_client", args)
        return SshClient(_wire.field(d, "client"))

    async def shutdown(self) -> None:
        """Stops serving (this object is spent; refused with
        :class:`~microsandbox.BusyError` while another call on it runs, and the endpoint
        is still usable then)."""
        if not self._ref.alive:
            return
        await self._ref.consume("ssh.shutdown", "shut down")

    async def __aenter__(self) -> "SshEndpoint":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.shutdown()

    def __repr__(self) -> str:
        return f"<SshEndpoint {self.addr}:{self.port}>"


class SandboxSsh:
    """SSH for a running sandbox (``sb.ssh()``)."""

    __slots__ = ("_sandbox",)

    def __init__(self, sandbox: "Sandbox") -> None:
        self._sandbox = sandbox

    async def serve(
        self, *, port: Optional[int] = None, authorized_keys: Sequence[str] = ()
    ) -> SshEndpoint:
        """Serves SSH on ``127.0.0.1:port`` (``None``: a free port) to ``authorized_keys``
        (OpenSSH public key lines)."""
        args: dict = {"handle": self._sandbox._handle()}
        if port is not None:
            p = check_int(port, "port")
            if p > 65535:
                from microsandbox.errors import InvalidArgumentError

                raise InvalidArgumentError(f"port must be at most 65535; got {p}")
            args["port"] = p
        keys = check_str_list(list(authorized_keys), "authorized_keys")
        if keys:
            args["authorized_keys"] = keys
        return SshEndpoint(await _wire.call("ssh.serve", args))

    async def open_client(self) -> SshClient:
        """An SSH session to the sandbox inside this process (no port)."""
        d = await _wire.call("ssh.open_client", {"handle": self._sandbox._handle()})
        return SshClient(_wire.field(d, "client"))
