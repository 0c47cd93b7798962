"""The tiny world's base build: the VAE method on the loop and the staged build, at toy sizes.
(What the full-size base and the demo measure is in the README; `make demo` prints it.)"""
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ldmcore.checkpoints import load_components
from worlds import build
from worlds.pictures import scenes, write_dataset
from worlds.world import TEST_WORLD, TINY_WORLD, WORLDS

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def pixels(folder: Path) -> torch.Tensor:
    files = sorted(folder.glob("*.png"))
    return torch.stack([torch.from_numpy(np.asarray(Image.open(f).convert("RGB")).copy()).permute(2, 0, 1)
                        for f in files]).float() / 127.5 - 1


def reconstruction_error(model: Path, x: torch.Tensor) -> float:
    vae = load_components(model, dtype=torch.float32).vae
    with torch.no_grad():
        return (vae.decode(vae.encode(x).mode()) - x).abs().mean().item()


def test_vae_method_trains_the_autoencoder_and_measures_its_scaling_factor(tmp_path):
    data = write_dataset(tmp_path / "pics", scenes(32, 0, 32), 32)
    init = build.make_init(tmp_path / "init")
    out = tmp_path / "vae"
    cmd = [sys.executable, "-m", "trainers", str(ROOT / "configs/tiny/world_vae.yaml"), f"model.path={init}",
           f"data.path={data}", f"output_dir={out}", "train.max_steps=30", "train.batch_size=8",
           "train.checkpoint_every=15", "train.warmup_steps=0"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]

    x = pixels(data)
    assert reconstruction_error(out / "model", x) < 0.85 * reconstruction_error(init, x)
    trained = load_components(out / "model", dtype=torch.float32)
    # the scaling factor written into the config gives unit-variance latents on the training pictures
    with torch.no_grad():
        z = trained.vae.encode(x).sample(torch.Generator().manual_seed(1))
    assert abs(trained.vae.scale(z).std().item() - 1.0) < 0.1
    assert trained.vae.config.scaling_factor != load_components(init).vae.config.scaling_factor
    # only the VAE trained: the U-Net and text encoder are the initial ones, bit for bit
    start = load_components(init, dtype=torch.float32)
    assert all(torch.equal(a, b) for a, b in zip(start.denoiser.state_dict().values(), trained.denoiser.state_dict().values()))
    assert (out / "checkpoints" / "step_00000030" / "model" / "model_index.json").is_file()


QUICK = {"vae": ("train.max_steps=2", "train.batch_size=4", "train.warmup_steps=0"),
         "unet": ("train.max_steps=2", "train.batch_size=4", "train.warmup_steps=0")}


def test_base_build_runs_every_stage_once_and_reuses_the_result(tmp_path, monkeypatch):
    world = replace(TINY_WORLD, pictures=8, overrides=QUICK)
    base = build.build_base(world, tmp_path / "runs", tmp_path / "data")
    assert base == (tmp_path / "runs" / "tiny-world" / "base").resolve()
    parts = load_components(base, dtype=torch.float32)
    vae_stage = load_components(base.parent / "vae" / "model", dtype=torch.float32)
    # the base holds the trained VAE of stage 1 and the U-Net of stage 2 (trained away from its init)
    assert all(torch.equal(a, b) for a, b in zip(parts.vae.state_dict().values(), vae_stage.vae.state_dict().values()))
    assert any(not torch.equal(a, b) for a, b in zip(parts.denoiser.state_dict().values(), vae_stage.denoiser.state_dict().values()))
    assert "zorb" in parts.tokenizer.get_vocab() or "zorb</w>" in parts.tokenizer.get_vocab()
    # the U-Net's captions never hold the held-out shape
    truth = (tmp_path / "data" / "tiny-world" / "base" / "truth.jsonl").read_text()
    assert "cross" not in truth and truth.count('"file"') == 8
    stamp = (base / "model_index.json").stat().st_mtime_ns

    def no_training(*args, **kwargs):
        raise AssertionError("a finished base must not be rebuilt")

    monkeypatch.setattr(build, "run_stage", no_training)
    assert build.build_base(world, tmp_path / "runs", tmp_path / "data") == base
    assert (base / "model_index.json").stat().st_mtime_ns == stamp


def test_a_world_is_data_its_pictures_draw_only_its_shapes_colours_and_backgrounds():
    w = TEST_WORLD
    drawn = w.scenes(200, seed=0)
    assert {s.shape for s in drawn} == set(w.shapes) and {s.colour for s in drawn} == set(w.colours)
    assert {s.background for s in drawn} == set(w.backgrounds) and not any(s.textured for s in drawn)
    # the default world's pictures are the ones its figures were measured on: the same draws as before worlds existed
    assert TINY_WORLD.scenes(50, seed=0) == scenes(50, 0, 32)
    from ldmcore.presets import PRESETS

    assert all(world.preset in PRESETS for world in WORLDS.values())


