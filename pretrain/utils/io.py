"""File output: atomic (a reader sees the old file or the new one, never half of one), and
checked before any work (:func:`check_output`: never an input, never a file unasked); the
one walk of an input folder (:func:`walk_files`); and the one read of an input file that cannot
hang on a pipe (:func:`read_regular`)."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import stat
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from ..errors import ConfigError

_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path``; on success fsync it and rename it over ``path``.

    On any exception the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the usual mode
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> None:
    """``write(f)`` into a temporary file, then atomically replace ``path``."""
    with atomic_open(path, "wb") as f:
        write(f)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """``text`` as UTF-8, whatever the locale."""
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def walk_files(root: str | os.PathLike) -> tuple[list[str], list[str]]:
    """Every file under the folder ``root``, recursively, folder by folder with names sorted,
    links followed, each real folder once; and the linked folders left out (a link to a folder
    already walked, or to one that contains it, would walk it again or never end). Names only:
    no file is opened."""
    paths, seen, skipped = [], {os.path.realpath(root)}, []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        here, kept = os.path.realpath(dirpath), []
        for d in sorted(dirnames):
            real = os.path.realpath(os.path.join(dirpath, d))
            if real in seen or os.path.commonpath([here, real]) == real:
                skipped.append(os.path.join(dirpath, d))
            else:
                seen.add(real)
                kept.append(d)
        dirnames[:] = kept
        paths += [os.path.join(dirpath, f) for f in sorted(filenames)]
    return paths, skipped


def read_regular(path: str | os.PathLike) -> bytes:
    """The bytes of the regular file ``path``. Anything else raises :class:`OSError` before a
    byte is read: a named pipe would block the reader for ever, a device (``/dev/zero``) never
    end. Opened non-blocking, so that opening a pipe cannot block either."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", os.fspath(path))
        os.set_blocking(fd, True)
        with os.fdopen(fd, "rb") as f:
            fd = -1  # closed by the file object from here on
            return f.read()
    finally:
        if fd >= 0:
            os.close(fd)


@contextlib.contextmanager
def sigint_deferred() -> Iterator[None]:
    """Ctrl-C inside the block raises ``KeyboardInterrupt`` once the block is done.

    torch.save's writer calls back into Python; a KeyboardInterrupt raised inside those calls
    can surface as a RuntimeError or be dropped by the writer, and the interrupt is lost. Only
    the main thread receives SIGINT, and only Python's own handler is replaced.
    """
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield
        return
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` into ``path`` atomically; a Ctrl-C during the write takes effect after it."""
    import torch

    with sigint_deferred():
        atomic_write(path, lambda f: torch.save(obj, f))


def nearest_existing(path: str | os.PathLike) -> Path:
    """``path`` (absolute) if it exists, else its nearest existing parent."""
    path = Path(path).absolute()
    return path if path.exists() else next(p for p in path.parents if p.exists())


def check_output_folder(out: Path, error: type[Exception], *, flag: str = "OUTPUT_DIR",
                        inputs: dict[str, Any] | None = None) -> None:
    """Refuse an output folder ``out`` that is not a folder, or that cannot be created or written
    (checked on ``out`` or its nearest existing parent), or that is, or lies inside, one of
    ``inputs`` (as for :func:`check_output`), with ``error`` and one line naming ``flag``."""
    if out.exists() and not out.is_dir():
        raise error(f"{flag} {out}: exists and is not a folder")
    folder = out if out.exists() else nearest_existing(out)
    if not folder.is_dir():
        raise error(f"{flag} {out}: cannot be created, {folder} is not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise error(f"{flag} {out}: no write permission in {folder}")
    clash = _input_clash(out, inputs)
    if clash:
        raise error(f"{flag} {out}: {clash}")


def _input_clash(dst: Path, inputs: dict[str, Any] | None) -> str:
    """Why ``dst`` may not be written: it is one of ``inputs`` (label -> path) under any spelling
    or link, or lies inside one that is a folder (a dataset); "" if neither."""
    for label, src in (inputs or {}).items():
        if not src or not Path(src).exists():
            continue
        if Path(src).is_dir():  # links resolved: a linked spelling of the folder is inside it
            real, folder = dst.resolve(), Path(src).resolve()
            if real.is_relative_to(folder):
                where = "is" if real == folder else "is inside"
                return f"{where} the {label} folder {src}; give a path outside it"
        elif dst.exists() and os.path.samefile(src, dst):
            return f"the output is the {label} file {src}; give another name"
    return ""


def check_output(path: str | os.PathLike, *, inputs: dict[str, Any] | None = None,
                 overwrite: bool = False, flag: str = "", error: type[Exception] | None = None
                 ) -> None:
    """Refuse, before any work, an output file that could not be written or would lose data:
    a folder; one of ``inputs`` (label -> path, e.g. ``{"--checkpoint": c}``), under any
    spelling or link, or a path inside one that is a folder (a dataset); an existing file (or
    link) without ``overwrite``; a path whose folder is a file or cannot be written. ``flag``
    prefixes the path in the message (``--output F: ...``); ``error``: the exception class
    (default :class:`~pretrain.errors.ConfigError`)."""
    error, dst = error or ConfigError, Path(path)
    name = f"{flag} {dst}" if flag else str(dst)
    if dst.is_dir():
        raise error(f"{name}: is a folder; give the output file's name")
    clash = _input_clash(dst, inputs)
    if clash:
        raise error(f"{name}: {clash}")
    if (dst.exists() or dst.is_symlink()) and not overwrite:
        raise error(f"{name}: exists; use --overwrite to replace it")
    folder = next(p for p in dst.absolute().parents if p.exists())
    if not folder.is_dir():
        raise error(f"{name}: cannot write: {folder} is not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise error(f"{name}: cannot write: no write permission in {folder}")
