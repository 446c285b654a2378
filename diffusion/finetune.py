"""Start a new run from the weights of an earlier checkpoint (`init_from=PATH`), strictly or partially.

Unlike resuming (`ckpt_path=`), which restores the optimizer, the step count and the callbacks' state, this
copies only network weights into a freshly built network: training then starts at step 0 with a fresh
optimizer, possibly on another dataset. The checkpoint's EMA weights are used when present (they are the
better ones) unless asked otherwise. Keys can be left out on purpose (`ignore_keys`, e.g. a label embedding
whose class count changed); keys the two networks do not share, or share with different shapes, are either
an error that lists them all (strict) or reported and left at their fresh initialisation (partial). Plain
torch: no Lightning, no Hydra.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from diffusion.checkpoint import CONDITIONING_PREFIX, net_state_dict, read_checkpoint, sub_state_dict
from diffusion.errors import ConfigError
from diffusion.networks import register_network
from diffusion.optional import require

ADAPTER_DTYPES = ("fp32", None)
_SHOWN = 8  # keys listed per category in messages; the counts are always complete


@dataclass
class InitReport:
    """What `init_from_checkpoint` did: which checkpoint tensors went where, and which did not."""

    path: str
    weights: str  # "ema" or "raw": which copy of the checkpoint's weights was used
    global_step: int  # the step the source checkpoint was saved at
    loaded: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)  # matched init.ignore_keys (in the net or the checkpoint)
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)  # (key, ckpt, net)
    missing: list[str] = field(default_factory=list)  # in the net, not in the checkpoint
    unexpected: list[str] = field(default_factory=list)  # in the checkpoint, not in the net

    def problems(self) -> str:
        """The mismatches, missing and unexpected keys, in one line ('' when there are none)."""
        parts = []
        if self.mismatched:
            shown = ", ".join(f"{k}: checkpoint {list(a)} vs model {list(b)}" for k, a, b in self.mismatched[:_SHOWN])
            parts.append(f"{len(self.mismatched)} shape mismatches ({shown}{_more(self.mismatched)})")
        if self.missing:
            parts.append(f"{len(self.missing)} missing from the checkpoint ({_keys(self.missing)})")
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} not in the model ({_keys(self.unexpected)})")
        return "; ".join(parts)

    def summary(self) -> str:
        """One line for the console."""
        line = (
            f"init_from={self.path}: loaded {len(self.loaded)} tensors ({self.weights} weights, "
            f"saved at step {self.global_step})"
        )
        if self.ignored:
            line += f"; ignored {len(self.ignored)} ({_keys(self.ignored)})"
        problems = self.problems()
        return line + (f"; left at their fresh initialisation: {problems}" if problems else "")


def _more(items: Sequence) -> str:
    return f", ... {len(items) - _SHOWN} more" if len(items) > _SHOWN else ""


def _keys(keys: Sequence[str]) -> str:
    return ", ".join(keys[:_SHOWN]) + _more(keys)


def matches(key: str, patterns: Sequence[str]) -> bool:
    """Whether a state-dict key is named by one of `patterns`: the key itself, a module prefix, or a glob."""
    return any(key == p or key.startswith(p.rstrip(".") + ".") or fnmatch.fnmatchcase(key, p) for p in patterns)


def init_from_state_dict(
    net: nn.Module,
    state: dict[str, Tensor],
    *,
    ignore_keys: Sequence[str] = (),
    strict: bool = True,
    report: InitReport,
) -> InitReport:
    """Copy the tensors of `state` into `net` by name; fills and returns `report`.

    Steps: 1. drop the keys named by `ignore_keys` on both sides; 2. sort the rest into loaded / shape
    mismatched / missing / unexpected; 3. strict: any of the last three is a ValueError listing them all;
    partial: load what matches, but a checkpoint that shares no tensor with the net is still an error.
    """
    target = net.state_dict()
    # 1. keys asked to be left out
    report.ignored = sorted({k for k in (*target, *state) if matches(k, ignore_keys)})
    ignored = set(report.ignored)
    # 2. sort the others
    loadable: dict[str, Tensor] = {}
    for key, value in state.items():
        if key in ignored:
            continue
        if key not in target:
            report.unexpected.append(key)
        elif tuple(value.shape) != tuple(target[key].shape):
            report.mismatched.append((key, tuple(value.shape), tuple(target[key].shape)))
        else:
            loadable[key] = value
    report.missing = [k for k in target if k not in state and k not in ignored]
    report.loaded = list(loadable)
    # 3. strict or partial
    problems = report.problems()
    if problems and strict:
        raise ConfigError(
            f"init_from={report.path} does not fit the model: {problems}. Set init.strict=false to load the "
            "matching tensors and keep the rest freshly initialised, or name keys to skip in init.ignore_keys"
        )
    if not loadable:
        raise ConfigError(f"init_from={report.path} shares no tensor with the model ({problems or 'all ignored'})")
    with torch.no_grad():
        for key, value in loadable.items():
            target[key].copy_(value)  # state_dict() tensors share storage with the parameters and buffers
    return report


def init_from_checkpoint(
    net: nn.Module,
    path: str | Path,
    *,
    ignore_keys: Sequence[str] = (),
    strict: bool = True,
    use_ema: bool = True,
    conditioning: nn.Module | None = None,
) -> InitReport:
    """Load the network weights of the checkpoint at `path` into `net` (see `init_from_state_dict`).

    `use_ema`: take the checkpoint's EMA weights when it has them (else its raw weights). `conditioning`: also
    load the checkpoint's conditioning state into it (a trained text encoder and its tokenizer), when it has one.
    """
    ckpt = read_checkpoint(path)
    cond_state = sub_state_dict(ckpt["state_dict"], CONDITIONING_PREFIX)
    if conditioning is not None and cond_state:
        try:
            conditioning.load_state_dict(cond_state)
        except RuntimeError as e:
            raise ConfigError(f"init_from={path}: its text encoder does not fit conditioning.encoder ({e})") from None
    state, weights = net_state_dict(ckpt, use_ema=use_ema)
    report = InitReport(path=str(path), weights=weights, global_step=int(ckpt.get("global_step", 0)))
    return init_from_state_dict(net, state, ignore_keys=list(ignore_keys), strict=strict, report=report)


# --- parameter-efficient and full fine-tuning (`finetune=lora|full`) ----------------------------------------------
# LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"): a frozen weight W gets a trainable
# low-rank update W + (alpha / r) B A, with B zero at the start, so training starts from the base model exactly.
DEFAULT_TARGETS: dict[str, list[str]] = {
    "diffusion.diffusers_unet.DiffusersCondUNet": ["to_q", "to_k", "to_v", "to_out.0"],
    "diffusion.diffusers_unet.DiffusersUNet": ["to_q", "to_k", "to_v", "to_out.0"],
    "diffusion.unet.UNet": ["qkv", "q", "kv", "proj"],  # self- and cross-attention's projections
    "diffusion.dit.DiT": ["qkv", "q", "kv", "proj", "fc1", "fc2"],  # attention's projections and the MLP
}
# SD3 / Flux: the joint attention's image and text projections (as diffusers' DreamBooth scripts target them),
# and for Flux its feed-forward layers too
_JOINT_ATTENTION = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                    "attn.add_v_proj", "attn.to_add_out"]  # fmt: skip
DEFAULT_TARGETS["diffusion.diffusers_transformer.SD3Transformer"] = _JOINT_ATTENTION
DEFAULT_TARGETS["diffusion.diffusers_transformer.FluxTransformer"] = [
    *_JOINT_ATTENTION,
    "ff.net.0.proj",
    "ff.net.2",
    "ff_context.net.0.proj",
    "ff_context.net.2",
]


def base_source(*, init_from: str | None, use_ema: bool = True, pretrained: str | None = None) -> dict | None:
    """Where a fine-tune's frozen base weights come from: a project checkpoint (init_from) or a pretrained folder/id."""
    if init_from:
        return {"kind": "checkpoint", "path": str(Path(init_from).expanduser().resolve()), "use_ema": use_ema}
    if pretrained:
        path = Path(pretrained).expanduser()
        return {"kind": "pretrained", "path": str(path.resolve()) if path.exists() else str(pretrained)}
    return None


