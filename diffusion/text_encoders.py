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
- `SD3TextEncoder`, `FluxTextEncoder`: the frozen CLIP and T5 encoders of an SD3 / Flux pipeline folder, combined
  as the pipeline's `encode_prompt` does; they return a dict of the network's arguments: context, context_mask and
  pooled (the pooled text embedding these transformers also take).
"""

from __future__ import annotations

import logging
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

    @torch.no_grad()
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


# --- the text encoders of SD3 and Flux pipelines -------------------------------------------------------------------
def _pipeline_part(cls_name: str, pretrained: str, subfolder: str, *, dtype: TextDtype | None = None):
    """A pipeline's `subfolder` part (a transformers model or tokenizer, by class name) from a local pipeline folder
    or a Hub id; None where the pipeline has no such part (model_index.json names it null, or no folder)."""
    from diffusion.pipeline import load_component

    transformers = require("transformers", feature="the SD3 / Flux text encoders")
    folder = _local_folder(str(pretrained))
    if folder is not None and not (folder / subfolder).is_dir():
        return None
    tokenizer = cls_name.endswith("Tokenizer")
    kwargs = {} if tokenizer else {"dtype": _DTYPES[dtype or "fp32"]}
    return load_component(
        getattr(transformers, cls_name),
        str(folder / subfolder) if folder is not None else str(pretrained),
        subfolder=subfolder,
        key="conditioning.encoder.pretrained",
        config_name="tokenizer_config.json" if tokenizer else "config.json",
        **kwargs,
    )


def _token_ids(tokenizer, captions: list[str], max_length: int, device) -> Tensor:
    """Ids (B, max_length): padded to max_length and truncated beyond it, as the SD3 / Flux pipelines tokenize."""
    ids = tokenizer(list(captions), padding="max_length", max_length=max_length, truncation=True)["input_ids"]
    return torch.tensor(ids, device=device)


class _FrozenPipelineEncoders(nn.Module):
    """Frozen text models of a pipeline folder; always in eval mode, never trained. Called as
    `encoder(captions) -> {"context": (B, L, D), "context_mask": (B, L), "pooled": (B, P)}`."""

    trainable = False

    def _check(self, pretrained: str, dtype: str) -> None:
        if pretrained in (None, "", "???"):
            raise ConfigError("conditioning.encoder.pretrained is not set: a pipeline folder or a Hub id")
        if dtype not in _DTYPES:
            raise ConfigError(f"conditioning.encoder.dtype={dtype!r} is not one of 'fp32', 'bf16', 'fp16'")

    def train(self, mode: bool = True):
        super().train(mode)
        for model in self.children():
            model.eval()  # frozen: no dropout, whatever the module around it does
        return self

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device


class SD3TextEncoder(_FrozenPipelineEncoders):
    """StableDiffusion3Pipeline's three text encoders, as its `encode_prompt` combines them.

    context = [CLIP-L's and CLIP-G's penultimate hidden states concatenated on features, zero-padded to T5's width ;
    T5's last hidden state] along the sequence: (B, 77 + max_length, D); pooled = both CLIPs' projected pooled
    outputs concatenated (B, 768 + 1280). Without T5 (`t5=false`, or a pipeline saved with text_encoder_3=None, as
    SD3 allows to save memory) T5's part is max_length zero tokens of the transformer's joint_attention_dim, as
    the pipeline does. The mask is all True: the transformer attends to every token, padding included.

    Args:
        pretrained: an SD3 pipeline folder or Hub id (text_encoder/, text_encoder_2/, text_encoder_3/, tokenizers).
        max_length: T5 tokens per caption (the pipeline's max_sequence_length, 256).
        t5: use T5 (false: its zeros, as a pipeline without text_encoder_3).
        dtype: the frozen models' weights: "fp32", "bf16" or "fp16".
    """

    def __init__(self, *, pretrained: str, max_length: int = 256, t5: bool = True, dtype: TextDtype = "fp32") -> None:
        super().__init__()
        self._check(pretrained, dtype)
        self.clip_l = _pipeline_part("CLIPTextModelWithProjection", pretrained, "text_encoder", dtype=dtype)
        self.clip_g = _pipeline_part("CLIPTextModelWithProjection", pretrained, "text_encoder_2", dtype=dtype)
        self.tokenizer_l = _pipeline_part("AutoTokenizer", pretrained, "tokenizer")
        self.tokenizer_g = _pipeline_part("AutoTokenizer", pretrained, "tokenizer_2")
        if None in (self.clip_l, self.clip_g, self.tokenizer_l, self.tokenizer_g):
            raise ConfigError(f"conditioning.encoder.pretrained={pretrained} lacks SD3's two CLIP text encoders")
        self.t5 = _pipeline_part("T5EncoderModel", pretrained, "text_encoder_3", dtype=dtype) if t5 else None
        self.tokenizer_t5 = _pipeline_part("AutoTokenizer", pretrained, "tokenizer_3") if t5 else None
        from diffusion.pipeline import read_part_config

        folder = _local_folder(str(pretrained))
        transformer = read_part_config(
            folder or Path(str(pretrained)), "transformer", "conditioning.encoder.pretrained"
        )
        self.dim = int(transformer["joint_attention_dim"])
        if self.t5 is not None and int(self.t5.config.d_model) != self.dim:
            raise ConfigError(
                f"{pretrained}: T5's width {self.t5.config.d_model} differs from the transformer's {self.dim}"
            )
        self.clip_length = int(self.tokenizer_l.model_max_length)
        self.max_length = max_length
        self.pooled_dim = int(self.clip_l.config.projection_dim) + int(self.clip_g.config.projection_dim)
        self.requires_grad_(False).eval()
        self.config = dict(pretrained=str(pretrained), max_length=max_length, t5=t5, dtype=dtype)

    @torch.no_grad()
    def forward(self, captions: list[str]) -> dict[str, Tensor]:
        device, hidden, pooled = self.device, [], []
        for model, tokenizer in ((self.clip_l, self.tokenizer_l), (self.clip_g, self.tokenizer_g)):
            out = model(_token_ids(tokenizer, captions, self.clip_length, device), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])  # (B, 77, D_i): the penultimate layer
            pooled.append(out.text_embeds)  # (B, P_i)
        clip = torch.cat(hidden, dim=-1)  # (B, 77, D_l + D_g)
        clip = nn.functional.pad(clip, (0, self.dim - clip.shape[-1]))  # zeros up to T5's width: (B, 77, D)
        if self.t5 is None:
            t5 = clip.new_zeros(len(captions), self.max_length, self.dim)
        else:
            t5 = self.t5(_token_ids(self.tokenizer_t5, captions, self.max_length, device))[0]  # (B, L, D)
        context = torch.cat([clip, t5.to(clip.dtype)], dim=1)  # (B, 77 + L, D)
        mask = torch.ones(context.shape[:2], dtype=torch.bool, device=device)
        return {"context": context, "context_mask": mask, "pooled": torch.cat(pooled, dim=-1)}


class FluxTextEncoder(_FrozenPipelineEncoders):
    """FluxPipeline's two text encoders, as its `encode_prompt` uses them: context = T5's last hidden state
    (B, max_length, 4096), pooled = CLIP-L's pooled output (B, 768). The mask is all True (Flux attends to every
    token, padding included).

    Args:
        pretrained: a Flux pipeline folder or Hub id (text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/).
        max_length: T5 tokens per caption (the pipeline's max_sequence_length: 512; FLUX.1-schnell uses 256).
        dtype: the frozen models' weights: "fp32", "bf16" or "fp16".
    """

    def __init__(self, *, pretrained: str, max_length: int = 512, dtype: TextDtype = "fp32") -> None:
        super().__init__()
        self._check(pretrained, dtype)
        self.clip = _pipeline_part("CLIPTextModel", pretrained, "text_encoder", dtype=dtype)
        self.tokenizer_clip = _pipeline_part("AutoTokenizer", pretrained, "tokenizer")
        self.t5 = _pipeline_part("T5EncoderModel", pretrained, "text_encoder_2", dtype=dtype)
        self.tokenizer_t5 = _pipeline_part("AutoTokenizer", pretrained, "tokenizer_2")
        if None in (self.clip, self.tokenizer_clip, self.t5, self.tokenizer_t5):
            raise ConfigError(f"conditioning.encoder.pretrained={pretrained} lacks Flux's CLIP and T5 text encoders")
        self.clip_length = int(self.tokenizer_clip.model_max_length)
        self.max_length = max_length
        self.dim = int(self.t5.config.d_model)
        self.pooled_dim = int(self.clip.config.hidden_size)
        self.requires_grad_(False).eval()
        self.config = dict(pretrained=str(pretrained), max_length=max_length, dtype=dtype)

    @torch.no_grad()
    def forward(self, captions: list[str]) -> dict[str, Tensor]:
        device = self.device
        pooled = self.clip(_token_ids(self.tokenizer_clip, captions, self.clip_length, device)).pooler_output
        context = self.t5(_token_ids(self.tokenizer_t5, captions, self.max_length, device))[0]  # (B, L, D)
        mask = torch.ones(context.shape[:2], dtype=torch.bool, device=device)
        return {"context": context, "context_mask": mask, "pooled": pooled}
