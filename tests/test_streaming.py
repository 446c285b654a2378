"""Streaming shards (`data=shards`) and Hugging Face datasets (`data=hf`): every sample once per epoch across ranks
and loader workers, seeded shuffles, exact mid-epoch resume, the shard writer (round trip, determinism, atomicity,
overwrite refusal), no credentials in configs, reading over HTTP, and train.py end to end (one 2-process DDP run)."""

from __future__ import annotations

import functools
import http.server
import json
import os
import shutil
import threading
from pathlib import Path

import lightning as L
import pytest
import torch

from diffusion.data import HFDataModule, ImageFolderDataModule, ShardDataModule
from diffusion.data.shards import INDEX, ShardLoader, ShardStream, main, write_shards
from diffusion.errors import BadFileError, ConfigError, MissingPathError, PathExistsError, user_error_message
from tests.conftest import TINY, run_cli, run_train, write_image
from tests.test_files import deadline
from tests.test_safety import one_line_error, snapshot

NO_GRIDS = ["callbacks.sample_grid.every_n_steps=0"]


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    yield
    torch.set_num_threads(threads)


def make_folder(root: Path, n: int, *, classes: int = 2, size=(20, 18)) -> Path:
    """n RGB images in `classes` subfolders, each with a `.txt` caption naming it."""
    for i in range(n):
        path = write_image(root / f"c{i % classes:02d}" / f"{i:03d}.png", size, seed=i)
        path.with_suffix(".txt").write_text(f"image {i}")
    return root


@pytest.fixture(scope="module")
def shard_set(tmp_path_factory) -> Path:
    """45 captioned training samples in shards of 7 (the last one of 3) and 5 val samples, 2 classes."""
    root = tmp_path_factory.mktemp("shards")
    write_shards(make_folder(root / "images", 50), root / "shards", labels=True, val_fraction=0.1, shard_samples=7)
    return root / "shards"


def stream(
    path: Path, *, world: int, rank: int, workers: int, seed: int = 0, shuffle: bool = True, captions: bool = True
) -> ShardStream:
    """Rank `rank` of `world`'s training stream, as the datamodule builds it under DDP."""
    dm = ShardDataModule(path=str(path), image_size=16, batch_size=4, seed=seed, captions=True, shuffle_buffer=5)
    return ShardStream(
        dm.location,
        dm.index["splits"]["train"],
        prep=dm.prep,
        batch_size=4,
        seed=seed,
        shuffle=shuffle,
        buffer=5,
        flip=False,
        labels=True,
        captions=captions,
        world=world,
        rank=rank,
        workers=workers,
    )


def captions_of(s: ShardStream, workers: int, epoch: int, skip: int = 0) -> list[list[str]]:
    """The captions of each batch a real DataLoader with `workers` processes yields for (epoch, skip)."""
    loader = ShardLoader(s, begin=lambda: (epoch, skip), num_workers=workers)
    return [c for _, c in loader]


def test_each_sample_once_per_epoch_across_2_ranks_x_2_workers(shard_set):
    per_epoch = []
    for epoch in (0, 1):
        seen = []
        for rank in (0, 1):
            batches = captions_of(stream(shard_set, world=2, rank=rank, workers=2), 2, epoch)
            assert len(batches) == 5 and all(len(b) == 4 for b in batches)  # 45 // 2 // 4 batches on each rank
            seen += [c for b in batches for c in b]
        assert len(seen) == len(set(seen)) == 40  # no duplicates; 5 of 45 dropped (the stream's tail)
        per_epoch.append(seen)
    assert per_epoch[0] != per_epoch[1] and set(per_epoch[0]) != set(per_epoch[1])  # another order, another tail
    # Seeded: the same seed gives the same batches, another seed others.
    same = captions_of(stream(shard_set, world=2, rank=0, workers=2), 2, 0)
    assert [c for b in same for c in b] == per_epoch[0][:20]
    other = captions_of(stream(shard_set, world=2, rank=0, workers=2, seed=1), 2, 0)
    assert [c for b in other for c in b] != per_epoch[0][:20]


