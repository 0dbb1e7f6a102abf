"""One logging set-up for every command: a console stream and a log file per run."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable
from pathlib import Path

_MARK = "_feataug_handler"
_FORMAT = logging.Formatter("[%(asctime)s %(name)s] %(message)s", "%m/%d %H:%M:%S")


def setup_logging(names: Iterable[str], log_file: str | Path | None = None, *,
                  console: bool = True, main: bool = True) -> None:
    """Give each logger in ``names`` exactly these handlers, replacing ours from an earlier call
    (in-process callers that run several times never print a line twice).

    Rank 0 (``main``) logs INFO and above to stdout (if ``console``) and appends to
    ``log_file``; the other ranks log warnings to stdout only.
    """
    handlers: list[logging.Handler] = []
    if console or not main:
        handlers.append(logging.StreamHandler(sys.stdout))
    if main and log_file is not None:
        handlers.append(logging.FileHandler(log_file))
    for h in handlers:
        h.setFormatter(_FORMAT)
        setattr(h, _MARK, True)
    for name in names:
        log = logging.getLogger(name)
        for h in list(log.handlers):
            if getattr(h, _MARK, False):
                log.removeHandler(h)
                h.close()
        log.setLevel(logging.INFO if main else logging.WARNING)
        log.propagate = False
        for h in handlers:
            log.addHandler(h)


def close_log_files(names: Iterable[str]) -> None:
    """Detach and close the log files ``setup_logging`` gave these loggers; their console
    handlers stay. A run's log file ends with the run: a later record of the same process
    (the next job of an in-process study, a library that re-configures logging and closes every
    handler, as ``submitit`` does when imported) must not reopen a finished run's ``log.txt``,
    whose folder may be gone by then."""
    for name in names:
        log = logging.getLogger(name)
        for h in list(log.handlers):
            if getattr(h, _MARK, False) and isinstance(h, logging.FileHandler):
                log.removeHandler(h)
                h.close()
