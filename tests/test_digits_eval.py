"""bench/digits_eval.py: the digit classifier that scores samples of the built-in digits tells real digits from
noise, its Frechet distance is zero between a set and itself, and its training is a function of its seed.

The classifier is trained once (about 25 s) and cached in .cache/digits_eval/; with the cache the tests take a
few seconds.
"""

from __future__ import annotations

import numpy as np
import torch

from bench import digits_eval


def test_real_digits_score_high_and_noise_low(tmp_path, capsys):
    x, y = digits_eval.digits("train")
    real = digits_eval.score(x[:500])
    assert real["share_p90"] > 0.85 and real["classes"] == 10
    assert 0.85 < real["real_p90"] <= 1.0
    assert real["fd"] < 2 * real["fd_floor"]
    assert sum(real["counts"]) == round(real["share_p90"] * 500)

    generator = torch.Generator().manual_seed(0)
    noise = torch.rand(500, 1, 16, 16, generator=generator) * 2 - 1
    blobs = torch.nn.functional.interpolate(torch.rand(500, 1, 4, 4, generator=generator) * 2 - 1, size=16)
    for fake in (noise, blobs):
        bad = digits_eval.score(fake)
        assert bad["share_p90"] < 0.05
        assert bad["fd"] > 10 * real["fd"]

    sevens = x[y == 7]
    assert digits_eval.label_share(sevens, 7) > 0.95
    assert digits_eval.label_share(sevens, 1, threshold=0.9) < 0.05

    # The CLI reads sample.py's npz (uint8 (N, H, W, C) arr_0) and prints the same scores.
    uint8 = ((x[:500] + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()  # (N, 16, 16, 1)
    np.savez(tmp_path / "samples.npz", uint8)
    row = digits_eval.main(["--samples", str(tmp_path / "samples.npz")])
    assert row == real
    assert "classes 10/10" in capsys.readouterr().out


def test_frechet_distance_of_a_set_with_itself_is_zero():
    feats = digits_eval.predict(digits_eval.digits("train")[0][:600])[1]
    assert abs(digits_eval.frechet_distance(feats, feats)) < 1e-3
    assert digits_eval.frechet_distance(feats[:300], feats[300:]) > 0.1


def test_training_is_a_function_of_the_seed():
    a, b, c = (digits_eval.train_classifier(seed=s, epochs=1) for s in (0, 0, 1))
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert not all(torch.equal(pa, pc) for pa, pc in zip(a.state_dict().values(), c.state_dict().values()))
