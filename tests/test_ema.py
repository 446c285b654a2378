"""EMA callback: decay warm-up and updates against hand computations, exact swaps, checkpoints, resume, DDP."""

from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from diffusion.callbacks.ema import EMA, ema_decay, ema_weights, find_ema
from diffusion.checkpoint import NET_PREFIX, read_checkpoint, sub_state_dict
from diffusion.model import DiffusionModel
from tests.conftest import run_cli, run_train


class Reseed(L.Callback):
    """Test helper: the training batches in a fixed order every epoch and the same noise at each global step, so
    a run resumed from a checkpoint sees exactly what an uninterrupted run sees (Lightning saves no RNG state)."""

    def setup(self, trainer, pl_module, stage):
        dm = trainer.datamodule
        dm.train_dataloader = lambda: DataLoader(dm.train_set, batch_size=dm.batch_size, shuffle=False, drop_last=True)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        torch.manual_seed(10_000 + trainer.global_step)


class DumpWeights(L.Callback):
    """Test helper: each rank saves its EMA and raw weights when training ends."""

    def __init__(self, dirpath: str):
        self.dirpath = Path(dirpath)

    def on_train_end(self, trainer, pl_module):
        ema = find_ema(trainer)
        self.dirpath.mkdir(parents=True, exist_ok=True)
        torch.save(
            {
                "ema": ema.state_dict_for_net(pl_module.model.net),
                "raw": pl_module.model.net.state_dict(),
                "n": ema.num_updates,
            },
            self.dirpath / f"rank{trainer.global_rank}.pt",
        )


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2, 1)
        self.register_buffer("scale", torch.zeros(()))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))


def _set(net: Net, value: float) -> None:
    with torch.no_grad():
        net.lin.weight.fill_(value)
        net.lin.bias.fill_(-value)
        net.scale.fill_(10 * value)
        net.count.fill_(int(value))


def test_decay_warmup_closed_form():
    assert ema_decay(0, decay=0.9999) == 0.0  # the first update copies the weights
    assert ema_decay(1, decay=0.9999, inv_gamma=1.0, power=2 / 3) == pytest.approx(1 - 2 ** (-2 / 3))
    assert ema_decay(9, decay=0.9999, inv_gamma=2.0, power=0.5) == pytest.approx(1 - (1 + 4.5) ** -0.5)
    assert ema_decay(10**9, decay=0.999) == 0.999  # capped
    assert ema_decay(3, decay=0.9, min_decay=0.8, power=1.0) == 0.8  # 1 - 1/4 = 0.75, floored


def test_updates_match_hand_computation():
    """start_step=1, every 2 steps, power=1: updates after steps 2, 4, 6 with decays 0, 1-1/3, 1-1/5 (cap 0.7)."""
    net = Net()
    ema = EMA(decay=0.7, power=1.0, inv_gamma=1.0, update_every_n_steps=2, start_step=1)
    module = SimpleNamespace(model=SimpleNamespace(net=net))
    expected, weights = None, {1: 5.0, 2: 1.0, 3: 7.0, 4: 3.0, 5: 9.0, 6: 2.0, 7: 4.0}
    decays = {2: 0.0, 4: min(0.7, 1 - 1 / 3), 6: min(0.7, 1 - 1 / 5)}
    for step, w in weights.items():
        _set(net, w)
        ema.maybe_update(SimpleNamespace(global_step=step), module)
        ema.maybe_update(SimpleNamespace(global_step=step), module)  # idempotent within a step
        if step in decays:
            expected = w if expected is None else decays[step] * expected + (1 - decays[step]) * w
        state = ema.state_dict_for_net(net)
        assert ema.num_updates == len([s for s in decays if s <= step])
        if expected is not None:
            torch.testing.assert_close(state["lin.weight"], torch.full((1, 2), expected))
            torch.testing.assert_close(state["lin.bias"], torch.full((1,), -expected))
    assert ema.last_decay == pytest.approx(0.7)
    # buffers are copied, not averaged (the ones from the last update, step 6)
    assert state["scale"].item() == 20.0 and state["count"].item() == 2 and state["count"].dtype == torch.long