def load_base(net: nn.Module, source: dict) -> None:
    """Load the base weights `source` names into `net` strictly (a checkpoint loads weights-only)."""
    from diffusion.checkpoint import load_weights

    if source.get("kind") == "checkpoint":
        state, _ = net_state_dict(read_checkpoint(source["path"]), use_ema=bool(source.get("use_ema", True)))
        load_weights(net, state, source=f"the LoRA base checkpoint {source['path']}")
    elif source.get("kind") == "pretrained" and hasattr(net, "load_pretrained"):
        net.load_pretrained(source["path"])
    else:
        raise ConfigError(f"a LoRA base must be a checkpoint or a pretrained folder for {type(net).__name__}: {source}")


class LoRA:
    """`finetune=lora`: freeze the network and train LoRA adapters on `target_modules` (peft's LoraConfig).

    Args:
        rank: r, the adapters' rank.
        alpha: the update's scale is alpha / rank; null: alpha = rank.
        target_modules: names (or name suffixes) of the Linear / Conv layers to adapt; null: the network's attention
            projections (`DEFAULT_TARGETS`: to_q, to_k, to_v, to_out.0 in diffusers U-Nets; qkv, q, kv, proj in our
            U-Net; those and the MLP's fc1, fc2 in the DiT).
        dropout: dropout on the adapters' input.
        adapter_dtype: "fp32": the adapters (and so their gradients and optimizer state) stay fp32 when
            trainer.precision=bf16-true / 16-true casts the frozen base to half precision (diffusers' training
            scripts do the same: `cast_training_params`); null: the adapters take the base's dtype.
    """

    def __init__(
        self,
        *,
        rank: int = 8,
        alpha: float | None = None,
        target_modules: list[str] | None = None,
        dropout: float = 0.0,
        adapter_dtype: str | None = "fp32",
    ) -> None:
        if adapter_dtype not in ADAPTER_DTYPES:
            raise ConfigError(f"finetune.adapter_dtype={adapter_dtype!r} is not one of 'fp32', null")
        self.adapter_dtype = adapter_dtype
        if rank < 1:
            raise ConfigError(f"finetune.rank={rank} must be >= 1")
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"finetune.dropout={dropout} must be in [0, 1)")
        self.rank, self.alpha, self.dropout = rank, float(alpha if alpha is not None else rank), dropout
        self.target_modules = list(target_modules) if target_modules else None

    def apply(self, net: nn.Module, *, source: dict | None) -> LoRANet:
        """`net` (already holding its base weights) frozen, with adapters; `source` is where the base came from."""
        if source is None:
            raise ConfigError("finetune=lora needs base weights: model.pretrained=<folder or Hub id> or init_from=PATH")
        target = f"{type(net).__module__}.{type(net).__qualname__}"
        targets = self.target_modules or DEFAULT_TARGETS.get(target)
        if not targets:
            raise ConfigError(f"finetune.target_modules is required for {target} (no default)")
        return LoRANet(
            source=source,
            rank=self.rank,
            alpha=self.alpha,
            target_modules=targets,
            dropout=self.dropout,
            adapter_dtype=self.adapter_dtype,
            net=net,
        )


