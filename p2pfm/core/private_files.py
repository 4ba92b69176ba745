"""Files and folders only their owner can read, created without following symlinks.

A node's out folder holds its checkpoint (optimizer state, adapter) and its
metrics; its key file is its only secret. Each is created with its final mode
(0700 folders, 0600 files) in the very system call that creates it, so there is
no moment at which another user could open it, whatever the process umask (a
umask only ever removes permission bits, so asking for 0700/0600 cannot give
more). The last path component is never followed when it is a symlink: whoever
can plant a symlink next to our files must not make us chmod or overwrite the
file it points to.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
from pathlib import Path

from p2pfm.core.errors import UnsafePathError

PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600


def make_private_dir(path: Path) -> Path:
    """Create ``path`` and its missing parents with mode 0700 (like ``mkdir -p``); return ``path``.

    An existing ``path`` that we own is chmod'ed to 0700: an out folder from an
    older run may have been created world-readable. Existing parents are left
    alone (``/home``, a mount point: they are the operator's). Raises
    UnsafePathError when ``path`` is a symlink (live or dangling) or not a folder.
    """
    missing: list[Path] = []
    current = path
    while not os.path.lexists(current) and current.parent != current:
        missing.append(current)
        current = current.parent
    for folder in reversed(missing):
        try:
            os.mkdir(folder, PRIVATE_DIR_MODE)
        except FileExistsError:
            continue  # created meanwhile by someone else: only the leaf is checked (below)
        if folder != path:
            _make_dir_private(folder)
    _make_dir_private(path)
    return path


def _make_dir_private(path: Path) -> None:
    """chmod 0700 through a descriptor opened with O_NOFOLLOW, so a symlink swapped in is never followed."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if os.path.islink(path):
            raise UnsafePathError(
                path, "is a symbolic link; remove it, or point the setting at the real folder"
            ) from None
        if exc.errno == errno.ENOTDIR:
            raise UnsafePathError(path, "is not a folder; remove it or choose another path") from None
        raise
    try:
        if os.fstat(fd).st_uid == os.geteuid():
            os.fchmod(fd, PRIVATE_DIR_MODE)
    finally:
        os.close(fd)


def write_private_file(path: Path, data: bytes) -> None:
    """Atomically replace ``path`` with a mode-0600 file holding ``data``.

    The bytes go to a new temporary file in the same folder (O_CREAT|O_EXCL|
    O_NOFOLLOW: nothing planted there is ever opened), are fsynced, then
    ``os.replace``-d onto ``path``. A reader sees the old file or the new one,
    never a torn one, and a symlink at ``path`` is replaced itself, its target
    left untouched. The folder must exist; OSError (naming the path) when it is
    not writable or ``path`` is a folder.
    """
    temp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, PRIVATE_FILE_MODE)
    try:
        with os.fdopen(fd, "wb") as handle:
            # Exactly 0600 even under a umask that strips the owner's own bits.
            os.fchmod(handle.fileno(), PRIVATE_FILE_MODE)
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    """Make a rename inside ``folder`` durable (the new name survives a power cut)."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
