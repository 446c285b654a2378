"""Text conditioning: the tokenizer kept as data, cross-attention and its mask, guidance with prompts, CLIP folders."""

from __future__ import annotations

import io
import logging

import pytest
import torch
from torch import nn

from diffusion.conditioning import TextConditioning, build_conditioning
from diffusion.model import DiffusionModel
from diffusion.process.discrete import NoiseSchedule
from diffusion.text_encoders import CLIPTextEncoder, TransformerTextEncoder, word_tokenizer
from diffusion.unet import AttentionBlock, CrossAttentionBlock, UNet
from tests.conftest import tiny_unet

CAPTIONS = ["a handwritten seven", "the digit 7", "a handwritten one", "the digit 1", "a 1"]


def _encoder(**kwargs) -> TransformerTextEncoder:
    torch.manual_seed(0)
    encoder = TransformerTextEncoder(dim=16, depth=1, heads=2, max_length=8, vocab_size=64, **kwargs)
    encoder.fit(CAPTIONS)
    return encoder.eval()


def _text_net(context_dim: int = 16) -> UNet:
    torch.manual_seed(0)
    net = tiny_unet(context_dim=context_dim)
    with torch.no_grad():  # zero-initialised output layers would hide what the context does
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return net.eval()


def test_tokenizer_round_trip_and_is_stored_as_data():
    encoder = _encoder()
    ids, mask = encoder.tokenize(["A handwritten SEVEN", ""])
    vocab = encoder._tokenizer.get_vocab()
    assert ids[0].tolist() == [vocab["[BOS]"], vocab["a"], vocab["handwritten"], vocab["seven"]]
    assert mask.tolist() == [[True] * 4, [True, False, False, False]]  # the empty caption keeps its [BOS]
    assert encoder._tokenizer.decode(ids[0].tolist()) == "a handwritten seven"
    # the tokenizer travels in the state dict as a JSON string and loads weights-only
    conditioning = TextConditioning(encoder=encoder)
    buffer = io.BytesIO()
    torch.save(conditioning.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    assert isinstance(state["encoder._extra_state"]["tokenizer"], str)
    rebuilt = build_conditioning(conditioning.describe())
    assert not rebuilt.encoder.has_tokenizer
    rebuilt.load_state_dict(state)
    rebuilt.eval()
    for a, b in zip(conditioning(CAPTIONS).values(), rebuilt(CAPTIONS).values(), strict=True):
        assert torch.equal(a, b)


def test_word_tokenizer_keeps_vocab_size_and_new_words_extend_it():
    tokenizer_json = word_tokenizer(["a b c d e f"], vocab_size=6)  # 3 specials + 3 words
    encoder = TransformerTextEncoder(dim=8, depth=0, heads=1, vocab_size=16, tokenizer=tokenizer_json)
    assert len(encoder._tokenizer.get_vocab()) == 6
    before = encoder._tokenizer.get_vocab()
    encoder.fit(["an inverted seven"])  # fine-tuning captions: old ids stay, new words get free rows
    after = encoder._tokenizer.get_vocab()
    assert {k: after[k] for k in before} == before
    assert {"an", "inverted", "seven"} <= set(after) and max(after.values()) == 8


def test_lora_fine_tune_trains_only_the_new_words():
    """finetune=lora with a jointly trained encoder: only the new words' rows train (AdamW's weight decay
    included), the old captions encode bit for bit as before, and the state dict keeps the usual layout (a fresh
    encoder loads it and encodes the new words as trained; a resumed one puts the rows back into training)."""
    encoder = _encoder()
    old = [*CAPTIONS, ""]
    before = [t.clone() for t in encoder(old)]
    table = encoder.token_emb.weight.detach().clone()
    encoder.fit(["an inverted seven"])
    assert encoder.train_new_words_only() == 2  # an, inverted
    trained = [name for name, p in encoder.named_parameters() if p.requires_grad]
    assert trained == ["new_word_emb"]
    optimizer = torch.optim.AdamW([p for p in encoder.parameters() if p.requires_grad], lr=0.1, weight_decay=0.5)
    encoder.train()
    for _ in range(3):
        optimizer.zero_grad()
        context, mask = encoder(["an inverted seven", "a handwritten one"])
        context[mask].pow(2).sum().backward()
        optimizer.step()
    encoder.eval()
    for a, b in zip(before, encoder(old), strict=True):
        assert torch.equal(a, b)
    vocab = encoder._tokenizer.get_vocab()
    new_ids = [vocab["an"], vocab["inverted"]]
    state = TextConditioning(encoder=encoder).state_dict()
    assert "encoder.new_word_emb" not in state
    weight = state["encoder.token_emb.weight"]
    assert not torch.equal(weight[new_ids], table[new_ids])  # the new rows trained
    others = [i for i in range(len(table)) if i not in new_ids]
    assert torch.equal(weight[others], table[others])  # and nothing else moved
    fresh = build_conditioning(TextConditioning(encoder=encoder).describe())
    fresh.load_state_dict(state)
    fresh.eval()
    for a, b in zip(encoder(["an inverted seven"]), fresh.encoder(["an inverted seven"]), strict=True):
        assert torch.equal(a, b)
    resumed = _encoder()  # a resumed LoRA run: base tokenizer, the same new words, then the checkpoint
    resumed.fit(["an inverted seven"])
    resumed.train_new_words_only()
    TextConditioning(encoder=resumed).load_state_dict(state)
    assert torch.equal(resumed.new_word_emb, weight[new_ids])


def test_unknown_words_and_long_captions_warn_once(caplog):
    encoder = _encoder()
    with caplog.at_level(logging.WARNING):
        encoder(["a handwritten eight", "an eight"])
        encoder(["an eight"])
        ids, _ = encoder.tokenize(["a handwritten seven " * 4])
        encoder.tokenize(["the digit 7 " * 4])
    messages = [r.getMessage() for r in caplog.records]
    assert sum("not in the text encoder's vocabulary" in m for m in messages) == 2  # 'eight', then 'an' (new)
    assert sum("truncated" in m for m in messages) == 1
    assert ids.shape[1] == 8


def test_text_net_prompts_null_caption_and_guidance():
    encoder, net = _encoder(), _text_net()
    conditioning = TextConditioning(encoder=encoder)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([10, 10])
    seven, one = conditioning(["a handwritten seven"] * 2), conditioning(["a handwritten one"] * 2)
    null = conditioning.null(2)
    assert not torch.allclose(net(x, t, **seven), net(x, t, **one))  # different prompts, different outputs
    # guidance=1 is exactly the conditional model; 0 the null caption's; the unconditional model is the null one
    model = DiffusionModel(net=net, process=NoiseSchedule(num_steps=20), conditioning=conditioning)
    assert torch.equal(model.denoiser(seven, null=null, guidance=1.0)(x, t), net(x, t, **seven))
    assert torch.equal(model.denoiser(seven, null=null, guidance=0.0)(x, t), net(x, t, **null))
    assert torch.equal(model.denoiser(seven, guidance=0.0)(x, t), net(x, t, **null))  # the default null: ""
    assert torch.equal(model.denoiser()(x, t), net(x, t, **conditioning([""] * 2)))
    # guidance > 1: one batched pass over both branches, the (longer) prompt and the (shorter) null caption padded
    cond_out, null_out = net(x, t, **seven), net(x, t, **null)
    guided = model.denoiser(seven, null=null, guidance=3.0)(x, t)
    torch.testing.assert_close(guided, null_out + 3.0 * (cond_out - null_out), atol=1e-5, rtol=1e-5)
    # a negative prompt is the other branch
    negative = conditioning(["the digit 1"] * 2)
    other = model.denoiser(seven, null=negative, guidance=3.0)(x, t)
    assert not torch.allclose(guided, other)


def test_padding_tokens_do_not_change_the_output():
    encoder, net = _encoder(), _text_net()
    conditioning = TextConditioning(encoder=encoder)
    x, t = torch.randn(1, 1, 8, 8), torch.tensor([5])
    alone = net(x, t, **conditioning(["a 1"]))
    kwargs = conditioning(["a 1", "a handwritten seven the digit 7"])  # the first row is padded now
    assert kwargs["context"].shape[1] > 3 and not kwargs["context_mask"][0].all()
    padded = net(x.repeat(2, 1, 1, 1), t.repeat(2), **kwargs)[:1]
    torch.testing.assert_close(padded, alone, atol=1e-5, rtol=1e-5)
    # the block itself: garbage context under a False mask is ignored, under a True mask it is not
    block = CrossAttentionBlock(16, 8, head_dim=8, groups=4)
    nn.init.normal_(block.proj.weight)
    h, context = torch.randn(1, 16, 4, 4), torch.randn(1, 3, 8)
    mask = torch.tensor([[True, True, True]])
    longer = torch.cat([context, 100 * torch.randn(1, 2, 8)], dim=1)
    ignored = block(h, longer, torch.tensor([[True, True, True, False, False]]))
    torch.testing.assert_close(ignored, block(h, context, mask))
    assert not torch.allclose(block(h, longer, torch.ones(1, 5, dtype=torch.bool)), block(h, context, mask))


def test_cross_attention_keys_appear_only_with_context_dim():
    plain = UNet(in_channels=1, image_size=8, base_channels=8, channel_mult=[1, 2], attention_resolutions=[4],
                 attention_head_dim=8, norm_groups=4, num_res_blocks=1)  # fmt: skip
    text = _text_net()
    plain_keys, text_keys = set(plain.state_dict()), set(text.state_dict())
    assert not any(isinstance(m, CrossAttentionBlock) for m in plain.modules())
    crosses = sum(isinstance(m, CrossAttentionBlock) for m in text.modules())
    assert crosses == sum(isinstance(m, AttentionBlock) for m in text.modules()) == 4  # one per self-attention
    assert len(text_keys) == len(plain_keys) + crosses * 8  # norm, q, kv and proj weights and biases each
    with pytest.raises(ValueError, match="needs a context"):
        text(torch.zeros(1, 1, 8, 8), torch.tensor([1]))
    with pytest.raises(ValueError, match="model.context_dim is null"):
        plain(torch.zeros(1, 1, 8, 8), torch.tensor([1]), context=torch.zeros(1, 2, 16))


# --- a pretrained CLIP text model from a user's folder ---------------------------------------------------------
def save_tiny_clip(folder, *, pipeline_layout: bool = False):
    """A tiny CLIP text model with a word-level tokenizer trained here, saved as `save_pretrained` leaves them."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(
        CAPTIONS, trainers.WordLevelTrainer(special_tokens=["<pad>", "<unk>", "<s>", "</s>"], show_progress=False)
    )
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", tok.token_to_id("<s>")), ("</s>", tok.token_to_id("</s>"))]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    config = CLIPTextConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=16,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )
    torch.manual_seed(0)
    model = CLIPTextModel(config)
    model_dir, tok_dir = (folder / "text_encoder", folder / "tokenizer") if pipeline_layout else (folder, folder)
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(tok_dir)
    return folder


@pytest.mark.parametrize("pipeline_layout", [False, True], ids=["save_pretrained", "pipeline_folder"])
def test_clip_encoder_from_a_local_folder(tmp_path, pipeline_layout):
    folder = save_tiny_clip(tmp_path / "clip", pipeline_layout=pipeline_layout)
    encoder = CLIPTextEncoder(pretrained=str(folder), dtype="bf16")
    assert encoder.dim == 32 and encoder.max_length == 16
    assert not any(p.requires_grad for p in encoder.parameters())
    context, mask = encoder(["a handwritten seven", ""])
    assert context.shape == (2, 16, 32) and context.dtype == torch.bfloat16
    assert mask.sum(1).tolist() == [5, 2]  # <s> a handwritten seven </s>; <s> </s>
    conditioning = TextConditioning(encoder=encoder, cache=True)
    assert not any(k.startswith("encoder.") for k in conditioning.state_dict())  # referenced, not copied
    conditioning.load_state_dict({})  # and nothing is missing when loading
    first = conditioning(["a handwritten seven", "a 1"])
    assert len(conditioning._cached) == 2
    assert torch.equal(conditioning(["a 1", "a handwritten seven"])["context"], first["context"].flip(0))
    rebuilt = build_conditioning(conditioning.describe())
    assert torch.equal(rebuilt(["a 1"])["context"], first["context"][1:])


def test_clip_encoder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="text encoder folder .*nope does not exist"):
        CLIPTextEncoder(pretrained=str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(OSError, match="cannot load the CLIP text encoder"):
        CLIPTextEncoder(pretrained=str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="dtype"):
        CLIPTextEncoder(pretrained=str(tmp_path / "empty"), dtype="int8")
