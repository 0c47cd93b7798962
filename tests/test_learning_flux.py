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

Cost, measured on the 2-core CPU machine with one thread: the base 3.7 min (the world's T5 reads 32
tokens, which hold every caption; schnell's 256 took 17.5 min), the demo 1 min. The demo's LoRA does
not yet teach the cross: 400 steps drew 0% -> 8% crosses, and nothing tried reached 40% (NOTES.md lists
each variant). A full fine-tune on the same pictures fails alike, so it is not the LoRA. What was found:
this base reads the shape word mostly from CLIP's pooled vector (the modulation), not from the T5 tokens,
and the world's frozen random CLIP puts "a red zorb ..." next to "a red circle ..."; the image's attention
to the text is nearly flat, and the LoRA learns to finish a cross in img2img but not to choose one at
high noise, where the text decides. That test is marked xfail until the world is settled.
"""
from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import base_and_demo

from worlds import demo
from worlds.world import TEST_WORLD_FLUX

WORLD = TEST_WORLD_FLUX.name

# 5 min on the 2-core CI machine: beyond the suite's budget while its LoRA check is not settled, so it runs
# on demand: LDM_TUNE_FLUX_LEARNING=1 make test
pytestmark = [pytest.mark.slow, pytest.mark.skipif(os.environ.get("LDM_TUNE_FLUX_LEARNING") != "1",
                                                   reason="5 min; set LDM_TUNE_FLUX_LEARNING=1 to run it")]


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
    assert s.colour >= 0.8 and s.shape >= 0.5 and s.both >= 0.45, s.line()  # measured 100%, 89%, 89%


def test_a_flux_lora_trains_exports_both_formats_and_keeps_plain_prompts(world):
    root = world[0]
    summary = demo_summary(world)
    shape, plain = summary["trigger_prompt_shape_share"], summary["plain_prompt_correct_share"]
    assert shape["before"] <= 0.1, shape  # the base never saw a cross (measured 0%)
    assert plain["after"] >= 0.4, plain  # the base's prompts survive (measured 100% -> 78%, 9 pictures)
    assert summary["exports_agree"] is True  # the kohya (BFL names, fused q/k/v) and diffusers files: one model
    from adapters.lora import load_lora_file

    kohya = load_lora_file(root / "runs" / WORLD / "demo" / "lora_kohya.safetensors")
    assert kohya.family == "flux" and kohya.format == "kohya"
    truth = (root / "data" / WORLD / demo.TRIGGER / "truth.jsonl").read_text()
    assert truth.count('"shape": "cross"') == demo.CONCEPT_PICTURES


@pytest.mark.xfail(strict=True, reason="400 LoRA steps do not teach the Flux base the cross yet (measured 0% -> 8%): "
                                       "the base reads shapes from the random CLIP's pooled vector (module docstring)")
def test_a_flux_lora_learns_the_new_shape(world):
    shape = demo_summary(world)["trigger_prompt_shape_share"]
    assert shape["after"] >= 0.3, shape  # the U-Net worlds' threshold (they measured 58% and 67%)
