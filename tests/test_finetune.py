"""init_from: exact weights, fresh optimizer at step 0, across datasets, partial loading; digits_cond labels."""

from pathlib import Path

import lightning as L
import pytest
import torch

from diffusion.checkpoint import NET_PREFIX, net_state_dict, read_checkpoint
from diffusion.finetune import init_from_checkpoint, matches
from diffusion.networks import build_net
from diffusion.unet import UNet
from tests.conftest import compose_train, run_cli, run_train, write_image

QUIET = ["callbacks.sample_grid.every_n_steps=0", "trainer.max_steps=2", "+trainer.limit_val_batches=1"]
PROBE = "+callbacks.probe._target_=tests.test_finetune.Probe"


class Probe(L.Callback):
    """Records what a run starts from: step, optimizer state, net weights, the EMA hook, and training labels."""

    last: "Probe | None" = None

    def __init__(self) -> None:
        Probe.last = self
        self.labels: list[torch.Tensor] = []

    def on_train_start(self, trainer, pl_module) -> None:
        self.start_step = trainer.global_step
        self.optimizer_state = dict(trainer.optimizers[0].state)
        self.weights = {k: v.detach().clone() for k, v in pl_module.model.net.state_dict().items()}
        self.ema_init_state = pl_module.ema_init_state

        def record(module, args, kwargs):
            y = args[2] if len(args) > 2 else kwargs.get("y")
            if module.training and y is not None:
                self.labels.append(y.detach().cpu())

        pl_module.model.net.register_forward_pre_hook(record, with_kwargs=True)


def folder(root: Path, n: int, seed: int) -> Path:
    for i in range(n):
        write_image(root / f"img{i}.png", (20, 20), "RGB", seed=seed + i)
    return root


