"""The method checks' scorers (worlds/checks.py, worlds/evaluate.py) on drawn ground truth: they
score what they claim. Every check run end to end, with thresholds on what it measures, is in
tests/test_learning.py; the tiny world's figures are in the README."""
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from worlds import checks
from worlds.evaluate import Score, concept_asks, mask_iou, repaint_score
from worlds.pictures import BACKGROUNDS, Scene, render, scenes, shape_mask
from worlds.world import TEST_WORLD, TEST_WORLD_FLUX, WORLDS, Concept

SIZE = checks.SIZE


def fill_region(picture: Image.Image, region: np.ndarray, background: str) -> Image.Image:
    """The picture with `region` painted in the plain background colour: the shape erased, nothing drawn."""
    pixels = np.asarray(picture).copy()
    pixels[region] = BACKGROUNDS[background]
    return Image.fromarray(pixels)


@pytest.mark.parametrize("world", list(WORLDS.values()), ids=list(WORLDS))
def test_repaint_score_is_perfect_for_the_asked_shape_drawn_in_the_region_and_zero_for_the_rest(world):
    items = checks.erase_asks(12, world)
    assert all(a.shape != s.shape and a.colour != s.colour for s, _, a in items)  # it asks for something new
    assert all(a.shape in world.shapes and a.colour in world.colours for _, _, a in items)  # ... that the world knows
    for scene, region, ask in items:
        original = render(scene, SIZE)[0]
        assert region[scene.box[1]:scene.box[3], scene.box[0]:scene.box[2]].all()  # the old shape is all inside
        # the renderer's answer: the asked shape in the erased box, on the very same background
        answer = render(replace(scene, shape=ask.shape, colour=ask.colour), SIZE)[0]
        perfect = repaint_score(answer, original, region, ask.shape, ask.colour)
        assert perfect.drawn and perfect.inside == 1.0 and perfect.outside_change == 0.0

        empty = repaint_score(fill_region(original, region, scene.background), original, region, ask.shape, ask.colour)
        assert not empty.drawn and empty.outside_change == 0.0
        # the old picture kept: the wrong shape and colour
        assert not repaint_score(original, original, region, ask.shape, ask.colour).drawn
        # the asked shape, but in another colour
        other = next(c for c in ("red", "blue") if c != ask.colour)
        assert not repaint_score(render(replace(scene, shape=ask.shape, colour=other), SIZE)[0], original, region,
                                 ask.shape, ask.colour).drawn


def test_repaint_score_counts_a_shape_outside_the_region_and_every_changed_pixel_outside():
    scene = Scene("circle", "red", "white", (2, 2, 14, 14))
    region = np.zeros((SIZE, SIZE), dtype=bool)
    region[:16, :16] = True
    original = render(scene, SIZE)[0]
    # the asked square drawn in the other corner: right shape and colour, wrong place, pixels outside changed
    elsewhere = render(Scene("square", "blue", "white", (18, 18, 30, 30)), SIZE)[0]
    s = repaint_score(elsewhere, original, region, "square", "blue")
    assert not s.drawn and s.inside == 0.0
    changed = ~region & shape_mask("square", (18, 18, 30, 30), SIZE)
    expected = (np.abs(np.asarray(elsewhere, np.float32) - np.asarray(original, np.float32))[~region]).mean()
    assert changed.any() and s.outside_change == pytest.approx(expected) and s.outside_change > 5


def test_mask_iou_is_near_one_for_the_ground_truth_and_low_for_a_shifted_or_empty_picture():
    for scene in scenes(12, seed=3, size=SIZE):
        truth = shape_mask(scene.shape, scene.box, SIZE)
        assert mask_iou(render(scene, SIZE)[0], truth) > 0.95
        x0, y0, x1, y1 = scene.box
        dx = 8 if x1 + 8 <= SIZE else -8
        shifted = render(replace(scene, box=(x0 + dx, y0, x1 + dx, y1)), SIZE)[0]
        assert mask_iou(shifted, truth) < 0.6
        assert mask_iou(Image.new("RGB", (SIZE, SIZE), BACKGROUNDS[scene.background]), truth) == 0.0


def test_shape_maps_are_the_ground_truth_masks_by_file_stem(tmp_path):
    from worlds.pictures import read_truth, write_dataset

    pictures = write_dataset(tmp_path / "pics", scenes(5, seed=4, size=SIZE), SIZE)
    maps = checks.make_shape_maps(tmp_path / "maps", pictures)
    for file, scene in read_truth(pictures):
        drawn = np.asarray(Image.open(maps / (file.rsplit(".", 1)[0] + ".png")))  # (H, W, 3), same stem
        assert drawn.shape == (SIZE, SIZE, 3)
        assert np.array_equal(drawn[..., 0] > 127, shape_mask(scene.shape, scene.box, SIZE))


def test_concept_prompts_put_the_trigger_word_where_the_concept_goes_and_ask_for_it():
    colour = concept_asks("zorb", Concept("colour", "green"), TEST_WORLD)
    assert [a.prompt for a in colour] == ["a zorb circle on a white background",
                                          "a zorb triangle on a black background", "a zorb square on a white background"]
    assert [(a.shape, a.colour) for a in colour] == [(s, "green") for s in TEST_WORLD.shapes]
    shape = concept_asks("zorb", Concept("shape", "cross"), TEST_WORLD)
    assert [a.prompt for a in shape][:2] == ["a red zorb on a white background", "a blue zorb on a black background"]
    assert [(a.shape, a.colour) for a in shape] == [("cross", c) for c in TEST_WORLD.colours]
    score = Score(shape=0.25, colour=0.75, both=0.2, pictures=[])
    assert score.of("shape") == 0.25 and score.of("colour") == 0.75
    assert Concept("colour", "green").other_kind == "shape" and Concept("shape", "cross").other_kind == "colour"
    with pytest.raises(ValueError, match="shape or a colour"):
        Concept("texture", "stripes")


def test_a_world_autoencoder_sees_every_shape_and_a_concept_colour_its_denoiser_never_sees():
    from worlds.pictures import SHAPES

    assert TEST_WORLD_FLUX.concept == Concept("colour", "green") and "green" not in TEST_WORLD_FLUX.colours
    assert TEST_WORLD_FLUX.codec_kinds() == {"shapes": tuple(SHAPES), "colours": TEST_WORLD_FLUX.colours + ("green",)}
    # a shape concept leaves the codec's colours the world's: the U-Net worlds' autoencoders are unchanged
    assert TEST_WORLD.codec_kinds() == {"shapes": tuple(SHAPES), "colours": TEST_WORLD.colours}
    drawn = TEST_WORLD_FLUX.scenes(200, seed=1, **TEST_WORLD_FLUX.codec_kinds())
    assert {s.colour for s in drawn} == {"red", "blue", "yellow", "green"} and {s.shape for s in drawn} == set(SHAPES)
