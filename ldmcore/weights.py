"""Reading weight files safely and loading them into modules with errors a user can act on."""
from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Mapping

import torch
from torch import nn


class CheckpointError(ValueError):
    """A weight file or folder that cannot be used as given; the message says why and what to do."""


#: the safetensors metadata entry holding `tensors_digest` of the file's tensors, in every file ldm-tune writes
DIGEST_KEY = "ldm_tune.sha256"


def tensors_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 over the tensors' names, dtypes, shapes and bytes, in name order."""
    import hashlib

    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def write_safetensors(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike,
                      metadata: Mapping[str, str] | None = None) -> Path:
    """The one way ldm-tune writes a .safetensors file: contiguous CPU tensors, the tensors' digest in
    the metadata (DIGEST_KEY, checked on every read), written beside, flushed to disk and renamed into
    place, so a crash or a full disk never leaves a complete-looking damaged file."""
    from ldmcore.faults import fault_point
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    meta = {"format": "pt", **(metadata or {}), DIGEST_KEY: tensors_digest(state)}
    tmp = path.with_name(path.name + ".partial")
    try:
        fault_point("write", tmp)
        save_file(state, str(tmp), metadata=meta)
        with open(tmp, "rb+") as f:  # the bytes are on disk before the name says the file is whole
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def read_safetensors(path: str | os.PathLike, device: str = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a .safetensors file; a file that records its digest (all of ldm-tune's)
    must match it. Errors name the file."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt", device=device) as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for truncated headers and data
        raise CheckpointError(f"{path}: not a readable safetensors file ({e}); the file is damaged or truncated: "
                              "re-download, re-copy or re-export it") from e
    if DIGEST_KEY in metadata and tensors_digest(tensors) != metadata[DIGEST_KEY]:
        raise CheckpointError(f"{path}: its tensors do not match the checksum written with them: the file was damaged "
                              "after it was written (disk, copy, download); re-copy or re-export it")
    return tensors, metadata


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a `.safetensors`, `.bin`, `.pt`, `.pth` or `.ckpt` file into a flat dict of tensors.

    Pickle files are read with `weights_only=True`: a pickle holding anything but plain weights
    (code, custom classes) is refused rather than executed. Lightning checkpoints that wrap the
    weights in a `state_dict` entry are unwrapped.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: the file is empty (an interrupted download or copy?)")
    if path.suffix == ".safetensors":
        return read_safetensors(path)[0]
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=_can_mmap(path))
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path}: refused to unpickle: the file holds more than plain weights ({str(e).splitlines()[0]}). "
            "Convert it to safetensors with a tool you trust, or re-save only its state_dict."
        ) from e
    except (RuntimeError, EOFError) as e:
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({e}); is the file truncated?") from e
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{path}: the file holds no tensors")
    return tensors


def _can_mmap(path: Path) -> bool:
    # mmap needs the zip-based format torch has written since 1.6; legacy files fall back to a full read.
    import zipfile

    return zipfile.is_zipfile(path)


def find_weights(folder: Path, stem: str) -> Path:
    """The weight file in a diffusers component folder: safetensors first, then the pickle format."""
    for name in (f"{stem}.safetensors", f"{stem}.bin"):
        if (folder / name).is_file():
            return folder / name
    found = sorted(p.name for p in folder.glob("*") if p.suffix in (".safetensors", ".bin"))
    hint = f" (found {', '.join(found)}; variants such as fp16 are not picked automatically)" if found else ""
    raise CheckpointError(f"{folder}: no {stem}.safetensors or {stem}.bin{hint}")


def preview_keys(keys: list[str], n: int = 5) -> str:
    shown = ", ".join(keys[:n])
    return shown + (f", ... ({len(keys) - n} more)" if len(keys) > n else "")


def describe_mismatch(missing: list[str], unexpected: list[str]) -> str:
    """Guess what kind of checkpoint was given from the keys that did not match."""
    everything = missing + unexpected
    if any(k.startswith(("add_embedding", "encoder_hid_proj")) for k in unexpected):
        return "this looks like an SDXL (or other added-conditioning) U-Net, which this model config does not describe"
    if any(".transformer_blocks.1." in k for k in unexpected) and not any(".transformer_blocks.1." in k for k in missing):
        return "the checkpoint has deeper transformer blocks than the config (an SDXL checkpoint?)"
    if any(k.startswith("controlnet_") for k in unexpected):
        return "this looks like a ControlNet, not a U-Net"
    if any("lora" in k.lower() for k in unexpected):
        return "the file holds LoRA weights; load it as an adapter, not as a model"
    if any(k.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model.")) for k in unexpected):
        return "this is an original single-file checkpoint; load it with ldmcore.load_components"
    if any(k.startswith(("encoder.", "decoder.")) for k in missing) and any(
        k.startswith(("down_blocks.", "up_blocks.", "conv_in.")) for k in unexpected
    ):
        return "the file holds a U-Net, not a VAE"
    if any(k.startswith(("down_blocks.", "up_blocks.")) for k in missing) and any(
        k.startswith(("encoder.", "decoder.")) for k in unexpected
    ):
        return "the file holds a VAE, not a U-Net"
    if not everything:
        return ""
    return "the checkpoint and the config describe different architectures"


def check_state_dict(
    own: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor], what: str, hint: str = ""
) -> None:
    """Raise a CheckpointError unless `given` has exactly the keys and shapes of `own`: the
    message names the first missing and unexpected keys, the first wrong shape, and `hint` (or a
    guess at the cause from the keys)."""
    missing = sorted(k for k in own if k not in given)
    unexpected = sorted(k for k in given if k not in own)
    if missing or unexpected:
        parts = [what]
        if missing:
            parts.append(f"missing {len(missing)} keys: {preview_keys(missing)}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} keys: {preview_keys(unexpected)}")
        cause = hint or describe_mismatch(missing, unexpected)
        if cause:
            parts.append(f"likely cause: {cause}")
        raise CheckpointError("; ".join(parts))
    wrong = [k for k, v in own.items() if tuple(given[k].shape) != tuple(v.shape)]
    if wrong:
        k = wrong[0]
        detail = f"{k} is {tuple(given[k].shape)} in the file but {tuple(own[k].shape)} in the model"
        extra = ""
        if k == "conv_in.weight" and given[k].shape[1] == 9:
            extra = "; this is a 9-channel inpainting U-Net: set in_channels=9 in the config"
        elif hint:
            extra = f"; {hint}"
        raise CheckpointError(f"{what}: {len(wrong)} tensors have the wrong shape, first {detail}{extra}")


def load_strict(module: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """`load_state_dict(strict=True)` that explains itself: which keys, which shapes, and a guess why."""
    check_state_dict(module.state_dict(), state_dict, f"{source}: the weights do not fit {type(module).__name__}")
    module.load_state_dict(state_dict, strict=True)
