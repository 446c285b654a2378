"""The conditioning seam: what a batch's condition (class labels, captions) becomes for the network.

A `Conditioning` turns the conditions of a batch into the network's keyword arguments, so the training module,
sample grids and `sample.py` call every network as `net(x_t, t, **kwargs)` without knowing the modality:

- `NoConditioning`: unconditional; no arguments.
- `ClassConditioning`: labels -> `y` (label `num_classes` is the null class).
- `TextConditioning`: captions -> `context` (B, L, D) and `context_mask` (B, L) from its text encoder (see
  `diffusion.text_encoders`); the empty caption "" is the null condition, as in Stable Diffusion.

In training, `drop_prob` replaces conditions by the null one (classifier-free guidance, Ho & Salimans 2022,
needs the network to learn both); `null(n)` gives the null condition's arguments for guidance. Text conditioning
owns its encoder as a submodule: a trainable one is trained with the network and saved in the checkpoint's
state dict (its tokenizer as a JSON string in the extra state); a frozen one (CLIP) is named by path or Hub id in
the checkpoint's description, its weights are left out of the state dict, and its outputs may be cached per
caption string. `describe()` gives the plain-value description that `build_conditioning` rebuilds from,
including `guidance`: the classifier-free guidance scale the run recommends (`conditioning.guidance`), which
travels with the checkpoint and is what `sample.py`, the sample grids and FID use unless told otherwise.
"""

from __future__ import annotations

import importlib
import logging
import math
from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from diffusion.errors import BadFileError, ConfigError
from diffusion.state import is_plain

log = logging.getLogger(__name__)
Kwargs = dict[str, Tensor]
ENCODER_PREFIX = "encoder."


class Conditioning(nn.Module):
    """The interface: conditions of a batch in, the network's keyword arguments out."""

    def forward(self, cond, *, device: torch.device | str | None = None, drop_prob: float = 0.0) -> Kwargs:
        """The network's keyword arguments for the batch's conditions; each is replaced by the null condition
        with probability `drop_prob` (drawn from torch's global generator of `device`)."""
        raise NotImplementedError

    def null(self, n: int, *, device: torch.device | str | None = None) -> Kwargs:
        """The keyword arguments of `n` null conditions (the unconditional branch of guidance)."""
        raise NotImplementedError

    def check_network(self, net: nn.Module) -> None:
        """A one-line ConfigError unless `net` takes this conditioning's arguments."""

    def prepare(self, datamodule) -> None:
        """Learn what the conditioning needs from the training data before training (a tokenizer); no-op here."""

    def preview_conditions(self) -> list | None:
        """The conditions sample grids cycle through (one grid row each); None for unconditional grids."""
        return None

    def freeze_for_adapters(self) -> None:
        """A LoRA fine-tune (`finetune=lora`, after `prepare`): freeze what this conditioning would train, so that
        the base model's conditions reach the network unchanged."""
        self.requires_grad_(False)

    #: how sample.py's user gives this conditioning's conditions, for messages (None: it takes none)
    usage: str | None = None
    #: the classifier-free guidance scale the training run recommends (`conditioning.guidance`, saved in the
    #: checkpoint's description): what sample.py, the sample grids and FID use unless told otherwise
    guidance: float = 1.0

    def conditions_from(self, *, label=None, prompts=None, negative=None, guidance=None) -> list:
        """The condition of each grid row from sample.py's options (`label=`, `prompt=` / `prompts=`,
        `negative_prompt=`, `guidance=`); [None] is the null condition. A one-line ConfigError for an option this
        conditioning does not take, or guidance without a condition to guide towards."""
        if label is not None:
            raise ConfigError(
                "label=... was given but the model is unconditional (trained with model.num_classes=null)"
            )
        _no_prompts(prompts, negative)
        if guidance is not None:
            raise ConfigError(f"guidance={guidance} needs a class-conditional model, but this one is unconditional")
        return [None]

    def _guided_rows(self, rows: list, guidance, negative) -> list:
        """`rows`, or a ConfigError when guidance (or a negative prompt) has no condition to act on."""
        if (guidance is not None or negative is not None) and rows == [None]:
            what = f"guidance={guidance}" if guidance is not None else "negative_prompt="
            raise ConfigError(f"{what} needs {self.usage}")
        return rows

    def describe(self) -> dict:
        """Plain values that `build_conditioning` rebuilds this conditioning from (saved in checkpoints)."""
        return {"target": f"{type(self).__module__}.{type(self).__qualname__}", "config": {}}


