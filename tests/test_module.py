"""DiffusionModule: the objective, learning, fixed-seed validation, learning-rate schedule."""

import functools

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from diffusion.data import DigitsDataModule
from diffusion.module import DiffusionModule
from diffusion.schedule import NoiseSchedule
from diffusion.unet import UNet


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
    schedule = NoiseSchedule(kind="cosine", num_steps=100, prediction=kwargs.pop("prediction", "eps"))
    opt = functools.partial(torch.optim.AdamW, lr=kwargs.pop("lr", 3e-3))
    return DiffusionModule(net=net, schedule=schedule, optimizer=opt, **kwargs)


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
            return module.per_sample_loss(x, eval_t, eval_noise, None).mean().item()

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
    assert (module._labels(y, train=True) == 3).all()
    assert (module._labels(y, train=False) == y).all()
    with pytest.raises(ValueError, match="no class labels"):
        module._labels(torch.tensor([-1, -1]), train=True)


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
