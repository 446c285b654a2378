"""The local web page of `demo.py`: try a checkpoint in a browser (Gradio, the optional extra `demo`).

`build_page` lays the page out for what the model takes (a prompt and a negative prompt for a text model, a label
for a class model, neither for an unconditional one), with guidance, sampler, steps, seed and batch, and an image
editor for image-to-image (the uploaded image, `strength`) and inpainting (the brush strokes are the mask: painted
= repainted). `generate` is what its button runs, a plain function of the page's values that goes through
`DiffusionModel.generate` as `sample.py` does (`diffusion.generation`); a user error becomes a message on the page
(`gr.Error`), never a traceback. The model is loaded once, by the caller.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from functools import partial

import numpy as np
import torch

from diffusion.conditioning import ClassConditioning, TextConditioning
from diffusion.errors import ConfigError, UserError
from diffusion.generation import edit_inputs, image_shape, image_tensor, mask_tensor, nonfinite_warning, to_uint8
from diffusion.optional import require
from diffusion.samplers import SamplePrecision, check_sampler

log = logging.getLogger(__name__)
NO_LABEL = "none (unconditional)"
MAX_BATCH = 16


def import_gradio():
    """The gradio module, or a one-line MissingPackageError saying which extra installs it."""
    return require("gradio", feature="demo.py")


def editor_inputs(editor, *, channels: int, size: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(init (1, C, S, S), mask (1, 1, S, S) or None) from the image editor's value: its background image and the
    alpha of its brush layers (painted = 1 = repaint); (None, None) when no image was given."""
    background = editor.get("background") if isinstance(editor, Mapping) else editor
    if background is None:
        return None, None
    init = image_tensor(background, channels=channels, size=size)[None]
    layers = (
        [layer for layer in (editor.get("layers") or []) if layer is not None] if isinstance(editor, Mapping) else []
    )
    painted = None
    for layer in layers:
        alpha = np.asarray(layer.convert("RGBA"))[..., 3] > 0  # (H, W)
        painted = alpha if painted is None else painted | alpha
    if painted is None or not painted.any():
        return init, None
    from PIL import Image

    mask = mask_tensor(Image.fromarray(painted.astype(np.uint8) * 255, "L").resize(background.size), size=size)
    return init, mask[None]


def generate(
    model,
    samplers: Mapping[str, Callable],
    *,
    prompt: str = "",
    label: str | int | None = None,
    negative: str = "",
    guidance: float = 1.0,
    sampler: str,
    steps: int,
    seed: int,
    batch: int,
    editor=None,
    strength: float = 1.0,
    precision: SamplePrecision = "fp32",
    progress: bool = True,
) -> list[np.ndarray]:
    """The page's images: (H, W, C) uint8 arrays (grayscale as (H, W)); a UserError for a bad value."""
    if sampler not in samplers:
        raise ConfigError(f"sampler {sampler!r} is not one of {', '.join(samplers)}")
    for name, value, lo in (("steps", steps, 1), ("seed", seed, 0), ("batch", batch, 1)):
        if value is None or float(value) != int(value) or int(value) < lo:
            raise ConfigError(f"{name}={value} must be a whole number >= {lo}")
    if int(batch) > MAX_BATCH:
        raise ConfigError(f"batch={batch}: at most {MAX_BATCH} images at a time")
    condition = None
    if isinstance(model.conditioning, TextConditioning):
        condition = (prompt or "").strip() or None
    elif isinstance(model.conditioning, ClassConditioning) and label not in (None, "", NO_LABEL):
        condition = int(label)
    negative = (negative or "").strip() or None
    guidance = float(guidance)
    rows = model.conditioning.conditions_from(
        label=condition if isinstance(condition, int) else None,
        prompts=[condition] if isinstance(condition, str) else None,
        negative=negative,
        guidance=None if guidance == 1.0 else guidance,
    )
    run = partial(samplers[sampler], steps=int(steps))
    check_sampler(run, model.process)
    channels, size = image_shape(model)
    init, mask = editor_inputs(editor, channels=channels, size=size)
    columns = list(range(int(batch)))
    init, mask = edit_inputs(init, mask, columns, strength=float(strength))
    pixels = model.generate(
        rows * len(columns),
        seeds=[int(seed) + j for j in columns],
        sampler=run,
        guidance=guidance,
        negative=negative,
        precision=precision,
        batch_size=MAX_BATCH,
        progress=progress,
        init=init,
        strength=float(strength),
        mask=mask,
    )
    warning = nonfinite_warning(pixels, model, "the checkpoint")
    if warning:
        log.warning(warning)
    return [img[..., 0] if img.shape[-1] == 1 else img for img in to_uint8(pixels)]