def folder_run(data: Path) -> list[str]:
    return ["data=folder", f"data.path={data}", "data.image_size=16", "data.batch_size=4", "data.num_workers=0"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    """A tiny unconditional U-Net pretrained for 2 steps on one folder of RGB images."""
    tmp = tmp_path_factory.mktemp("pre")
    run = tmp / "run"
    run_train(run, [*folder_run(folder(tmp / "a", 8, 0)), *QUIET])
    return run


def test_init_from_loads_exact_weights_fresh_optimizer_step0_other_dataset(tmp_path, pretrained):
    run = tmp_path / "ft"
    data_b = folder(tmp_path / "b", 8, 100)  # another dataset, same architecture
    run_train(run, [*folder_run(data_b), *QUIET, f"init_from={pretrained}", "optim.lr=1e-3", PROBE])
    probe = Probe.last
    assert probe.start_step == 0 and probe.optimizer_state == {}  # a new run, not a resume
    source, weights = net_state_dict(read_checkpoint(pretrained / "checkpoints" / "last.ckpt"))
    assert weights == "ema" and set(probe.weights) == set(source)  # the default callbacks keep an EMA; it is preferred
    for k, v in source.items():
        torch.testing.assert_close(probe.weights[k], v, rtol=0, atol=0)
        torch.testing.assert_close(probe.ema_init_state[k], v, rtol=0, atol=0)  # the EMA hook
    after = read_checkpoint(run / "checkpoints" / "last.ckpt")
    assert after["global_step"] == 2  # counted from 0, not from the pretrained run's step 2
    assert any(not torch.equal(after["state_dict"][NET_PREFIX + k], v) for k, v in source.items())  # it trained


def test_init_from_prefers_ema_weights_and_ema_from_init_off(tmp_path, pretrained):
    ckpt = read_checkpoint(pretrained / "checkpoints" / "last.ckpt")
    raw, _ = net_state_dict(ckpt, use_ema=False)
    ckpt["ema_state_dict"] = {k: v + 1 for k, v in raw.items()}
    path = tmp_path / "with_ema.ckpt"
    torch.save(ckpt, path)
    net = build_net(ckpt["diffusion"]["net"])
    report = init_from_checkpoint(net, path)
    assert report.weights == "ema" and len(report.loaded) == len(raw)
    torch.testing.assert_close(net.conv_in.weight, raw["conv_in.weight"] + 1, rtol=0, atol=0)
    report = init_from_checkpoint(net, path, use_ema=False)
    torch.testing.assert_close(net.conv_in.weight, raw["conv_in.weight"], rtol=0, atol=0)
    run_train(
        tmp_path / "run",
        [*QUIET, "trainer.max_steps=1", "data.channels=3", f"init_from={path}", "init.ema_from_init=false", PROBE],
    )
    assert Probe.last.ema_init_state is None
    torch.testing.assert_close(Probe.last.weights["conv_in.weight"], raw["conv_in.weight"] + 1, rtol=0, atol=0)


def _tiny(**kw) -> UNet:
    cfg = dict(
        in_channels=3,
        image_size=16,
        base_channels=8,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attention_resolutions=(),
        attention_head_dim=8,
        norm_groups=4,
        scale_shift_norm=True,
    )
    return UNet(**{**cfg, **kw})


def test_partial_loading_ignore_keys_and_mismatch_report(pretrained):
    path = pretrained / "checkpoints" / "last.ckpt"
    source, _ = net_state_dict(read_checkpoint(path))
    # unconditional checkpoint -> conditional net: the label embedding is missing
    with pytest.raises(ValueError, match=r"1 missing from the checkpoint \(label_emb.weight\).*init.strict=false"):
        init_from_checkpoint(_tiny(num_classes=2), path)
    net = _tiny(num_classes=2)
    fresh = net.label_emb.weight.detach().clone()
    report = init_from_checkpoint(net, path, strict=False)
    assert report.missing == ["label_emb.weight"] and len(report.loaded) == len(source)
    torch.testing.assert_close(net.label_emb.weight, fresh, rtol=0, atol=0)  # kept its fresh initialisation
    torch.testing.assert_close(net.time_mlp[0].weight, source["time_mlp.0.weight"], rtol=0, atol=0)
    assert "left at their fresh initialisation: 1 missing" in report.summary()
    # ... or say so up front: strict loading of everything else
    report = init_from_checkpoint(_tiny(num_classes=2), path, ignore_keys=["label_emb"])
    assert report.ignored == ["label_emb.weight"] and report.problems() == ""
    # grayscale net from an RGB checkpoint: shape mismatches listed with both shapes
    with pytest.raises(ValueError) as err:
        init_from_checkpoint(_tiny(in_channels=1), path)
    assert "3 shape mismatches (conv_in.weight: checkpoint [8, 3, 3, 3] vs model [8, 1, 3, 3]" in str(err.value)
    assert "conv_out.weight: checkpoint [3, 8, 3, 3] vs model [1, 8, 3, 3]" in str(err.value)
    net = _tiny(in_channels=1)
    report = init_from_checkpoint(net, path, ignore_keys=["conv_in.*", "conv_out"])
    assert set(report.ignored) == {"conv_in.weight", "conv_in.bias", "conv_out.weight", "conv_out.bias"}
    report = init_from_checkpoint(_tiny(in_channels=1), path, strict=False)
    assert [m[0] for m in report.mismatched] == ["conv_in.weight", "conv_out.weight", "conv_out.bias"]
    # a different architecture altogether shares nothing
    with pytest.raises(ValueError, match="shares no tensor"):
        init_from_checkpoint(torch.nn.Linear(2, 2), path, strict=False)


def test_key_patterns():
    assert matches("label_emb.weight", ["label_emb"]) and matches("label_emb.weight", ["label_emb."])
    assert matches("down.0.0.conv1.weight", ["down.*.conv1.*"]) and not matches("label_embx.weight", ["label_emb"])


def test_bad_init_from_through_train(tmp_path, pretrained):
    with pytest.raises(ValueError, match=r"does not fit the model: .*shape mismatches \(conv_in.weight"):
        run_train(tmp_path / "a", [*QUIET, "data.channels=1", f"init_from={pretrained}"])
    with pytest.raises(ValueError, match="exclude each other"):
        run_train(tmp_path / "b", [*QUIET, f"init_from={pretrained}", f"ckpt_path={pretrained}"])
    with pytest.raises(ValueError, match="init_from is required"):
        run_train(tmp_path / "c", [*QUIET, "experiment=finetune"])
    # the command line: one line, exit 1
    result = run_cli("train.py", f"init_from={tmp_path}/missing.ckpt", f"hydra.run.dir={tmp_path}/d", "logger=none")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: init_from={tmp_path}/missing.ckpt: {tmp_path}/missing.ckpt does not exist"
    )


def test_finetune_experiment_composes(tmp_path):
    cfg = compose_train(tmp_path / "run", ["experiment=finetune", "init_from=x.ckpt"], tiny=False)
    assert cfg.init_from == "x.ckpt" and cfg.optim.lr == 2e-4 and cfg.optim.warmup_steps == 20
    assert cfg.init.strict is True and cfg.init.ignore_keys == [] and cfg.init.ema_from_init is True
    assert cfg.init.required is True


def test_digits_cond_trains_with_labels_and_dropout(tmp_path):
    cfg = compose_train(tmp_path / "c", ["experiment=digits_cond"], tiny=False)
    assert (
        cfg.model.num_classes == 10
        and cfg.module.cond_drop_prob == 0.1
        and cfg.data._target_.endswith("DigitsDataModule")
    )
    run = tmp_path / "run"
    run_train(
        run,
        [
            "experiment=digits_cond",
            "model=unet_tiny",
            "model.num_classes=10",
            *QUIET,
            "trainer.max_steps=4",
            "data.batch_size=64",
            PROBE,
        ],
    )
    labels = torch.cat(Probe.last.labels)
    assert labels.numel() == 4 * 64 and labels.min() >= 0 and labels.max() <= 10
    dropped = (labels == 10).float().mean().item()
    assert 0.02 < dropped < 0.25  # cond_drop_prob=0.1 of the labels go to the null class 10
    assert len(labels[labels < 10].unique()) == 10
    net = build_net(read_checkpoint(run / "checkpoints" / "last.ckpt")["diffusion"]["net"])
    assert net.num_classes == 10 and net.label_emb.num_embeddings == 11
