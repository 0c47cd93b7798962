"""Flux.1's text conditioning: T5's last hidden state for the tokens, CLIP-L's pooled output for the
modulation vector.

T5 (transformers' `T5EncoderModel`) reads the prompt padded to a fixed `max_length` (512 tokens for
Flux.1-dev, 256 for schnell) with no attention mask, as diffusers' Flux pipelines and the original
code call it: the padding positions' states depend on the prompt and the transformer attends to all
of them, so the whole padded sequence is the conditioning (the cache keeps it whole). CLIP reads 77
tokens; only its pooled (end-token) output is used.

`build_t5_word_tokenizer` makes a T5 tokenizer from a word list, for the tiny worlds and tests: a
real T5 vocabulary cannot be downloaded there.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

CLIP_LENGTH = 77


class FluxPromptEncoder(nn.Module):
    """prompts -> {"hidden": (b, max_length, t5 width), "pooled": (b, clip width)}."""

    def __init__(self, clip_tokenizer, clip: nn.Module, t5_tokenizer, t5: nn.Module, max_length: int = 512):
        super().__init__()
        self.clip_tokenizer, self.clip = clip_tokenizer, clip
        self.t5_tokenizer, self.t5 = t5_tokenizer, t5
        self.max_length = max_length

    @property
    def text_encoders(self) -> list[nn.Module]:
        return [self.clip, self.t5]

    @property
    def device(self) -> torch.device:
        return next(self.t5.parameters()).device

    def forward(self, prompts: str | Sequence[str]) -> dict[str, torch.Tensor]:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        t5_ids = self.t5_tokenizer(prompts, padding="max_length", max_length=self.max_length, truncation=True,
                                   return_tensors="pt").input_ids  # (b, max_length)
        clip_ids = self.clip_tokenizer(prompts, padding="max_length", max_length=CLIP_LENGTH, truncation=True,
                                       return_tensors="pt").input_ids  # (b, 77)
        hidden = self.t5(t5_ids.to(self.device))[0]  # (b, max_length, d_model)
        clip_device = next(self.clip.parameters()).device
        pooled = self.clip(clip_ids.to(clip_device)).pooler_output  # (b, width)
        return {"hidden": hidden, "pooled": pooled.to(hidden.device)}


def build_t5_word_tokenizer(words: Sequence[str], model_max_length: int = 512):
    """A T5 (unigram) tokenizer whose vocabulary holds <pad>, </s>, <unk>, the word boundary, every
    letter and digit, and each of `words` as one token: known words are one token each, others
    fall back to letters (no byte fallback: anything else is <unk>)."""
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    seen = {p for p, _ in pieces}
    for word in sorted({w for w in words if w}):
        for piece in ("\u2581" + word,):
            if piece not in seen:
                seen.add(piece)
                pieces.append((piece, -1.0))  # a whole word beats any split into letters
    for ch in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789,.!?'-":
        for piece in (ch, "\u2581" + ch):
            if piece not in seen:
                seen.add(piece)
                pieces.append((piece, -10.0))
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=model_max_length)


def t5_tokenizer_like(clip_tokenizer, model_max_length: int = 512):
    """A T5 word tokenizer knowing the whole words of a CLIP word tokenizer (`text.build_word_tokenizer`):
    a fresh tiny model's second tokenizer, so that one word list describes both."""
    words = [t[: -len("</w>")] for t in clip_tokenizer.get_vocab() if t.endswith("</w>") and len(t) > len("</w>") + 1]
    return build_t5_word_tokenizer(words, model_max_length)
