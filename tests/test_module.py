"""DiffusionModule: the objective, learning, fixed-seed validation, learning-rate schedule."""

import functools
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra.utils import instantiate
from torch.utils.data import DataLoader, TensorDataset

from diffusion.data import DigitsDataModule
from diffusion.model import DiffusionModel
from diffusion.module import DiffusionModule
from diffusion.process.discrete import NoiseSchedule
from diffusion.unet import UNet
from tests.conftest import run_train
from tests.test_unet import _randomize_output


def _module(**kwargs):
    net = UNet(
        in_channels=1,
        image_size=8,
        base_channels=16,
        channel_mult=(1, 2),
        norm_groups=8,
        dropout=0.0,
        scale_shift_norm=True,
        num_classes=kwargs.pop("num_classes", None),
    )
    schedule = NoiseSchedule(
        kind="cosine",
        num_steps=100,
        prediction=kwargs.pop("prediction", "eps"),
        min_snr_gamma=kwargs.pop("min_snr_gamma", None),
    )
    opt = functools.partial(torch.optim.AdamW, lr=kwargs.pop("lr", 3e-3))
    return DiffusionModule(model=DiffusionModel(net=net, process=schedule), optimizer=opt, **kwargs)


def _images(n=8):
    """The first n built-in digits at their native 8x8, in [-1, 1]."""
    return DigitsDataModule(image_size=8).load()[0][:n]


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_tiny_model_overfits_a_handful_of_images(prediction):
    torch.manual_seed(0)
    x = _images(4)
    module = _module(prediction=prediction)
    loader = DataLoader(TensorDataset(x, torch.full((4,), -1)), batch_size=4, shuffle=True)
    eval_t = torch.tensor([25, 50, 75, 95])
    eval_noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))

    def fixed_loss():
        module.eval()
        with torch.no_grad():
            return module.model.loss(x, eval_t, eval_noise, None).mean().item()

    before = fixed_loss()
    module.train()
    trainer = L.Trainer(
        max_steps=300,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(module, loader)
    after = fixed_loss()
    assert after < before / 5, (before, after)


def test_images_per_sec_logs_when_an_epoch_is_shorter_than_the_log_period(tmp_path):
    """The built-in digits have 12 batches an epoch and the log period is 25 steps: the rate's clock runs across
    epochs (it reset at every epoch start, and train/images_per_sec was never logged)."""
    import csv

    from lightning.pytorch.loggers import CSVLogger

    x = _images(8)
    loader = DataLoader(TensorDataset(x, torch.full((8,), -1)), batch_size=4)  # 2 batches an epoch
    trainer = L.Trainer(
        max_steps=9,
        accelerator="cpu",
        logger=CSVLogger(tmp_path),
        log_every_n_steps=3,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(_module(), loader)
    with open(Path(trainer.logger.log_dir) / "metrics.csv") as f:
        rates = [float(r["train/images_per_sec"]) for r in csv.DictReader(f) if r.get("train/images_per_sec")]
    assert len(rates) == 2 and all(r > 0 for r in rates)  # steps 6 and 9 (step 3 starts the clock)


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_per_sample_loss_by_hand(prediction):
    """min-SNR-weighted MSE to the target (Hang et al. 2023, gamma = 5), per sample, from the formulas."""
    module = _module(prediction=prediction, min_snr_gamma=5.0)
    _randomize_output(module.model.net)
    g = torch.Generator().manual_seed(0)
    x0, noise = _images(4), torch.randn(4, 1, 8, 8, generator=g)
    t = torch.tensor([0, 20, 60, 99])
    ab = module.model.process.alpha_bar.double()[t].view(-1, 1, 1, 1)
    a, b = ab.sqrt(), (1 - ab).sqrt()
    x_t = (a * x0 + b * noise).float()
    target = {"eps": noise, "x0": x0, "v": a * noise - b * x0}[prediction]
    snr = (ab / (1 - ab)).flatten()
    weight = {"eps": snr.clamp(max=5) / snr, "v": snr.clamp(max=5) / (snr + 1), "x0": snr.clamp(max=5)}[prediction]
    with torch.no_grad():
        expected = (module.model.net(x_t, t).double() - target).square().mean((1, 2, 3)) * weight
        loss = module.model.loss(x0, t, noise, None)
    assert loss.shape == (4,) and loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), expected, rtol=1e-4, atol=0)
    assert weight.min() < 0.5 or prediction == "x0"  # the weights are not all 1
    # under bf16 autocast the network's output is bf16, but the MSE on it is taken in fp32
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = module.model.net(module.model.process.q_sample(x0, t, noise), t)
        low = module.model.loss(x0, t, noise, None)
    assert out.dtype == torch.bfloat16 and low.dtype == torch.float32
    expected = (out.double() - target).square().mean((1, 2, 3)) * weight
    torch.testing.assert_close(low.double(), expected, rtol=1e-4, atol=0)  # bf16 arithmetic: ~1e-2


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_loss_of_a_bf16_cast_model_is_taken_in_fp32(prediction):
    """trainer.precision=bf16-true casts the whole model (no autocast to upcast the MSE): the loss must still be
    fp32 arithmetic on the bf16 output and target, checked against an fp64 reference (bf16 arithmetic: ~1e-2)."""
    module = _module(prediction=prediction, min_snr_gamma=5.0)
    _randomize_output(module.model.net)
    model = module.model.to(torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    x0, noise = _images(4).to(torch.bfloat16), torch.randn(4, 1, 8, 8, generator=g).to(torch.bfloat16)
    t = torch.tensor([0, 20, 60, 99])
    with torch.no_grad():
        out = model.net(*model.process.net_input(model.process.q_sample(x0, t, noise), t))
        target = model.process.target(x0, noise, t)
        loss = model.loss(x0, t, noise)
    assert out.dtype == torch.bfloat16 and loss.dtype == torch.float32  # (v: the target is fp32 already)
    weight = model.process.loss_weight(t).double()
    expected = (out.double() - target.double()).square().flatten(1).mean(1) * weight
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=0)


