"""Teach a trained digits_text model a new concept with LoRA, and measure that it learned it and kept the old one.

The concept: digits drawn in inverted colours (white background, dark strokes), captioned with a word the model
never saw ("an inverted seven"). This script writes those images as a captioned image folder (the Hugging Face
imagefolder convention: PNGs + metadata.jsonl), fine-tunes the model on them with `finetune=lora` through
`train.py` (the adapters train, and the new words' embeddings: they get fresh tokens in the text encoder's
vocabulary, whose other weights stay frozen), then draws
`--n` images per prompt through `sample.py` for the new prompts ("an inverted seven") and the old ones
("a handwritten seven"), and prints per digit:
- inverted: the share of images whose background is light (mean pixel > 0 in [-1, 1]);
- right digit: the share the digit classifier of `bench/digits_eval.py` labels as the prompt's digit (new prompts:
  scored on the images turned back to normal colours).

`--prior N` (default 100) is DreamBooth's prior preservation (Ruiz et al. 2023, sec. 4.2) through the recipe
(`dreambooth=default`, diffusion/data/dreambooth.py): before training, the base model draws N images per old prompt
("a handwritten seven", the class prompts) once, cached in OUT/class_images, and every batch holds `--batch` / 2
inverted digits and as many of those, the loss being instance MSE + prior MSE. With `--prior 0` the adapters see only
the new style, and nothing keeps it to the new word: the old prompts break (README step 9).

    python bench/text_lora_concept.py --ckpt RUN_OF_experiment=digits_text --out /tmp/lora_concept [--prior 0]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.digits_eval import as_images, digits, predict  # noqa: E402
from diffusion.data.base import DIGIT_WORDS  # noqa: E402


def write_concept(folder: Path) -> int:
    """The training digits in inverted colours, one PNG each, captioned "an inverted <word>"; returns the count."""
    x, y = digits("train")  # (N, 1, 16, 16) in [-1, 1]
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (img, label) in enumerate(zip(x, y.tolist())):
        pixels = ((1 - img[0]) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()  # inverted: -x
        Image.fromarray(pixels, mode="L").save(folder / f"{i:05d}.png")
        rows.append({"file_name": f"{i:05d}.png", "text": f"an inverted {DIGIT_WORDS[label]}"})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return len(rows)


def adapter_share(run: Path) -> str:
    """What the fine-tune trained, from its checkpoint: adapters and new word embeddings against the network."""
    from diffusion.checkpoint import read_checkpoint
    from diffusion.model import DiffusionModel

    ckpt = read_checkpoint(run / "checkpoints" / "last.ckpt")
    adapters = sum(v.numel() for k, v in ckpt["state_dict"].items() if ".lora_" in k)
    model = DiffusionModel.from_checkpoint(run / "checkpoints" / "last.ckpt")
    total = sum(p.numel() for p in model.net.parameters()) - adapters
    encoder = json.loads(ckpt["state_dict"]["model.conditioning.encoder._extra_state"]["tokenizer"])["model"]["vocab"]
    dim = ckpt["state_dict"]["model.conditioning.encoder.token_emb.weight"].shape[1]
    new = [w for w in ("an", "inverted") if w in encoder]
    return (
        f"adapters: {adapters:,} parameters, {adapters / total:.1%} of the base network's {total:,}; "
        f"new word embeddings: {len(new)} x {dim}"
    )


def run(*args: str) -> None:
    print("+", " ".join(args), flush=True)
    subprocess.run([sys.executable, *args], cwd=ROOT, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="a run (or .ckpt) of experiment=digits_text")
    parser.add_argument("--out", required=True, help="a new folder for the data, the LoRA run and the samples")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--n", type=int, default=20, help="images per prompt")
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--prior", type=int, default=100, help="base-model images per old prompt (0: no prior)")
    parser.add_argument("--batch", type=int, default=64, help="images per step (with a prior: half of each kind)")
    parser.add_argument("--targets", default=None, help="finetune.target_modules, comma-separated (default: attention)")
    args = parser.parse_args()
    out = Path(args.out)
    if out.exists():
        sys.exit(f"error: --out {out} exists; give a new folder")
    count = write_concept(out / "data")
    print(f"wrote {count} inverted digits to {out / 'data'}")
    old_prompts = [f"a handwritten {w}" for w in DIGIT_WORDS]
    prior = [
        "dreambooth=default",  # instance captions from the folder; class images drawn by the base model
        "dreambooth.class_prompt=[" + ",".join(f"'{p}'" for p in old_prompts) + "]",
        f"dreambooth.num_class_images={args.prior}",
        f"dreambooth.class_dir={out / 'class_images'}",
        "dreambooth.sample_batch_size=100",
        f"conditioning.guidance={args.guidance}",
    ]
    run(
        "train.py",
        "experiment=digits_text",
        f"init_from={args.ckpt}",
        "finetune=lora",
        f"finetune.rank={args.rank}",
        *([f"finetune.target_modules=[{args.targets}]"] if args.targets else []),
        "data=folder",
        f"data.path={out / 'data'}",
        "data.captions=true",
        "data.image_size=16",
        "data.channels=1",
        "data.flip=false",
        "data.num_workers=0",
        f"data.batch_size={args.batch // 2 if args.prior else args.batch}",
        *(prior if args.prior else []),
        f"trainer.max_steps={args.steps}",
        f"trainer.val_check_interval={args.steps}",
        f"callbacks.sample_grid.every_n_steps={args.steps}",
        f"callbacks.model_checkpoint.every_n_train_steps={args.steps}",
        "trainer.enable_progress_bar=false",
        f"hydra.run.dir={out / 'run'}",
    )
    print(adapter_share(out / "run"))
    prompts = [f"an inverted {w}" for w in DIGIT_WORDS] + old_prompts
    (out / "prompts.txt").write_text("\n".join(prompts) + "\n")
    for name, ckpt in (("lora", out / "run"), ("base", Path(args.ckpt))):
        run(
            "sample.py",
            f"ckpt={ckpt}",
            f"prompts={out / 'prompts.txt'}",
            f"n={args.n}",
            f"guidance={args.guidance}",
            "npz=true",
            "progress=false",
            f"out={out / ('samples_' + name)}",
        )
    print(f"\n{'prompt':24s} | {'model':5s} | inverted | right digit")
    for name in ("base", "lora"):
        data = np.load(out / f"samples_{name}" / "samples.npz")
        x = as_images(data["arr_0"])
        for k, prompt in enumerate(prompts):
            imgs = x[k * args.n : (k + 1) * args.n]
            inverted = (imgs.mean(dim=(1, 2, 3)) > 0).float()
            digit = k % 10
            probs, _ = predict(-imgs if prompt.startswith("an inverted") else imgs)
            right = (probs.argmax(1) == digit).float()
            print(f"{prompt:24s} | {name:5s} | {inverted.mean():7.0%} | {right.mean():7.0%}")
        for kind in ("an inverted", "a handwritten"):
            rows = [k for k, p in enumerate(prompts) if p.startswith(kind)]
            imgs = torch.cat([x[k * args.n : (k + 1) * args.n] for k in rows])
            inv = (imgs.mean(dim=(1, 2, 3)) > 0).float().mean()
            labels = torch.tensor([k % 10 for k in rows]).repeat_interleave(args.n)
            probs, _ = predict(-imgs if kind == "an inverted" else imgs)
            acc = (probs.argmax(1) == labels).float().mean()
            print(f"{'all ' + kind + ' ...':24s} | {name:5s} | {inv:7.0%} | {acc:7.0%}")


if __name__ == "__main__":
    main()