@pytest.mark.parametrize("stop", [3, 4])
def test_a_resumed_epoch_yields_exactly_the_samples_not_yet_seen(shard_set, stop):
    """Stopped after `stop` batches (odd: worker roles rotate), restored from the state: the rest of the epoch in
    the order of a run that never stopped, nothing seen twice, nothing missed; the next epoch as usual."""

    def run(state: dict | None) -> tuple[list[list[str]], list[list[str]], ShardDataModule]:
        dm = ShardDataModule(path=str(shard_set), image_size=16, batch_size=4, num_workers=2, captions=True)
        if state is not None:
            dm.load_state_dict(state)
        loader = dm.train_dataloader()
        first = [c for _, c in loader]
        return first, [c for _, c in loader], dm

    straight, next_epoch, dm = run(None)
    assert len(straight) == 11 and dm._epoch == 1
    state = {"epoch": 0, "position": stop * 4, "layout": dm._layout()}
    rest, resumed_next, _ = run(state)
    assert rest == straight[stop:] and resumed_next == next_epoch
    seen = [c for b in straight[:stop] + rest for c in b]
    assert len(seen) == len(set(seen)) == 44
    # Another layout (here 1 worker): the interrupted epoch starts over, and says so.
    other = ShardDataModule(path=str(shard_set), image_size=16, batch_size=4, num_workers=1, captions=True)
    other.load_state_dict(state)
    assert len([b for b in other.train_dataloader()]) == 11


def test_the_writer_round_trips_pixels_labels_and_captions(tmp_path):
    src = make_folder(tmp_path / "images", 12, classes=3)
    # captions as data=folder reads them: a metadata file, when there is one, names every image (sidecars unused)
    rows = [{"file_name": f"c{i % 3:02d}/{i:03d}.png", "text": "from metadata" if i == 0 else f"image {i}"}
            for i in range(12)]  # fmt: skip
    (src / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[1:]))
    with pytest.raises(BadFileError, match=r"image .*000.png has no row in .*metadata.jsonl; pass --skip-bad"):
        write_shards(src, tmp_path / "shards", labels=True)
    assert not (tmp_path / "shards").exists()
    skipped = write_shards(src, tmp_path / "skipped", labels=True, val_fraction=0.0, skip_bad=True)
    assert skipped["skipped"] == 1 and sum(s["count"] for s in skipped["splits"]["train"]) == 11
    (src / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    index = write_shards(src, tmp_path / "shards", labels=True, val_fraction=0.25, shard_samples=4)
    assert [s["count"] for s in index["splits"]["train"]] == [4, 4, 1] and index["classes"] == ["c00", "c01", "c02"]

    folder = ImageFolderDataModule(path=str(src), image_size=16, labels=True, val_fraction=0.25, flip=False)
    folder.setup()
    shards = ShardDataModule(path=str(tmp_path / "shards"), image_size=16, captions=True)
    shards.setup()
    # 2 batches of 4 (1 dropped); with captions they take the labels' place
    batches = list(stream(tmp_path / "shards", world=1, rank=0, workers=1, shuffle=False))
    labelled = list(stream(tmp_path / "shards", world=1, rank=0, workers=1, shuffle=False, captions=False))
    x, y = torch.cat([b[0] for b in labelled]), torch.cat([b[1] for b in labelled])
    assert torch.equal(x, torch.cat([b[0] for b in batches]))
    fx, fy = folder.train_set.__getitems__(list(range(8)))
    assert torch.equal(x, fx) and torch.equal(y, fy)  # the same pixels and labels as data=folder, in written order
    files = [folder.train_set.files[i].stem for i in range(8)]
    assert batches[0][1] + batches[1][1] == [("from metadata" if f == "000" else f"image {int(f)}") for f in files]
    vx, vy = folder.val_set.__getitems__(list(range(3)))
    val = shards.val_set.dataset  # captioned: the val images come with their captions, as training batches do
    assert torch.equal(val.images, vx) and torch.equal(val.labels, vy)  # the same val split
    stems = [folder.val_set.files[i].stem for i in range(3)]
    assert shards.val_set.__getitems__([0, 1, 2])[1] == [
        "from metadata" if f == "000" else f"image {int(f)}" for f in stems
    ]

    # Other tools read the shards: webdataset groups each sample's members by key.
    import webdataset

    url = str(tmp_path / "shards" / index["splits"]["train"][0]["name"])
    sample = next(iter(webdataset.WebDataset(url, shardshuffle=False)))
    assert {"png", "cls", "txt"} <= set(sample) and sample["cls"] == b"0"


def test_the_writer_is_deterministic_atomic_and_refuses_to_overwrite(tmp_path, monkeypatch, capsys):
    src = make_folder(tmp_path / "images", 6)
    assert main(["write", str(src), str(tmp_path / "a"), "--labels", "--shard-samples", "2"]) == 0
    assert "wrote" in capsys.readouterr().out
    write_shards(src, tmp_path / "b", labels=True, shard_samples=2)
    assert {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()} == {
        p.name: p.read_bytes() for p in (tmp_path / "b").iterdir()
    }
    assert main(["write", str(src), str(tmp_path / "a")]) == 1
    assert "a already exists; pass --overwrite to replace it" in capsys.readouterr().err
    with pytest.raises(PathExistsError):
        write_shards(src, tmp_path / "a")
    write_shards(src, tmp_path / "a", overwrite=True)  # unlabeled now
    assert json.loads((tmp_path / "a" / INDEX).read_text())["classes"] is None

    import diffusion.data.shards as shards

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(shards, "write_bytes", fail)  # the disk fills as the index is written
    with pytest.raises(OSError):
        write_shards(src, tmp_path / "c")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "images"]  # nothing half-written left
    monkeypatch.undo()

    # A shard set missing its index, or with a short shard (an interrupted copy), is named, never read as whole.
    (tmp_path / "b" / INDEX).rename(tmp_path / "index.bak")
    with pytest.raises(MissingPathError, match=f"{tmp_path / 'b' / INDEX} does not exist"):
        ShardDataModule(path=str(tmp_path / "b"), image_size=16)
    (tmp_path / "index.bak").rename(tmp_path / "b" / INDEX)
    shard = tmp_path / "b" / "train-000001.tar"
    shard.write_bytes(shard.read_bytes()[:1536])
    dm = ShardDataModule(path=str(tmp_path / "b"), image_size=16, batch_size=2, num_workers=0, shuffle=False)
    with pytest.raises(BadFileError, match="train-000001.tar (holds 1 samples where index.json says 2|is not)"):
        list(dm.train_dataloader())


