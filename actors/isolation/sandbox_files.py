"""Workspace file operations, resolved by the kernel so that `..` and symlinks cannot escape."""

from __future__ import annotations

import errno
import os
import posixpath
import shutil
import stat
from dataclasses import dataclass
from typing import Any

from actors.isolation import syscalls as sc

WORKSPACE = "/workspace"
_RESOLVE = sc.RESOLVE_BENEATH | sc.RESOLVE_NO_MAGICLINKS


class PathEscape(Exception):
    """The path leaves the workspace; raised before or by the kernel's RESOLVE_BENEATH check."""


def relative_path(path: str) -> str:
    """Workspace-relative form of `path` ('' is the workspace itself); refuses escapes up front."""
    if "\0" in path:
        raise PathEscape("path contains a NUL byte")
    if path.startswith("/"):
        if path != WORKSPACE and not path.startswith(WORKSPACE + "/"):
            raise PathEscape(f"{path!r} is outside {WORKSPACE}")
        path = path[len(WORKSPACE) :]
    parts: list[str] = []
    for part in path.split("/"):
        if part == "..":
            if not parts:
                raise PathEscape(f"{path!r} leaves the workspace")
            parts.pop()
        elif part not in ("", "."):
            parts.append(part)
    return "/".join(parts)


@dataclass
class Workspace:
    root_fd: int

    @classmethod
    def open(cls, root: str = WORKSPACE) -> Workspace:
        return cls(os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC))

    def handle(self, message: dict[str, Any]) -> tuple[dict[str, Any], list[int]]:
        op = message.get("op")
        rel = relative_path(str(message.get("path", "")))
        if op == "open_read":
            return {"ok": True}, [self._open_regular(rel, os.O_RDONLY)]
        if op == "open_write":
            self._make_parents(rel)
            return {"ok": True}, [self._open_regular(rel, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)]
        if op == "list":
            return {"ok": True, "entries": self._list(rel)}, []
        if op == "delete":
            self._delete(rel, bool(message.get("recursive")))
            return {"ok": True}, []
        return {"error": f"unknown operation {op!r}", "kind": "invalid_argument"}, []

    def _open(self, rel: str, flags: int, mode: int = 0) -> int:
        if not rel:
            rel = "."
        try:
            return sc.openat2(self.root_fd, rel, flags | os.O_CLOEXEC, mode, _RESOLVE)
        except OSError as exc:
            if exc.errno == 18:  # EXDEV: the kernel saw the path leave the workspace
                raise PathEscape(f"{rel!r} resolves outside the workspace") from None
            raise

    def _open_regular(self, rel: str, flags: int) -> int:
        # O_NONBLOCK: a FIFO planted by the sandbox must not hang the zygote in open().
        fd = self._open(rel, flags | os.O_NONBLOCK, 0o644 if flags & os.O_CREAT else 0)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise OSError(errno.EISDIR, f"{rel!r} is not a regular file")
        os.set_blocking(fd, True)
        return fd

    def _make_parents(self, rel: str) -> None:
        parent = posixpath.dirname(rel)
        if not parent:
            return
        done = ""
        for part in parent.split("/"):
            fd = self._open(done or ".", os.O_PATH | os.O_DIRECTORY)
            try:
                os.mkdir(part, 0o755, dir_fd=fd)
            except FileExistsError:
                pass
            finally:
                os.close(fd)
            done = posixpath.join(done, part)

    def _list(self, rel: str) -> list[dict[str, Any]]:
        fd = self._open(rel, os.O_RDONLY | os.O_DIRECTORY)
        try:
            with os.scandir(fd) as it:
                return sorted((_entry(e) for e in it), key=lambda e: e["name"])
        finally:
            os.close(fd)

    def _delete(self, rel: str, recursive: bool) -> None:
        if not rel:
            raise PathEscape("refusing to delete the workspace itself")
        parent_fd = self._open(posixpath.dirname(rel) or ".", os.O_PATH | os.O_DIRECTORY)
        name = posixpath.basename(rel)
        try:
            st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                if recursive:
                    shutil.rmtree(name, dir_fd=parent_fd)
                else:
                    os.rmdir(name, dir_fd=parent_fd)
            else:
                os.unlink(name, dir_fd=parent_fd)
        finally:
            os.close(parent_fd)


def _entry(entry: os.DirEntry[str]) -> dict[str, Any]:
    st = entry.stat(follow_symlinks=False)
    kind = "dir" if stat.S_ISDIR(st.st_mode) else "symlink" if stat.S_ISLNK(st.st_mode) else "file"
    return {
        "name": entry.name,
        "type": kind,
        "size": st.st_size,
        "mode": stat.S_IMODE(st.st_mode),
        "mtime": st.st_mtime,
    }
