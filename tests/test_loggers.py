"""Loggers: W&B offline without credentials (never a prompt), TensorBoard and CSV together in one tiny run."""

import json
import struct
from pathlib import Path

from tests.conftest import run_train


def read_wandb_records(path: Path) -> list:
    """The protobuf records of a .wandb file (LevelDB log format: 32 KiB blocks of checksummed chunks)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B", path
    pos, chunks, pending = 7, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 1:  # full
            chunks.append(chunk)
        elif kind == 2:  # first
            pending = chunk
        elif kind == 3:  # middle
            pending += chunk
        elif kind == 4:  # last
            chunks.append(pending + chunk)
        else:
            break
    records = []
    for chunk in chunks:
        record = pb.Record()
        record.ParseFromString(chunk)
        records.append(record)
    return records


def test_wandb_offline_without_credentials_with_tensorboard_and_csv(tmp_path, monkeypatch, caplog):
    import wandb

    for var in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no_netrc"))  # no `wandb login` either
    caplog.set_level("INFO")  # messages go through logging (into train.log under Hydra)
    run = tmp_path / "run"
    try:
        run_train(run, ["logger=many_loggers", "trainer.max_steps=2"])
    finally:
        wandb.finish()
    lines = [m for m in caplog.messages if m.startswith("wandb: no W&B credentials")]
    assert len(lines) == 1 and f"wandb sync {run / 'wandb'}/offline-run-*" in lines[0]

    (wandb_file,) = (run / "wandb").glob("offline-run-*/run-*.wandb")
    records = read_wandb_records(wandb_file)
    history = [
        {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
        for r in records
        if r.WhichOneof("record_type") == "history"
    ]
    assert any("train/loss" in h for h in history)
    images = [h for h in history if "samples/_type" in h]  # nested keys are flattened as samples/...
    assert len(images) == 1 and images[0]["samples/_type"] == "images/separated" and images[0]["samples/count"] == 1
    assert images[0]["trainer/global_step"] == 2 and images[0]["samples/height"] == 2 * 66 + 2
    config = [r.config for r in records if r.WhichOneof("record_type") == "config"]
    keys = {item.key for c in config for item in c.update}
    assert {"model", "process", "callbacks"} <= keys  # the resolved config
    summary = {
        item.key or "/".join(item.nested_key): json.loads(item.value_json)
        for r in records
        if r.WhichOneof("record_type") == "summary"
        for item in r.summary.update
    }
    assert summary.get("checkpoint/last") == str(run / "checkpoints" / "last.ckpt")

    # TensorBoard got the loss and the grid; CSV the metrics.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0})
    acc.Reload()
    assert "train/loss" in acc.Tags()["scalars"] and "samples" in acc.Tags()["images"]
    assert [e.step for e in acc.Images("samples")] == [2]
    assert "train/loss" in (run / "csv" / "version_0" / "metrics.csv").read_text()