def test_overwrite_removes_only_a_shard_set_this_project_wrote(tmp_path, capsys):
    """--overwrite replaces a shard set (its index and the shards it lists) and nothing else: DST = the parent of
    SRC, DST = SRC, a shard set holding a user's file, a plain file, a link: one line naming DST, nothing deleted."""
    src = make_folder(tmp_path / "images", 6)
    (tmp_path / "notes.txt").write_text("the user's own file")
    write_shards(src, tmp_path / "mixed", shard_samples=2)
    (tmp_path / "mixed" / "README.md").write_text("the user's notes on this set")
    write_shards(src, tmp_path / "elsewhere", shard_samples=2)
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere")
    before = snapshot(tmp_path)
    for dst in (tmp_path, src, tmp_path / "mixed", tmp_path / "notes.txt", tmp_path / "link"):
        assert main(["write", str(src), str(dst), "--overwrite"]) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and str(dst) in err and "\n" not in err, err
        assert snapshot(tmp_path) == before, dst
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere", "images", "link", "mixed", "notes.txt"]

    # A set this project wrote is replaced whole: the new index and its shards, no shard of the old one left.
    write_shards(src, tmp_path / "set", shard_samples=1, val_fraction=0.0)
    assert main(["write", str(src), str(tmp_path / "set"), "--overwrite", "--shard-samples", "4"]) == 0
    index = json.loads((tmp_path / "set" / INDEX).read_text())
    names = {s["name"] for shards in index["splits"].values() for s in shards}
    assert {p.name for p in (tmp_path / "set").iterdir()} == {INDEX, *names} and len(names) == 3  # not 6
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no staging folder left


