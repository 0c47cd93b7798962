"""`ldm-tune`: the one command, and its `generate` (LoRAs at weights, A1111-style PNG metadata)."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import randomize_, randomize_lora_
from PIL import Image

from adapters.lora import LoraSettings, add_lora, lora_state_dict, save_diffusers, save_kohya
from ldm_tune.generate import a1111_parameters, parse_lora, read_parameters
from ldmcore.checkpoints import Components, load_components
from ldmcore.pipeline import generate
from ldmcore.text import build_word_tokenizer

ROOT = Path(__file__).resolve().parent.parent
WORDS = "a red circle on white background".split()
PROMPT = "a red circle on a white background"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A tiny SD model folder and two LoRA files for it (one per layout)."""
    root = tmp_path_factory.mktemp("cli")
    parts = Components.from_preset("tiny", build_word_tokenizer(WORDS), seed=0)
    randomize_(parts.denoiser, seed=1, std=0.05)
    randomize_(parts.vae, seed=2, std=0.05)
    parts.save_pretrained(root / "model")
    settings = LoraSettings(rank=4, alpha=2.0)
    for seed, name in ((3, "style"), (4, "subject")):
        lora = load_components(root / "model")
        add_lora(lora.denoiser, settings)
        randomize_lora_(lora.denoiser, seed, std=0.1)
        if name == "style":
            save_kohya(root / f"{name}.safetensors", lora_state_dict(lora.denoiser), None, settings, None)
        else:
            save_diffusers(root / f"{name}.safetensors", lora_state_dict(lora.denoiser), None, None, settings=settings)
    return root


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ldm_tune", *args], cwd=str(ROOT), capture_output=True, text=True)


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_the_command_reaches_every_room(model, tmp_path):
    proc = cli("--help")
    assert proc.returncode == 0 and all(c in proc.stdout for c in ("train", "scan", "precompute", "export", "generate"))
    proc = cli("inspect", str(model / "style.safetensors"))  # adapters' inspect, through ldm-tune
    assert proc.returncode == 0 and "kohya" in proc.stdout.lower(), proc.stderr
    proc = cli("train", str(tmp_path / "missing.yaml"))
    assert proc.returncode == 2 and "missing.yaml" in proc.stderr
    proc = cli("frobnicate")
    assert proc.returncode == 2 and "unknown command 'frobnicate'" in proc.stderr
    script = Path(sys.executable).parent / "ldm-tune"  # the console script the package installs
    assert script.is_file() and subprocess.run([str(script), "--help"], capture_output=True).returncode == 0


def test_generate_with_a_lora_at_weight_0_draws_the_base(model, tmp_path):
    common = ["--steps", "3", "--size", "64x64", "--seed", "5"]
    assert cli("generate", str(model / "model"), PROMPT, *common, "--out", str(tmp_path / "base")).returncode == 0
    proc = cli("generate", str(model / "model"), PROMPT, *common, "--out", str(tmp_path / "zero"),
               "--lora", f"{model / 'style.safetensors'}:0")
    assert proc.returncode == 0, proc.stderr[-2000:]
    base, zero = pixels(tmp_path / "base" / "00000-5.png"), pixels(tmp_path / "zero" / "00000-5.png")
    assert np.array_equal(base, zero)
    proc = cli("generate", str(model / "model"), PROMPT, *common, "--out", str(tmp_path / "one"),
               "--lora", f"{model / 'style.safetensors'}:1")
    assert not np.array_equal(pixels(tmp_path / "one" / "00000-5.png"), base)  # at weight 1 it does change the picture


