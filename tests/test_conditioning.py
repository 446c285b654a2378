"""The conditioning seam: captioned data (digits, folders), the config groups, and text-to-image end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hydra.utils import instantiate

from diffusion.checkpoint import CONDITIONING_PREFIX, read_checkpoint
from diffusion.conditioning import ClassConditioning, NoConditioning, TextConditioning
from diffusion.data import DigitsDataModule, ImageFolderDataModule
from diffusion.data.base import Captioned
from diffusion.errors import PathExistsError
from tests.conftest import compose_train, run_train, write_image
from tests.test_sample_cli import sample_in_process


def _folder(tmp_path, names=("a.png", "b.png", "sub/c.png")):
    root = tmp_path / "images"
    for i, name in enumerate(names):
        write_image(root / name, (16, 16), seed=i)
    return root


def _captions(root, **kwargs) -> dict[str, list[str]]:
    """Every caption each image gets over 30 epochs, by file name."""
    dm = ImageFolderDataModule(
        path=str(root), image_size=8, batch_size=1, val_fraction=0.0, num_workers=0, flip=False, **kwargs
    )
    dm.setup("fit")
    seen: dict[str, set[str]] = {}
    for epoch in range(30):
        dm.train_set.set_epoch(epoch)
        for i, f in enumerate(dm.train_set.dataset.files):
            seen.setdefault(f.name, set()).add(dm.train_set[i][1])
    return {k: sorted(v) for k, v in seen.items()}


def test_metadata_jsonl_with_several_captions_and_csv(tmp_path):
    root = _folder(tmp_path)
    rows = [
        {"file_name": "a.png", "text": "a red square"},
        {"file_name": "b.png", "text": ["a blue square", "blue"]},  # several captions
    ]
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (root / "sub" / "metadata.csv").write_text('file_name,caption\nc.png,"green, small"\n')
    with pytest.raises(ValueError, match=r"metadata.csv needs the columns file_name and text"):
        _captions(root, captions=True)
    (root / "sub" / "metadata.csv").write_text('file_name,text\nc.png,"green, small"\n')
    assert _captions(root, captions=True) == {
        "a.png": ["a red square"],
        "b.png": ["a blue square", "blue"],  # both drawn over the epochs
        "c.png": ["green, small"],
    }
    (root / "metadata.jsonl").write_text("\n".join(json.dumps({**r, "caption": "x"}) for r in rows))
    (root / "sub" / "metadata.csv").write_text('file_name,caption\nc.png,"y"\n')
    assert _captions(root, captions=True, caption_column="caption") == {"a.png": ["x"], "b.png": ["x"], "c.png": ["y"]}


def test_metadata_with_a_bom_and_not_utf8(tmp_path):
    """A BOM at the start of metadata.jsonl / metadata.csv / a .txt caption (Excel, Notepad) is not part of the first
    row: no 'row 1 ... is not a JSON object'; a file in another encoding is one line naming it."""
    from diffusion.errors import BadFileError

    root = _folder(tmp_path)
    rows = [{"file_name": "a.png", "text": "a red square"}, {"file_name": "b.png", "text": "blue"}]
    (root / "metadata.jsonl").write_bytes(("\ufeff" + "".join(json.dumps(r) + "\n" for r in rows)).encode())
    (root / "sub" / "metadata.csv").write_bytes('\ufefffile_name,text\nc.png,"green, small"\n'.encode())
    assert _captions(root, captions=True) == {"a.png": ["a red square"], "b.png": ["blue"], "c.png": ["green, small"]}
    (root / "sub" / "metadata.csv").write_bytes('file_name,text\nc.png,"caf\xe9"\n'.encode("latin-1"))
    with pytest.raises(BadFileError, match=r"metadata.csv is not UTF-8 text \(byte 0xe9 at offset 25\)"):
        _captions(root, captions=True)
    for meta in (root / "metadata.jsonl", root / "sub" / "metadata.csv"):
        meta.unlink()
    for name, text in (("a.txt", "a red square"), ("b.txt", "blue"), ("sub/c.txt", "green")):
        (root / name).write_bytes(("\ufeff" + text).encode())
    assert _captions(root, captions=True) == {"a.png": ["a red square"], "b.png": ["blue"], "c.png": ["green"]}


def test_sidecar_txt_and_fixed_caption(tmp_path):
    root = _folder(tmp_path)
    (root / "a.txt").write_text("first line\n\nsecond line\n")
    (root / "b.txt").write_text("only one")
    (root / "sub" / "c.txt").write_text("nested\n")
    assert _captions(root, captions=True) == {
        "a.png": ["first line", "second line"],
        "b.png": ["only one"],
        "c.png": ["nested"],
    }
    fixed = _captions(root, caption="a photo of sks dog")
    assert set(map(tuple, fixed.values())) == {("a photo of sks dog",)}
    dm = ImageFolderDataModule(
        path=str(root), image_size=8, batch_size=3, val_fraction=0.0, num_workers=0, captions=True
    )
    dm.setup("fit")
    x, captions = next(iter(dm.train_dataloader()))  # the default loader keeps the captions as strings
    assert x.shape == (3, 3, 8, 8) and all(isinstance(c, str) for c in captions)
    assert sorted(dm.caption_corpus()) == ["first line", "nested", "only one", "second line"]


@pytest.mark.parametrize(
    "rows, message",
    [
        ([{"file_name": "missing.png", "text": "x"}], "names missing.png, which does not exist"),
        ([{"file_name": "b.png", "text": "  "}], "has an empty caption"),
        ([{"file_name": "notes.txt", "text": "x"}], "names notes.txt, which is not an image"),
        ([{"text": "x"}], "has no file_name"),
    ],
)
def test_bad_metadata_rows_are_named_or_skipped(tmp_path, rows, message):
    root = _folder(tmp_path, names=("a.png", "b.png"))
    good = [{"file_name": "a.png", "text": "fine"}]
    if not any(r.get("file_name") == "b.png" for r in rows):
        good.append({"file_name": "b.png", "text": "fine too"})
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in [*good, *rows]))
    with pytest.raises(ValueError, match=message + r".*set data.skip_bad=true"):
        _captions(root, captions=True)
    kept = _captions(root, captions=True, skip_bad=True)
    assert kept["a.png"] == ["fine"] and ("b.png" in kept) == (message != "has an empty caption")


def test_images_without_captions_and_conflicting_options(tmp_path):
    root = _folder(tmp_path, names=("a.png", "b.png"))
    with pytest.raises(ValueError, match="no metadata.jsonl / metadata.csv and no .txt captions"):
        _captions(root, captions=True)
    (root / "a.txt").write_text("only a")
    with pytest.raises(ValueError, match=r"b.png has no caption file b.txt"):
        _captions(root, captions=True)
    assert _captions(root, captions=True, skip_bad=True) == {"a.png": ["only a"]}
    with pytest.raises(ValueError, match="exclude each other"):
        ImageFolderDataModule(path=str(root), labels=True, captions=True)
    with pytest.raises(ValueError, match="data.caption is empty"):
        ImageFolderDataModule(path=str(root), caption=" ")


def test_the_documented_one_caption_override_runs(tmp_path):
    """README / docs/finetune.md: `experiment=sd_lora data.caption="a photo of sks dog"`; the experiment sets
    captions=true, and the one caption given on the command line wins over the folder's caption files."""
    root = _folder(tmp_path, names=("a.png", "b.png"))
    (root / "a.txt").write_text("its own caption")
    cfg = compose_train(
        tmp_path / "run",
        ["experiment=sd_lora", f"data.path={root}", 'data.caption="a photo of sks dog"'],
        tiny=False,
    )
    assert cfg.data.captions is True
    seen = _captions(root, captions=cfg.data.captions, caption=cfg.data.caption)
    assert seen == {"a.png": ["a photo of sks dog"], "b.png": ["a photo of sks dog"]}