class Full:
    """`finetune=full`: every network weight trains (frozen parts such as the VAE stay frozen); needs a base."""

    def apply(self, net: nn.Module, *, source: dict | None) -> nn.Module:
        if source is None:
            raise ConfigError("finetune=full needs base weights: model.pretrained=<folder or Hub id> or init_from=PATH")
        return net


@register_network  # adapters on a base the config names by path (a checkpoint, read weights-only, or a folder)
class LoRANet(nn.Module):
    """A frozen base network with LoRA adapters: forward(...) is the base's, with the adapted layers.

    Its state dict holds the adapters only; loading one keeps the base as it is. Its `config` says how to rebuild
    it (the base's own description, where its weights come from, the LoRA settings), so a checkpoint holds the
    adapter weights plus where the base came from, and `sample.py` / a resume rebuild base + adapters.

    Args:
        base: the base's description ({"target": class path, "config": {...}}); ignored when `net` is given.
        source: where the base weights come from (`base_source`): {"kind": "checkpoint", "path", "use_ema"} or
            {"kind": "pretrained", "path"}.
        rank, alpha, target_modules, dropout: peft's LoraConfig r, lora_alpha, target_modules, lora_dropout.
        adapter_dtype: "fp32" or None: what `cast_adapters` puts the adapters in (`LoRA`).
        net: the base network, already loaded (at training time); else it is built from `base` and `source`.
    """

    def __init__(
        self,
        *,
        base: dict | None = None,
        source: dict,
        rank: int,
        alpha: float,
        target_modules: list[str],
        dropout: float = 0.0,
        adapter_dtype: str | None = "fp32",
        net: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if adapter_dtype not in ADAPTER_DTYPES:
            raise ConfigError(f"finetune.adapter_dtype={adapter_dtype!r} is not one of 'fp32', null")
        peft = require("peft", feature="finetune=lora")
        LoraConfig, inject_adapter_in_model = peft.LoraConfig, peft.inject_adapter_in_model  # noqa: N806

        from diffusion.networks import build_net, describe_net
        from diffusion.state import keep_in_state_dict

        if net is None:
            net = build_net(base, source="the LoRA base description")
            load_base(net, source)
        if isinstance(net, LoRANet):
            raise ConfigError("finetune=lora on a network that already has LoRA adapters")
        base = describe_net(net)
        config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(target_modules), lora_dropout=dropout)
        try:
            inject_adapter_in_model(config, net)
        except ValueError as e:
            raise ConfigError(f"finetune.target_modules={list(target_modules)}: {str(e).splitlines()[0]}") from e
        self.net = net
        adapters = frozenset(f"net.{name}" for name, p in net.named_parameters() if p.requires_grad)
        keep_in_state_dict(self, adapters)
        self.config = dict(
            base=base,
            source=dict(source),
            rank=rank,
            alpha=alpha,
            target_modules=list(target_modules),
            dropout=dropout,
            adapter_dtype=adapter_dtype,
        )
        self.adapter_dtype = adapter_dtype
        for attr in ("image_size", "in_channels", "num_classes", "context_dim", "pooled_dim", "takes_time_ids"):
            if hasattr(net, attr):
                setattr(self, attr, getattr(net, attr))

    def forward(self, *args, **kwargs):
        return self.net(*args, **kwargs)

    def cast_adapters(self) -> None:
        """Put the trainable adapters back into `adapter_dtype` after a half-precision cast of the whole network
        (the frozen base stays in half precision; peft casts an adapter's input to the adapter's dtype and its
        output back). Called by the training module right before it builds the optimizer."""
        if self.adapter_dtype is None:
            return
        for p in self.net.parameters():
            if p.requires_grad and p.dtype != torch.float32:
                p.data = p.data.float()

    def adapter_state_dict(self) -> dict[str, Tensor]:
        """peft's adapter weights, keyed as in the base network (`get_peft_model_state_dict`)."""
        return require("peft", feature="finetune=lora").get_peft_model_state_dict(self.net)


