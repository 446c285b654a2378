"""The diffusers UNet2DModel adapter: the net(x_t, t, y) contract, rebuilding from its config, pretrained loading."""

from pathlib import Path

import pytest
import torch
from diffusers import UNet2DModel  # a dev dependency: its absence is a failure, not a skip

from diffusion.diffusers_unet import DiffusersUNet

TINY_UNET = dict(
    block_out_channels=[8, 16],
    layers_per_block=1,
    norm_num_groups=4,
    down_block_types=["DownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "UpBlock2D"],
)


def save_tiny_unet(folder: Path, in_channels: int = 1, **kw) -> UNet2DModel:
    """A tiny UNet2DModel written with save_pretrained, as a pretrained model on disk would be."""
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=16, in_channels=in_channels, out_channels=in_channels, **TINY_UNET, **kw)
    unet.save_pretrained(str(folder))
    return unet


def test_forward_null_class_and_rebuild_from_config():
    torch.manual_seed(0)
    net = DiffusersUNet(image_size=16, in_channels=1, num_classes=3, unet=TINY_UNET)
    assert net.unet.class_embedding.num_embeddings == 4  # K + 1: the last is the null class
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([3, 40])
    out = net(x, t, torch.tensor([0, 2]))
    assert out.shape == x.shape
    # y=None is the null class; the adapter output is UNet2DModel's for the same inputs
    torch.testing.assert_close(net(x, t), net.unet(x, t, class_labels=torch.tensor([3, 3])).sample)
    assert not torch.allclose(net(x, t), out)
    # the config is plain values and rebuilds the same network (what checkpoints rely on)
    assert net.config["pretrained"] is None and net.config["unet"]["block_out_channels"] == [8, 16]
    twin = DiffusersUNet(**net.config)
    twin.load_state_dict(net.state_dict())
    torch.testing.assert_close(twin(x, t, torch.tensor([1, 0])), net(x, t, torch.tensor([1, 0])), rtol=0, atol=0)
    unconditional = DiffusersUNet(image_size=16, in_channels=1, unet=TINY_UNET)
    with pytest.raises(ValueError, match="unconditional model"):
        unconditional(x, t, torch.tensor([0, 1]))


def test_pretrained_local_folder_model_and_pipeline_layouts(tmp_path):
    unet = save_tiny_unet(tmp_path / "model")
    x, t = torch.randn(1, 1, 16, 16), torch.tensor([7])
    expected = unet(x, t).sample
    net = DiffusersUNet(image_size=16, in_channels=1, pretrained=str(tmp_path / "model"), unet={"ignored": 1})
    torch.testing.assert_close(net(x, t), expected, rtol=0, atol=0)
    save_tiny_unet(tmp_path / "pipe" / "unet")  # a DDPMPipeline folder keeps the U-Net in unet/
    net = DiffusersUNet(image_size=32, in_channels=1, pretrained=str(tmp_path / "pipe"))
    assert net.unet.config.sample_size == 32  # follows the training resolution
    torch.testing.assert_close(net(x, t), expected, rtol=0, atol=0)  # convolutional: same weights, same output
    # a pretrained unconditional U-Net fine-tuned class-conditionally gets a new label embedding
    net = DiffusersUNet(image_size=16, in_channels=1, num_classes=10, pretrained=str(tmp_path / "model"))
    assert net.unet.class_embedding.num_embeddings == 11
    torch.testing.assert_close(net.unet.conv_in.weight, unet.conv_in.weight, rtol=0, atol=0)


def test_pretrained_errors(tmp_path, monkeypatch):
    save_tiny_unet(tmp_path / "model")
    with pytest.raises(ValueError, match=r"takes in_channels=1 but the data has 3 \(data.channels\)"):
        DiffusersUNet(image_size=16, in_channels=3, pretrained=str(tmp_path / "model"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no config.json"):
        DiffusersUNet(image_size=16, in_channels=1, pretrained=str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="is not a folder written by save_pretrained"):
        DiffusersUNet(image_size=16, in_channels=1, pretrained=str(tmp_path / "missing"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match=r"model.pretrained=google/ddpm-cifar10-32: could not load .*offline"):
        DiffusersUNet(image_size=32, pretrained="google/ddpm-cifar10-32")
    with pytest.raises(ValueError, match="model.image_size=18 must be divisible by 2"):
        DiffusersUNet(
            image_size=18,
            in_channels=1,
            unet={
                **TINY_UNET,
                "block_out_channels": [8, 8, 16],
                "down_block_types": ["DownBlock2D"] * 3,
                "up_block_types": ["UpBlock2D"] * 3,
            },
        )
    with pytest.raises(ValueError, match="learned-variance"):
        DiffusersUNet(image_size=16, in_channels=1, unet={**TINY_UNET, "out_channels": 2})