def test_index_names_resolve_inside_the_shard_set(tmp_path):
    """A shard the index names is a file inside the set: `../x.tar`, an absolute path or a link out of the set is
    refused in one line naming the index and the entry, before a byte is read; a named pipe is never waited on."""
    src = make_folder(tmp_path / "images", 6)
    write_shards(src, tmp_path / "set", shard_samples=2, val_fraction=0.0)
    index_path = tmp_path / "set" / INDEX
    index = json.loads(index_path.read_text())
    shutil.copy(tmp_path / "set" / "train-000000.tar", tmp_path / "x.tar")
    os.mkfifo(tmp_path / "pipe.tar")
    (tmp_path / "set" / "link.tar").symlink_to(tmp_path / "x.tar")
    outside = ["../x.tar", str(tmp_path / "x.tar"), "../pipe.tar", str(tmp_path / "pipe.tar"), "link.tar"]
    outside.append("a/../../x.tar")
    for split, name in [*(("train", n) for n in outside), ("val", "../x.tar")]:
        changed = json.loads(json.dumps(index))
        changed["splits"][split] = [{**index["splits"]["train"][0], "name": name}]
        index_path.write_text(json.dumps(changed))

        def read():
            dm = ShardDataModule(path=str(tmp_path / "set"), image_size=16, batch_size=2, num_workers=0)
            dm.setup()
            list(dm.train_dataloader())

        with deadline():
            message = one_line_error(read)
        assert str(index_path) in message and repr(name) in message and "\n" not in message, message

    # A named pipe inside the set, under a name the index lists: refused when the shard is opened.
    index_path.write_text(json.dumps(index))
    (tmp_path / "set" / "train-000001.tar").unlink()
    os.mkfifo(tmp_path / "set" / "train-000001.tar")
    dm = ShardDataModule(path=str(tmp_path / "set"), image_size=16, batch_size=2, num_workers=0, shuffle=False)
    with deadline():
        message = one_line_error(lambda: list(dm.train_dataloader()))
    assert "train-000001.tar" in message and "named pipe" in message, message


def test_credentials_in_the_config_are_refused(tmp_path, shard_set):
    for overrides, key in [
        (["data.path=s3://bucket/x", "+data.storage.aws_secret_access_key=abc"], "data.storage.aws_secret_access_key"),
        (["data.path=https://user:pw@example.com/x"], "data.path carries credentials"),
        (["data.path='https://example.com/x?X-Amz-Signature=1'"], "data.path carries a signed"),
    ]:
        with pytest.raises(ConfigError) as info:
            run_train(tmp_path / "run", ["data=shards", *overrides])
        assert key in user_error_message(info.value) and "\n" not in user_error_message(info.value)


def test_shards_stream_over_http_as_from_disk(shard_set):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(shard_set))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/"
        remote = ShardDataModule(path=url, image_size=16, batch_size=4, num_workers=0, captions=True)
        local = ShardDataModule(path=str(shard_set), image_size=16, batch_size=4, num_workers=0, captions=True)
        for dm in (remote, local):
            dm.setup()
        pairs = zip(remote.train_dataloader(), local.train_dataloader(), strict=True)
        assert all(torch.equal(a[0], b[0]) and a[1] == b[1] for a, b in pairs)
        assert torch.equal(remote.val_set.dataset.images, local.val_set.dataset.images)  # captioned val sets
        with pytest.raises(MissingPathError, match="nothing/index.json does not exist"):
            ShardDataModule(path=url + "nothing", image_size=16)
    finally:
        server.shutdown()


@pytest.mark.slow
def test_train_from_shards_stopped_and_resumed_ends_as_the_uninterrupted_run(tmp_path, shard_set):
    """Stopped mid-epoch 1 (11 batches per epoch, 2 workers, odd position) and resumed: bit for bit the weights of a
    run that never stopped, so the resumed stream gave the same batches (flips included) in the same order."""
    from tests.test_resume import EXACT, assert_same_tensors

    data = ["data=shards", f"data.path={shard_set}", "data.image_size=16", "data.channels=3", "data.batch_size=4"]
    data += ["data.num_workers=2", "model.num_classes=2", *[o for o in EXACT if not o.startswith("data.")], *NO_GRIDS]
    straight, split = tmp_path / "straight", tmp_path / "split"
    run_train(straight, [*data, "trainer.max_steps=16"])
    run_train(split, [*data, "trainer.max_steps=14"])
    layout = {"world_size": 1, "num_workers": 2, "batch_size": 4}
    half = torch.load(split / "checkpoints" / "last.ckpt", weights_only=True)
    assert half["ShardDataModule"] == {"epoch": 1, "position": 3 * 4, "layout": layout}
    run_train(split, [*data, "trainer.max_steps=16", f"ckpt_path={split}"])
    a, b = (torch.load(r / "checkpoints" / "last.ckpt", weights_only=True) for r in (straight, split))
    assert a["global_step"] == b["global_step"] == 16
    assert a["ShardDataModule"] == b["ShardDataModule"] == {"epoch": 1, "position": 5 * 4, "layout": layout}
    for key in ("state_dict", "optimizer_states"):
        assert_same_tensors(a[key], b[key], key)
    assert any(not torch.equal(v, half["state_dict"][k]) for k, v in a["state_dict"].items())