def test_generate_equals_the_pipeline_with_both_loras_merged(model, tmp_path):
    """Two LoRAs (kohya and diffusers files) at their weights: the same picture as merging them into the
    model by hand and sampling with ldmcore's pipeline; the PNG says how it was made, A1111's way."""
    from adapters.lora import merge_lora

    proc = cli("generate", str(model / "model"), PROMPT, "a blue circle", "--steps", "4", "--size", "64x48",
               "--seed", "7", "--count", "2", "--negative", "blurry", "--sampler", "euler", "--guidance", "6",
               "--lora", f"{model / 'style.safetensors'}:0.7", "--lora", str(model / "subject.safetensors"),
               "--out", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    files = sorted((tmp_path / "out").glob("*.png"))
    assert [f.name for f in files] == ["00000-7.png", "00001-8.png", "00002-7.png", "00003-8.png"]
    parts = load_components(model / "model")
    merge_lora(parts, model / "style.safetensors", scale=0.7)
    merge_lora(parts, model / "subject.safetensors", scale=1.0)
    want = generate(parts, PROMPT, negative_prompt="blurry", seed=8, height=48, width=64, steps=4, guidance_scale=6,
                    sampler="euler")[0]
    assert np.array_equal(pixels(files[1]), np.asarray(want))

    text = Image.open(files[1]).text
    info = read_parameters(text["parameters"])
    assert info["prompt"] == f"{PROMPT} <lora:style:0.7> <lora:subject:1>" and info["negative"] == "blurry"
    assert (info["Steps"], info["Sampler"], info["CFG scale"], info["Seed"], info["Size"]) == ("4", "Euler", "6.0", "8", "64x48")
    assert info["Lora hashes"].startswith("style: ") and "subject: " in info["Lora hashes"]
    exact = json.loads(text["ldm_tune"])
    assert exact["seed"] == 8 and exact["loras"][0] == {"file": str(model / "style.safetensors"), "weight": 0.7}


def test_parameters_round_trip_and_lora_specs():
    settings = {"steps": 20, "sampler": "dpmpp_2m", "cfg_scale": 7.5, "seed": 3, "width": 512, "height": 768,
                "model_hash": "abc", "model_name": "sd15"}
    info = read_parameters(a1111_parameters("a cat, smiling", "", [], settings))
    assert info["prompt"] == "a cat, smiling" and info["Sampler"] == "DPM++ 2M" and info["Size"] == "512x768"
    assert parse_lora("C:/x/y.safetensors") == (Path("C:/x/y.safetensors"), 1.0)  # a colon that is not a weight
    assert parse_lora("y.safetensors:0.5") == (Path("y.safetensors"), 0.5)


def test_generate_names_what_is_wrong(model, tmp_path):
    proc = cli("generate", str(model / "model"), PROMPT, "--lora", str(tmp_path / "nope.safetensors"))
    assert proc.returncode == 2 and "nope.safetensors: no such file" in proc.stderr
    proc = cli("generate", str(model / "model"), PROMPT, "--size", "64by64")
    assert proc.returncode == 2 and "WIDTHxHEIGHT" in proc.stderr
    proc = cli("generate", str(tmp_path / "nomodel"), PROMPT)
    assert proc.returncode == 2 and "nomodel" in proc.stderr


def test_a_prompts_file_samples_each_prompt_with_its_own_settings_during_training(tmp_path):
    """kohya's sample-prompts lines (--n --w --h --d --l --s) through `ldm-tune train`: each prompt is drawn
    with its settings, as `generate` draws it, and its PNG says how."""
    from conftest import build_training_world

    from trainers.samples import PromptsFileError, read_prompts_file

    world = build_training_world(tmp_path / "world")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# samples\na red circle --n blue --w 64 --h 32 --d 3 --l 5.5 --s 3\n\na green square --s 2\n")
    out = tmp_path / "run"
    proc = cli("train", str(ROOT / "configs" / "tiny" / "lora.yaml"), f"model.path={world / 'model'}",
               f"data.path={world / 'data'}", f"data.cache.dir={tmp_path / 'cache'}", f"output_dir={out}",
               "train.max_steps=1", f"validation.prompts_file={prompts}", "validation.seeds=[9]")
    assert proc.returncode == 0, proc.stderr[-3000:]
    first, second = out / "samples" / "step_00000001_00.png", out / "samples" / "step_00000001_01.png"
    info = read_parameters(Image.open(first).text["parameters"])
    assert (info["prompt"], info["negative"], info["Size"], info["Seed"], info["CFG scale"], info["Steps"]) == (
        "a red circle", "blue", "64x32", "3", "5.5", "3")
    assert read_parameters(Image.open(second).text["parameters"])["Seed"] == "9"  # the validation seed
    from adapters.lora import merge_lora

    parts = load_components(world / "model")  # the model as sampled: the base with the step's LoRA
    merge_lora(parts, out / "checkpoints" / "step_00000001" / "pytorch_lora_weights.safetensors")
    want = generate(parts, "a red circle", negative_prompt="blue", seed=3, height=32, width=64, steps=3,
                    guidance_scale=5.5)[0]
    assert np.abs(pixels(first).astype(int) - np.asarray(want).astype(int)).max() <= 1  # (merged vs injected LoRA)

    bad = tmp_path / "bad.txt"
    bad.write_text("a cat --q 3\n")
    with pytest.raises(PromptsFileError, match=r"bad.txt:1: unknown option --q"):
        read_prompts_file(bad)
    bad.write_text("a cat --w wide\n")
    with pytest.raises(PromptsFileError, match=r"bad.txt:1: --w 'wide' is not a int"):
        read_prompts_file(bad)