class NoConditioning(Conditioning):
    """Unconditional: the network takes no condition."""

    def forward(self, cond, *, device=None, drop_prob: float = 0.0) -> Kwargs:
        return {}

    def null(self, n: int, *, device=None) -> Kwargs:
        return {}

    def check_network(self, net: nn.Module) -> None:
        if getattr(net, "num_classes", None):
            raise ConfigError(
                f"conditioning=none but the network is class-conditional (model.num_classes={net.num_classes}); "
                "use conditioning=class or model.num_classes=null"
            )
        if getattr(net, "context_dim", None):
            raise ConfigError("conditioning=none but the network has cross-attention (model.context_dim is set)")


class ClassConditioning(Conditioning):
    """Class labels 0..num_classes-1 as the network's `y`; label `num_classes` is the null class.

    Args:
        num_classes: the number of classes (`model.num_classes`).
        guidance: the recommended classifier-free guidance scale (`Conditioning.guidance`).
    """

    def __init__(self, *, num_classes: int, guidance: float = 1.0) -> None:
        super().__init__()
        if num_classes is None or num_classes < 1:
            raise ConfigError(f"conditioning=class needs model.num_classes >= 1 (got {num_classes})")
        self.num_classes = num_classes
        self.guidance = check_guidance(guidance)

    def forward(self, cond, *, device=None, drop_prob: float = 0.0) -> Kwargs:
        if isinstance(cond, (list, tuple)) and cond and isinstance(cond[0], str):
            raise ConfigError(
                "model.num_classes is set but the data yields captions; use conditioning=text for captions"
            )
        y = torch.as_tensor(cond, dtype=torch.long, device=device)
        if (y < 0).any():
            raise ConfigError(
                "model.num_classes is set but the data has no class labels (use data.labels=true or a labeled dataset)"
            )
        if (y > self.num_classes).any():
            raise ConfigError(f"label {int(y.max())} is out of range: the model has classes 0..{self.num_classes - 1}")
        if drop_prob > 0:
            drop = torch.rand(y.shape, device=y.device) < drop_prob
            y = torch.where(drop, torch.full_like(y, self.num_classes), y)
        return {"y": y}

    def null(self, n: int, *, device=None) -> Kwargs:
        return {"y": torch.full((n,), self.num_classes, dtype=torch.long, device=device)}

    def check_network(self, net: nn.Module) -> None:
        if getattr(net, "num_classes", None) != self.num_classes:
            raise ConfigError(
                f"conditioning=class has {self.num_classes} classes but the network's model.num_classes is "
                f"{getattr(net, 'num_classes', None)}"
            )

    def preview_conditions(self) -> list:
        return list(range(self.num_classes))

    usage = "a label (label=7, label=[1,2] or label=all)"

    def conditions_from(self, *, label=None, prompts=None, negative=None, guidance=None) -> list:
        _no_prompts(prompts, negative)
        if label is None:
            return self._guided_rows([None], guidance, None)
        if label == "all":
            return list(range(self.num_classes))
        values = list(label) if isinstance(label, (list, tuple)) else [label]
        if not values or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            raise ConfigError(f"label={label} must be a class index, a list of them, or 'all'")
        bad = [v for v in values if not 0 <= v < self.num_classes]
        if bad:
            raise ConfigError(f"label={bad[0]} is out of range: the model has classes 0..{self.num_classes - 1}")
        return values

    def describe(self) -> dict:
        return {**super().describe(), "config": {"num_classes": self.num_classes, "guidance": self.guidance}}


def check_guidance(guidance: float) -> float:
    """`guidance` as a float if it is a finite scale >= 0, else a one-line ConfigError."""
    if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not 0 <= guidance < math.inf:
        raise ConfigError(f"conditioning.guidance={guidance} must be a number >= 0 (1 = plain conditional)")
    return float(guidance)


def class_or_none(*, num_classes: int | None, guidance: float = 1.0) -> Conditioning:
    """`conditioning=auto`: class labels when `model.num_classes` is set (recommending `guidance`), else
    unconditional."""
    return NoConditioning() if num_classes is None else ClassConditioning(num_classes=num_classes, guidance=guidance)


