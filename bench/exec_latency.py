"""Exec of `true` through the actor handle, in-process, and fresh `bwrap --unshare-all`."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess

from actors.isolation.backend import select_backend
from actors.isolation.sandbox import Sandbox
from actors.sandboxes import create_sandbox, stop_sandbox
from bench.common import bench_settings, report, start_ray, stop_ray, timed

N = int(os.environ.get("CAVE_BENCH_N", "200"))
BWRAP = [
    "bwrap",
    "--unshare-all",
    "--die-with-parent",
    "--ro-bind",
    "/usr",
    "/usr",
    "--symlink",
    "usr/bin",
    "/bin",
    "--symlink",
    "usr/lib",
    "/lib",
    "--symlink",
    "usr/lib64",
    "/lib64",
    "--proc",
    "/proc",
    "--dev",
    "/dev",
    "true",
]


def spawn(argv: list[str]) -> None:
    os.waitpid(os.posix_spawnp(argv[0], argv, os.environ), 0)


def in_process(settings) -> dict[str, float]:  # type: ignore[no-untyped-def]
    async def main() -> dict[str, float]:
        sandbox = Sandbox(select_backend(settings.isolation))
        await sandbox.start(settings.defaults)
        loop = asyncio.get_running_loop()

        async def once() -> None:
            async for _ in sandbox.exec(["true"]):
                pass

        samples = []
        for _ in range(N):
            start = loop.time()
            await once()
            samples.append(loop.time() - start)
        await sandbox.stop()
        from bench.common import percentiles

        return percentiles(samples)

    return asyncio.run(main())


def main() -> None:
    settings = bench_settings()
    start_ray()
    sandbox = create_sandbox(settings)
    rows = {
        "host posix_spawn true (no isolation)": timed(lambda: spawn(["true"]), N),
    }
    if shutil.which("bwrap"):
        subprocess.run(BWRAP, check=True)
        rows["bwrap --unshare-all true (fresh)"] = timed(lambda: spawn(BWRAP), N)
    rows["sandbox exec true, in-process (no Ray)"] = in_process(settings)
    rows["sandbox exec true, actor handle run()"] = timed(lambda: sandbox.run(["true"]), N)
    rows["sandbox exec true, actor streaming exec()"] = timed(
        lambda: list(sandbox.exec_stream(["true"])), N
    )
    stop_sandbox(sandbox.id)
    stop_ray()
    report(rows, baseline="bwrap --unshare-all true (fresh)" if shutil.which("bwrap") else None)


if __name__ == "__main__":
    main()