def build_page(model, samplers: Mapping[str, Callable], *, sampler: str, steps: int, title: str, **defaults):
    """The gr.Blocks page for `model`; `defaults`: guidance, seed, batch, precision."""
    gr = import_gradio()
    text = isinstance(model.conditioning, TextConditioning)
    classes = model.conditioning.num_classes if isinstance(model.conditioning, ClassConditioning) else None
    precision = defaults.get("precision", "fp32")

    def on_generate(prompt, label, negative, guidance, sampler_name, steps_, seed, batch, editor, strength, *rest):
        progress = rest[-1] if rest else None
        try:
            return generate(
                model, samplers, prompt=prompt, label=label, negative=negative, guidance=guidance,
                sampler=sampler_name, steps=steps_, seed=seed, batch=batch, editor=editor, strength=strength,
                precision=precision, progress=progress is not None,
            )  # fmt: skip
        except UserError as e:
            raise gr.Error(" ".join(str(e).split())) from None
        except Exception as e:  # a bug: its traceback goes to the console, a line to the page
            log.exception("generation failed")
            raise gr.Error(f"generation failed ({type(e).__name__}: {e}); the console has the details") from None

    with gr.Blocks(title=title) as page:
        gr.Markdown(f"## {title}")
        with gr.Row():
            with gr.Column():
                prompt = gr.Textbox(label="Prompt", visible=text, elem_id="prompt")
                negative = gr.Textbox(label="Negative prompt", visible=text, elem_id="negative")
                label = gr.Dropdown(
                    [NO_LABEL, *map(str, range(classes or 0))],
                    value=NO_LABEL if not classes else "0",
                    label="Label",
                    visible=classes is not None,
                    elem_id="label",
                )
                guidance = gr.Number(
                    defaults.get("guidance", 1.0), label="Guidance", visible=text or classes is not None,
                    elem_id="guidance",
                )  # fmt: skip
                with gr.Row():
                    sampler_name = gr.Dropdown(list(samplers), value=sampler, label="Sampler", elem_id="sampler")
                    steps_box = gr.Number(steps, label="Steps", precision=0, elem_id="steps")
                with gr.Row():
                    seed = gr.Number(defaults.get("seed", 0), label="Seed", precision=0, elem_id="seed")
                    batch = gr.Number(defaults.get("batch", 4), label="Batch", precision=0, elem_id="batch")
                with gr.Accordion("Edit an image: image-to-image and inpainting", open=True):
                    editor = gr.ImageEditor(
                        type="pil", image_mode="RGBA", format="png", label="Image (paint over what to repaint)",
                        brush=gr.Brush(colors=["#ff00ff"], color_mode="fixed"), elem_id="editor",
                    )  # fmt: skip
                    strength = gr.Number(
                        1.0, label="Strength (0 keeps the image, 1 redraws from noise)", elem_id="strength"
                    )
                button = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column():
                gallery = gr.Gallery(label="Images", format="png", columns=4, elem_id="gallery")
        inputs = [prompt, label, negative, guidance, sampler_name, steps_box, seed, batch, editor, strength]
        button.click(_with_progress(on_generate, gr), inputs=inputs, outputs=gallery)
    return page


def _with_progress(fn, gr):
    """`fn` with a `gr.Progress` that follows the samplers' tqdm bar (Gradio reads the default argument)."""

    def handler(*args, progress=gr.Progress(track_tqdm=True)):  # noqa: B008 (Gradio's documented pattern)
        return fn(*args, progress)

    return handler