class TextConditioning(Conditioning):
    """Captions -> `context` (B, L, D) and `context_mask` (B, L) through `encoder`; "" is the null caption.

    Args:
        encoder: a text encoder (`diffusion.text_encoders`): trained with the network when `encoder.trainable`,
            frozen otherwise.
        cache: keep a frozen encoder's output per caption string (on its device, at most `cache_size` of them,
            least recently used dropped first); ignored for trainable encoders, whose outputs change.
        cache_size: most captions cached.
        preview_prompts: the prompts of sample grids (one row each); default up to 8 distinct training captions.
        guidance: the recommended classifier-free guidance scale (`Conditioning.guidance`).
    """

    def __init__(
        self,
        *,
        encoder: nn.Module,
        cache: bool = True,
        cache_size: int = 4096,
        preview_prompts: Sequence[str] | None = None,
        guidance: float = 1.0,
    ) -> None:
        super().__init__()
        self.guidance = check_guidance(guidance)
        if cache_size < 0:
            raise ConfigError(f"conditioning.cache_size={cache_size} must be >= 0")
        self.encoder = encoder
        self.cache = cache and not encoder.trainable
        self.cache_size = cache_size
        self.preview_prompts = [str(p) for p in preview_prompts] if preview_prompts else None
        self._cached: OrderedDict[str, Kwargs] = OrderedDict()
        if not encoder.trainable:
            # A frozen pretrained encoder is referenced by path / id, not copied into every checkpoint.
            encoder.requires_grad_(False)
            self.register_state_dict_post_hook(_drop_encoder_weights)
            self.register_load_state_dict_post_hook(_allow_missing_encoder_weights)

    @property
    def dim(self) -> int:
        return self.encoder.dim

    def _encoder(self, captions: list[str]) -> Kwargs:
        out = self.encoder(captions)
        if isinstance(out, dict):  # a pipeline's encoders: context, context_mask and maybe pooled
            return dict(out)
        context, mask = out
        return {"context": context, "context_mask": mask}

    def encode(self, captions: list[str]) -> Kwargs:
        """The encoder's arguments of `captions` (context (B, L, D), context_mask (B, L), ...), from the cache
        where it can."""
        if not self.cache:
            return self._encoder(captions)
        missing = list(dict.fromkeys(c for c in captions if c not in self._cached))
        if missing:
            out = self._encoder(missing)
            for i, caption in enumerate(missing):
                self._cached[caption] = {k: v[i] for k, v in out.items()}
        for caption in captions:
            self._cached.move_to_end(caption)
        rows = [self._cached[c] for c in captions]
        while len(self._cached) > self.cache_size:
            self._cached.popitem(last=False)
        return {k: pad_stack([r[k] for r in rows]) for k in rows[0]}

    def forward(self, cond, *, device=None, drop_prob: float = 0.0) -> Kwargs:
        if isinstance(cond, str) or not all(isinstance(c, str) for c in cond):
            raise ConfigError(
                "conditioning=text needs captions, but the data yields class labels or none; use captioned data "
                "(data.captions=true, data.caption=..., or experiment=digits_text)"
            )
        captions = list(cond)
        if drop_prob > 0:
            drop = (torch.rand(len(captions), device=device) < drop_prob).tolist()
            captions = ["" if d else c for c, d in zip(captions, drop, strict=True)]
        return self.encode(captions)

    def null(self, n: int, *, device=None) -> Kwargs:
        return self.forward([""] * n, device=device)

    def check_network(self, net: nn.Module) -> None:
        context_dim = getattr(net, "context_dim", None)
        if context_dim != self.encoder.dim:
            raise ConfigError(
                f"the text encoder gives {self.encoder.dim}-dim embeddings but the network's model.context_dim is "
                f"{context_dim}; set model.context_dim={self.encoder.dim} (a network with cross-attention)"
            )
        pooled_dim, ours = getattr(net, "pooled_dim", None), getattr(self.encoder, "pooled_dim", None)
        if pooled_dim is not None and pooled_dim != ours:
            raise ConfigError(
                f"the network takes a {pooled_dim}-dim pooled text embedding but the text encoder gives "
                f"{ours or 'none'} (conditioning.encoder: the pipeline's own text encoders)"
            )

    def prepare(self, datamodule) -> None:
        captions = getattr(datamodule, "caption_corpus", lambda: None)()
        if captions is None:
            raise ConfigError(
                "conditioning=text needs captioned data: data.captions=true or data.caption=... for a folder, "
                "or experiment=digits_text"
            )
        if hasattr(self.encoder, "fit"):
            self.encoder.fit(captions)
        if self.preview_prompts is None:
            self.preview_prompts = list(dict.fromkeys(captions))[:8]

    def preview_conditions(self) -> list | None:
        return self.preview_prompts

    usage = 'a prompt (prompt="..." or prompts=FILE)'

    def conditions_from(self, *, label=None, prompts=None, negative=None, guidance=None) -> list:
        if label is not None:
            raise ConfigError('label=... is for class-conditional models; this one takes prompt="..." or prompts=FILE')
        return self._guided_rows(list(prompts) if prompts else [None], guidance, negative)

    def freeze_for_adapters(self) -> None:
        """A jointly trained encoder keeps training only the words the fine-tuning captions added (their embedding
        rows): the old captions encode exactly as in the base model, the new words learn their meaning."""
        if not hasattr(self.encoder, "train_new_words_only"):
            return super().freeze_for_adapters()
        words = self.encoder.train_new_words_only()
        if words:
            log.info(f"text encoder: frozen except the embeddings of the {words} new words (finetune=lora)")

    def describe(self) -> dict:
        encoder = {"target": f"{type(self.encoder).__module__}.{type(self.encoder).__qualname__}"}
        config = {
            "encoder": {**encoder, "config": dict(self.encoder.config)},
            "cache": self.cache,
            "cache_size": self.cache_size,
            "preview_prompts": self.preview_prompts,
            "guidance": self.guidance,
        }
        return {**super().describe(), "config": config}


