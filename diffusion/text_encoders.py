"""Text encoders: captions in, a context sequence for cross-attention out.

Every encoder is an `nn.Module` called as `encoder(list[str]) -> (context (B, L, D), mask (B, L) bool)`, with
`.dim` (= D), `.trainable` (trained jointly with the network, or frozen) and `.config` (plain values that rebuild
it, saved in checkpoints). The mask is True on real tokens; every caption, the empty one included, has at least
one (a begin-of-text token), so masked attention never sees an all-padding row.

- `TransformerTextEncoder`: a small transformer trained jointly from scratch with a word-level tokenizer built
  from the training captions, as latent diffusion did for its own text models (Rombach et al. 2022, sec. 4.3:
  a transformer over tokens, trained with the U-Net). The tokenizer is `tokenizers` JSON, kept in the module's
  extra state, so a checkpoint carries it as a plain string, never as pickled code.
- `CLIPTextEncoder`: a pretrained `transformers` CLIP text model (Radford et al. 2021) and its tokenizer, from a
  local folder (a `save_pretrained` folder, or a Stable Diffusion folder with `text_encoder/` and `tokenizer/`)
  or a Hub id; frozen, optionally in bf16/fp16. Checkpoints name it by path or id; its weights are not copied.
- `PipelineTextEncoder`: the frozen text encoders of a diffusers pipeline folder (Stable Diffusion: one CLIP;
  SDXL: two CLIPs; SD3: two CLIPs and an optional T5; Flux: CLIP and T5), run as the pipeline's `encode_prompt`
  runs them and combined by the pipeline kind's rule (`PIPELINE_TEXT`: which encoders, and how their hidden states
  and pooled embeddings become the network's `context` and `pooled`). A new pipeline kind adds a rule, not a
  class. Returns a dict of network arguments.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

from diffusion.errors import ConfigError, MissingPathError, PathError
from diffusion.optional import require

log = logging.getLogger(__name__)

PAD, UNK, BOS = "[PAD]", "[UNK]", "[BOS]"
TextDtype = Literal["fp32", "bf16", "fp16"]
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def word_tokenizer(captions: list[str], *, vocab_size: int) -> str:
    """A word-level tokenizer (lowercased, split on whitespace and punctuation) trained on `captions`, as JSON.

    Keeps the `vocab_size` most frequent words, the special tokens [PAD] (id 0), [UNK] and [BOS] included;
    rarer words read as [UNK].
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.WordLevel(unk_token=UNK))
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(vocab_size=vocab_size, special_tokens=[PAD, UNK, BOS], show_progress=False)
    tokenizer.train_from_iterator(captions, trainer)
    return tokenizer.to_str()