def test_digit_captions_are_per_epoch_and_seeded():
    dm = DigitsDataModule(captions=True, batch_size=8)
    dm.setup("fit")
    assert dm.num_classes is None and dm.captioned
    x, captions = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 1, 16, 16) and len(captions) == 8 and all(isinstance(c, str) for c in captions)
    captioned = dm.train_set.dataset
    assert isinstance(captioned, Captioned)
    picks = []
    for epoch in (0, 1, 0):
        captioned.set_epoch(epoch)
        picks.append(captioned.pick(range(50)))
    assert picks[0] == picks[2] != picks[1]  # a function of (seed, epoch, item): a resumed epoch draws alike
    label = int(captioned.dataset[3][1])
    assert captioned.pick([3])[0] in captioned.captions[3] and "the digit " + str(label) in captioned.captions[3]
    assert DigitsDataModule().num_classes == 10  # unchanged without captions


def test_conditioning_groups_compose(tmp_path):
    def built(*overrides):
        cfg = compose_train(tmp_path / "run", list(overrides), tiny=False)
        return cfg, instantiate(cfg.conditioning)

    assert isinstance(built()[1], NoConditioning)
    cfg, cond = built("experiment=digits_cond")
    assert isinstance(cond, ClassConditioning) and cond.num_classes == 10
    cfg, cond = built("experiment=digits_text")
    assert isinstance(cond, TextConditioning) and cfg.model.context_dim == cond.dim == 64
    assert cfg.data.captions is True and cond.encoder.trainable
    with pytest.raises(ValueError, match="conditioning=text needs captioned data"):
        run_train(tmp_path / "nocaps", ["conditioning=text"])
    with pytest.raises(ValueError, match="conditioning=none but the network is class-conditional"):
        run_train(tmp_path / "mismatch", ["conditioning=none", "model.num_classes=10"])
    with pytest.raises(ValueError, match="set model.context_dim=128"):
        run_train(tmp_path / "dim", ["conditioning=text", "data.captions=true", "model.context_dim=8"])


