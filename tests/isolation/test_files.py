"""The workspace file API on a real sandbox: round trips, and paths that must not leave it."""

from __future__ import annotations

import asyncio

import pytest

from actors.isolation.backend import Backend
from cave.errors import InvalidArgumentError, InvalidPathError, NotFoundError
from tests.isolation.conftest import assert_still_works, async_test, open_sandbox, run

# Generous: a hang is what this guards against, not a slow reply.
HANG_GUARD_S = 20


@async_test
async def test_write_read_list_delete_round_trip(backend: Backend) -> None:
    async with open_sandbox(backend) as sandbox:
        assert await sandbox.files.write("hello.txt", b"hello\n") == 6
        assert await sandbox.files.read("hello.txt") == b"hello\n"
        assert await sandbox.files.read("/workspace/hello.txt") == b"hello\n"
        out, _, _ = await run(sandbox, ["cat", "/workspace/hello.txt"])
        assert out == b"hello\n"
        [entry] = await sandbox.files.list()
        assert (entry.name, entry.type, entry.size) == ("hello.txt", "file", 6)
        await sandbox.files.delete("hello.txt")
        assert await sandbox.files.list() == []
        _, _, result = await run(sandbox, ["test", "-e", "/workspace/hello.txt"])
        assert result.exit_code == 1


@async_test
async def test_write_creates_nested_directories(backend: Backend) -> None:
    async with open_sandbox(backend) as sandbox:
        await sandbox.files.write("a/b/c/deep.bin", bytes(range(256)))
        assert await sandbox.files.read("a/b/c/deep.bin") == bytes(range(256))
        assert [(e.name, e.type) for e in await sandbox.files.list("a/b")] == [("c", "dir")]
        with pytest.raises(InvalidArgumentError):
            await sandbox.files.delete("a")  # not empty, not recursive
        await sandbox.files.delete("a", recursive=True)
        assert await sandbox.files.list() == []


@async_test
async def test_file_written_by_a_command_is_read_back(backend: Backend) -> None:
    async with open_sandbox(backend) as sandbox:
        _, _, result = await run(sandbox, "mkdir -p out && printf 'made inside' > out/r.txt")
        assert result.exit_code == 0
        assert await sandbox.files.read("out/r.txt") == b"made inside"


ESCAPES = ["../etc/passwd", "/etc/passwd", "a/../../x", "/workspace/../etc/passwd"]


@pytest.mark.parametrize("path", ESCAPES)
@async_test
async def test_paths_leaving_the_workspace_are_refused(backend: Backend, path: str) -> None:
    async with open_sandbox(backend) as sandbox:
        with pytest.raises(InvalidPathError):
            await sandbox.files.read(path)
        with pytest.raises(InvalidPathError):
            await sandbox.files.write(path, b"owned")
        with pytest.raises(InvalidPathError):
            await sandbox.files.delete(path)
        out, _, _ = await run(sandbox, ["cat", "/etc/passwd"])
        assert b"owned" not in out


@async_test
async def test_symlinks_planted_inside_cannot_reach_outside(backend: Backend) -> None:
    async with open_sandbox(backend) as sandbox:
        _, err, result = await run(
            sandbox,
            "ln -s /etc /workspace/link && ln -s ../../.. /workspace/up && "
            "ln -s /etc/passwd /workspace/pw && mkdir -p /workspace/d/e",
        )
        assert result.exit_code == 0, err
        for path in ("link/passwd", "up/etc/passwd", "pw", "d/e/../../up/etc/passwd"):
            with pytest.raises(InvalidPathError):
                await sandbox.files.read(path)
        for path in ("link/evil", "up/etc/evil", "up/tmp/new/evil", "pw"):
            with pytest.raises(InvalidPathError):
                await sandbox.files.write(path, b"evil")
        for path in ("link", "up"):
            with pytest.raises(InvalidPathError):
                await sandbox.files.list(path)
        out, _, _ = await run(sandbox, "cat /etc/passwd; ls /etc /tmp")
        assert b"evil" not in out
        await sandbox.files.delete("link")  # removes the link itself, not /etc
        _, _, result = await run(sandbox, ["test", "-d", "/etc"])
        assert result.exit_code == 0


@async_test
async def test_symlink_staying_inside_is_followed(backend: Backend) -> None:
    async with open_sandbox(backend) as sandbox:
        await sandbox.files.write("real/data.txt", b"inside")
        _, _, result = await run(sandbox, "ln -s real/data.txt /workspace/alias")
        assert result.exit_code == 0
        assert await sandbox.files.read("alias") == b"inside"


@async_test
async def test_non_utf8_file_name_from_list_can_be_read_back(backend: Backend) -> None:
    # A program may name a file with any bytes; list() shows it the way os.listdir does
    # (surrogate escapes), and handing that name back must work, not end the sandbox.
    async with open_sandbox(backend) as sandbox:
        _, err, result = await run(sandbox, "printf data > \"$(printf 'caf\\351')\"")  # Latin-1
        assert result.exit_code == 0, err
        [entry] = await sandbox.files.list()
        assert entry.name == "caf\udce9"
        assert await sandbox.files.read(entry.name) == b"data"
        await sandbox.files.write(entry.name, b"new")
        assert await sandbox.files.read(entry.name) == b"new"
        await assert_still_works(sandbox)


@async_test
async def test_missing_file_is_not_found(backend: Backend) -> None:
    async with open_sandbox(backend) as sandbox:
        with pytest.raises(NotFoundError):
            await sandbox.files.read("nope.txt")
        with pytest.raises(NotFoundError):
            await sandbox.files.list("no/such/dir")
        with pytest.raises(NotFoundError):
            await sandbox.files.delete("nope.txt")


@async_test
async def test_fifo_is_an_error_not_a_hang(backend: Backend) -> None:
    async with open_sandbox(backend) as sandbox:
        _, _, result = await run(sandbox, ["mkfifo", "/workspace/f"])
        assert result.exit_code == 0
        with pytest.raises(InvalidArgumentError):
            await asyncio.wait_for(sandbox.files.read("f"), HANG_GUARD_S)
        with pytest.raises(InvalidArgumentError):
            await asyncio.wait_for(sandbox.files.write("f", b"x"), HANG_GUARD_S)
        assert await sandbox.files.write("after.txt", b"still serving") == 13  # zygote alive


@async_test
async def test_directory_is_not_read_as_a_file(backend: Backend) -> None:
    async with open_sandbox(backend) as sandbox:
        await sandbox.files.write("dir/x", b"")
        with pytest.raises(InvalidArgumentError):
            await sandbox.files.read("dir")
