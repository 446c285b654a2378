"""The model: a denoising network, a diffusion process, a conditioning and a codec, and what every caller does
with them. Plain torch: no Lightning, no Hydra (the lucidrains principle: the model is the loss).

- `loss` is the one place where a batch becomes a loss: encode the images through the codec, draw noise levels
  from the process, noise x0 into x_t, call the network on what the process gives it, and take the process's
  weighted MSE against its target, in fp32 whatever the network's dtype (Ho et al. 2020, Algorithm 1).
  `validation_loss` is the same at fixed, stratified noise levels.
- `generate` is the one place where conditions become images: per-image seeded noise, the guided denoiser
  (`denoiser`: classifier-free guidance, Ho & Salimans 2022), a sampler, and the codec's decoder. Unconditional,
  class and text models differ only in the conditions passed (None, labels, prompts). With `init` (and `mask`)
  it edits images instead: image-to-image and inpainting (`diffusion.samplers.Edit`).
- `describe` is the self-description a checkpoint carries; `from_description`, `from_checkpoint` and
  `from_export` rebuild the model from one (only registered networks, `diffusion.networks`).
Training (`diffusion.module.DiffusionModule`), validation, the sample grid, FID, `sample.py`, `export.py` and the
benchmarks all go through this object.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffusion.checkpoint import (
    CONDITIONING_PREFIX,
    FORMAT,
    check_description,
    load_weights,
    net_state_dict,
    read_checkpoint,
    sub_state_dict,
)
from diffusion.codec import Codec, IdentityCodec, build_codec, sampler_for
from diffusion.conditioning import Conditioning, Kwargs, build_conditioning, class_or_none, concat_kwargs
from diffusion.errors import BadFileError, ConfigError, MissingPathError
from diffusion.networks import NetworkSpec, build_net, describe_net, spec
from diffusion.process import Process, build_process
from diffusion.samplers import Edit, ModelFn, SamplePrecision, draw_noise, image_generators, with_precision
from diffusion.state import is_plain

EXPORT_CONFIG = "config.json"  # export.py format=safetensors: the description, which weights, the step
EXPORT_WEIGHTS = "model.safetensors"
EXPORT_CONDITIONING = "conditioning.safetensors"  # a trained text encoder's weights, when there is one
EXPORT_EXTRA_STATE = "extra_state"  # its metadata key: the module's non-tensor state (a tokenizer), as JSON


class DiffusionModel(nn.Module):
    """network + process + conditioning + codec (see the module docstring).

    Args:
        net: a network of the `diffusion.networks` interface, in the codec's latent space.
        process: the diffusion family (`diffusion.process`): discrete schedule, EDM or flow.
        conditioning: what a batch's conditions become for the network (`diffusion.conditioning`); default: class
            labels when the network has `num_classes`, else none.
        codec: pixels <-> what the network models (`diffusion.codec`); default pixels.

    `weights` ("raw", "ema", "post-hoc EMA ...") and `global_step` say where loaded weights came from (None and 0
    for a freshly assembled model).
    """

    def __init__(
        self,
        *,
        net: nn.Module,
        process: Process,
        conditioning: Conditioning | None = None,
        codec: Codec | None = None,
    ) -> None:
        super().__init__()
        self.net = net
        self.process = process
        self.conditioning = conditioning or class_or_none(num_classes=getattr(net, "num_classes", None))
        self.conditioning.check_network(net)
        self.codec = codec if codec is not None else IdentityCodec()  # frozen; its tensors stay out of state dicts
        self.weights: str | None = None
        self.global_step = 0

    @property
    def spec(self) -> NetworkSpec:
        """What the network declares: channels and side of a sample (in the codec's space), classes, context."""
        return spec(self.net)

    @property
    def device(self) -> torch.device:
        return self.process.device

    # --- the loss ------------------------------------------------------------------------------------------
    def loss(
        self, x0: Tensor, level: Tensor, noise: Tensor, cond: Kwargs | None = None, *, forward: ModelFn | None = None
    ) -> Tensor:
        """Weighted MSE between the network's output and the process's target at `level`, per sample, in fp32: (B,).

        `cond`: the network's conditioning keyword arguments (`conditioning(...)`), None for none; `forward`: the
        network's forward to call (a compiled one), default the network itself.
        """
        x_t = self.process.q_sample(x0, level, noise)
        out = (forward or self.net)(*self.process.net_input(x_t, level), **(cond or {}))
        target = self.process.target(x0, noise, level)
        # fp32 whatever the network's dtype (bf16-true casts the network): a bf16 mean of squares loses ~3 digits
        mse = (out.float() - target.float()).square().flatten(1).mean(1)
        return mse * self.process.loss_weight(level)

    def training_loss(
        self,
        x: Tensor,
        conditions,
        *,
        drop_prob: float = 0.0,
        forward: ModelFn | None = None,
        channels_last: bool = False,
    ) -> Tensor:
        """The per-sample training loss (B,) of a batch: images `x` (pixels, or a latent cache's moments) and their
        `conditions` (labels, captions, or None); each condition is dropped to the null one with `drop_prob`.

        Every draw (the codec's latent sample, the levels, the noise, the dropped conditions, the network's dropout)
        comes from torch's global generator of x's device, which the caller seeds (the module's training stream).
        """
        x0 = self.codec.encode(x)  # a latent sample (or the mean, codec.sample=false)
        if channels_last:
            x0 = x0.contiguous(memory_format=torch.channels_last)
        level = self.process.draw_levels(x0.shape[0], device=x0.device)
        noise = torch.randn_like(x0)
        cond = self.conditioning(conditions, device=x0.device, drop_prob=drop_prob)
        return self.loss(x0, level, noise, cond, forward=forward)

    def validation_loss(
        self, x: Tensor, conditions, *, seed: int, buckets: int, forward: ModelFn | None = None
    ) -> tuple[Tensor, Tensor]:
        """(loss (B,), bucket (B,)) at fixed noise and stratified noise levels: sample i falls in bucket i mod
        `buckets` of the training level distribution's equally likely buckets, at a position seeded by `seed`, so
        the same batch gives the same value every time (and the codec's mean latent, never a sample)."""
        x0 = self.codec.encode(x, sample=False)
        b = x0.shape[0]
        g = torch.Generator().manual_seed(seed)
        bucket = torch.arange(b) % buckets
        level = self.process.val_levels(bucket, torch.rand(b, generator=g), buckets).to(x0.device)
        noise = torch.randn(x0.shape, generator=g).to(x0.device, x0.dtype)
        cond = self.conditioning(conditions, device=x0.device)
        return self.loss(x0, level, noise, cond, forward=forward), bucket.to(x0.device)

    # --- generation ----------------------------------------------------------------------------------------
    def denoiser(
        self,
        cond: Kwargs | None = None,
        *,
        null: Kwargs | None = None,
        guidance: float = 1.0,
        precision: SamplePrecision = "fp32",
    ) -> ModelFn:
        """The `model(x_in, t_in)` a sampler takes: the network with classifier-free guidance.

        out = uncond + guidance * (cond - uncond), the conditional branch with the network arguments `cond`, the
        unconditional one with `null` (default: the conditioning's null condition; a negative prompt's arguments
        replace it). guidance=1 is the plain conditional model, 0 the unconditional one; anything else evaluates
        both branches in one batched forward pass (sequences of different lengths padded, their masks False
        there). Without `cond` the model is the unconditional branch. The network runs under autocast in
        `precision`; the sampler's own arithmetic stays fp32.
        """
        net = self.net

        def unconditional(x: Tensor, t: Tensor) -> Tensor:
            return net(x, t, **_on(null if null is not None else self.conditioning.null(x.shape[0]), x.device))

        if cond is None or guidance == 0.0:
            model = unconditional
        elif guidance == 1.0:

            def model(x: Tensor, t: Tensor) -> Tensor:
                return net(x, t, **_on(cond, x.device))
        else:

            def model(x: Tensor, t: Tensor) -> Tensor:
                uncond = null if null is not None else self.conditioning.null(x.shape[0])
                both = concat_kwargs(_on(cond, x.device), _on(uncond, x.device))
                c, u = net(torch.cat([x, x]), torch.cat([t, t]), **both).chunk(2)  # (2B, C, H, W) -> 2 x (B, ...)
                return u + guidance * (c - u)

        return with_precision(model, precision, self.device)

    @torch.no_grad()
    def generate(
        self,
        conditions: Sequence | None = None,
        *,
        seeds: Sequence[int],
        sampler: Callable[..., Tensor],
        guidance: float = 1.0,
        negative=None,
        precision: SamplePrecision = "fp32",
        batch_size: int = 64,
        progress: bool = False,
        init: Tensor | None = None,
        strength: float = 1.0,
        mask: Tensor | None = None,
    ) -> Tensor:
        """(len(seeds), C, H, W) pixels in [-1, 1], on the model's device, in eval mode.

        Image i starts from noise seeded `seeds[i]` (and any fresh noise a stochastic sampler draws comes from the
        same generator), so an image depends only on its seed and condition, not on the batch it was drawn in.
        `conditions`: one per image (a label, a prompt), or None for unconditional images (the null condition);
        `negative`: a condition whose arguments replace the null one in guidance (a negative prompt);
        `sampler`: a sampler with its options bound (`diffusion.samplers`), called as sampler(model, process,
        noise, generator=...); x0 is clipped to [-1, 1] only in pixel space.

        Editing (`diffusion.samplers.Edit`): `init` (len(seeds), C, H, W) pixels in [-1, 1] to start from, encoded
        through the codec (its mean latent); `strength` in [0, 1] the share of the sampling grid run from `init`
        noised with each image's own seeded noise (SDEdit: 0 returns `init` up to the codec's round trip, 1 is plain
        generation); `mask` (len(seeds), 1, H, W) in {0, 1}, 1 = generate and 0 = keep, for inpainting: after every
        step the kept region is the init noised to the level reached (RePaint), in latent space for a latent model
        (the mask max-pooled to the latent size, so a latent that sees any masked pixel is generated). A pixel
        model's kept region comes back exactly as `init`.
        """
        seeds = list(seeds)
        conditions = [None] * len(seeds) if conditions is None else list(conditions)
        if len(conditions) != len(seeds):
            raise ValueError(f"{len(conditions)} conditions for {len(seeds)} seeds")
        check_edit(init, mask, strength, n=len(seeds), sampler=sampler)
        sampler = sampler_for(sampler, self.codec)
        shape, device = self.spec.sample_shape, self.device
        was_training = self.training
        self.eval()
        out = []
        try:
            for lo in range(0, len(seeds), batch_size):
                chunk = conditions[lo : lo + batch_size]
                generators = image_generators(seeds[lo : lo + batch_size])
                noise = draw_noise((len(chunk), *shape), generator=generators, device=device)
                cond = None if all(c is None for c in chunk) else self.conditioning(chunk, device=device)
                null = (  # computed once per batch, not at every step (a text encoder's forward)
                    self.conditioning([negative] * len(chunk), device=device)
                    if negative is not None
                    else self.conditioning.null(len(chunk), device=device)
                )
                model = self.denoiser(cond, null=null, guidance=guidance, precision=precision)
                options = {"progress": True} if progress else {}  # (custom samplers need not take it)
                if init is not None:
                    options["edit"] = self._edit(init[lo : lo + batch_size], mask, lo, batch_size, strength, shape)
                z = sampler(model, self.process, noise, generator=generators, **options)
                out.append(self.codec.decode(z).float())  # pixels in [-1, 1]
        finally:
            self.train(was_training)
        return torch.cat(out) if out else torch.empty(0, *shape, device=device)

    def _edit(self, init: Tensor, mask: Tensor | None, lo: int, batch_size: int, strength: float, shape) -> Edit:
        """The sampler's `Edit` for one batch: its init images encoded (the codec's mean), the mask at their size."""
        known = self.codec.encode(init.to(self.device, torch.float32), sample=False).float()
        if tuple(known.shape[1:]) != tuple(shape):
            raise ConfigError(
                f"init images of shape {tuple(init.shape[1:])} give {tuple(known.shape[1:])} for a model of "
                f"{tuple(shape)} samples"
            )
        if mask is not None:
            mask = mask[lo : lo + batch_size].to(self.device, torch.float32)
            if mask.shape[-2:] != known.shape[-2:]:  # a latent sees any masked pixel of its patch: generate it
                mask = F.adaptive_max_pool2d(mask, tuple(known.shape[-2:]))
        return Edit(known=known, strength=strength, mask=mask)

    # --- self-description and loading ------------------------------------------------------------------
    def describe(self) -> dict:
        """What `from_description` needs to rebuild this model; plain values (saved in every checkpoint)."""
        description = {
            "format": FORMAT,
            "net": describe_net(self.net),
            "process": self.process.description(),
            "conditioning": self.conditioning.describe(),
        }
        if self.codec.config.get("kind") != "identity":
            description["codec"] = dict(self.codec.config)
        return description

    @classmethod
    def from_description(
        cls, description: dict, *, source: str = "checkpoint", text_encoder: str | None = None
    ) -> DiffusionModel:
        """The model a (checked) description names, with freshly initialised weights.

        `text_encoder` replaces the path / Hub id of a frozen pretrained text encoder the description names.
        """
        description = check_description(description, source=source)
        net = build_net(description["net"], source=source)
        conditioning = build_conditioning(
            description.get("conditioning"), net=net, source=source, pretrained=text_encoder
        )
        codec = build_codec(description.get("codec"), source=source)
        return cls(net=net, process=build_process(description["process"]), conditioning=conditioning, codec=codec)

    def load_checkpoint_weights(self, ckpt: dict, *, use_ema: bool = True, source: str = "checkpoint") -> None:
        """Load checkpoint `ckpt`'s network weights (its EMA copy when present and `use_ema`) and a trained text
        encoder's; one-line errors naming `source` when they do not fit."""
        state, self.weights = net_state_dict(ckpt, use_ema=use_ema)
        load_weights(self.net, state, source=source)
        self._load_conditioning(sub_state_dict(ckpt["state_dict"], CONDITIONING_PREFIX), source=source)
        self.global_step = int(ckpt.get("global_step", 0))

    def _load_conditioning(self, state: dict, *, source: str) -> None:
        try:
            self.conditioning.load_state_dict(state)
        except RuntimeError as e:
            raise BadFileError(f"{source}: its text encoder weights do not fit its description ({e})") from None

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        *,
        use_ema: bool = True,
        map_location: str | torch.device = "cpu",
        text_encoder: str | None = None,
    ) -> DiffusionModel:
        """The model a checkpoint describes, with its EMA weights (or raw ones), in eval mode on `map_location`."""
        ckpt = read_checkpoint(path)
        source = f"checkpoint {path}"
        model = cls.from_description(ckpt["diffusion"], source=source, text_encoder=text_encoder)
        model.load_checkpoint_weights(ckpt, use_ema=use_ema, source=source)
        return model.eval().to(map_location)

    @classmethod
    def from_export(cls, folder: str | Path, *, map_location: str | torch.device = "cpu") -> DiffusionModel:
        """The model of a folder written by `export.py format=safetensors` (config.json + model.safetensors)."""
        from safetensors.torch import load_file

        folder = Path(folder).expanduser()
        if not (folder / EXPORT_CONFIG).is_file() or not (folder / EXPORT_WEIGHTS).is_file():
            raise MissingPathError(f"{folder} holds no {EXPORT_CONFIG} + {EXPORT_WEIGHTS} (written by export.py)")
        source = str(folder / EXPORT_CONFIG)
        try:
            config = json.loads((folder / EXPORT_CONFIG).read_text())
        except json.JSONDecodeError as e:
            raise BadFileError(f"{source} is not JSON ({e})") from e
        if not isinstance(config, dict):
            raise BadFileError(f"{source} is not a JSON object")
        model = cls.from_description(config, source=source)
        load_weights(model.net, load_file(str(folder / EXPORT_WEIGHTS)), source=str(folder / EXPORT_WEIGHTS))
        if (folder / EXPORT_CONDITIONING).is_file():
            model._load_conditioning(_read_with_extra_state(folder / EXPORT_CONDITIONING), source=source)
        elif model.conditioning.state_dict():
            raise MissingPathError(f"{folder} holds no {EXPORT_CONDITIONING}, the text encoder weights {source} names")
        model.weights, model.global_step = config.get("weights"), int(config.get("global_step", 0))
        return model.eval().to(map_location)


