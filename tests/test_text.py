"""Prompt encoding against diffusers' StableDiffusionPipeline.encode_prompt on a tiny CLIP."""
import pytest
import torch
from conftest import rel_err
from transformers import CLIPTextConfig, CLIPTextModel

from ldmcore.text import WINDOW, PromptEncoder, build_word_tokenizer, pad_to_same_length

WORDS = "a red green blue circle square triangle on white black background photo of sks".split()


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    tok = build_word_tokenizer(WORDS)
    cfg = CLIPTextConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=2,
        max_position_embeddings=77,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    return tok, CLIPTextModel(cfg).eval()


class _TextEncoderShim(torch.nn.Module):
    """diffusers 0.42 reaches for `text_encoder.text_model.final_layer_norm` under clip skip, a
    level transformers 5 removed; this shim restores the attribute so the reference path runs."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.config = model.config
        self.dtype = model.dtype

    @property
    def text_model(self):
        return getattr(self.model, "text_model", self.model)

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)


def diffusers_embeddings(tok, model, prompt, clip_skip=None):
    from diffusers import StableDiffusionPipeline

    # encode_prompt reads only these attributes of the pipeline
    pipe = StableDiffusionPipeline.__new__(StableDiffusionPipeline)
    pipe.tokenizer, pipe.text_encoder = tok, _TextEncoderShim(model)
    pipe._lora_scale = None
    embeds, _ = StableDiffusionPipeline.encode_prompt(
        pipe, prompt, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False, clip_skip=clip_skip
    )
    return embeds


def test_known_words_are_single_tokens(clip):
    tok, _ = clip
    ids = tok("a red circle on a white background")["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == [
        "<|startoftext|>", "a</w>", "red</w>", "circle</w>", "on</w>", "a</w>", "white</w>", "background</w>", "<|endoftext|>"
    ]
    # unknown words fall back to characters instead of failing
    assert len(tok("zebra")["input_ids"]) == 2 + 5


@pytest.mark.parametrize("clip_skip", [0, 1])
def test_short_prompt_matches_diffusers(clip, clip_skip):
    tok, model = clip
    enc = PromptEncoder(tok, model, clip_skip=clip_skip)
    prompt = "a photo of sks red circle"
    with torch.no_grad():
        ours = enc(prompt)
        expected = diffusers_embeddings(tok, model, prompt, clip_skip=clip_skip or None)
    assert ours.shape == (1, WINDOW, 32)
    assert rel_err(ours, expected) < 1e-6
    if clip_skip:
        assert rel_err(ours, enc.__class__(tok, model)(prompt)) > 1e-3  # the penultimate layer differs


def test_long_prompt_uses_several_windows(clip):
    tok, model = clip
    enc = PromptEncoder(tok, model, max_windows=3)
    long_prompt = " ".join(["red circle"] * 50)  # 100 tokens: two windows
    ids = enc.tokenize([long_prompt, "blue square"])
    assert ids.shape == (2, 2 * WINDOW)
    assert ids[0, 0] == tok.bos_token_id and ids[0, WINDOW] == tok.bos_token_id
    assert ids[0, WINDOW - 1] == tok.eos_token_id  # the first window is full: 75 tokens then EOS
    with torch.no_grad():
        emb = enc([long_prompt, "blue square"])
        first75 = " ".join(["red circle"] * 37 + ["red"])
        assert emb.shape == (2, 2 * WINDOW, 32)
        assert rel_err(emb[:1, :WINDOW], enc(first75)) < 1e-6
        # the short prompt's first window is what it would be alone
        assert rel_err(emb[1:, :WINDOW], enc("blue square")) < 1e-6
    truncating = PromptEncoder(tok, model, max_windows=1)
    assert truncating.tokenize([long_prompt]).shape == (1, WINDOW)


def test_pad_to_same_length(clip):
    tok, model = clip
    enc = PromptEncoder(tok, model)
    with torch.no_grad():
        a, b, empty = enc(" ".join(["red"] * 80)), enc("blue"), enc("")
    a2, b2 = pad_to_same_length(a, b, empty)
    assert a2.shape == b2.shape == (1, 2 * WINDOW, 32)
    assert torch.equal(b2[:, :WINDOW], b) and torch.equal(b2[:, WINDOW:], empty)
    assert torch.equal(a2, a)