# --- LoRA on a pretrained text encoder (`dreambooth.train_text_encoder=true`) -------------------------------------
# CLIP's attention projections, as diffusers' DreamBooth LoRA script adapts them (T5 names them q, k, v, o)
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def text_models(encoder: nn.Module) -> dict[str, nn.Module]:
    """The transformers models inside a pretrained text encoder, by their names in a diffusers pipeline
    ("text_encoder", "text_encoder_2", ...): the encoder's `text_models()`, or its one `model` (CLIPTextEncoder)."""
    if hasattr(encoder, "text_models"):
        return dict(encoder.text_models())
    model = getattr(encoder, "model", None)
    if not isinstance(model, nn.Module):
        raise ConfigError(
            f"dreambooth.train_text_encoder=true needs a pretrained text encoder (conditioning=clip); "
            f"{type(encoder).__name__} has none to put adapters on"
        )
    return {"text_encoder": model}


class LoRATextEncoder(nn.Module):
    """A frozen pretrained text encoder with LoRA adapters on its transformers models (`text_models`); called as the
    encoder is. Its state dict holds the adapters only; its `config` names the encoder (rebuilt from its own
    description) and the LoRA settings, so a checkpoint rebuilds encoder + adapters.

    Args:
        encoder: the frozen encoder (`diffusion.conditioning.build_text_encoder` builds it first from a checkpoint).
        rank, alpha, target_modules, dropout: peft's LoraConfig r, lora_alpha, target_modules, lora_dropout.
    """

    trainable = True  # its adapters train; TextConditioning then neither caches its outputs nor drops its state

    def __init__(
        self,
        *,
        encoder: nn.Module,
        rank: int,
        alpha: float,
        target_modules: list[str] | None = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        peft = require("peft", feature="dreambooth.train_text_encoder")
        from diffusion.state import keep_in_state_dict

        if rank < 1:
            raise ConfigError(f"dreambooth.text_encoder_rank={rank} must be >= 1")
        targets = list(target_modules or TEXT_TARGETS)
        config = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, lora_dropout=dropout)
        for model in text_models(encoder).values():
            peft.inject_adapter_in_model(config, model)
        self.encoder, self.dim = encoder, encoder.dim
        keep_in_state_dict(self, frozenset(name for name, p in self.named_parameters() if p.requires_grad))
        described = {"target": f"{type(encoder).__module__}.{type(encoder).__qualname__}", "config": encoder.config}
        self.config = dict(encoder=described, rank=rank, alpha=float(alpha), target_modules=targets, dropout=dropout)

    def forward(self, captions: list[str]):
        out = self.encoder(captions)
        context = out[0] if isinstance(out, tuple) else out["context"]
        if torch.is_grad_enabled() and self.training and not context.requires_grad:
            raise ConfigError(f"{type(self.encoder).__name__} runs without gradients: its LoRA adapters cannot train")
        return out

    def adapter_layers(self) -> dict[str, dict[str, Tensor]]:
        """Each text model's adapters as diffusers' LoRA state dict (alpha / rank folded into B, as diffusers' files
        carry no alpha), by the model's name in the pipeline: what `save_lora_weights(text_encoder_lora_layers=...)`
        takes."""
        diffusers_utils = require("diffusers.utils", feature="format=lora")
        peft = require("peft", feature="format=lora")
        scale = self.config["alpha"] / self.config["rank"]
        layers = {}
        for name, model in text_models(self.encoder).items():
            state = peft.get_peft_model_state_dict(model)
            state = {
                k: (v * scale if ".lora_B." in k else v).detach().float().contiguous().cpu() for k, v in state.items()
            }
            layers[name] = diffusers_utils.convert_state_dict_to_diffusers(state)
        return layers


def with_text_adapters(conditioning: nn.Module, *, rank: int, alpha: float) -> nn.Module:
    """`conditioning` rebuilt from its own description around its text encoder with LoRA adapters
    (`LoRATextEncoder`): the adapters train and are saved with it; the rest of the encoder stays frozen."""
    config = dict(conditioning.describe().get("config", {}))
    if not isinstance(getattr(conditioning, "encoder", None), nn.Module) or "encoder" not in config:
        raise ConfigError("dreambooth.train_text_encoder=true needs text conditioning (conditioning=clip)")
    if getattr(conditioning.encoder, "trainable", False):
        raise ConfigError(
            f"dreambooth.train_text_encoder=true is for a frozen pretrained text encoder; "
            f"{type(conditioning.encoder).__name__} trains already"
        )
    encoder = LoRATextEncoder(encoder=conditioning.encoder, rank=rank, alpha=alpha)
    return type(conditioning)(**{**config, "encoder": encoder})