class TransformerTextEncoder(nn.Module):
    """A small pre-norm transformer over word tokens, trained jointly with the diffusion network.

    Args:
        dim: width of the token embeddings and of the context it returns.
        depth: transformer layers.
        heads: attention heads per layer.
        max_length: most tokens per caption, [BOS] included; longer captions are truncated (a warning, once).
        vocab_size: rows of the token embedding; the tokenizer keeps at most this many words.
        dropout: dropout inside the transformer layers.
        tokenizer: a tokenizer as `tokenizers` JSON; None until `fit` builds one from the training captions
            (checkpoints restore it through the module's extra state).
    """

    trainable = True

    def __init__(
        self,
        *,
        dim: int = 128,
        depth: int = 2,
        heads: int = 4,
        max_length: int = 32,
        vocab_size: int = 1024,
        dropout: float = 0.0,
        tokenizer: str | None = None,
    ) -> None:
        super().__init__()
        if dim < 1 or depth < 0 or heads < 1 or dim % heads:
            raise ConfigError(
                f"conditioning.encoder: dim={dim} must be >= 1 and split into heads={heads}; depth={depth} >= 0"
            )
        if max_length < 2:
            raise ConfigError(f"conditioning.encoder.max_length={max_length} must be >= 2 ([BOS] and a word)")
        if vocab_size < 4:
            raise ConfigError(f"conditioning.encoder.vocab_size={vocab_size} must be >= 4")
        self.config = dict(
            dim=dim, depth=depth, heads=heads, max_length=max_length, vocab_size=vocab_size, dropout=dropout
        )
        self.dim = dim
        self.max_length = max_length
        self.vocab_size = vocab_size
        self.token_emb = nn.Embedding(vocab_size, dim)
        self.pos_emb = nn.Parameter(torch.randn(max_length, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(
            dim, heads, 4 * dim, dropout, activation="gelu", batch_first=True, norm_first=True
        )
        self.layers = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False) if depth else None
        self.norm = nn.LayerNorm(dim)
        nn.init.normal_(self.token_emb.weight, std=0.02)
        self._tokenizer = None
        self._tokenizer_json: str | None = None
        self._first_new_id: int | None = None  # the first id `fit` gave a word new to a loaded tokenizer
        self.new_word_emb: nn.Parameter | None = None  # those words' rows, while only they train (train_new_words_only)
        self._warned_long = False
        self._warned_words: set[str] = set()
        if tokenizer is not None:
            self.set_tokenizer(tokenizer)

    # --- the tokenizer, kept as data ------------------------------------------------------------------
    @property
    def has_tokenizer(self) -> bool:
        return self._tokenizer is not None

    def set_tokenizer(self, tokenizer_json: str) -> None:
        from tokenizers import Tokenizer

        try:
            tokenizer = Tokenizer.from_str(tokenizer_json)
        except Exception as e:  # tokenizers raises its own Exception type for bad JSON
            raise ConfigError(f"conditioning.encoder.tokenizer is not a tokenizers JSON string ({e})") from None
        vocab = tokenizer.get_vocab()
        if any(tok not in vocab for tok in (PAD, UNK, BOS)) or vocab[PAD] != 0:
            raise ConfigError(f"conditioning.encoder.tokenizer must hold {PAD} (id 0), {UNK} and {BOS}")
        if max(vocab.values()) >= self.vocab_size:
            raise ConfigError(
                f"the tokenizer has {len(vocab)} tokens, more than conditioning.encoder.vocab_size={self.vocab_size}"
            )
        self._tokenizer, self._tokenizer_json = tokenizer, tokenizer_json
        self._unk, self._bos = vocab[UNK], vocab[BOS]

    def fit(self, captions: list[str]) -> None:
        """Build the tokenizer from the training captions; a tokenizer it already has (given, or loaded from a
        checkpoint to fine-tune) keeps its words and ids and learns the captions' new words, while rows are free."""
        if not captions:
            raise ConfigError("the text encoder's tokenizer needs training captions, and the data has none")
        if self._tokenizer is None:
            self.set_tokenizer(word_tokenizer(captions, vocab_size=self.vocab_size))
            words = len(self._tokenizer.get_vocab()) - 3
            log.info(f"text encoder: tokenizer of {words} words built from {len(captions)} training captions")
            return
        from collections import Counter

        from tokenizers import models

        tokenizer, vocab = self._tokenizer, self._tokenizer.get_vocab()
        counts = Counter(
            word
            for caption in dict.fromkeys(captions)
            for word, _ in tokenizer.pre_tokenizer.pre_tokenize_str(tokenizer.normalizer.normalize_str(caption))
            if word not in vocab
        )
        if not counts:
            return
        start = max(vocab.values()) + 1
        new = [w for w, _ in counts.most_common()][: max(self.vocab_size - start, 0)]
        if len(new) < len(counts):
            log.warning(f"text encoder: no room for {len(counts) - len(new)} new words (vocab_size={self.vocab_size})")
        tokenizer.model = models.WordLevel({**vocab, **{w: start + i for i, w in enumerate(new)}}, unk_token=UNK)
        self.set_tokenizer(tokenizer.to_str())
        self._first_new_id = start if new else None
        log.info(f"text encoder: {len(new)} new words from the training captions: {', '.join(new[:10])}")

    def train_new_words_only(self) -> int:
        """Freeze the encoder except the embeddings of the words `fit` added to a loaded tokenizer; returns how many
        words train.

        For LoRA fine-tunes (`finetune=lora`): the old captions then encode bit for bit as the base model's did,
        and a new word ("an inverted seven") learns what it means, as in textual inversion (Gal et al. 2022). The
        new rows train as their own parameter, so no optimizer step (AdamW's weight decay included) touches the
        others; the state dict keeps the usual layout (the rows written back into `token_emb.weight`).
        """
        self.requires_grad_(False)
        if self._first_new_id is None:
            return 0
        start, stop = self._first_new_id, len(self._tokenizer.get_vocab())
        self.new_word_emb = nn.Parameter(self.token_emb.weight.detach()[start:stop].clone())
        self.register_state_dict_post_hook(_merge_new_words)
        self.register_load_state_dict_pre_hook(_split_new_words)
        return stop - start

    def embedding_weight(self) -> Tensor:
        """The token embedding table, with the new words' rows from `new_word_emb` while only they train."""
        if self.new_word_emb is None:
            return self.token_emb.weight
        start, weight = self._first_new_id, self.token_emb.weight
        return torch.cat([weight[:start], self.new_word_emb, weight[start + len(self.new_word_emb) :]])

    def get_extra_state(self) -> dict:
        return {"tokenizer": self._tokenizer_json}

    def set_extra_state(self, state: dict) -> None:
        if isinstance(state, dict) and isinstance(state.get("tokenizer"), str):
            self.set_tokenizer(state["tokenizer"])

    def tokenize(self, captions: list[str]) -> tuple[Tensor, Tensor]:
        """(ids (B, L) long, mask (B, L) bool): [BOS] then the words, padded with [PAD] to the longest caption."""
        if self._tokenizer is None:
            raise ConfigError("the text encoder has no tokenizer yet: build it from captions with fit()")
        rows = []
        for caption, encoding in zip(captions, self._tokenizer.encode_batch(list(captions)), strict=True):
            ids = [self._bos, *encoding.ids]
            if len(ids) > self.max_length:
                if not self._warned_long:
                    self._warned_long = True
                    log.warning(
                        f"caption {caption[:60]!r} has {len(ids)} tokens, more than conditioning.encoder.max_length="
                        f"{self.max_length}; longer captions are truncated (this warning is shown once)"
                    )
                ids = ids[: self.max_length]
            if not self.training:
                self._warn_unknown(caption, encoding)
            rows.append(ids)
        length = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), length, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
        return ids, ids != 0  # [PAD] is id 0

    def _warn_unknown(self, caption: str, encoding) -> None:
        """Prompts at sampling time: name words the training captions never had (they read as [UNK]), once each."""
        new = [caption[a:b] for i, (a, b) in zip(encoding.ids, encoding.offsets, strict=True) if i == self._unk]
        new = [w for w in new if w.lower() not in self._warned_words]
        if new:
            self._warned_words.update(w.lower() for w in new)
            log.warning(
                f"prompt {caption!r}: {', '.join(repr(w) for w in new)} not in the text encoder's vocabulary "
                "(the training captions); read as [UNK]"
            )

    # --- the encoder ----------------------------------------------------------------------------------------
    def forward(self, captions: list[str]) -> tuple[Tensor, Tensor]:
        ids, mask = self.tokenize(captions)
        device = self.token_emb.weight.device
        ids, mask = ids.to(device), mask.to(device)
        h = nn.functional.embedding(ids, self.embedding_weight()) + self.pos_emb[: ids.shape[1]]  # (B, L, D)
        if self.layers is not None:
            h = self.layers(h, src_key_padding_mask=~mask)
        return self.norm(h), mask


