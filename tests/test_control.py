"""ControlNet conditioning: Canny maps, folder matching by stem, and the training image's crop applied."""
import numpy as np
import pytest
from PIL import Image

from data_tools.control import ConditioningSource, canny, conditioning_image, find_conditioning


def square(size=64, lo=16, hi=48, level=255) -> Image.Image:
    a = np.zeros((size, size, 3), np.uint8)
    a[lo:hi, lo:hi] = level
    return Image.fromarray(a)


def gradient(w, h) -> Image.Image:
    x = np.linspace(0, 255, w, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 255, h, dtype=np.float32)[:, None, None]
    return Image.fromarray(np.concatenate([np.broadcast_to(x, (h, w, 1)), np.broadcast_to(y, (h, w, 1)),
                                           np.full((h, w, 1), 128, np.float32)], -1).astype(np.uint8))


def test_canny_finds_the_square_border_only():
    out = canny(square())
    assert out.mode == "RGB" and out.size == (64, 64)
    a = np.asarray(out)
    assert np.array_equal(a[..., 0], a[..., 1]) and np.array_equal(a[..., 0], a[..., 2])
    edges = a[..., 0]
    assert set(np.unique(edges)) == {0, 255}
    ys, xs = np.nonzero(edges)
    # every edge pixel is on the border (within a pixel of it): none inside, none outside
    on_border = (np.minimum.reduce([abs(ys - 15.5), abs(ys - 47.5), abs(xs - 15.5), abs(xs - 47.5)]) <= 1)
    inside_box = (ys >= 14) & (ys <= 49) & (xs >= 14) & (xs <= 49)
    assert (on_border & inside_box).all()
    # and the whole border is traced: every row and column of the square meets an edge
    assert all(edges[r, 14:50].any() for r in range(16, 48))
    assert all(edges[14:50, c].any() for c in range(16, 48))
    assert not edges[20:44, 20:44].any() and not edges[:12].any() and not edges[52:].any()


def test_canny_thresholds_are_used():
    faint = square(level=20)  # gradient too weak for the default thresholds
    assert not np.asarray(canny(faint)).any()
    assert np.asarray(canny(faint, low=10, high=30)).any()


def test_find_conditioning_matches_by_stem_and_reports_missing(tmp_path):
    for name in ("cat_01.png", "cat_02.jpg", "cat_03.txt", "notes.md"):
        (tmp_path / name).write_bytes(b"x")
    found, missing = find_conditioning(tmp_path, ["cat_01", "cat_02", "cat_03", "dog"])
    assert found == {"cat_01": tmp_path / "cat_01.png", "cat_02": tmp_path / "cat_02.jpg"}
    assert missing == ["cat_03", "dog"]
    with pytest.raises(FileNotFoundError, match="2 training image.*'cat_03', 'dog'"):
        find_conditioning(tmp_path, ["cat_01", "cat_03", "dog"], strict=True)
    assert find_conditioning(tmp_path, ["cat_01"], strict=True)[1] == []


def test_find_conditioning_refuses_ambiguous_and_absent_folders(tmp_path):
    (tmp_path / "a.png").write_bytes(b"x")
    (tmp_path / "a.jpg").write_bytes(b"x")
    with pytest.raises(ValueError, match="several.*'a'"):
        find_conditioning(tmp_path, ["a"])
    assert find_conditioning(tmp_path, ["b"]) == ({}, ["b"])  # ambiguity elsewhere is not in the way
    with pytest.raises(FileNotFoundError, match="does not exist"):
        find_conditioning(tmp_path / "nope", ["a"])


class Recorder:
    """A stand-in for the training image's crop plan: crop a fixed box, resize, remember the inputs."""

    def __init__(self, box, size):
        self.box, self.size, self.seen = box, size, []

    def __call__(self, img):
        self.seen.append(img.size)
        return img.crop(self.box).resize(self.size, Image.BICUBIC)


def test_canny_map_gets_the_training_images_transform():
    record = Image.new("RGB", (80, 40))
    record.paste(square(size=40, lo=10, hi=30), (40, 0))  # the square sits in the right half
    crop = Recorder((40, 0, 80, 40), (32, 32))
    out = conditioning_image(record, ConditioningSource("canny"), size=(32, 32), transform=crop)
    assert crop.seen == [(80, 40)]
    assert out.size == (32, 32) and out.mode == "RGB"
    assert np.array_equal(np.asarray(out), np.asarray(canny(crop(record))))
    left = Recorder((0, 0, 40, 40), (32, 32))  # the other half holds no edges
    assert not np.asarray(conditioning_image(record, ConditioningSource("canny"), size=(32, 32), transform=left)).any()


def test_canny_map_without_transform_is_resized_and_uses_the_thresholds():
    faint = square(level=20)
    out = conditioning_image(faint, ConditioningSource("canny", low=10, high=30), size=(32, 16))
    assert out.size == (32, 16)
    assert np.asarray(out).any()
    assert np.array_equal(np.asarray(out), np.asarray(canny(faint.resize((32, 16), Image.BICUBIC), 10, 30)))


def test_folder_map_gets_the_training_images_transform(tmp_path):
    path = tmp_path / "img.png"
    gradient(80, 40).save(path)
    record = Image.new("RGB", (80, 40))
    crop = Recorder((10, 5, 50, 35), (24, 16))
    source = ConditioningSource("folder", folder=str(tmp_path))
    out = conditioning_image(record, source, size=(24, 16), path=path, transform=crop)
    assert np.array_equal(np.asarray(out), np.asarray(crop(gradient(80, 40))))


def test_folder_map_at_another_resolution_is_scaled_to_the_training_image(tmp_path):
    gradient(40, 20).save(tmp_path / "half.png")
    gradient(40, 40).save(tmp_path / "square.png")
    record = Image.new("RGB", (80, 40))
    crop = Recorder((0, 0, 40, 40), (16, 16))
    source = ConditioningSource("folder", folder=str(tmp_path))
    conditioning_image(record, source, size=(16, 16), path=tmp_path / "half.png", transform=crop)
    assert crop.seen == [(80, 40)]  # the plan is made in the training image's pixels
    with pytest.raises(ValueError, match="aspect ratios differ"):
        conditioning_image(record, source, size=(16, 16), path=tmp_path / "square.png", transform=crop)


def test_folder_map_follows_exif_orientation(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways, shown rotated 90 degrees
    gradient(40, 80).save(tmp_path / "rot.jpg", exif=exif)
    record = Image.new("RGB", (80, 40))  # the training image as shown
    out = conditioning_image(record, ConditioningSource("folder", folder=str(tmp_path)), size=(80, 40),
                             path=tmp_path / "rot.jpg", transform=Recorder((0, 0, 80, 40), (80, 40)))
    assert out.size == (80, 40)


def test_wrong_sized_transform_and_bad_sources_are_refused(tmp_path):
    with pytest.raises(ValueError, match="bucket is 32x32"):
        conditioning_image(square(), ConditioningSource("canny"), size=(32, 32), transform=lambda im: im)
    with pytest.raises(ValueError, match="needs `path`"):
        conditioning_image(square(), ConditioningSource("folder", folder=str(tmp_path)), size=(32, 32))
    with pytest.raises(ValueError, match="not one of"):
        ConditioningSource("depth")
    with pytest.raises(ValueError, match="exactly when"):
        ConditioningSource("folder")
    with pytest.raises(ValueError, match="low <= high"):
        ConditioningSource("canny", low=200, high=100)
    assert ConditioningSource("canny").to_dict() != ConditioningSource("canny", low=50).to_dict()