def test_training_step_draws_t_uniformly_from_0_to_T(monkeypatch):
    module = _module()
    seen = []
    original = DiffusionModel.loss

    def spy(self, x0, t, noise, cond=None, **kwargs):
        seen.append(t)
        return original(self, x0, t, noise, cond, **kwargs)

    monkeypatch.setattr(DiffusionModel, "loss", spy)
    torch.manual_seed(0)
    x = _images(64)
    for _ in range(20):
        module.training_step((x, torch.full((64,), -1)), 0)
    t = torch.cat(seen)  # 1280 draws from T = 100 timesteps
    assert t.dtype == torch.long and t.min() == 0 and t.max() == 99
    assert torch.bincount(t, minlength=100).min() >= 3  # every timestep, no gaps


TINY_DIFFUSERS_UNET = [
    "model=diffusers_unet",
    "model.unet.block_out_channels=[8,16]",
    "model.unet.layers_per_block=1",
    "model.unet.norm_num_groups=4",
    "model.unet.attention_head_dim=8",
    "model.unet.down_block_types=[DownBlock2D,DownBlock2D]",
    "model.unet.up_block_types=[UpBlock2D,UpBlock2D]",
]


@pytest.mark.parametrize(
    "model",
    [
        pytest.param(TINY_DIFFUSERS_UNET, id="diffusers_unet"),
        pytest.param([], id="unet"),
    ],
)
def test_bf16_true_training_keeps_the_schedule_in_fp32(tmp_path, monkeypatch, model):
    """trainer.precision=bf16-true casts the whole module to bfloat16; the schedule's tables must stay fp32."""
    seen = []
    original = DiffusionModel.loss

    def spy(self, x0, t, noise, cond=None, **kwargs):
        loss = original(self, x0, t, noise, cond, **kwargs)
        net_dtype = next(self.net.parameters()).dtype
        seen.append((net_dtype, x0.dtype, self.process.alpha_bar, self.process.loss_weight(t), t, loss.dtype))
        return loss

    monkeypatch.setattr(DiffusionModel, "loss", spy)
    cfg, _ = run_train(tmp_path / "run", ["trainer.precision=bf16-true", "process.min_snr_gamma=5", *model])
    reference = instantiate(cfg.process)
    assert seen
    for net_dtype, x_dtype, alpha_bar, weight, t, loss_dtype in seen:
        assert net_dtype == torch.bfloat16 and x_dtype == torch.bfloat16  # the cast did happen
        assert torch.equal(alpha_bar, reference.alpha_bar) and torch.equal(weight, reference.loss_weight(t))
        assert loss_dtype == torch.float32


def test_validation_loss_is_reproducible():
    module = _module()
    x = _images(16)
    batch = (x, torch.full((16,), -1))

    def val():
        module.validation_step(batch, 0)
        loss = module.val_loss.compute().item()
        module.val_loss.reset()
        return loss

    assert val() == val()


def test_label_dropout_and_missing_labels():
    module = _module(num_classes=3, cond_drop_prob=1.0)
    y = torch.tensor([0, 1, 2, 1])
    conditioning = module.model.conditioning
    assert (conditioning(y, device=y.device, drop_prob=module.cond_drop_prob)["y"] == 3).all()
    assert (conditioning(y, device=y.device)["y"] == y).all()
    with pytest.raises(ValueError, match="no class labels"):
        conditioning(torch.tensor([-1, -1]), device=y.device, drop_prob=module.cond_drop_prob)


def test_warmup_then_cosine_decay():
    module = _module(warmup_steps=10, lr_decay="cosine")
    trainer = L.Trainer(max_steps=110, logger=False)
    module.trainer = trainer
    assert module.lr_factor(0) == pytest.approx(0.1)
    assert module.lr_factor(9) == pytest.approx(1.0)
    assert module.lr_factor(60) == pytest.approx(0.5)
    assert module.lr_factor(110) == pytest.approx(0.0, abs=1e-9)
    assert _module(warmup_steps=0).lr_factor(1000) == 1.0


def test_bad_options():
    with pytest.raises(ValueError, match="lr_decay"):
        _module(lr_decay="linear")
    with pytest.raises(ValueError, match="cond_drop_prob"):
        _module(cond_drop_prob=2.0)
