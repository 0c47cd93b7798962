"""Class images for prior preservation: filled up to a count, resumable, the same pictures either way."""
import logging

import numpy as np
import pytest
from conftest import randomize_
from PIL import Image

import data_tools.class_images as ci
from data_tools.class_images import class_image_name, ensure_class_images
from ldmcore.checkpoints import Components
from ldmcore.text import build_word_tokenizer

PROMPT = "a photo of a dog"
FAST = {"steps": 2, "batch_size": 3, "progress": False}


@pytest.fixture(scope="module")
def tiny():
    parts = Components.from_preset("tiny", build_word_tokenizer(["a", "photo", "of", "dog"]), seed=0)
    for i, model in enumerate((parts.denoiser, parts.vae)):  # random weights, so pictures differ by seed
        randomize_(model, seed=i, std=0.05)
    return parts


@pytest.fixture
def calls(monkeypatch):
    """Records how many images each generate() call was asked for."""
    seen = []
    real = ci.generate

    def counting(components, prompt, **kw):
        seen.append(len(prompt))
        return real(components, prompt, **kw)

    monkeypatch.setattr(ci, "generate", counting)
    return seen


def pixels(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def names(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_fills_the_folder_and_a_second_call_does_nothing(tiny, tmp_path, calls):
    paths = ensure_class_images(tiny, PROMPT, tmp_path, 5, **FAST)
    assert [p.name for p in paths] == [class_image_name(i) for i in range(5)]
    assert names(tmp_path) == [class_image_name(i) for i in range(5)]
    assert calls == [3, 3]  # two whole batches of 3; the sixth picture is not written
    arrays = [pixels(p) for p in paths]
    assert arrays[0].shape == (32, 32, 3)
    assert len({a.tobytes() for a in arrays}) == 5  # every index its own picture
    stamps = [p.stat().st_mtime_ns for p in paths]
    assert ensure_class_images(tiny, PROMPT, tmp_path, 5, **FAST) == paths
    assert calls == [3, 3]
    assert [p.stat().st_mtime_ns for p in paths] == stamps


def test_deleted_images_come_back_identical(tiny, tmp_path, calls):
    paths = ensure_class_images(tiny, PROMPT, tmp_path, 7, **FAST)
    originals = {p.name: pixels(p) for p in paths}
    stamps = {p.name: p.stat().st_mtime_ns for p in paths}
    for i in (1, 6):  # in different batches
        (tmp_path / class_image_name(i)).unlink()
    calls.clear()
    again = ensure_class_images(tiny, PROMPT, tmp_path, 7, **FAST)
    assert again == paths
    assert calls == [3, 3]  # the batches holding 1 and 6, nothing else
    for p in again:
        assert np.array_equal(pixels(p), originals[p.name]), p.name
        if p.name not in (class_image_name(1), class_image_name(6)):
            assert p.stat().st_mtime_ns == stamps[p.name]  # untouched


def test_growing_the_count_matches_an_uninterrupted_run(tiny, tmp_path):
    ensure_class_images(tiny, PROMPT, tmp_path / "a", 2, **FAST)
    grown = ensure_class_images(tiny, PROMPT, tmp_path / "a", 5, **FAST)
    whole = ensure_class_images(tiny, PROMPT, tmp_path / "b", 5, **FAST)
    assert all(np.array_equal(pixels(x), pixels(y)) for x, y in zip(grown, whole))
    other_seed = ensure_class_images(tiny, PROMPT, tmp_path / "c", 5, seed=1, **FAST)
    assert not any(np.array_equal(pixels(x), pixels(y)) for x, y in zip(other_seed, whole))


def test_user_images_count_toward_the_total(tiny, tmp_path, calls):
    for name in ("real_dog_1.jpg", "real_dog_2.png"):
        Image.new("RGB", (40, 40), (200, 100, 50)).save(tmp_path / name)
    (tmp_path / "notes.txt").write_text("not an image, not counted, not reported")
    paths = ensure_class_images(tiny, PROMPT, tmp_path, 4, **FAST)
    assert [p.name for p in paths] == [class_image_name(0), class_image_name(1), "real_dog_1.jpg", "real_dog_2.png"]
    assert calls == [3]


def test_a_write_killed_midway_leaves_no_valid_looking_file(tiny, tmp_path, monkeypatch):
    class Killed(BaseException):  # like KeyboardInterrupt, which pytest would take for the user's ^C
        pass

    def killed(src, dst):
        raise Killed

    monkeypatch.setattr(ci.os, "replace", killed)
    with pytest.raises(Killed):
        ensure_class_images(tiny, PROMPT, tmp_path, 2, **FAST)
    assert names(tmp_path) == [class_image_name(0) + ".partial"]
    monkeypatch.undo()
    (tmp_path / "class_00042.png.partial").write_bytes(b"\x89PNG\r\n\x1a\n")  # another run's leftover
    paths = ensure_class_images(tiny, PROMPT, tmp_path, 2, **FAST)
    assert names(tmp_path) == [class_image_name(0), class_image_name(1)]  # the leftover is cleaned
    assert [p.name for p in paths] == names(tmp_path)


def test_corrupt_images_are_reported_not_counted(tiny, tmp_path, caplog):
    paths = ensure_class_images(tiny, PROMPT, tmp_path, 3, **FAST)
    original = pixels(paths[1])
    data = paths[1].read_bytes()
    paths[1].write_bytes(data[: len(data) // 2])  # truncated: opens, fails to decode
    (tmp_path / "user.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    with caplog.at_level(logging.WARNING, logger="data_tools.class_images"):
        again = ensure_class_images(tiny, PROMPT, tmp_path, 3, **FAST)
    assert again == paths
    assert np.array_equal(pixels(paths[1]), original)  # drawn again over itself
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "class_00001.png cannot be read" in messages and "generated again" in messages
    assert "user.png cannot be read" in messages and "delete or replace it" in messages


def test_bad_arguments_are_refused(tiny, tmp_path):
    with pytest.raises(ValueError, match="batch_size >= 1"):
        ensure_class_images(tiny, PROMPT, tmp_path, 3, steps=2, batch_size=0, progress=False)
    assert ensure_class_images(tiny, PROMPT, tmp_path, 0, **FAST) == []