def check_edit(
    init: Tensor | None, mask: Tensor | None, strength: float, *, n: int, sampler: Callable[..., Tensor]
) -> None:
    """A ConfigError naming what is wrong with `generate`'s editing arguments for `n` images."""
    if not 0.0 <= float(strength) <= 1.0:
        raise ConfigError(f"strength={strength} must be in [0, 1]")
    if init is None:
        if mask is not None:
            raise ConfigError("mask= needs init=: the image whose unmasked region is kept")
        if float(strength) != 1.0:
            raise ConfigError(f"strength={strength} needs init=: the image to start from")
        return
    if init.ndim != 4 or init.shape[0] != n:
        raise ConfigError(f"init of shape {tuple(init.shape)} must be (N, C, H, W) with N = {n} images")
    if mask is not None and (mask.ndim != 4 or tuple(mask.shape) != (n, 1, *init.shape[-2:])):
        raise ConfigError(f"mask of shape {tuple(mask.shape)} must be {(n, 1, *init.shape[-2:])} for init's images")
    if "edit" not in inspect.signature(sampler).parameters:
        raise ConfigError(f"sampler {getattr(sampler, 'func', sampler)} takes no edit= (init= and mask= need one)")


def _read_with_extra_state(path: Path) -> dict:
    """A safetensors file's tensors, with the non-tensor state its metadata carries (`EXPORT_EXTRA_STATE`)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    try:
        extra = json.loads(metadata.get(EXPORT_EXTRA_STATE, "{}"))
    except json.JSONDecodeError as e:
        raise BadFileError(f"{path}: its {EXPORT_EXTRA_STATE} metadata is not JSON ({e})") from None
    if not isinstance(extra, dict) or not is_plain(extra):
        raise BadFileError(f"{path}: its {EXPORT_EXTRA_STATE} metadata is not a dict of plain values; refused")
    return {**load_file(str(path)), **extra}


def _on(kwargs: Kwargs, device: torch.device) -> Kwargs:
    return {k: v.to(device) for k, v in kwargs.items()}
