"""`trainer.max_time` (what bench/recipes.py trains each recipe by): a run stopped by the clock, not by
`trainer.max_steps`, still ends with last.ckpt holding its last step and the EMA average, and its final grid."""

from __future__ import annotations

import torch

from diffusion.checkpoint import NET_PREFIX, read_checkpoint
from tests.conftest import run_train


def test_a_run_stopped_by_max_time_saves_its_last_step_and_ema(tmp_path):
    run = tmp_path / "run"
    rare = [
        "trainer.max_steps=100000",
        "trainer.val_check_interval=100000",
        "callbacks.model_checkpoint.every_n_train_steps=100000",
        "callbacks.sample_grid.every_n_steps=0",
        "trainer.max_time='00:00:00:02'",
    ]
    run_train(run, rare)
    ckpt = read_checkpoint(run / "checkpoints" / "last.ckpt")
    step = ckpt["global_step"]
    assert 1 <= step < 100000
    raw, ema = ckpt["state_dict"], ckpt["ema_state_dict"]
    assert any(not torch.equal(raw[NET_PREFIX + k], v) for k, v in ema.items()), "the EMA is an average, not a copy"
    assert (run / "samples" / f"step_{step:06d}.png").is_file()
