"""The full fine-tune: every weight of the denoiser (the U-Net, or Flux's transformer) trains; the
VAE and the text encoders stay as they were.

What it writes (`unet/` below is `transformer/` for Flux: the family's denoiser folder):
- at the end, into output_dir: `model/`, a complete diffusers folder (the trained denoiser with the
  base's VAE, text encoders, tokenizers and scheduler), and `model.safetensors`, the same model as one
  original-layout file (A1111, ComfyUI, diffusers' from_single_file; for Flux the transformer alone,
  as Black Forest Labs ship it). With `train.ema_decay` the denoiser in both is the EMA, as diffusers'
  own scripts publish it, and `model/unet_raw/` holds the raw weights beside it
  (`UNet2DConditionModel.from_pretrained(".../model", subfolder="unet_raw")`).
- into every checkpoint: `unet/`, a diffusers denoiser folder whose weights file is the checkpoint's
  own `trained.safetensors` (a hard link: no second copy of a model-sized file), and
  `training.json`. The complete export of a checkpoint is one command away:

      python -m trainers.full output_dir/checkpoints/step_00001000 --out exported [--ema]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from .method import Method
from .statefile import load_state

TRAINED_FILE = "trained.safetensors"  # the loop's name for what trained_state_dict() returns
INFO_FILE = "training.json"  # the run's metadata: base model, its hash, the whole config
DENOISER_WEIGHTS = "diffusion_pytorch_model.safetensors"


class FullMethod(Method):
    name = "full"
    #: set by the loop for the final export when the EMA is live: the raw weights, in parameters() order
    raw_weights: list[torch.Tensor] | None = None

    def build(self) -> None:
        self.components.denoiser.requires_grad_(True)

    # Checkpoints keep the U-Net under its diffusers names, so trained.safetensors is itself a
    # diffusers U-Net weights file that a checkpoint's unet/ folder links to.
    def trained_parameters(self) -> dict[str, torch.nn.Parameter]:
        return dict(self.components.denoiser.named_parameters())

    def export(self, folder: Path, metadata: dict[str, str]) -> list[Path]:
        folder = Path(folder)
        info = folder / INFO_FILE
        if (folder / TRAINED_FILE).is_file():  # a checkpoint: the weights are there already
            written = [self._link_denoiser(folder), info]
        else:
            written = self._export_model(folder)
            written.append(info)
        info.write_text(json.dumps(metadata, indent=2) + "\n")
        return written

    def export_bytes(self, checkpoint: bool) -> int:
        if checkpoint:  # the checkpoint's denoiser folder links to its trained weights
            return 0
        whole = sum(p.numel() * p.element_size() for m in self.components.models for p in m.parameters())
        raw = sum(p.numel() * 4 for p in self.parameters()) if self.config.train.ema_decay else 0
        return whole * (2 if self.config.full.single_file else 1) + raw

    def _export_model(self, folder: Path) -> list[Path]:
        parts = self.components
        parts.save_pretrained(folder / "model")
        written = [folder / "model"]
        if self.raw_weights is not None:
            names = [k for k, p in parts.denoiser.named_parameters() if p.requires_grad]  # parameters() order
            _save_denoiser_folder(folder / "model" / f"{parts.family.denoiser_name}_raw", parts.denoiser.config.to_dict(),
                              dict(zip(names, self.raw_weights, strict=True)))
        if self.config.full.single_file:
            parts.save_single_file(folder / "model.safetensors")
            written.append(folder / "model.safetensors")
        return written

    def _link_denoiser(self, folder: Path) -> Path:
        parts = self.components
        denoiser = folder / parts.family.denoiser_name  # unet/ or transformer/
        denoiser.mkdir(exist_ok=True)
        (denoiser / "config.json").write_text(json.dumps(parts.denoiser.config.to_dict(), indent=2) + "\n")
        target = denoiser / DENOISER_WEIGHTS
        target.unlink(missing_ok=True)
        try:
            os.link(folder / TRAINED_FILE, target)
        except OSError:  # a file system without hard links: pay for the copy
            _save_denoiser_folder(denoiser, parts.denoiser.config.to_dict(), self.trained_state_dict())
        return denoiser


def _save_denoiser_folder(folder: Path, config: dict, state: dict[str, torch.Tensor]) -> None:
    """A diffusers U-Net or transformer folder (config.json + weights) from a state dict."""
    from ldmcore.weights import write_safetensors

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    write_safetensors({k: v.float() for k, v in state.items()}, folder / DENOISER_WEIGHTS)


# -- the complete export of a checkpoint -----------------------------------------------------------


def export_checkpoint(checkpoint: str | os.PathLike, out: str | os.PathLike, ema: bool = False) -> list[Path]:
    """Write what the end of the run writes (model/ and model.safetensors) from a checkpoint, with
    its raw weights or, with `ema`, its EMA (then model/unet_raw/ holds the raw ones)."""
    from ldmcore.weights import read_state_dict

    from .config import Config
    from .loop import make_method

    checkpoint, out = Path(checkpoint), Path(out)
    if not (checkpoint / INFO_FILE).is_file() or not (checkpoint / TRAINED_FILE).is_file():
        raise FileNotFoundError(f"{checkpoint}: no {INFO_FILE} and {TRAINED_FILE}; pass a checkpoint folder "
                                "(output_dir/checkpoints/step_XXXXXXXX) of a full or DreamBooth full run")
    metadata = json.loads((checkpoint / INFO_FILE).read_text())
    config = Config.model_validate(json.loads(metadata["ldm_tune.config"]))
    parts = config.model.load()
    method = make_method(config, parts)
    if not isinstance(method, FullMethod):
        raise ValueError(f"{checkpoint}: a {config.method} run that does not train the whole U-Net; "
                         "LoRA checkpoints export with `python -m adapters export`")
    method.build()
    method.load_trained_state_dict(read_state_dict(checkpoint / TRAINED_FILE))
    if ema:
        if not (checkpoint / "ema.safetensors").is_file():
            raise FileNotFoundError(f"{checkpoint}: no ema.safetensors; the run had no train.ema_decay, "
                                    "export without --ema")
        params = method.parameters()
        method.raw_weights = [p.detach().clone() for p in params]
        shadow = load_state(checkpoint / "ema.safetensors")["shadow"]
        with torch.no_grad():
            for p, s in zip(params, shadow, strict=True):
                p.copy_(s)
    return method.export(out, metadata)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainers.full",
                                     description="Export a full fine-tune's checkpoint as a diffusers folder and a single file.")
    parser.add_argument("checkpoint", help="output_dir/checkpoints/step_XXXXXXXX")
    parser.add_argument("--out", required=True, help="folder to write model/ and model.safetensors into")
    parser.add_argument("--ema", action="store_true", help="export the EMA weights (model/unet_raw/ keeps the raw ones)")
    args = parser.parse_args(argv)
    try:
        written = export_checkpoint(args.checkpoint, args.out, ema=args.ema)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