def test_starts_from_init_weights_and_warms_up():
    """Fine-tuning (init_from): the average starts at the loaded weights. With the warm-up (the default) it follows
    the fine-tuned weights as a fresh run's would (a constant 0.9999 held a 300-step LoRA run's average at 97% of
    its starting adapters); with warmup=false it leaves the loaded weights at the full decay at once."""
    for warmup, first in ((True, 0.0), (False, 0.9)):
        net = Net()
        _set(net, 2.0)
        init = {k: v.clone() for k, v in net.state_dict().items()}
        module = SimpleNamespace(model=SimpleNamespace(net=net), ema_init_state=init)
        ema = EMA(decay=0.9, warmup=warmup)
        ema.on_fit_start(SimpleNamespace(), module)
        assert ema.from_init and ema.decay_at(1) == first
        torch.testing.assert_close(ema.state_dict_for_net(net)["lin.weight"], torch.full((1, 2), 2.0))
        _set(net, 12.0)  # the weights after the first fine-tuning step
        ema.maybe_update(SimpleNamespace(global_step=1), module)
        expected = first * 2.0 + (1 - first) * 12.0
        torch.testing.assert_close(ema.state_dict_for_net(net)["lin.weight"], torch.full((1, 2), expected))
        assert ema.decay_at(3) == (ema_decay(2, decay=0.9) if warmup else 0.9)  # 0.52 with the warm-up
        restored = EMA(decay=0.9, warmup=warmup)
        restored.load_state_dict(ema.state_dict())
        assert restored.from_init and restored.decay_at(5) == ema.decay_at(5)


def test_swap_restores_raw_weights_exactly_even_on_error():
    net = Net()
    _set(net, 1.0)
    ema = EMA(decay=0.5)
    module = SimpleNamespace(model=SimpleNamespace(net=net))
    ema.maybe_update(SimpleNamespace(global_step=1), module)
    _set(net, 3.0)
    net.lin.weight.data[0, 0] = 3.0000002  # a value an average would round away
    ema.maybe_update(SimpleNamespace(global_step=2), module)  # decay 1 - 2^(-2/3) ~ 0.37
    raw = {k: v.clone() for k, v in net.state_dict().items()}
    trainer = SimpleNamespace(callbacks=[ema], global_step=2)
    with ema_weights(trainer, module) as used:
        assert used
        assert not torch.equal(net.lin.weight, raw["lin.weight"])
        torch.testing.assert_close(net.lin.weight, ema.ema["lin.weight"])
        with ema.swapped_in(module):  # nested: no second swap
            torch.testing.assert_close(net.lin.weight, ema.ema["lin.weight"])
    assert all(torch.equal(v, raw[k]) for k, v in net.state_dict().items())
    with pytest.raises(RuntimeError), ema.swapped_in(module):
        raise RuntimeError("boom")
    assert all(torch.equal(v, raw[k]) for k, v in net.state_dict().items())


@pytest.mark.parametrize(
    "kwargs, key",
    [({"decay": 1.0}, "decay"), ({"update_every_n_steps": 0}, "update_every_n_steps"), ({"start_step": -1}, "start")],
)
def test_bad_options_name_the_key(kwargs, key):
    with pytest.raises(ValueError, match=f"callbacks.ema.{key}"):
        EMA(**kwargs)


# Four batches per epoch (180 training digits, batch 45), so every epoch sees the same batches in the same order.
DET = [
    "data.val_fraction=0.9",
    "data.batch_size=45",
    "trainer.max_steps=8",
    "+trainer.limit_val_batches=0",
    "callbacks.model_checkpoint.every_n_train_steps=4",
    "callbacks.sample_grid=null",
    "callbacks.ema.decay=0.9",
    "+callbacks.reseed._target_=tests.test_ema.Reseed",
    "logger=none",
]


def _net_state(ckpt: dict) -> dict:
    return sub_state_dict(ckpt["state_dict"], NET_PREFIX)


