"""One run per folder: an OS lock on ``FOLDER/.feataug.lock``, held for the whole run.

``fcntl.flock`` locks belong to the open file: the OS drops them when the holder exits, however
it ends (SIGKILL included), so a lock is never stale; a file left by a killed run is simply
locked again. The holder writes its pid, host and command into the file, for the message of the
run that is refused, and removes the file when it is done. Nested ``run_lock`` calls on one
folder in one process (a study job that pretrains into its own folder) share the outer lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
from collections.abc import Iterator
from pathlib import Path

from ..errors import ConfigError

LOCK_NAME = ".feataug.lock"
_held: dict[str, int] = {}  # real path of a folder this process locked -> nesting depth


class FolderInUse(ConfigError):
    """The folder is locked by another live process."""


@contextlib.contextmanager
def run_lock(folder: str | os.PathLike, what: str, key: str = "OUTPUT_DIR") -> Iterator[Path]:
    """Create ``folder`` if needed and hold its lock until the block ends; raises
    :class:`FolderInUse` (naming the holder's pid) when another process holds it, and
    ``ConfigError`` when the folder cannot be created or written. ``what`` names this command
    for others' messages, ``key`` the folder's option in ours."""
    folder = Path(folder)
    real = os.path.realpath(folder)
    if real in _held:
        _held[real] += 1
        try:
            yield folder
        finally:
            _held[real] -= 1
        return
    fd = _acquire(folder, what, key)
    _held[real] = 1
    try:
        yield folder
    finally:
        del _held[real]
        with contextlib.suppress(OSError):  # unlinked while locked: a waiting run reopens it
            os.unlink(folder / LOCK_NAME)
        os.close(fd)


def _acquire(folder: Path, what: str, key: str) -> int:
    path = folder / LOCK_NAME
    while True:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise ConfigError(f"{key} {folder}: cannot be written ({e.strerror or e})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise FolderInUse(f"{key} {folder} is in use by {holder}; wait for it to end") \
                from None
        try:  # the file may have been removed by a holder that just finished: lock the new one
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()} {socket.gethostname()} {what}\n".encode())
            return fd
        os.close(fd)


def _holder(fd: int) -> str:
    """``"feataug pretrain (pid 123 on host)"`` from the lock file's contents."""
    text = os.pread(fd, 4096, 0).decode(errors="replace").split(maxsplit=2)
    if len(text) < 2:
        return "another process"
    what = text[2].strip() if len(text) > 2 else "another run"
    return f"{what} (pid {text[0]} on {text[1]})"
