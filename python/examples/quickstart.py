"""Quickstart: boot a sandbox, run commands in it, move a file, read its metrics."""

import asyncio
import sys
import uuid

from microsandbox import Network, Sandbox, is_installed


async def main() -> None:
    if not await is_installed():
        sys.exit(
            "the microsandbox runtime (msb-vmm and the guest artifacts) is not installed: "
            "run `await microsandbox.ensure_installed()` once, which builds it (see the README)"
        )
    name = f"quickstart-{uuid.uuid4().hex[:8]}"
    # No image: the default busybox root. Pass image="python:3.12" for an OCI image.
    # No network device either: nothing in the sandbox can reach the network.
    async with await Sandbox.create(
        name, memory=256, network=Network.disabled(), env={"GREETING": "hello"}
    ) as sb:
        out = await sb.shell('echo "$GREETING from $(uname -s)"')
        print(out.stdout_text, end="")

        out = await sb.exec("cat", stdin=b"piped in\n")
        print(out.stdout_text, end="")

        await sb.fs.write("/tmp/note.txt", b"written from the host\n")
        print((await sb.fs.read("/tmp/note.txt")).decode(), end="")

        metrics = await sb.metrics()
        print(f"memory: {metrics.memory_bytes >> 20} of {metrics.memory_limit_bytes >> 20} MiB")
    # Leaving the block killed the sandbox and removed its state.


if __name__ == "__main__":
    asyncio.run(main())
