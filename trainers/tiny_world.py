"""The tiny world's base model, built from nothing by the project's own trainers (`make base`).

    python -m trainers.tiny_world [--runs runs/tiny-world] [--data data/tiny-world]

1. pictures: `<data>/base`, seeded pictures of the base shapes and colours with captions, and
   `<data>/codec`, pictures of every shape and colour for the autoencoder alone: the VAE is the
   world's image codec (SD's VAE has seen far more than any one fine-tune brings), while what is
   held out (the cross, the demo's concept) stays out of every caption the text-to-image model learns from;
2. init: a freshly initialised model folder in SD's layout (`tiny-world` preset) whose CLIP
   tokenizer is built from the caption vocabulary (plus spare words the base never reads);
3. vae: the KL autoencoder trained on the pictures (`configs/tiny/world_vae.yaml`, method vae);
4. unet: the U-Net trained from its random weights on the cached latents (`world_unet.yaml`,
   method full); the text encoder stays as initialised: a fixed random encoder still gives every
   word its own embedding, and the U-Net learns to read them;
5. base: the result as a diffusers folder at `<runs>/base`, and its measured score.

Each stage is skipped when its result exists, and a training stage killed half-way resumes from
its last checkpoint when the command runs again: nothing done is lost.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs" / "tiny"
BASE_PICTURES = 3000
SIZE = 32  # pixels; the tiny-world VAE makes 8x8 latents of them


def run_stage(config: Path, *overrides: str, launcher: tuple[str, ...] = ()) -> None:
    """One training run in its own process (as a user would start it), resuming where a killed one stopped."""
    cmd = [*(launcher or (sys.executable,)), "-m", "trainers", str(config), *overrides, "train.resume=latest"]
    done = subprocess.run(cmd, cwd=ROOT)
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed with exit code {done.returncode}")


def make_pictures(folder: Path, n: int, seed: int, **kinds) -> Path:
    """`kinds`: `shapes` / `colours` to draw from (default: the base's)."""
    from data_tools.synthetic import TRUTH_FILE, scenes, write_dataset

    if not (folder / TRUTH_FILE).is_file():
        write_dataset(folder, scenes(n, seed, SIZE, **kinds), SIZE, progress=True)
    return folder


def make_init(folder: Path, seed: int = 0) -> Path:
    from data_tools.synthetic import vocabulary
    from ldmcore.checkpoints import Components
    from ldmcore.text import build_word_tokenizer

    if not (folder / "model_index.json").is_file():
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        Components.from_preset("tiny-world", build_word_tokenizer(vocabulary()), seed=seed).save_pretrained(tmp)
        os.replace(tmp, folder)
    return folder


def publish(model: Path, target: Path) -> Path:
    """Copy a finished model folder into place; the rename makes it appear complete or not at all."""
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(model, tmp)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    return target


def build_base(runs: Path, data: Path, *, pictures: int = BASE_PICTURES, overrides: dict[str, list[str]] | None = None) -> Path:
    """Build `<runs>/base` unless it exists; `overrides` adds key=value per stage ("vae", "unet")."""
    runs, data = Path(runs).resolve(), Path(data).resolve()
    base = runs / "base"
    if (base / "model_index.json").is_file():
        print(f"tiny-world base: {base} exists, reusing it")
        return base
    started = time.perf_counter()
    extra = overrides or {}
    from data_tools.synthetic import COLOURS, SHAPES

    pics = make_pictures(data / "base", pictures, seed=0)
    codec = make_pictures(data / "codec", pictures, seed=1, shapes=tuple(SHAPES), colours=tuple(COLOURS))
    init = make_init(runs / "init")
    cache = f"data.cache.dir={runs / 'cache'}"
    vae_out = runs / "vae"
    if not (vae_out / "model" / "model_index.json").is_file():
        run_stage(CONFIGS / "world_vae.yaml", f"model.path={init}", f"data.path={codec}", cache,
                  f"output_dir={vae_out}", *extra.get("vae", []))
    unet_out = runs / "unet"
    if not (unet_out / "model" / "model_index.json").is_file():
        run_stage(CONFIGS / "world_unet.yaml", f"model.path={vae_out / 'model'}", f"data.path={pics}", cache,
                  f"output_dir={unet_out}", *extra.get("unet", []))
    publish(unet_out / "model", base)
    (runs / "base_build.json").write_text(json.dumps({"seconds": time.perf_counter() - started}) + "\n")
    return base


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainers.tiny_world", description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", default="runs/tiny-world", help="where the stages and the base go")
    p.add_argument("--data", default="data/tiny-world", help="where the pictures go")
    p.add_argument("--pictures", type=int, default=BASE_PICTURES)
    p.add_argument("--check", action="store_true", help="measure how often the base draws what it is asked")
    args = p.parse_args(argv)
    base = build_base(Path(args.runs), Path(args.data), pictures=args.pictures)
    print(f"tiny-world base: {base}")
    if args.check:
        from .evaluate import main as evaluate

        return evaluate(["base", str(base), "--json", str(Path(args.runs) / "base_score.json")])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
