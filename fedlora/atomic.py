"""Atomic, owner-only file writes: the one helper every run-output writer uses.

A crash (or power loss) while writing leaves either the old file or the new one, never a
truncated mix: the bytes go to a temporary file in the target's directory (same file
system, so the rename is atomic), are ``fsync``-ed, then ``os.replace`` swaps it in and the
directory is ``fsync``-ed. Files are created ``0600`` and missing directories ``0700``:
run outputs (ledgers, checkpoints, metrics) describe clients and are the operator's alone.
"""

from __future__ import annotations

import os
import secrets
import stat
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

FILE_MODE = 0o600
DIR_MODE = 0o700
TMP_MARK = ".tmp-"


def private_dir(path: str | os.PathLike[str]) -> Path:
    """Create ``path`` (and missing parents) owner-only (0700) and return it.

    An existing directory the current user owns is tightened to 0700 too, so a run
    directory made by an older version or by ``mkdir`` becomes private on first write.
    """
    p = Path(path)
    p.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
    try:
        if p.stat().st_uid == os.getuid():
            os.chmod(p, DIR_MODE)
    except (OSError, AttributeError):  # AttributeError: os.getuid is missing on Windows
        pass
    return p


class UnsafeDirectoryError(PermissionError):
    """A directory others control: links planted in it could redirect fedlora's writes."""


def owned_dir(path: str | os.PathLike[str]) -> Path:
    """Create ``path`` 0700, or accept an existing one only if this user controls it; return it.

    A run directory (or a node's state directory) that another user owns, that is writable by
    the group or by others, or that is itself a symbolic link may hold links planted by someone
    else: a ``metrics.png`` link made the server overwrite a file outside the run. Such a
    directory is refused; an accepted one is tightened to 0700.

    Raises
    ------
    UnsafeDirectoryError
        Naming the directory, what is wrong and the fix.
    """
    p = Path(path)
    p.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
    info = p.lstat()
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        raise UnsafeDirectoryError(f"{p} is a link or not a directory; give a plain directory of your own")
    uid = getattr(os, "getuid", lambda: info.st_uid)()
    if info.st_uid != uid:
        raise UnsafeDirectoryError(
            f"{p} belongs to uid {info.st_uid}, not to you (uid {uid}); choose a directory of your own"
        )
    if info.st_mode & 0o022:
        raise UnsafeDirectoryError(
            f"{p} is writable by others (mode {stat.S_IMODE(info.st_mode):o}): files planted there could "
            f"redirect what is written; run `chmod go-w {p}` or choose another directory"
        )
    os.chmod(p, DIR_MODE)
    return p


def append_line(path: str | os.PathLike[str], line: str) -> None:
    """Append ``line`` to ``path`` (created 0600) without following a link planted at ``path``.

    Raises
    ------
    UnsafeDirectoryError
        When ``path`` is a symbolic link.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags, FILE_MODE)
    except OSError as err:
        if os.path.islink(path):
            raise UnsafeDirectoryError(
                f"{path} is a symbolic link; fedlora does not write through links"
            ) from err
        raise
    with os.fdopen(fd, "a", encoding="utf-8") as fh:
        fh.write(line)


def temp_path(target: Path) -> Path:
    """Return a fresh temporary name beside ``target`` (hidden, unique per process and call)."""
    return target.with_name(f".{target.name}{TMP_MARK}{os.getpid()}-{secrets.token_hex(4)}")


def fsync_dir(directory: Path) -> None:
    """``fsync`` a directory so a rename inside it survives power loss (no-op where unsupported)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(
    path: str | os.PathLike[str],
    data: bytes | str | Callable[[BinaryIO], None],
    *,
    mode: int = FILE_MODE,
    before_replace: Callable[[Path], None] | None = None,
) -> Path:
    """Atomically replace ``path`` with ``data``, owner-only.

    Parameters
    ----------
    path
        Target file; its directory is created 0700 if missing.
    data
        Bytes, text (written as UTF-8), or a function that writes into the open binary file.
    mode
        Permission bits of the new file (default 0600).
    before_replace
        Called with the target path after the new bytes are durable and just before the
        swap (checkpoints use it to keep the old file as ``<name>.prev``).

    Returns
    -------
    Path
        The target path.
    """
    target = Path(path)
    private_dir(target.parent)
    tmp = temp_path(target)
    try:
        with open(tmp, "xb", opener=lambda name, flags: os.open(name, flags, mode)) as handle:
            if callable(data):
                data(handle)
            else:
                handle.write(data.encode("utf-8") if isinstance(data, str) else data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)  # the umask may have removed bits; never adds group/other
        if before_replace is not None and target.exists():
            before_replace(target)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)
    return target


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Atomically write ``text`` (UTF-8) to ``path``, owner-only."""
    return atomic_write(path, text)


def private_tree(root: str | os.PathLike[str]) -> None:
    """Make every directory under ``root`` 0700 and every file 0600 (outputs written by libraries)."""
    top = Path(root)
    if not top.exists():
        return
    for path in [top, *top.rglob("*")]:
        if path.is_symlink():
            continue
        os.chmod(path, DIR_MODE if path.is_dir() else FILE_MODE)