class RecordLabels(L.Callback):
    """Test-only: appends each trained batch's (epoch, labels) to `<dirpath>/rank<r>.jsonl`."""

    def __init__(self, dirpath: str) -> None:
        self.dirpath = Path(dirpath)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        with open(self.dirpath / f"rank{trainer.global_rank}.jsonl", "a") as f:
            f.write(json.dumps([trainer.current_epoch, batch[1].tolist()]) + "\n")


@pytest.mark.slow
def test_ddp_two_processes_with_two_workers_each_see_every_sample_once_per_epoch(tmp_path):
    """A real 2-process gloo run through train.py; each image its own class, so labels name samples."""
    write_shards(make_folder(tmp_path / "images", 34, classes=34), tmp_path / "shards", labels=True, shard_samples=5)
    run, log = tmp_path / "run", tmp_path / "log"
    log.mkdir()
    tiny = [o for o in TINY if not o.startswith(("trainer=", "data.batch_size"))]
    result = run_cli(
        "train.py",
        *tiny,
        "trainer=ddp_cpu",
        "trainer.max_steps=8",
        "data=shards",
        f"data.path={tmp_path / 'shards'}",
        "data.image_size=16",
        "data.batch_size=4",
        "data.num_workers=2",
        *NO_GRIDS,
        "+callbacks.record._target_=tests.test_streaming.RecordLabels",
        f"+callbacks.record.dirpath={log}",
        f"hydra.run.dir={run}",
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    by_epoch: dict[int, list[int]] = {0: [], 1: []}
    for rank in (0, 1):
        for line in (log / f"rank{rank}.jsonl").read_text().splitlines():
            epoch, labels = json.loads(line)
            by_epoch[epoch] += labels
    # 33 training samples (1 held out), 2 ranks x 4 batches of 4: 32 each epoch, none twice; 8 steps = 2 epochs.
    for seen in by_epoch.values():
        assert len(seen) == len(set(seen)) == 32
    assert by_epoch[0] != by_epoch[1]


# --- Hugging Face datasets ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved_hf(tmp_path_factory) -> Path:
    """A tiny dataset saved with save_to_disk: image, a ClassLabel, a caption column."""
    import datasets
    from PIL import Image

    root = tmp_path_factory.mktemp("hf")
    files = [write_image(root / "src" / f"{i}.png", (20, 20), seed=i) for i in range(12)]
    features = datasets.Features(
        {"img": datasets.Image(), "kind": datasets.ClassLabel(names=["a", "b", "c"]), "text": datasets.Value("string")}
    )
    data = {"img": [Image.open(f) for f in files], "kind": [i % 3 for i in range(12)], "text": [f"t{i}" for i in files]}
    datasets.Dataset.from_dict(data, features=features).save_to_disk(str(root / "saved"))
    return root / "saved"


def test_hf_columns_are_checked_and_captions_batch(saved_hf):
    with pytest.raises(
        ConfigError, match=r"data.label_column='label' is not a column of .* \(columns: img, kind, text\)"
    ):
        HFDataModule(path=str(saved_hf), image_column="img", label_column="label")
    with pytest.raises(ConfigError, match="data.image_column='image' is not a column"):
        HFDataModule(path=str(saved_hf))
    with pytest.raises(ConfigError, match="data.image_column='text' of .* holds Value, not images"):
        HFDataModule(path=str(saved_hf), image_column="text")
    dm = HFDataModule(
        path=str(saved_hf), image_column="img", label_column="kind", caption_column="text", image_size=16, batch_size=4
    )
    dm.setup()
    assert dm.num_classes == 3 and dm.classes == ["a", "b", "c"]
    x, captions = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 16, 16) and -1 <= x.min() < x.max() <= 1
    assert len(captions) == 4  # captions take the labels' place: a batch holds one kind of condition
    assert isinstance(captions, list) and all(c.startswith("t") for c in captions)


