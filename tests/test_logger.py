"""One logging set-up for every command (pretrain/utils/logger.py)."""

from __future__ import annotations

import logging

from pretrain.utils.logger import close_log_files, setup_logging


def test_a_runs_log_file_ends_with_the_run(tmp_path):
    """setup_logging gives the loggers a console and a file; close_log_files detaches the file
    (closed, its records kept) and leaves the console: a record after the run goes nowhere near
    the old log.txt, even once its folder is gone."""
    name = "feataug.test_logger"
    log_file = tmp_path / "run" / "log.txt"
    log_file.parent.mkdir()
    setup_logging([name], log_file)
    log = logging.getLogger(name)
    kinds = sorted(type(h).__name__ for h in log.handlers)
    assert kinds == ["FileHandler", "StreamHandler"]
    log.info("during the run")
    close_log_files([name])
    assert [type(h).__name__ for h in log.handlers] == ["StreamHandler"]
    assert "during the run" in log_file.read_text()
    log_file.unlink()
    log_file.parent.rmdir()
    for h in log.handlers:
        h.close()  # what importing submitit does to every handler of the process
    log.info("after the run")  # on the old code: FileNotFoundError reopening the file
    assert not log_file.parent.exists()
    setup_logging([name], None, console=False)  # clean up: no handlers of ours left
    assert log.handlers == []
