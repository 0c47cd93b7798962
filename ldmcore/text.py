"""CLIP text conditioning: prompts -> token windows -> hidden states the U-Net cross-attends to.

The text model itself is transformers' `CLIPTextModel`; this file owns what Stable Diffusion does
around it: 77-token windows, longer prompts split into several windows whose embeddings are
concatenated along the token axis, and "clip skip" (taking a hidden state before the last layer).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

WINDOW = 77  # CLIP's context length: BOS + 75 prompt tokens + EOS


class PromptEncoder(nn.Module):
    """Encodes prompts with a CLIP tokenizer and text model.

    `clip_skip` follows diffusers: 0 uses the last layer's output (SD 1.x default); k > 0 takes the
    hidden state k layers before the last and applies the final layer norm to it, as A1111 does.
    `max_windows` bounds how many 77-token windows a long prompt may use (1 = truncate).
    """

    def __init__(self, tokenizer, text_encoder: nn.Module, clip_skip: int = 0, max_windows: int = 3):
        super().__init__()
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.clip_skip = clip_skip
        self.max_windows = max_windows

    @property
    def device(self) -> torch.device:
        return next(self.text_encoder.parameters()).device

    def tokenize(self, prompts: Sequence[str]) -> torch.Tensor:
        """prompts -> token ids (b, windows * 77). All prompts get as many windows as the longest needs."""
        return tokenize_windows(self.tokenizer, prompts, self.max_windows)

    def encode_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """token ids (b, windows * 77) -> hidden states (b, windows * 77, width)."""
        b = ids.shape[0]
        windows = ids.reshape(b, -1, WINDOW)  # (b, w, 77)
        flat = windows.reshape(-1, WINDOW).to(self.device)  # (b*w, 77)
        if self.clip_skip:
            out = self.text_encoder(flat, output_hidden_states=True)
            hidden = out.hidden_states[-(self.clip_skip + 1)]
            # transformers < 5 nests the layers under `text_model`; 5.x does not
            model = getattr(self.text_encoder, "module", self.text_encoder)  # unwrap DistributedDataParallel
            inner = getattr(model, "text_model", model)
            hidden = inner.final_layer_norm(hidden)
        else:
            hidden = self.text_encoder(flat)[0]  # (b*w, 77, width)
        return hidden.reshape(b, -1, hidden.shape[-1])

    def forward(self, prompts: str | Sequence[str]) -> torch.Tensor:
        if isinstance(prompts, str):
            prompts = [prompts]
        return self.encode_ids(self.tokenize(prompts))


def tokenize_windows(tokenizer, prompts: Sequence[str], max_windows: int, min_windows: int = 1) -> torch.Tensor:
    """prompts -> token ids (b, windows * 77) in 77-token windows, each BOS + up to 75 prompt tokens
    + EOS, the rest `tokenizer.pad_token_id`.

    A prompt is cut at `max_windows * 75` tokens; every prompt gets as many windows as the longest
    needs, and at least `min_windows` (so that two tokenizers of one model can be given the same count).
    """
    body = WINDOW - 2
    ids = tokenizer(list(prompts), add_special_tokens=False, truncation=False)["input_ids"]
    ids = [x[: body * max_windows] for x in ids]
    windows = max(min_windows, max((len(x) + body - 1) // body for x in ids))
    out = torch.full((len(ids), windows * WINDOW), tokenizer.pad_token_id, dtype=torch.long)
    for row, x in enumerate(ids):
        for w in range(windows):
            chunk = x[w * body : (w + 1) * body]
            start = w * WINDOW
            out[row, start] = tokenizer.bos_token_id
            out[row, start + 1 : start + 1 + len(chunk)] = torch.tensor(chunk, dtype=torch.long)
            out[row, start + 1 + len(chunk)] = tokenizer.eos_token_id
    return out


def pad_to_same_length(a: torch.Tensor, b: torch.Tensor, empty: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Give two embedding batches the same number of windows by appending encoded empty windows.

    Needed for classifier-free guidance when the prompt and the negative prompt use different
    numbers of 77-token windows. `empty` is the embedding of one empty window (1, 77, width).
    """
    def grow(x: torch.Tensor, n: int) -> torch.Tensor:
        if x.shape[1] >= n:
            return x
        extra = empty.expand(x.shape[0], -1, -1).repeat(1, (n - x.shape[1]) // WINDOW, 1)
        return torch.cat([x, extra.to(x)], dim=1)

    n = max(a.shape[1], b.shape[1])
    return grow(a, n), grow(b, n)


def build_word_tokenizer(words: Sequence[str]):
    """A CLIP tokenizer whose vocabulary holds every byte plus whole `words` as single tokens.

    Used by the tiny world and by tests: a real CLIP vocabulary cannot be downloaded there. Each
    word is reachable by merges that grow it from its last character leftwards, and every merge
    ends in an end-of-word token, so BPE can only ever follow one chain: a known word always
    becomes one token, anything else falls back to characters.
    """
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    alphabet = sorted(ByteLevel.alphabet())
    vocab: dict[str, int] = {}
    for token in ["<|startoftext|>", "<|endoftext|>", *alphabet, *(c + "</w>" for c in alphabet)]:
        vocab.setdefault(token, len(vocab))
    merges: list[tuple[str, str]] = []
    seen = set()
    for word in sorted({w.lower() for w in words if w}):
        suffix = word[-1] + "</w>"
        for i in range(len(word) - 2, -1, -1):
            pair = (word[i], suffix)
            suffix = word[i] + suffix
            if pair not in seen:
                seen.add(pair)
                merges.append(pair)
                vocab.setdefault(suffix, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=WINDOW)
