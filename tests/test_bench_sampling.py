"""bench/sampling.py on tiny checkpoints of two process families: the grid of rows (skipped spacings, no repeated
grid), counted network calls, the distance to the converged reference, and the ranking."""

from __future__ import annotations

import pytest

from bench import sampling
from tests.conftest import TINY, run_train


@pytest.mark.parametrize("process", ["cosine", "edm"])
def test_rows_rank_samplers_by_distance_to_the_reference(tmp_path, capsys, process):
    run = tmp_path / "run"
    tiny = [o for o in TINY if process == "cosine" or not o.startswith("process")]  # EDM has no num_steps
    run_train(run, [*tiny, f"process={process}", "callbacks.sample_grid.every_n_steps=0"], tiny=False)
    ckpt = run / "checkpoints" / "last.ckpt"
    args = ["n=3", "batch_size=2", "samplers=ddim,unipc+order=3", "spacings=trailing,logsnr,null", "steps=2,4"]
    ref, *rows = sampling.main([f"ckpt={ckpt}", *args, "reference=heun:12", "judge=none", "device=cpu"])
    table = capsys.readouterr().out

    got = {(r["sampler"], r["spacing"], r["steps"]) for r in rows}
    if process == "cosine":  # null is trailing for ddim and logsnr for unipc: those rows are not repeated
        want = {(s, sp, n) for s in ("ddim", "unipc+order=3") for sp in ("trailing", "logsnr") for n in (2, 4)}
    else:  # EDM takes no discrete spacing: only its own (Karras) grid
        want = {(s, "null", n) for s in ("ddim", "unipc+order=3") for n in (2, 4)}
    assert got == want and len(rows) == len(want)
    assert ref["nfe"] == 23 and all(r["nfe"] == r["steps"] for r in rows)  # Heun: 2 steps - 1 calls
    assert all(r["images"].shape == (3, 1, 16, 16) for r in [ref, *rows])
    # more steps of the same sampler and grid land closer to the converged reference
    for s, sp, _ in want:
        four, two = (
            next(r["rmse"] for r in rows if (r["sampler"], r["spacing"], r["steps"]) == (s, sp, n)) for n in (4, 2)
        )
        assert four < two, (s, sp, four, two)
    lines = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| rank")]
    assert lines[0].startswith("| ref | heun |")
    ranked = [float(line.split("|")[7]) for line in lines[1:]]
    half = len(ranked) // 2  # steps=2 rows, then steps=4 rows, each ranked by RMSE to the reference
    assert ranked[:half] == sorted(ranked[:half]) and ranked[half:] == sorted(ranked[half:])
