"""The tiny world's pictures and the detector that scores generated ones."""
import collections

import numpy as np
import pytest
from PIL import Image, ImageFilter

from worlds.detect import detect, share_matching
from worlds.pictures import (
    BACKGROUNDS,
    COLOURS,
    SHAPES,
    Scene,
    read_truth,
    render,
    scenes,
    shape_mask,
    vocabulary,
    write_dataset,
)

ALL = {"shapes": tuple(SHAPES), "colours": tuple(COLOURS)}


def test_scenes_are_seeded_and_inside_the_picture():
    a, b, c = scenes(50, 3, 32, **ALL), scenes(50, 3, 32, **ALL), scenes(50, 4, 32, **ALL)
    assert a == b and a != c
    for s in a:
        x0, y0, x1, y1 = s.box
        assert 0 <= x0 < x1 <= 32 and 0 <= y0 < y1 <= 32 and x1 - x0 == y1 - y0 >= 12
    assert {s.shape for s in scenes(200, 0, 32)} == {"circle", "square", "triangle", "diamond"}  # no star in the base


def test_render_draws_the_shape_in_its_colour_where_the_mask_says():
    scene = Scene("triangle", "blue", "white", (4, 6, 28, 30))
    picture, mask = render(scene, 32)
    pixels = np.asarray(picture).astype(int)
    assert np.abs(pixels[mask] - COLOURS["blue"]).max(axis=1).mean() < 20  # inside: the shape's colour
    outside = ~np.asarray(Image.fromarray(mask).filter(ImageFilter.MaxFilter(3)))  # away from the antialiased edge
    assert np.abs(pixels[outside] - BACKGROUNDS["white"]).max() <= 1
    # a triangle fills about half of its box; the mask is the same drawing as the detector's template
    assert 0.4 < mask.sum() / (24 * 24) < 0.6
    assert np.array_equal(mask, shape_mask("triangle", scene.box, 32))


def test_dataset_folder_has_pictures_captions_and_ground_truth(tmp_path):
    items = scenes(12, 0, 32)  # a circle and a red shape among them: both renames are met
    write_dataset(tmp_path / "d", items, 32, words={"circle": "zorb", "red": "ohwx"})
    truth = read_truth(tmp_path / "d")
    assert [s for _, s in truth] == items
    for file, scene in truth:
        caption = (tmp_path / "d" / file).with_suffix(".txt").read_text().strip()
        word = "zorb" if scene.shape == "circle" else scene.shape
        colour = "ohwx" if scene.colour == "red" else scene.colour
        assert caption == f"a {colour} {word} on a {scene.background} background"
        assert Image.open(tmp_path / "d" / file).size == (32, 32)
    captions = [(tmp_path / "d" / file).with_suffix(".txt").read_text() for file, _ in truth]
    assert any("zorb" in c for c in captions) and any("ohwx" in c for c in captions)
    assert set(" ".join(s.caption() for s in items).split()) <= set(vocabulary())


def test_detector_is_accurate_on_ground_truth_pictures():
    items = scenes(400, 11, 32, **ALL)
    right = collections.Counter()
    for s in items:
        d = detect(render(s, 32)[0])
        right["shape"] += d.shape == s.shape
        right["colour"] += d.colour == s.colour
        right["background"] += d.background == s.background
        right["box"] += max(abs(a - b) for a, b in zip(d.box, s.box)) <= 1
    n = len(items)
    assert right["shape"] / n >= 0.98, right
    assert right["colour"] / n == 1.0 and right["background"] / n == 1.0 and right["box"] / n >= 0.98, right


def test_detector_survives_blur_and_noise_like_generated_pictures():
    rng = np.random.default_rng(0)
    items = scenes(150, 12, 32, **ALL)
    right = 0
    for s in items:
        picture = render(s, 32)[0].filter(ImageFilter.GaussianBlur(0.8))
        noisy = np.asarray(picture).astype(float) + rng.normal(0, 8, (32, 32, 3))
        right += detect(Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))).matches(s.shape, s.colour)
    assert right / len(items) >= 0.9


def test_detector_finds_nothing_in_an_empty_or_shapeless_picture():
    assert detect(Image.new("RGB", (32, 32), BACKGROUNDS["gray"])).shape is None
    rng = np.random.default_rng(1)
    scribble = np.full((32, 32, 3), 245, np.uint8)
    scribble[rng.random((32, 32)) < 0.15] = (220, 40, 40)  # scattered red pixels: no shape
    assert detect(Image.fromarray(scribble)).shape is None


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_share_matching_counts_each_shape(shape):
    pictures = [render(Scene(shape, "red", "black", (3, 3, 27, 27)), 32)[0], Image.new("RGB", (32, 32), "black")]
    assert share_matching(pictures, shape) == 0.5
    assert share_matching(pictures, shape, "green") == 0.0
