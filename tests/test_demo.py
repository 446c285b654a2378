"""demo.py: the page's generate function (errors, the brush mask), the missing extra, and the page end to end in a
real headless browser (Debian's chromium driven by Selenium): generate from a tiny checkpoint, read the image
back, edit an uploaded image, and see a bad input's message on the page."""

from __future__ import annotations

import io
import shutil
import socket
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

from diffusion.errors import ConfigError, MissingPackageError
from tests.conftest import CONF, run_train

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("demo") / "run"
    run_train(run, ["model.num_classes=10", "trainer.max_steps=2", "callbacks.sample_grid.every_n_steps=0"])
    return run / "checkpoints" / "last.ckpt"


def compose_demo(*overrides: str):
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose("demo", overrides=list(overrides))


def test_missing_extra_is_one_line(monkeypatch, ckpt):
    import demo

    monkeypatch.setitem(sys.modules, "gradio", None)  # import gradio raises ImportError
    with pytest.raises(MissingPackageError, match=r'^demo.py needs gradio: pip install -e "\.\[demo\]"$'):
        demo.build(compose_demo(f"ckpt={ckpt}"))


def test_generate_checks_values_and_reads_the_brush_mask(ckpt):
    import demo
    from diffusion.demo_page import editor_inputs, generate
    from diffusion.model import DiffusionModel

    model = DiffusionModel.from_checkpoint(ckpt)
    samplers, chosen = demo.samplers(compose_demo("sampler=ddim", "sampler.eta=1").sampler)
    assert {"ddim", "dpmpp", "ddpm", "euler", "heun"} <= set(samplers) and chosen == "ddim"
    assert samplers["ddim"].keywords["eta"] == 1.0  # the command line's options
    run = dict(sampler="ddim", steps=2, seed=0, batch=2, progress=False)
    images = generate(model, samplers, label="3", guidance=2.0, **run)
    assert len(images) == 2 and images[0].shape == (16, 16) and images[0].dtype == np.uint8
    for bad, message in [
        (dict(steps=0), "steps=0 must be a whole number >= 1"),
        (dict(batch=100), "at most 16 images"),
        (dict(strength=0.5), "strength=0.5 needs init="),
        (dict(sampler="nope"), "sampler 'nope' is not one of"),
        (dict(prompt="a cat", label=None), None),  # a class model ignores the (hidden) prompt box
    ]:
        if message is None:
            generate(model, samplers, **{**run, **bad})
            continue
        with pytest.raises(ConfigError, match=message):
            generate(model, samplers, **{**run, **bad})
    # the editor: a background image and a brush layer (alpha > 0 where painted) -> init and mask
    background = Image.fromarray(np.full((32, 32, 3), 200, np.uint8))
    layer = np.zeros((32, 32, 4), np.uint8)
    layer[:, 16:, 3] = 255
    init, mask = editor_inputs(
        {"background": background, "layers": [Image.fromarray(layer, "RGBA")]}, channels=1, size=16
    )
    assert init.shape == (1, 1, 16, 16) and torch.allclose(init, torch.full_like(init, 200 / 127.5 - 1))
    assert mask.shape == (1, 1, 16, 16) and mask[..., 8:].eq(1).all() and mask[..., :8].eq(0).all()
    assert editor_inputs({"background": background, "layers": []}, channels=1, size=16)[1] is None
    assert editor_inputs({"background": None, "layers": []}, channels=1, size=16) == (None, None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _browser():
    """A headless Selenium Chrome on Debian's chromium, or a skip saying what is missing (never silently)."""
    pytest.importorskip("gradio", reason='the demo extra is not installed: pip install -e ".[demo]"')
    pytest.importorskip("selenium", reason='selenium is not installed: pip install -e ".[dev]"')
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip("no chromium / chromedriver on PATH: apt-get install chromium chromium-driver (.ci/run does)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)


@pytest.mark.slow
def test_page_in_a_headless_browser(tmp_path, ckpt):
    driver = _browser()
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    import demo
    from diffusion.demo_page import generate

    port = _free_port()
    page, model = demo.build(compose_demo(f"ckpt={ckpt}", "sampler=ddim", "sampler.steps=3", "batch=2", "seed=5"))
    page.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    wait = WebDriverWait(driver, 60)

    def set_number(elem_id: str, value) -> None:
        box = driver.find_element(By.CSS_SELECTOR, f"#{elem_id} input")
        box.send_keys(Keys.CONTROL, "a")
        box.send_keys(str(value), Keys.TAB)

    def gallery_images(previous: set[str]) -> list[np.ndarray]:
        """The gallery's images once new ones (other src than `previous`) are shown, fetched by their URLs."""

        def new_sources(_):
            srcs = [e.get_attribute("src") for e in driver.find_elements(By.CSS_SELECTOR, "#gallery img")]
            return srcs if srcs and not set(srcs) & previous else False

        srcs = wait.until(new_sources)
        return [np.asarray(Image.open(io.BytesIO(urllib.request.urlopen(src).read()))) for src in srcs]

    try:
        driver.get(f"http://127.0.0.1:{port}/")
        wait.until(EC.element_to_be_clickable((By.ID, "generate")))
        assert "Label" in driver.find_element(By.TAG_NAME, "body").text  # a class model asks for a label

        # 1. generate: the page's images are exactly what generate() gives for the same values
        driver.find_element(By.ID, "generate").click()
        shown = gallery_images(set())
        expect = generate(
            model, demo.samplers()[0], label="0", sampler="ddim", steps=3, seed=5, batch=2, progress=False
        )
        assert len(shown) == 2
        for got, want in zip(shown, expect):
            got = got if got.ndim == 2 else got[..., 0]
            assert np.array_equal(got, want)

        # 2. an edit: upload an image, strength 0 gives it back (at the model's size)
        picture = np.random.default_rng(0).integers(0, 256, (16, 16), dtype=np.uint8)
        Image.fromarray(picture).save(tmp_path / "init.png")
        driver.find_element(By.CSS_SELECTOR, "#editor input[type=file]").send_keys(str(tmp_path / "init.png"))
        time.sleep(2)  # the editor loads the picture into its canvas
        set_number("strength", 0)
        previous = {e.get_attribute("src") for e in driver.find_elements(By.CSS_SELECTOR, "#gallery img")}
        driver.find_element(By.ID, "generate").click()
        edited = gallery_images(previous)
        got = edited[0] if edited[0].ndim == 2 else edited[0][..., 0]
        assert np.array_equal(got, picture)  # the editor sends PNG: lossless

        # 3. a bad value: a message on the page, not a traceback
        set_number("steps", 0)
        driver.find_element(By.ID, "generate").click()
        wait.until(lambda d: "steps=0 must be a whole number" in d.find_element(By.TAG_NAME, "body").text)
        assert "Traceback" not in driver.find_element(By.TAG_NAME, "body").text
    finally:
        driver.quit()
        page.close()
