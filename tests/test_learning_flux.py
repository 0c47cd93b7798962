"""Flux learns too: a flow-matching base trained from nothing, and a LoRA on it, with thresholds.

The Flux test world (`worlds.world.TEST_WORLD_FLUX`) has the test world's pictures and a base in
Flux.1's architecture (preset "test-world-flux": two double-stream and two single-stream blocks 128
wide on 2x2 patches of 16-channel latents, T5's states as text tokens and CLIP's pooled output in the
modulation; schnell-shaped, without a guidance embedding). It is built here by the project's own
trainers (the VAE method, then the full method with the rectified-flow objective), and the demo's LoRA
trains on it through `accelerate launch`. A base trained here is not guidance-distilled: every score
samples with real classifier-free guidance (`worlds.world.FLOW_SAMPLING`, true_cfg_scale).
Thresholds sit well under the measured figures (beside each) and well over what an untrained model
or a broken family scores.

The demo teaches this world a colour, green, under "zorb" ("a zorb circle on a white background"):
the world's autoencoder has seen green, its denoiser never has. The U-Net worlds learn a shape, the
cross; this transformer hardly draws one at its size (a base trained from nothing with crosses among
its pictures drew none), so the cross would measure the world, not the training (docs/flux.md).

Cost, measured on the 2-core CPU machine with one thread: the base 3.7 min (the world's T5 reads 32
tokens, which hold every caption; schnell's 256 took 17.5 min), the demo 1.3 min (the LoRA 70 s).
"""
from __future__ import annotations

import json

import pytest
import torch
from conftest import base_and_demo

from worlds import demo
from worlds.world import TEST_WORLD_FLUX

WORLD = TEST_WORLD_FLUX.name

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return base_and_demo(tmp_path_factory.mktemp("learning_flux"), TEST_WORLD_FLUX)


def demo_summary(world) -> dict:
    root, _, codes = world
    log = (root / "demo.log").read_text()
    assert codes["demo"] == 0, log[-3000:]
    return json.loads((root / "runs" / WORLD / "demo" / "summary.json").read_text())


def test_the_flux_base_draws_the_asked_shape_and_colour(world):
    from ldmcore.checkpoints import load_components
    from worlds.evaluate import asks, score

    _, base, _ = world
    parts = load_components(base, dtype=torch.float32)
    assert parts.family.name == "flux-schnell" and parts.schedule.kind == "flow"
    s = score(parts, asks(world=TEST_WORLD_FLUX), seeds=(0, 1, 2, 3), world=TEST_WORLD_FLUX)
    assert s.colour >= 0.8 and s.shape >= 0.5 and s.both >= 0.45, s.line()  # measured 100%, 69%, 69%


def test_a_flux_lora_teaches_the_new_colour_and_keeps_plain_prompts(world):
    root = world[0]
    summary = demo_summary(world)
    assert summary["concept"] == {"kind": "colour", "value": "green", "word": demo.TRIGGER}
    taught, plain = summary["trigger_prompt_concept_share"], summary["plain_prompt_correct_share"]
    assert taught["before"] <= 0.1, taught  # the base never drew green (measured 0%)
    assert taught["after"] >= 0.5, taught  # "zorb" prompts draw green (measured 100%, 12 pictures)
    assert summary["trigger_prompt_shape_share"]["after"] >= 0.4, summary  # ... still the asked shape (measured 75%)
    assert plain["after"] >= 0.4, plain  # the base's prompts survive (measured 78% -> 78%, 9 pictures)
    assert summary["exports_agree"] is True  # the kohya (BFL names, fused q/k/v) and diffusers files: one model
    from adapters.lora import load_lora_file

    kohya = load_lora_file(root / "runs" / WORLD / "demo" / "lora_kohya.safetensors")
    assert kohya.family == "flux" and kohya.format == "kohya"
    truth = (root / "data" / WORLD / demo.TRIGGER / "truth.jsonl").read_text()
    assert truth.count('"colour": "green"') == truth.count("zorb") == demo.CONCEPT_PICTURES  # beside ordinary ones


def test_the_flux_world_autoencoder_saw_green_and_its_denoiser_did_not(world):
    root = world[0]
    codec = (root / "data" / WORLD / "codec" / "truth.jsonl").read_text()
    base = (root / "data" / WORLD / "base" / "truth.jsonl").read_text()
    assert '"colour": "green"' in codec and '"colour": "green"' not in base