def _merge_new_words(module: TransformerTextEncoder, state: dict, prefix: str, local_metadata) -> None:
    """State dicts hold the table whole: the trained new rows written into `token_emb.weight`."""
    state.pop(prefix + "new_word_emb", None)
    state[prefix + "token_emb.weight"] = module.embedding_weight().detach()


def _split_new_words(module: TransformerTextEncoder, state: dict, prefix: str, *args) -> None:
    """Loading a whole table (a resumed LoRA run's checkpoint): the new rows go to `new_word_emb`."""
    table = state.get(prefix + "token_emb.weight")
    if table is not None and module.new_word_emb is not None and prefix + "new_word_emb" not in state:
        start = module._first_new_id
        state[prefix + "new_word_emb"] = table[start : start + len(module.new_word_emb)]


def _local_folder(pretrained: str) -> Path | None:
    """The folder `pretrained` names, None for a Hub id; a missing folder is an error (not a Hub lookup)."""
    path = Path(pretrained).expanduser()
    if path.is_dir():
        return path
    looks_local = pretrained.startswith(("/", ".", "~")) or pretrained.count("/") > 1 or path.exists()
    if looks_local:
        raise MissingPathError(f"text encoder folder {path} does not exist (conditioning.encoder.pretrained)")
    return None


class CLIPTextEncoder(nn.Module):
    """A frozen pretrained CLIP text model (`transformers.CLIPTextModel`) and its tokenizer.

    Args:
        pretrained: a local folder (`save_pretrained` output holding the model and the tokenizer, or a Stable
            Diffusion folder with `text_encoder/` and `tokenizer/`), or a Hub id (downloaded when online).
        max_length: tokens per caption (captions are padded to it and truncated beyond it, with a warning once);
            default the model's `max_position_embeddings` (77 for CLIP).
        dtype: the frozen model's weights: "fp32", "bf16" or "fp16" (half the memory; contexts come out in it).
        layer: "last" hidden state, or "penultimate" (the layer before the last, as some pipelines use).
    """

    trainable = False

    def __init__(
        self,
        *,
        pretrained: str,
        max_length: int | None = None,
        dtype: TextDtype = "fp32",
        layer: Literal["last", "penultimate"] = "last",
    ) -> None:
        super().__init__()
        if pretrained in (None, "", "???"):
            raise ConfigError("conditioning.encoder.pretrained is not set: a CLIP folder or a Hub id")
        if dtype not in _DTYPES:
            raise ConfigError(f"conditioning.encoder.dtype={dtype!r} is not one of 'fp32', 'bf16', 'fp16'")
        if layer not in ("last", "penultimate"):
            raise ConfigError(f"conditioning.encoder.layer={layer!r} is not one of 'last', 'penultimate'")
        transformers = require("transformers", feature="conditioning=clip")
        AutoTokenizer, CLIPTextModel = transformers.AutoTokenizer, transformers.CLIPTextModel  # noqa: N806

        folder = _local_folder(str(pretrained))
        model_sub, tok_sub = {}, {}
        if folder is not None and (folder / "text_encoder").is_dir():  # a whole pipeline folder
            model_sub, tok_sub = {"subfolder": "text_encoder"}, {"subfolder": "tokenizer"}
        source = str(folder) if folder is not None else str(pretrained)
        try:
            self.model = CLIPTextModel.from_pretrained(source, dtype=_DTYPES[dtype], **model_sub)
            self.tokenizer = AutoTokenizer.from_pretrained(source, **tok_sub)
        except OSError as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise PathError(f"cannot load the CLIP text encoder {pretrained}: {first}") from None
        self.model.requires_grad_(False).eval()
        limit = int(self.model.config.max_position_embeddings)
        self.max_length = min(max_length or limit, limit)
        self.layer = layer
        self.dim = int(self.model.config.hidden_size)
        self.config = dict(pretrained=str(pretrained), max_length=max_length, dtype=dtype, layer=layer)
        self._warned_long = False

    def train(self, mode: bool = True) -> CLIPTextEncoder:
        super().train(mode)
        self.model.eval()  # frozen: always in eval mode (no dropout)
        return self

    # no torch.no_grad(): the frozen weights build no graph anyway, and LoRA adapters on the model
    # (dreambooth.train_text_encoder, diffusion.finetune.LoRATextEncoder) need one
    def forward(self, captions: list[str]) -> tuple[Tensor, Tensor]:
        tokens = self.tokenizer(list(captions), padding="max_length", max_length=self.max_length, truncation=False)
        ids = tokens["input_ids"]
        if any(len(row) > self.max_length for row in ids):
            if not self._warned_long:
                self._warned_long = True
                log.warning(
                    f"a caption has more than {self.max_length} CLIP tokens and is truncated "
                    "(this warning is shown once)"
                )
            tokens = self.tokenizer(list(captions), padding="max_length", max_length=self.max_length, truncation=True)
        device = next(self.model.parameters()).device
        ids = torch.tensor(tokens["input_ids"], device=device)
        mask = torch.tensor(tokens["attention_mask"], device=device).bool()
        out = self.model(input_ids=ids, attention_mask=mask.long(), output_hidden_states=self.layer != "last")
        context = out.last_hidden_state if self.layer == "last" else out.hidden_states[-2]
        return context, mask