@pytest.mark.slow
def test_train_py_on_hf_saved_and_imagefolder(tmp_path, saved_hf):
    common = ["data=hf", "data.image_size=16", "data.num_workers=0", *NO_GRIDS]
    run_train(
        tmp_path / "saved",
        [
            *common,
            f"data.path={saved_hf}",
            "data.image_column=img",
            "data.label_column=kind",
            "model.num_classes=3",
            "data.batch_size=4",
        ],
    )
    hf_cache = f"data.cache_dir={tmp_path / 'hf_cache'}"
    cfg, _ = run_train(
        tmp_path / "folder",
        [
            *common,
            f"data.path={make_folder(tmp_path / 'images', 10)}",
            "data.label_column=label",
            "data.batch_size=4",
            hf_cache,
        ],
    )
    for run in ("saved", "folder"):
        assert torch.load(tmp_path / run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4


def test_a_missing_hf_path_is_named_without_asking_the_hub(tmp_path):
    with pytest.raises(MissingPathError, match=f"data.path={tmp_path / 'none'} does not exist"):
        HFDataModule(path=str(tmp_path / "none"))


# --- captions: text models train on shards and Hugging Face datasets -----------------------------------------------
TEXT_MODEL = [
    "conditioning=text",
    "model.attention_resolutions=[8]",
    "conditioning.encoder.dim=16",
    "conditioning.encoder.depth=1",
    "data.image_size=16",
    "data.channels=3",
    "data.batch_size=4",
    "data.num_workers=0",
    "trainer.max_steps=3",
    *NO_GRIDS,
]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["shards", "hf"])
def test_text_models_train_on_shards_and_hf_captions(tmp_path, shard_set, saved_hf, kind):
    """conditioning=text on data=shards / data=hf: the tokenizer is built from the training captions (it failed:
    neither datamodule offered them, and validation batches held labels, not captions)."""
    from diffusion.checkpoint import CONDITIONING_PREFIX, read_checkpoint

    data = {
        "shards": ["data=shards", f"data.path={shard_set}", "data.captions=true"],
        "hf": ["data=hf", f"data.path={saved_hf}", "data.image_column=img", "data.caption_column=text"],
    }[kind]
    run_train(tmp_path / "run", [*TEXT_MODEL, *data])
    ckpt = read_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")
    vocab = json.loads(ckpt["state_dict"][CONDITIONING_PREFIX + "encoder._extra_state"]["tokenizer"])["model"]["vocab"]
    assert ("image" if kind == "shards" else "png") in vocab  # words of the training captions
    assert ckpt["global_step"] == 3


def test_several_captions_per_image_in_shards_and_hf(tmp_path):
    """A metadata row with a list of captions: the shard holds them one per line and the stream draws one per
    epoch (as folders do); an HF list column likewise. The corpus holds them all."""
    import datasets
    from PIL import Image

    root = tmp_path / "images"
    files = [write_image(root / f"{i}.png", (16, 16), seed=i) for i in range(8)]
    rows = [{"file_name": f.name, "text": [f"cat {i}", f"dog {i}"]} for i, f in enumerate(files)]
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    write_shards(root, tmp_path / "shards", val_fraction=0.0)
    dm = ShardDataModule(path=str(tmp_path / "shards"), image_size=16, batch_size=8, num_workers=0, captions=True)
    assert sorted(dm.caption_corpus()) == sorted(c for r in rows for c in r["text"])
    s = ShardStream(dm.location, dm.index["splits"]["train"], prep=dm.prep, batch_size=8, seed=0, shuffle=False,
                    buffer=1, flip=False, labels=False, captions=True, world=1, rank=0, workers=1)  # fmt: skip
    seen = set()
    for epoch in range(6):
        s.epoch, s.skip = epoch, 0
        ((_, captions),) = list(s)
        assert all(c.split()[0] in ("cat", "dog") for c in captions)
        seen.update(captions)
    assert len(seen) == 16  # every caption of every image drawn in some epoch, none as a list's str()
    features = datasets.Features({"img": datasets.Image(), "text": datasets.Sequence(datasets.Value("string"))})
    table = {"img": [Image.open(f) for f in files], "text": [r["text"] for r in rows]}
    datasets.Dataset.from_dict(table, features=features).save_to_disk(str(tmp_path / "hf"))
    hf = HFDataModule(path=str(tmp_path / "hf"), image_column="img", caption_column="text", image_size=16,
                      batch_size=8, val_fraction=0.0, num_workers=0)  # fmt: skip
    assert sorted(hf.caption_corpus()) == sorted(c for r in rows for c in r["text"])
    _, captions = next(iter(hf.train_dataloader()))
    assert all(c.split()[0] in ("cat", "dog") for c in captions)