TEXT = [
    "experiment=digits_text",
    "model=unet_tiny",
    "model.attention_resolutions=[8]",
    "conditioning.encoder.dim=16",
    "conditioning.encoder.depth=1",
    "conditioning.preview_prompts=[a 1,a 7]",
    "callbacks.sample_grid.num_images=4",
    "trainer.max_steps=4",
]


@pytest.mark.slow
def test_digits_text_trains_samples_with_prompts_and_resumes(tmp_path):
    run = tmp_path / "run"
    run_train(run, TEXT)
    ckpt = read_checkpoint(run / "checkpoints" / "last.ckpt")
    description = ckpt["diffusion"]["conditioning"]
    assert description["target"] == "diffusion.conditioning.TextConditioning"
    assert description["config"]["preview_prompts"] == ["a 1", "a 7"]
    assert any(k.startswith(CONDITIONING_PREFIX + "encoder.layers.") for k in ckpt["state_dict"])  # trained jointly
    assert (
        "the"
        in json.loads(ckpt["state_dict"][CONDITIONING_PREFIX + "encoder._extra_state"]["tokenizer"])["model"]["vocab"]
    )
    assert (run / "samples" / "step_000004.png").is_file()
    # sample.py: a prompt, a negative prompt and guidance; a prompt file gives one row per prompt
    sample_in_process(tmp_path / "one", f"ckpt={run}", "prompt=a handwritten seven", "negative_prompt=a 1",
                      "guidance=3", "n=2", "sampler.steps=2", "npz=true")  # fmt: skip
    assert np.load(tmp_path / "one" / "samples.npz")["arr_1"].tolist() == ["a handwritten seven"] * 2
    # images/ holds each image's prompt (metadata.jsonl): it is a captioned folder (prior-preservation images)
    folder = ImageFolderDataModule(
        path=str(tmp_path / "one" / "images"), image_size=16, channels=1, batch_size=2, val_fraction=0.0,
        num_workers=0, captions=True,
    )  # fmt: skip
    assert folder.caption_corpus() == ["a handwritten seven"] * 2
    with pytest.raises(PathExistsError, match="images/metadata.jsonl"):  # kept unless overwrite=true
        sample_in_process(tmp_path / "one", f"ckpt={run}", "prompt=a 1", "n=1", "sampler.steps=2")
    (tmp_path / "prompts.txt").write_text("a handwritten seven\n\nthe digit 1\n")
    sample_in_process(tmp_path / "file", f"ckpt={run}", f"prompts={tmp_path}/prompts.txt", "n=3", "sampler.steps=2")
    assert len(list((tmp_path / "file" / "images").glob("*.png"))) == 6
    with pytest.raises(ValueError, match="label=... is for class-conditional models"):
        sample_in_process(tmp_path / "bad", f"ckpt={run}", "label=3")
    with pytest.raises(ValueError, match="guidance=3.0 needs a prompt"):
        sample_in_process(tmp_path / "bad", f"ckpt={run}", "guidance=3.0")
    # resume: the tokenizer and the encoder come back from the checkpoint, and training goes on
    run_train(run, [*TEXT, "trainer.max_steps=6", f"ckpt_path={run}"])
    resumed = read_checkpoint(run / "checkpoints" / "last.ckpt")
    assert resumed["global_step"] == 6
    assert (
        resumed["state_dict"][CONDITIONING_PREFIX + "encoder._extra_state"]
        == ckpt["state_dict"][CONDITIONING_PREFIX + "encoder._extra_state"]
    )
    assert not torch.equal(
        resumed["state_dict"][CONDITIONING_PREFIX + "encoder.token_emb.weight"],
        ckpt["state_dict"][CONDITIONING_PREFIX + "encoder.token_emb.weight"],
    )


