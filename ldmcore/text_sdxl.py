"""SDXL text conditioning: prompts -> the U-Net's context and pooled text embedding, and the size ids.

SDXL reads two CLIP text encoders: CLIP-L (transformers' `CLIPTextModel`) and CLIP-bigG
(`CLIPTextModelWithProjection`). The context is both encoders' penultimate hidden states, without
the final layer norm, side by side on the channel axis (CLIP-L first); the pooled embedding is
bigG's projected EOS output. The refiner has bigG only. The micro-conditioning ids (picture sizes
and crop, or the refiner's aesthetic score) go through the U-Net's `add_embedding` with the pooled one.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .text import WINDOW, tokenize_windows

# Long prompts: tokenize_windows cuts them into 75-token chunks, each its own BOS ... EOS window,
# encoded separately and concatenated on the token axis, as ComfyUI does. The pooled embedding is
# the first window's. Checked against the sources: ComfyUI (comfy/sd1_clip.py,
# `encode_token_weights`) returns `pooled[0:1]`, the first chunk's; kohya sd-scripts
# (library/strategy_sdxl.py) keeps `pool2[::n]`, also the first chunk's. kohya differs in the hidden
# states: it drops the inner BOS/EOS of each window (75n + 2 tokens, not 77n); ComfyUI keeps whole
# windows but moves a word that would straddle a boundary to the next window whole.


class SDXLPromptEncoder(nn.Module):
    """Encodes prompts with SDXL's two CLIP text encoders (the refiner's one: pass None for the first).

    Returns {"hidden": (b, windows * 77, C1 + C2), "pooled": (b, P)}. `clip_skip` k takes
    `hidden_states[-(k + 2)]`: SDXL already reads the penultimate layer at k = 0 (diffusers'
    convention). `max_windows` bounds the 77-token windows of a long prompt (1 = truncate, as
    diffusers does). An empty prompt is encoded like any other: whether SDXL base's unconditional
    input is zeros instead (diffusers' `force_zeros_for_empty_prompt`) is the caller's decision.
    """

    def __init__(
        self,
        tokenizer,
        text_encoder: nn.Module | None,
        tokenizer_2,
        text_encoder_2: nn.Module,
        clip_skip: int = 0,
        max_windows: int = 3,
    ):
        super().__init__()
        if (tokenizer is None) != (text_encoder is None):
            raise ValueError("SDXLPromptEncoder: give both tokenizer and text_encoder (SDXL base) or neither (refiner)")
        if tokenizer_2 is None or text_encoder_2 is None:
            raise ValueError("SDXLPromptEncoder: tokenizer_2 and text_encoder_2 (CLIP-bigG) are required")
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.tokenizer_2 = tokenizer_2
        self.text_encoder_2 = text_encoder_2
        self.clip_skip = clip_skip
        self.max_windows = max_windows
        for _, encoder in self.pairs:
            layers = _unwrap(encoder).config.num_hidden_layers
            if not 0 <= clip_skip <= layers - 1:
                raise ValueError(f"clip_skip={clip_skip}: a {layers}-layer text encoder allows 0 to {layers - 1}")
        _check_pooling_token(tokenizer_2, text_encoder_2)

    @property
    def pairs(self) -> list[tuple]:
        """(tokenizer, text encoder) in channel order: CLIP-L first, then CLIP-bigG."""
        if self.text_encoder is None:
            return [(self.tokenizer_2, self.text_encoder_2)]
        return [(self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)]

    @property
    def text_encoders(self) -> list[nn.Module]:
        """The text encoders in use, in concatenation order (the cache hashes their weights)."""
        return [encoder for _, encoder in self.pairs]

    @property
    def device(self) -> torch.device:
        return next(self.text_encoder_2.parameters()).device

    def tokenize(self, prompts: Sequence[str]) -> list[torch.Tensor]:
        """prompts -> token ids (b, windows * 77), one tensor per encoder, each padded with its own
        tokenizer's pad token. Both get the same window count: their hidden states are concatenated
        on the channel axis, and two vocabularies may split a prompt into different numbers of tokens."""
        ids = [tokenize_windows(tok, prompts, self.max_windows) for tok, _ in self.pairs]
        windows = max(x.shape[1] for x in ids) // WINDOW
        return [
            x if x.shape[1] == windows * WINDOW else tokenize_windows(tok, prompts, self.max_windows, windows)
            for (tok, _), x in zip(self.pairs, ids)
        ]

    def encode_ids(self, ids: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        """token ids, one (b, windows * 77) per encoder -> {"hidden", "pooled"}."""
        b = ids[0].shape[0]
        hidden = []
        for (_, encoder), x in zip(self.pairs, ids):
            flat = x.reshape(-1, WINDOW).to(next(encoder.parameters()).device)  # (b*w, 77)
            out = encoder(flat, output_hidden_states=True)
            h = out.hidden_states[-(self.clip_skip + 2)]  # (b*w, 77, C), before the final layer norm
            hidden.append(h.reshape(b, -1, h.shape[-1]).to(self.device))  # (b, w*77, C)
        pooled = out.text_embeds  # the last pair is CLIP-bigG: projected EOS state, (b*w, P)
        pooled = pooled.reshape(b, -1, pooled.shape[-1])[:, 0]  # (b, P): the first window's
        return {"hidden": torch.cat(hidden, dim=-1), "pooled": pooled}  # hidden: (b, w*77, C1 + C2)

    def forward(self, prompts: str | Sequence[str]) -> dict[str, torch.Tensor]:
        if isinstance(prompts, str):
            prompts = [prompts]
        return self.encode_ids(self.tokenize(prompts))


def size_ids(original_size, crop_top_left, target_size, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """SDXL base's micro-conditioning: original (h, w), crop (top, left), target (h, w) -> (6,), or
    (b, 6) when any argument is batched as (b, 2). The order of diffusers' `_get_add_time_ids`."""
    return _concat_ids([original_size, crop_top_left, target_size], dtype)


def refiner_size_ids(original_size, crop_top_left, aesthetic_score, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The refiner's micro-conditioning: original (h, w), crop (top, left), aesthetic score -> (5,), or
    (b, 5) when batched (sizes (b, 2), scores (b,)). diffusers' img2img pipeline with
    `requires_aesthetics_score`, which defaults to 6.0 for the prompt and 2.5 for the negative."""
    score = torch.as_tensor(aesthetic_score, dtype=dtype)[..., None]
    return _concat_ids([original_size, crop_top_left, score], dtype)


def _concat_ids(parts: list, dtype: torch.dtype) -> torch.Tensor:
    parts = [torch.as_tensor(p, dtype=dtype) for p in parts]
    for p, name in zip(parts[:2], ("original_size", "crop_top_left")):
        if p.ndim == 0 or p.shape[-1] != 2:
            raise ValueError(f"{name} must be a pair (or a batch of pairs, (b, 2)); got shape {tuple(p.shape)}")
    batch = torch.broadcast_shapes(*(p.shape[:-1] for p in parts))
    return torch.cat([p.expand(*batch, p.shape[-1]) for p in parts], dim=-1)


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)  # DistributedDataParallel keeps the model in .module


def _check_pooling_token(tokenizer, text_encoder: nn.Module) -> None:
    """transformers' CLIP pools at the first position holding the EOS id it was built with; a legacy
    config saying 2 (SDXL's own text_encoder_2 does) pools at the highest token id instead, which
    is EOS only while EOS is the last entry of the vocabulary. Fail here rather than pool a wrong token."""
    model = _unwrap(text_encoder)
    inner = getattr(model, "text_model", model)  # CLIPTextModelWithProjection nests the text model
    pooled_at = getattr(inner, "eos_token_id", model.config.eos_token_id)
    eos = tokenizer.eos_token_id
    if pooled_at == 2:  # transformers' legacy rule: argmax of the ids
        if eos == len(tokenizer) - 1:
            return
        why = f"a config eos_token_id of 2 pools at the highest token id, and tokenizer_2's EOS ({eos}) is not it"
    elif pooled_at == eos:
        return
    else:
        why = f"it pools at token id {pooled_at} (its config's eos_token_id) but tokenizer_2 ends prompts with {eos}"
    raise ValueError(
        f"text_encoder_2: {why}, so the pooled embedding would come from the wrong token. Build the text "
        f"encoder with eos_token_id={eos} in its config (as Components.from_preset does)."
    )
