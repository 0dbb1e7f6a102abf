"""``pretrain.utils.io``: a Ctrl-C during a checkpoint write is raised after the write, and the
file is then complete (truth: the object read back); an input that is a pipe or a device is
refused without a byte read (truth: the call returns, pytest-timeout is the guard)."""

from __future__ import annotations

import os
import signal

import pytest
import torch

from pretrain.utils.io import atomic_torch_save, read_regular, sigint_deferred


@pytest.fixture(autouse=True)
def python_sigint_handler():
    """Python's own SIGINT handler for the test (a shell's background job starts with SIGINT
    ignored, and then Python installs none), the previous disposition restored after."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


class _CtrlCWhilePickled:
    """Sends this process SIGINT while torch.save pickles it; reads back as the int 7."""

    def __reduce__(self):
        os.kill(os.getpid(), signal.SIGINT)
        return int, (7,)


def test_ctrl_c_inside_torch_save_is_raised_after_a_complete_write(tmp_path):
    path = tmp_path / "ckpt.pth"
    payload = {"w": torch.arange(1000.0), "x": _CtrlCWhilePickled(), "after": torch.ones(3)}
    with pytest.raises(KeyboardInterrupt):
        atomic_torch_save(payload, path)
    back = torch.load(path, weights_only=False)  # this test's own file
    assert back["x"] == 7 and torch.equal(back["w"], torch.arange(1000.0))
    assert torch.equal(back["after"], torch.ones(3))
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pth"]  # no temporary left


def test_without_ctrl_c_nothing_is_raised_and_an_error_inside_wins():
    with sigint_deferred():
        pass
    with pytest.raises(ValueError), sigint_deferred():
        os.kill(os.getpid(), signal.SIGINT)
        raise ValueError("the block's own error")
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_an_ignored_sigint_stays_ignored():
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # e.g. `nohup feataug pretrain &`
    with sigint_deferred():
        os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN


@pytest.mark.timeout(60)
def test_read_regular_refuses_a_pipe_a_device_and_a_folder_without_blocking(tmp_path):
    pipe = tmp_path / "pipe.jpg"
    os.mkfifo(pipe)  # nobody writes: a plain open() for reading would block for ever
    for path in (pipe, "/dev/zero", tmp_path):
        with pytest.raises(OSError, match="not a regular file"):
            read_regular(path)
    (tmp_path / "f.bin").write_bytes(b"\x00abc")
    os.symlink(tmp_path / "f.bin", tmp_path / "link.bin")  # a link to a file is that file
    assert read_regular(tmp_path / "f.bin") == read_regular(tmp_path / "link.bin") == b"\x00abc"
    with pytest.raises(FileNotFoundError):
        read_regular(tmp_path / "missing")