# --- the text encoders of a diffusers pipeline ------------------------------------------------------------------
# The transformers classes a pipeline's model_index.json may name for a text encoder (files are data: no other
# class is built from one).
TEXT_MODEL_CLASSES = ("CLIPTextModel", "CLIPTextModelWithProjection", "T5EncoderModel")


@dataclass
class TowerOutput:
    """One text encoder's output for a batch of captions.

    hidden_states: every layer's (B, L, D), [0] the token embeddings, [-1] the last layer's (before any final norm);
    last: the model's last_hidden_state (B, L, D) (after CLIP's final layer norm); pooled: (B, P), CLIP's projected
    text embedding (`text_embeds`, with projection) or pooled output, None for an encoder without one (T5);
    mask: (B, L) bool, True on real tokens.
    """

    hidden_states: tuple[Tensor, ...]
    last: Tensor
    pooled: Tensor | None
    mask: Tensor


@dataclass(frozen=True)
class TextShape:
    """What a combine rule needs besides the towers: the batch size, the context width (the network's; SD3 pads
    the CLIP states to it and fills a left-out T5 with zeros of it) and T5's token count."""

    n: int
    dim: int | None
    long_length: int


def sd_text(towers: list[TowerOutput | None], shape: TextShape) -> dict[str, Tensor]:
    """Stable Diffusion 1.x / 2.x: the one CLIP encoder's last hidden state is the context."""
    return {"context": towers[0].last}