def _assert_equal_states(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_checkpoint_resume_and_no_leak(tmp_path):
    # A: 8 uninterrupted steps, never validates or draws grids, so the EMA is never swapped in.
    run_a = tmp_path / "a"
    run_train(run_a, DET)
    a8 = read_checkpoint(run_a / "checkpoints" / "last.ckpt")
    assert a8["global_step"] == 8
    assert a8["callbacks"]["EMA"] == {"num_updates": 8, "last_update_step": 8, "from_init": False}
    assert any(not torch.equal(v, _net_state(a8)[k]) for k, v in a8["ema_state_dict"].items())

    # Round trip: sample.py's loader rebuilds the net with the EMA weights (or the raw ones when asked).
    loaded = DiffusionModel.from_checkpoint(run_a / "checkpoints" / "last.ckpt")
    assert loaded.weights == "ema"
    _assert_equal_states(loaded.net.state_dict(), a8["ema_state_dict"])
    _assert_equal_states(
        DiffusionModel.from_checkpoint(run_a / "checkpoints" / "last.ckpt", use_ema=False).net.state_dict(),
        _net_state(a8),
    )

    # B: resume A's step-4 checkpoint to step 8: the EMA continues exactly as if never interrupted.
    run_b = tmp_path / "b"
    run_train(run_b, [*DET, f"ckpt_path={run_a / 'checkpoints' / 'step_000004.ckpt'}"])
    b8 = read_checkpoint(run_b / "checkpoints" / "last.ckpt")
    _assert_equal_states(_net_state(b8), _net_state(a8))
    _assert_equal_states(b8["ema_state_dict"], a8["ema_state_dict"])

    # C: validates (with EMA) and draws grids (with EMA) every 2 steps; the raw weights must equal A's.
    run_c = tmp_path / "c"
    with_grids = [o for o in DET if o != "callbacks.sample_grid=null"]  # TINY: 4-image grids every 2 steps
    run_train(run_c, [*with_grids, "++trainer.limit_val_batches=2", "trainer.val_check_interval=2"])
    c8 = read_checkpoint(run_c / "checkpoints" / "last.ckpt")
    assert len(list((run_c / "samples").glob("step_*.png"))) == 4
    _assert_equal_states(_net_state(c8), _net_state(a8))
    _assert_equal_states(c8["ema_state_dict"], a8["ema_state_dict"])


# A 4-step run in two CPU processes (gloo), for the DDP tests of the averaging callbacks.
DDP_TINY = [
    "model=unet_tiny",
    "trainer=cpu",
    "+trainer.strategy=ddp",
    "trainer.devices=2",
    "trainer.max_steps=4",
    "+trainer.limit_val_batches=0",
    "trainer.enable_progress_bar=false",
    "process=cosine",
    "process.num_steps=20",
    "sampler.steps=10",  # at most schedule.num_steps (train.py checks the sampler against the process up front)
    "data.batch_size=8",
    "callbacks.sample_grid=null",
]


def test_ema_identical_on_both_ddp_ranks(tmp_path):
    """Two CPU processes (gloo) see different batches; their averages must match bit for bit."""
    run, dump = tmp_path / "run", tmp_path / "dump"
    result = run_cli(
        "train.py",
        *DDP_TINY,
        "callbacks.ema.decay=0.9",
        "+callbacks.dump._target_=tests.test_ema.DumpWeights",
        f"+callbacks.dump.dirpath={dump}",
        "logger=none",
        f"hydra.run.dir={run}",
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    r0, r1 = (torch.load(dump / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["n"] == r1["n"] == 4
    _assert_equal_states(r0["ema"], r1["ema"])
    _assert_equal_states(r0["raw"], r1["raw"])
    assert any(not torch.equal(v, r0["raw"][k]) for k, v in r0["ema"].items())
    # and the checkpoint (written by rank 0) carries that same average
    _assert_equal_states(read_checkpoint(run / "checkpoints" / "last.ckpt")["ema_state_dict"], r0["ema"])