def _no_prompts(prompts, negative) -> None:
    if prompts is not None or negative is not None:
        raise ConfigError("prompt= / prompts= / negative_prompt= need a text-conditional model (conditioning=text)")


def _drop_encoder_weights(module: nn.Module, state_dict: dict, prefix: str, local_metadata) -> None:
    for key in [k for k in state_dict if k.startswith(prefix + ENCODER_PREFIX)]:
        del state_dict[key]


def _allow_missing_encoder_weights(module: nn.Module, incompatible_keys) -> None:
    missing = incompatible_keys.missing_keys
    missing[:] = [k for k in missing if ENCODER_PREFIX not in k]


def pad_stack(rows: list[Tensor]) -> Tensor:
    """Stack (L_i, ...) tensors into (B, max L_i, ...), padding with zeros (False for masks)."""
    length = max(r.shape[0] for r in rows)
    out = rows[0].new_zeros((len(rows), length, *rows[0].shape[1:]))
    for i, r in enumerate(rows):
        out[i, : r.shape[0]] = r
    return out


def concat_kwargs(a: Kwargs, b: Kwargs) -> Kwargs:
    """Two batches of network arguments as one (along the batch), padding sequences to the longer one."""
    out = {}
    for key in a:
        x, y = a[key], b[key]
        if x.ndim >= 2 and x.shape[1] != y.shape[1]:  # (B, L, ...) sequences of different lengths
            out[key] = pad_stack([*x, *y.to(x.device)])
        else:
            out[key] = torch.cat([x, y.to(x.device)])
    return out


# The conditionings and text encoders a checkpoint may name (plain config values only).
CONDITIONINGS = {f"{__name__}.{c.__qualname__}": c for c in (NoConditioning, ClassConditioning, TextConditioning)}
TEXT_ENCODERS = ("diffusion.text_encoders.TransformerTextEncoder", "diffusion.text_encoders.CLIPTextEncoder")
TEXT_ENCODERS += ("diffusion.text_encoders.SD3TextEncoder", "diffusion.text_encoders.FluxTextEncoder")


def build_conditioning(
    description: dict | None, *, net: nn.Module | None = None, source: str = "checkpoint", **encoder_overrides
) -> Conditioning:
    """The conditioning a checkpoint describes; for checkpoints without one, what the network implies.

    Only registered classes are built (`CONDITIONINGS`, `TEXT_ENCODERS`). `encoder_overrides` replace config
    values of a text encoder (e.g. `pretrained=` for a CLIP folder that moved).
    """
    if description is None:
        return class_or_none(num_classes=getattr(net, "num_classes", None))
    target = description.get("target") if isinstance(description, dict) else None
    config = description.get("config") if isinstance(description, dict) else None
    if target not in CONDITIONINGS or not isinstance(config, dict) or not is_plain(config):
        raise BadFileError(f"{source} names conditioning {target!r} with a config that is not plain data; refused")
    config = dict(config)
    if "encoder" in config:
        enc = config["encoder"]
        enc_target = enc.get("target") if isinstance(enc, dict) else None
        if enc_target not in TEXT_ENCODERS or not isinstance(enc.get("config"), dict):
            raise BadFileError(f"{source} names text encoder {enc_target!r}, which this project does not build")
        module_name, _, cls_name = enc_target.rpartition(".")
        cls = getattr(importlib.import_module(module_name), cls_name)
        enc_config = {**enc["config"], **{k: v for k, v in encoder_overrides.items() if v is not None}}
        try:
            config["encoder"] = cls(**enc_config)
        except (TypeError, ValueError, RuntimeError) as e:  # unknown keys, a refused value, a negative size
            raise BadFileError(f"{source}: text encoder {enc_target} cannot be built from its config ({e})") from e
    try:
        return CONDITIONINGS[target](**config)
    except TypeError as e:
        raise BadFileError(f"{source}: {target} cannot be built from the checkpoint's config ({e})") from e