def sdxl_text(towers: list[TowerOutput | None], shape: TextShape) -> dict[str, Tensor]:
    """SDXL (Podell et al. 2023): both CLIP encoders' penultimate hidden states, concatenated on the feature axis
    (768 + 1280 = 2048), are the context; the second encoder's projected pooled embedding is `pooled`."""
    return {"context": torch.cat([t.hidden_states[-2] for t in towers], dim=-1), "pooled": towers[1].pooled}


def sd3_text(towers: list[TowerOutput | None], shape: TextShape) -> dict[str, Tensor]:
    """SD3 (Esser et al. 2024): [CLIP-L's and CLIP-G's penultimate states concatenated on features, zero-padded to
    T5's width ; T5's last hidden state] along the sequence, (B, 77 + L, D); pooled = both CLIPs' projected pooled
    embeddings concatenated (768 + 1280). Without T5 (left out, or a pipeline saved without text_encoder_3) its
    part is L zero tokens, as StableDiffusion3Pipeline does."""
    clip_l, clip_g, t5 = towers
    clip = torch.cat([clip_l.hidden_states[-2], clip_g.hidden_states[-2]], dim=-1)  # (B, 77, D_l + D_g)
    clip = nn.functional.pad(clip, (0, shape.dim - clip.shape[-1]))  # zeros up to T5's width: (B, 77, D)
    long = t5.last.to(clip.dtype) if t5 is not None else clip.new_zeros(shape.n, shape.long_length, shape.dim)
    return {"context": torch.cat([clip, long], dim=1), "pooled": torch.cat([clip_l.pooled, clip_g.pooled], dim=-1)}


def flux_text(towers: list[TowerOutput | None], shape: TextShape) -> dict[str, Tensor]:
    """Flux: T5's last hidden state is the context (B, L, 4096); CLIP-L's pooled output is `pooled` (B, 768)."""
    return {"context": towers[1].last, "pooled": towers[0].pooled}


@dataclass(frozen=True)
class PipelineText:
    """How a pipeline kind conditions on text: its text encoders' subfolders (each with its tokenizer in the
    subfolder named with "tokenizer" for "text_encoder"), which of them may be left out (SD3's T5), the T5 token
    count its pipeline uses (`max_sequence_length`), and the rule that combines their outputs into the network's
    `context` (and `pooled`, where the network takes one)."""

    encoders: tuple[str, ...]
    combine: Callable[[list[TowerOutput | None], TextShape], dict[str, Tensor]]
    optional: tuple[str, ...] = ()
    long_length: int = 0


