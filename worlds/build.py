"""The tiny world's base model, built from nothing by the project's own trainers (`make base`).

    python -m worlds.build [--world NAME] [--runs runs] [--data data] [--check]

A world (`worlds.world.World`: its shapes, colours, backgrounds, model preset and run lengths) is
built in stages under `<runs>/<world>/`, its pictures under `<data>/<world>/`:

1. pictures: `base`, seeded pictures of the world's shapes and colours with captions, and
   `codec`, pictures of every shape in the world's colours (and the concept's colour, where the world's
   concept is one) for the autoencoder alone: the VAE is the world's image codec (SD's VAE has seen
   far more than any one fine-tune brings), while what is held out (the demo's concept, `World.concept`)
   stays out of every caption the text-to-image model learns from;
2. init: a freshly initialised model folder in SD's layout (the world's preset) whose CLIP
   tokenizer is built from the caption vocabulary (plus spare words the base never reads);
3. vae: the KL autoencoder trained on the pictures (`configs/tiny/world_vae.yaml`, method vae);
4. unet: the U-Net trained from its random weights on the cached latents (`world_unet.yaml`,
   method full); the text encoder stays as initialised: a fixed random encoder still gives every
   word its own embedding, and the U-Net learns to read them;
5. base: the result as a diffusers folder at `<runs>/<world>/base`, and its measured score (--check).

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
from typing import Callable

from .pictures import TRUTH_FILE, Scene, vocabulary, write_dataset
from .world import SIZE, TINY_WORLD, WORLDS, World

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs" / "tiny"


def run_stage(config: Path, *overrides: str, launcher: tuple[str, ...] = ()) -> None:
    """One training run in its own process (as a user would start it), resuming where a killed one stopped."""
    cmd = [*(launcher or (sys.executable,)), "-m", "trainers", str(config), *overrides, "train.resume=latest"]
    done = subprocess.run(cmd, cwd=ROOT)
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed with exit code {done.returncode}")


def make_pictures(folder: Path, draw: Callable[[], list[Scene]], **write) -> Path:
    """Write the scenes `draw()` gives into `folder`, unless a finished folder is there (its truth
    file is written last). `write`: `worlds.pictures.write_dataset`'s options."""
    if not (folder / TRUTH_FILE).is_file():
        write_dataset(folder, draw(), SIZE, progress=True, **write)
    return folder


def base_pictures(world: World, data: Path | str) -> Path:
    """The captioned pictures the world's U-Net learns from: `<data>/<world>/base`, seed 0."""
    return make_pictures(Path(data).resolve() / world.name / "base", lambda: world.scenes(world.pictures, seed=0))


def make_init(folder: Path, seed: int = 0, preset: str = TINY_WORLD.preset) -> Path:
    from ldmcore.checkpoints import Components
    from ldmcore.text import build_word_tokenizer

    if not (folder / "model_index.json").is_file():
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        Components.from_preset(preset, build_word_tokenizer(vocabulary()), seed=seed).save_pretrained(tmp)
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


def build_base(world: World = TINY_WORLD, runs: Path | str = "runs", data: Path | str = "data") -> Path:
    """Build `<runs>/<world>/base` unless it exists, and return it."""
    home, data = Path(runs).resolve() / world.name, Path(data).resolve()
    base = home / "base"
    if (base / "model_index.json").is_file():
        print(f"{world.name} base: {base} exists, reusing it")
        return base
    started = time.perf_counter()
    pics = base_pictures(world, data)
    # the autoencoder's pictures: every shape, the held-out ones too, and a concept colour (see the module's docstring)
    codec = make_pictures(data / world.name / "codec",
                          lambda: world.scenes(world.pictures, seed=1, **world.codec_kinds()))
    init = make_init(home / "init", preset=world.preset)
    cache = f"data.cache.dir={home / 'cache'}"
    vae_out = home / "vae"
    if not (vae_out / "model" / "model_index.json").is_file():
        run_stage(CONFIGS / "world_vae.yaml", f"model.path={init}", f"data.path={codec}", cache,
                  f"output_dir={vae_out}", *world.run_overrides("vae"))
    unet_out = home / "unet"
    if not (unet_out / "model" / "model_index.json").is_file():
        run_stage(CONFIGS / "world_unet.yaml", f"model.path={vae_out / 'model'}", f"data.path={pics}", cache,
                  f"output_dir={unet_out}", *world.run_overrides("unet"))
    publish(unet_out / "model", base)
    (home / "base_build.json").write_text(json.dumps({"seconds": time.perf_counter() - started}) + "\n")
    return base


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m worlds.build", description=__doc__.split("\n\n")[0])
    p.add_argument("--world", choices=sorted(WORLDS), default=TINY_WORLD.name)
    p.add_argument("--runs", default="runs", help="the stages and the base go to <runs>/<world>")
    p.add_argument("--data", default="data", help="the pictures go to <data>/<world>")
    p.add_argument("--check", action="store_true", help="measure how often the base draws what it is asked")
    args = p.parse_args(argv)
    world = WORLDS[args.world]
    base = build_base(world, args.runs, args.data)
    print(f"{world.name} base: {base}")
    if args.check:
        from .evaluate import main as evaluate

        return evaluate(["base", str(base), "--world", world.name, "--json", str(base.parent / "base_score.json")])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
