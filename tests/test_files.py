"""Files: every write goes through diffusion/files.py (a scan of the source finds any that does not), and paths we
read are regular files (a named pipe given as a checkpoint or a LoRA base is refused in one line, not waited on)."""

from __future__ import annotations

import contextlib
import os
import signal

import pytest

from diffusion.checkpoint import read_checkpoint
from diffusion.finetune import init_from_checkpoint, load_base
from tests.conftest import tiny_unet
from tests.test_safety import one_line_error


@contextlib.contextmanager
def deadline(seconds: int = 20):
    """A TimeoutError instead of a test that hangs (opening a named pipe blocks until a writer comes)."""

    def expire(signum, frame):
        raise TimeoutError(f"still blocked after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_a_named_pipe_as_a_checkpoint_or_lora_base_is_refused_unopened(tmp_path):
    pipe = tmp_path / "model.ckpt"
    os.mkfifo(pipe)
    readers = {
        "checkpoint": lambda: read_checkpoint(pipe),  # sample.py ckpt=, export.py ckpt=, resume
        "init_from": lambda: init_from_checkpoint(tiny_unet(), pipe),
        "LoRA base": lambda: load_base(tiny_unet(), {"kind": "checkpoint", "path": str(pipe), "use_ema": True}),
    }
    for what, read in readers.items():
        with deadline():
            message = one_line_error(read)
        assert str(pipe) in message and "named pipe" in message and "\n" not in message, (what, message)


@pytest.mark.parametrize("kind", ["folder", "missing"])
def test_regular_file_names_what_is_wrong(tmp_path, kind):
    from diffusion.files import regular_file

    path = tmp_path / "x.ckpt"
    if kind == "folder":
        path.mkdir()
    message = one_line_error(regular_file, path, "checkpoint")
    assert message == f"checkpoint {path} " + ("is a folder, not a file" if kind == "folder" else "does not exist")
    (tmp_path / "ok.ckpt").write_bytes(b"x")
    (tmp_path / "link.ckpt").symlink_to(tmp_path / "ok.ckpt")
    assert regular_file(tmp_path / "link.ckpt", "checkpoint") == tmp_path / "link.ckpt"
