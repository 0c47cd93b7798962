"""SDXL learns too: an SDXL-shaped base trained from nothing, and a LoRA on it, with thresholds.

The SDXL test world (`worlds.world.TEST_WORLD_SDXL`) has the test world's pictures and a base in
SDXL's architecture (preset "test-world-sdxl": two CLIP text encoders whose penultimate states are
concatenated, the pooled projection and the size ids added to the time embedding, three levels of
which the first has no attention). It is built here by the project's own trainers, as the SD-shaped
test world is in test_learning.py, and the demo's LoRA teaches it the cross under "zorb" through
`accelerate launch`. Thresholds sit well under the measured figures (beside each) and well over what
an untrained LoRA or a broken family scores.
"""
from __future__ import annotations

import json

import pytest
import torch
from conftest import base_and_demo

from worlds import demo
from worlds.world import TEST_WORLD_SDXL

WORLD = TEST_WORLD_SDXL.name

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return base_and_demo(tmp_path_factory.mktemp("learning_sdxl"), TEST_WORLD_SDXL)


def test_the_sdxl_base_draws_the_asked_shape_and_colour(world):
    from ldmcore.checkpoints import load_components
    from worlds.evaluate import asks, score

    _, base, _ = world
    parts = load_components(base, dtype=torch.float32)
    assert parts.family.name == "sdxl" and parts.text_encoder_2 is not None
    s = score(parts, asks(world=TEST_WORLD_SDXL), seeds=(0, 1, 2, 3))
    assert s.colour >= 0.8 and s.shape >= 0.5 and s.both >= 0.45, s.line()  # measured 100%, 97%, 97%


def test_an_sdxl_lora_learns_the_new_shape_and_keeps_plain_prompts(world):
    root, _, codes = world
    log = (root / "demo.log").read_text()
    assert codes["demo"] == 0, log[-3000:]
    summary = json.loads((root / "runs" / WORLD / "demo" / "summary.json").read_text())
    shape, plain = summary["trigger_prompt_shape_share"], summary["plain_prompt_correct_share"]
    assert shape["before"] <= 0.1 and shape["after"] >= 0.3, shape  # measured 0% -> 67%
    assert plain["after"] >= 0.4, plain  # the base's prompts survive (measured 100% -> 100%, 9 pictures)
    assert summary["exports_agree"] is True  # the kohya (sgm names) and diffusers files give the same model
    out = root / "runs" / WORLD / "demo"
    from adapters.lora import load_lora_file

    kohya = load_lora_file(out / "lora_kohya.safetensors")
    assert kohya.family == "sdxl" and kohya.format == "kohya"
    truth = (root / "data" / WORLD / demo.TRIGGER / "truth.jsonl").read_text()
    assert truth.count('"shape": "cross"') == demo.CONCEPT_PICTURES
