"""Does a text-to-image digits model draw the digit a prompt names? A 10-row table, one row per digit.

    python bench/text_prompts.py --ckpt outputs/digits_text/<run> [--guidance 1 3] [--n 100]

For each digit d the prompt is `--template` with d's word ("a handwritten seven"); `sample.py` draws `--n` images
per prompt (one run with a prompt file, one grid row per prompt: the same images as `prompt="..." n=100` gives for
each, since image j starts from seed + j whatever the row) and the digit classifier of `bench/digits_eval.py`
(trained on the real digits) labels them. A row reports the share labelled d (argmax), the share labelled d with
p >= 0.9, and the digit drawn most often instead. Run it under `flock /tmp/heavy.lock` on a shared machine.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.digits_eval import load_classifier, predict  # noqa: E402
from diffusion.data.base import DIGIT_WORDS  # noqa: E402


def sample_prompts(ckpt: str, prompts: list[str], *, n: int, guidance: float | None, out: Path, extra: list[str]):
    """(len(prompts) * n, H, W, C) uint8 images from sample.py, prompt k's images at rows k * n ... k * n + n - 1."""
    prompt_file = out / "prompts.txt"
    prompt_file.write_text("\n".join(prompts) + "\n")
    args = [f"ckpt={ckpt}", f"prompts={prompt_file}", f"n={n}", "npz=true", f"out={out}", "progress=false", *extra]
    if guidance is not None:
        args.append(f"guidance={guidance}")
    done = subprocess.run([sys.executable, str(ROOT / "sample.py"), *args], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"sample.py failed: {done.stderr.strip()[-2000:]}")
    return np.load(out / "samples.npz")["arr_0"]


def table(images: np.ndarray, n: int, template: str) -> list[dict]:
    """One row per digit: the shares of its prompt's images the classifier labels as that digit."""
    p, _ = predict(torch.from_numpy(images), load_classifier())
    rows = []
    for d in range(10):
        probs = p[d * n : (d + 1) * n]
        label = probs.argmax(1)
        others = torch.bincount(label[label != d], minlength=10)
        rows.append(
            {
                "digit": d,
                "prompt": template.format(word=DIGIT_WORDS[d], digit=d),
                "right": float((label == d).float().mean()),
                "right_p90": float(((label == d) & (probs.max(1).values >= 0.9)).float().mean()),
                "other": int(others.argmax()) if others.sum() else None,
                "other_share": float(others.max()) / n,
            }
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="a digits_text checkpoint or run folder")
    p.add_argument("--n", type=int, default=100, help="images per prompt")
    p.add_argument("--guidance", type=float, nargs="*", default=[None], help="guidance scales (default: none = 1)")
    p.add_argument("--template", default="a handwritten {word}", help="the prompt; {word} = seven, {digit} = 7")
    p.add_argument("overrides", nargs="*", help="more sample.py overrides, e.g. sampler=ddim sampler.steps=50")
    args = p.parse_args(argv)
    prompts = [args.template.format(word=DIGIT_WORDS[d], digit=d) for d in range(10)]
    for guidance in args.guidance:
        with tempfile.TemporaryDirectory() as tmp:
            images = sample_prompts(
                args.ckpt, prompts, n=args.n, guidance=guidance, out=Path(tmp), extra=args.overrides
            )
        rows = table(images, args.n, args.template)
        print(f"\n{args.ckpt}: guidance {guidance or 1.0}, {args.n} images per prompt, {' '.join(args.overrides)}")
        print("| digit | prompt | labelled as the digit | ... with p >= 0.9 | most drawn instead |")
        print("|---|---|---|---|---|")
        for r in rows:
            other = f"{r['other']} ({100 * r['other_share']:.0f}%)" if r["other"] is not None else "-"
            print(f"| {r['digit']} | {r['prompt']} | {100 * r['right']:.0f}% | {100 * r['right_p90']:.0f}% | {other} |")
        mean = sum(r["right"] for r in rows) / 10
        mean_p90 = sum(r["right_p90"] for r in rows) / 10
        print(f"| all | | {100 * mean:.1f}% | {100 * mean_p90:.1f}% | |")


if __name__ == "__main__":
    main()