@pytest.mark.slow
def test_text_lora_trains_adapters_and_new_words_only(tmp_path, caplog):
    """finetune=lora on a digits_text model, with captions holding new words: the adapters and the new words'
    embeddings train, nothing else; the checkpoint carries the grown tokenizer, so the old captions encode as the
    base's did and sample.py reads the new words; a resume puts the new words back into training."""
    from diffusion.model import DiffusionModel

    base = tmp_path / "base"
    run_train(base, TEXT)
    images = tmp_path / "inverted"
    for i in range(6):
        write_image(images / f"{i}.png", (16, 16), mode="L", seed=i)
    rows = [{"file_name": f"{i}.png", "text": f"an inverted {['one', 'seven'][i % 2]}"} for i in range(6)]
    (images / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = tmp_path / "lora"
    overrides = [*TEXT, f"init_from={base}", "finetune=lora", "finetune.rank=2", "data=folder", f"data.path={images}",
                 "data.captions=true", "data.image_size=16", "data.channels=1", "data.flip=false",
                 "data.val_fraction=0.34", "data.num_workers=0", "data.batch_size=2", "optim.lr=1e-2"]  # fmt: skip
    run_train(run, overrides)
    ckpt, base_ckpt = (read_checkpoint(r / "checkpoints" / "last.ckpt") for r in (run, base))
    vocab = json.loads(ckpt["state_dict"][CONDITIONING_PREFIX + "encoder._extra_state"]["tokenizer"])["model"]["vocab"]
    new_ids = [vocab["an"], vocab["inverted"]]
    # 1. trained: the adapters and the two new rows of the embedding table; the rest of the encoder is the base's
    table, base_table = (c["state_dict"][CONDITIONING_PREFIX + "encoder.token_emb.weight"] for c in (ckpt, base_ckpt))
    assert not torch.equal(table[new_ids], base_table[new_ids])
    others = [i for i in range(len(table)) if i not in new_ids]
    assert torch.equal(table[others], base_table[others])
    for key, value in ckpt["state_dict"].items():
        if key.startswith(CONDITIONING_PREFIX + "encoder.") and "token_emb" not in key and "_extra_state" not in key:
            assert torch.equal(value, base_ckpt["state_dict"][key]), key
    adapters = [k for k in ckpt["state_dict"] if ".lora_" in k]
    assert sum(len(g["params"]) for g in ckpt["optimizer_states"][0]["param_groups"]) == len(adapters) + 1
    # 2. rebuilt from the checkpoint: old captions encode exactly as the base's; the new words are known words
    lora = DiffusionModel.from_checkpoint(run / "checkpoints" / "last.ckpt")
    plain = DiffusionModel.from_checkpoint(base / "checkpoints" / "last.ckpt")
    old = ["a handwritten seven", "the digit 1", ""]
    for a, b in zip(lora.conditioning(old).values(), plain.conditioning(old).values(), strict=True):
        assert torch.equal(a, b)
    with caplog.at_level("WARNING"):
        lora.conditioning(["an inverted seven"])
    assert not [r for r in caplog.records if "not in the text encoder's vocabulary" in r.getMessage()]
    # 3. resume: the new words train on from the checkpoint's rows
    run_train(run, [*overrides, "trainer.max_steps=6", f"ckpt_path={run}"])
    resumed = read_checkpoint(run / "checkpoints" / "last.ckpt")
    assert resumed["global_step"] == 6
    moved = resumed["state_dict"][CONDITIONING_PREFIX + "encoder.token_emb.weight"]
    assert not torch.equal(moved[new_ids], table[new_ids]) and torch.equal(moved[others], base_table[others])


@pytest.mark.slow
def test_clip_conditioning_trains_and_samples_from_the_named_folder(tmp_path):
    from tests.test_text import save_tiny_clip

    folder = save_tiny_clip(tmp_path / "clip")
    run = tmp_path / "run"
    overrides = ["conditioning=clip", f"conditioning.encoder.pretrained={folder}", "model.context_dim=32",
                 "data.captions=true", "trainer.max_steps=2"]  # fmt: skip
    run_train(run, overrides)
    ckpt = read_checkpoint(run / "checkpoints" / "last.ckpt")
    assert not any(k.startswith("conditioning.") for k in ckpt["state_dict"])  # named by path, not copied
    assert ckpt["diffusion"]["conditioning"]["config"]["encoder"]["config"]["pretrained"] == str(folder)
    sample_in_process(
        tmp_path / "s", f"ckpt={run}", "prompt=a handwritten seven", "n=2", "sampler.steps=2", "guidance=2"
    )
    moved = folder.rename(tmp_path / "moved")
    with pytest.raises(FileNotFoundError, match="text encoder folder"):
        sample_in_process(tmp_path / "s2", f"ckpt={run}", "prompt=a 1", "n=1", "sampler.steps=2")
    sample_in_process(tmp_path / "s3", f"ckpt={run}", "prompt=a 1", "n=1", "sampler.steps=2", f"text_encoder={moved}")