# pipeline kind (`diffusion.pipeline.pipeline_kind`) -> its text encoders and combine rule; a new pipeline kind is
# a new entry (and combine rule), not a new encoder class
PIPELINE_TEXT: dict[str, PipelineText] = {
    "sd": PipelineText(encoders=("text_encoder",), combine=sd_text),
    "sdxl": PipelineText(encoders=("text_encoder", "text_encoder_2"), combine=sdxl_text),
    "sd3": PipelineText(
        encoders=("text_encoder", "text_encoder_2", "text_encoder_3"),
        combine=sd3_text,
        optional=("text_encoder_3",),
        long_length=256,
    ),
    "flux": PipelineText(encoders=("text_encoder", "text_encoder_2"), combine=flux_text, long_length=512),
}


class PipelineTextEncoder(nn.Module):
    """The frozen text encoders of a diffusers pipeline (Stable Diffusion 1.x / 2.x: one CLIP; SDXL: two CLIPs;
    SD3: two CLIPs and T5; Flux: CLIP and T5), run as the pipeline's `encode_prompt` does and combined by the
    pipeline kind's rule (`PIPELINE_TEXT`).

    Called as `encoder(captions) -> {"context": (B, L, D), "context_mask": (B, L), "pooled": (B, P) where the kind
    has one}`. The mask is all True: these networks attend to every one of the tokenizers' max_length positions,
    padding included, as they were trained. `zero_null` is the pipeline's `force_zeros_for_empty_prompt` (SDXL):
    its null condition (guidance's unconditional branch, dropped captions) is all-zero embeddings, not the empty
    prompt's, as diffusers' pipeline does when no negative prompt is given.

    Args:
        pretrained: a pipeline folder written by `save_pretrained` (with model_index.json) or a Hub id.
        max_length: T5's tokens per caption for the kinds with T5 (SD3: 256, Flux: 512 by default; the pipelines'
            `max_sequence_length`); else the CLIP tokens, at most each tokenizer's own (77). CLIP always pads to
            its own length where T5 is there, as those pipelines do. Longer captions are truncated, with a warning.
        t5: false leaves T5 out where the pipeline allows it (SD3: its part becomes zeros, much less memory).
        dtype: the frozen models' weights: "fp32", "bf16" or "fp16" (the embeddings come out in it).
    """

    trainable = False

    def __init__(
        self, *, pretrained: str, max_length: int | None = None, t5: bool = True, dtype: TextDtype = "fp32"
    ) -> None:
        super().__init__()
        from diffusion.pipeline import pipeline_kind, read_model_index, read_part_config

        if pretrained in (None, "", "???"):
            raise ConfigError("conditioning.encoder.pretrained is not set: a pipeline folder or a Hub id")
        if dtype not in _DTYPES:
            raise ConfigError(f"conditioning.encoder.dtype={dtype!r} is not one of 'fp32', 'bf16', 'fp16'")
        if max_length is not None and max_length < 1:
            raise ConfigError(f"conditioning.encoder.max_length={max_length} must be >= 1 (or null)")
        key = "conditioning.encoder.pretrained"
        folder = _local_folder(str(pretrained))
        source = str(folder) if folder is not None else str(pretrained)
        index = read_model_index(source, key=key)
        if not index:
            raise ConfigError(
                f"{key}={pretrained} holds no model_index.json: not a pipeline folder written by diffusers"
            )
        kind = pipeline_kind(source, key=key, index=index)
        self.kind, self.rule = kind, PIPELINE_TEXT[kind]
        transformers = require("transformers", feature="a pipeline's text encoders (model.pretrained)")
        self.models, self.tokenizers, self.present = nn.ModuleList(), [], []
        for sub in self.rule.encoders:
            entry = index.get(sub)
            cls_name = entry[1] if isinstance(entry, list) and len(entry) == 2 else None
            if sub in self.rule.optional and (cls_name is None or not t5):  # left out: the rule fills it in
                self.present.append(False)
                continue
            if not t5 and cls_name == "T5EncoderModel":
                raise ConfigError(f"conditioning.encoder.t5=false: a {kind} pipeline needs its T5 text encoder")
            if cls_name not in TEXT_MODEL_CLASSES:
                raise ConfigError(
                    f"{key}={pretrained}: its {sub} is {cls_name!r}, not one of {', '.join(TEXT_MODEL_CLASSES)}"
                )
            tok_sub = sub.replace("text_encoder", "tokenizer")
            try:
                model = getattr(transformers, cls_name).from_pretrained(source, subfolder=sub, dtype=_DTYPES[dtype])
                tokenizer = transformers.AutoTokenizer.from_pretrained(source, subfolder=tok_sub)
            except OSError as e:
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise PathError(f"cannot load {sub}/ and {tok_sub}/ of {pretrained}: {first}") from None
            self.models.append(model.requires_grad_(False).eval())
            self.tokenizers.append(tokenizer)
            self.present.append(True)
        long_length = max_length or self.rule.long_length  # T5's tokens, for the kinds that have one
        self.max_lengths = [
            long_length
            if type(m).__name__ == "T5EncoderModel"
            else min((None if self.rule.long_length else max_length) or t.model_max_length, t.model_max_length)
            for m, t in zip(self.models, self.tokenizers, strict=True)
        ]
        # the context width: the network's where a rule pads to it (SD3: the transformer's joint_attention_dim)
        width = None
        if kind == "sd3":
            width = int(read_part_config(Path(source), "transformer", key)["joint_attention_dim"])
            for m in self.models:  # the combine rule pads the CLIP states to T5's width, which must be the network's
                if type(m).__name__ == "T5EncoderModel" and int(m.config.d_model) != width:
                    raise ConfigError(
                        f"{pretrained}: T5's width {m.config.d_model} differs from the transformer's {width}"
                    )
        self.shape = dict(dim=width, long_length=long_length)
        self.zero_null = bool(index.get("force_zeros_for_empty_prompt", False))
        self._warned_long = False
        with torch.no_grad():  # the widths, from one caption (the combine rule decides them)
            probe = self([""])
        self.dim = int(probe["context"].shape[-1])
        self.pooled_dim = int(probe["pooled"].shape[-1]) if "pooled" in probe else None
        self.config = dict(pretrained=str(pretrained), max_length=max_length, t5=t5, dtype=dtype)

    def train(self, mode: bool = True) -> PipelineTextEncoder:
        super().train(mode)
        self.models.eval()  # frozen: always in eval mode (no dropout)
        return self

    def tower(self, i: int, captions: list[str]) -> TowerOutput:
        """Text encoder i's output, tokenized as diffusers' pipelines do (padded to max_length, truncated)."""
        tokenizer, model, length = self.tokenizers[i], self.models[i], self.max_lengths[i]
        tokens = tokenizer(captions, padding="max_length", max_length=length, truncation=True)
        if not self._warned_long and any(len(ids) > length for ids in tokenizer(captions)["input_ids"]):
            self._warned_long = True
            log.warning(f"a caption has more than {length} tokens and is truncated (this warning is shown once)")
        device = next(model.parameters()).device
        ids = torch.tensor(tokens["input_ids"], device=device)
        mask = torch.tensor(tokens["attention_mask"], device=device).bool()
        # no attention mask, as diffusers' pipelines call these encoders: the padding positions are part of the
        # context the network was trained on
        out = model(input_ids=ids, output_hidden_states=True)
        pooled = getattr(out, "text_embeds", None)
        if pooled is None:
            pooled = getattr(out, "pooler_output", None)
        return TowerOutput(hidden_states=out.hidden_states, last=out.last_hidden_state, pooled=pooled, mask=mask)

    @torch.no_grad()
    def forward(self, captions: list[str]) -> dict[str, Tensor]:
        captions = list(captions)
        loaded = iter(range(len(self.models)))
        towers = [self.tower(next(loaded), captions) if here else None for here in self.present]
        out = self.rule.combine(towers, TextShape(n=len(captions), **self.shape))
        context = out.pop("context")
        mask = torch.ones(context.shape[:2], dtype=torch.bool, device=context.device)
        return {"context": context, "context_mask": mask, **out}
