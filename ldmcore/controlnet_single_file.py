"""The original ControlNet release's single-file layout (lllyasviel's cldm), both ways.

The original ControlNet is the U-Net's encoder under the U-Net's own original names (`time_embed`,
`input_blocks`, `middle_block`; SDXL ControlNets also `label_emb`, the added conditioning), plus:
    input_hint_block.{0, 2, 4, ...}  the conditioning-image convs (odd indices are the SiLUs between them)
    zero_convs.N.0                   the 1x1 zero conv on skip N
    middle_block_out.0               the 1x1 zero conv on the mid block
Files that hold a whole ControlLDM put it under `control_model.`; files of the ControlNet alone
(A1111 / ComfyUI model folders accept both) have no prefix. We write the prefixed form.

The encoder's renaming is the U-Net table of single_file.py; this module adds the ControlNet's own rows.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping

import torch

from .controlnet import ControlNet, ControlNetConfig
from .single_file import _convert, _Module, _unet_modules
from .weights import CheckpointError, load_strict, read_state_dict, write_safetensors

PREFIX = "control_model."
METADATA_KEY = "ldm_tune.controlnet"  # JSON of the ControlNetConfig in files we write
_ENCODER = ("conv_in", "time_embedding.", "add_embedding.", "down_blocks.", "mid_block.")


def _modules(config: ControlNetConfig) -> list[_Module]:
    encoder = [m for m in _unet_modules(config.unet_view()) if m.diffusers.startswith(_ENCODER)]
    convs = 2 * (len(config.conditioning_embedding_out_channels) - 1)  # the hint block's convs between in and out
    return [
        *encoder,
        _Module("controlnet_cond_embedding.conv_in", "input_hint_block.0"),
        *(_Module(f"controlnet_cond_embedding.blocks.{k}", f"input_hint_block.{2 * (k + 1)}") for k in range(convs)),
        _Module("controlnet_cond_embedding.conv_out", f"input_hint_block.{2 * (convs + 1)}"),
        *(_Module(f"controlnet_down_blocks.{i}", f"zero_convs.{i}.0") for i in range(len(config.skip_channels()))),
        _Module("controlnet_mid_block", "middle_block_out.0"),
    ]


def controlnet_to_original(state_dict: Mapping[str, torch.Tensor], config: ControlNetConfig) -> dict[str, torch.Tensor]:
    """diffusers-named ControlNet state dict -> original names under `control_model.`."""
    out = _convert(state_dict, _modules(config), True, "ControlNet", PREFIX)
    return {PREFIX + k: v for k, v in out.items()}


def original_to_controlnet(state_dict: Mapping[str, torch.Tensor], config: ControlNetConfig) -> dict[str, torch.Tensor]:
    """Original ControlNet state dict (with or without `control_model.`) -> diffusers names. Keys of other
    models in a whole ControlLDM file (model.diffusion_model.*, first_stage_model.*, ...) are ignored."""
    if any(k.startswith(PREFIX) for k in state_dict):
        own, prefix = {k[len(PREFIX) :]: v for k, v in state_dict.items() if k.startswith(PREFIX)}, PREFIX
    else:
        own, prefix = dict(state_dict), ""
    if "input_hint_block.0.weight" not in own:
        raise CheckpointError(
            "not an original ControlNet: no control_model.input_hint_block.0.weight (nor input_hint_block.0.weight); "
            "a diffusers ControlNet folder loads with ControlNet.from_pretrained"
        )
    return _convert(own, _modules(config), False, "ControlNet", prefix)


def hint_block_widths(state_dict: Mapping[str, torch.Tensor]) -> tuple[int, tuple[int, ...]]:
    """(conditioning_channels, conditioning_embedding_out_channels) read from an original file's
    input_hint_block shapes."""
    own = {k.removeprefix(PREFIX): v for k, v in state_dict.items()}
    convs = sorted(int(k.split(".")[1]) for k in own if k.startswith("input_hint_block.") and k.endswith(".weight"))
    if len(convs) < 2 or len(convs) % 2:
        raise CheckpointError(f"input_hint_block has {len(convs)} convs; expected conv_in, pairs, conv_out")
    first = own[f"input_hint_block.{convs[0]}.weight"]  # (w0, c, 3, 3)
    # after conv_in, every second conv (the stride-2 one) moves to the next width; the last is conv_out
    widths = (first.shape[0], *(own[f"input_hint_block.{i}.weight"].shape[0] for i in convs[2:-1:2]))
    return first.shape[1], widths


def save_controlnet_single_file(controlnet: ControlNet, path: str | os.PathLike, metadata: dict[str, str] | None = None,
                                dtype: torch.dtype | None = None) -> Path:
    """Write the original layout to a .safetensors file, atomically; our config rides in its metadata."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: ControlNet single files are written as .safetensors only")
    state = controlnet_to_original(controlnet.state_dict(), controlnet.config)
    state = {k: v.detach().to(dtype or v.dtype).contiguous().cpu() for k, v in state.items()}
    return write_safetensors(state, path, {**(metadata or {}), METADATA_KEY: json.dumps(controlnet.config.to_dict())})


def load_controlnet_single_file(path: str | os.PathLike, config: ControlNetConfig | dict | None = None,
                                dtype: torch.dtype | None = None) -> ControlNet:
    """Read an original-layout ControlNet file. The config comes from the file's metadata (files we wrote)
    or from `config` (for others: `ControlNetConfig.from_unet_config(base_unet.config)`; the hint block's
    widths are then read from the file)."""
    path = Path(path)
    state = read_state_dict(path)
    stored = _stored_config(path)
    if stored is not None:
        cfg = ControlNetConfig.from_dict(stored, source=f"{path} metadata")
    elif config is None:
        raise CheckpointError(
            f"{path}: no ControlNet config in the file; pass config=ControlNetConfig.from_unet_config(base_unet.config) "
            "for the base model it was trained on"
        )
    else:
        cfg = ControlNetConfig.from_dict(config.to_dict() if hasattr(config, "to_dict") else dict(config))
        channels, widths = hint_block_widths(state)
        cfg = ControlNetConfig.from_dict({**cfg.to_dict(), "conditioning_channels": channels,
                                          "conditioning_embedding_out_channels": widths})
    with torch.device("meta"):
        model = ControlNet(cfg)
    model.to_empty(device="cpu")
    load_strict(model, original_to_controlnet(state, cfg), str(path))
    if dtype is not None:
        model.to(dtype)
    return model.eval()


def _stored_config(path: Path) -> dict | None:
    if path.suffix != ".safetensors":
        return None
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        raw = (f.metadata() or {}).get(METADATA_KEY)
    return json.loads(raw) if raw else None
