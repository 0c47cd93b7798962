"""Crop plans and their application: cover the bucket, stay in range, reproduce, mirror, scale to [-1, 1]."""
import numpy as np
import pytest
import torch
from PIL import Image

from data_tools.records import ImageRecord
from data_tools.transforms import CropPlan, apply, flipped, plan_crop, plan_for_record, resized_size, to_tensor

CASES = [((1000, 600), (640, 384)), ((600, 1000), (384, 640)), ((1024, 512), (704, 320)), ((333, 777), (320, 704)),
         ((512, 512), (512, 512)), ((300, 200), (256, 192)), ((97, 41), (512, 512))]


def gradient_image(w, h, seed=0):
    """Distinct pixels everywhere, so that a wrong offset or a missing flip changes the result."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize("orig, bucket", CASES)
@pytest.mark.parametrize("mode", ["center", "random"])
def test_plan_covers_the_bucket_with_offsets_in_range(orig, bucket, mode):
    for seed in range(5):
        plan = plan_crop(*orig, *bucket, mode=mode, seed=seed)
        assert (plan.orig_w, plan.orig_h, plan.bucket_w, plan.bucket_h) == (*orig, *bucket)
        assert plan.resized_w >= bucket[0] and plan.resized_h >= bucket[1]
        assert plan.resized_w == bucket[0] or plan.resized_h == bucket[1]  # the smallest covering size
        assert plan.resized_w / plan.resized_h == pytest.approx(orig[0] / orig[1], rel=2 / min(bucket))
        assert 0 <= plan.crop_left <= plan.resized_w - bucket[0]
        assert 0 <= plan.crop_top <= plan.resized_h - bucket[1]
        assert apply(gradient_image(*orig), plan).size == bucket


def test_center_crop_is_centered():
    plan = plan_crop(1000, 500, 512, 512)
    assert (plan.resized_w, plan.resized_h, plan.crop_left, plan.crop_top) == (1024, 512, 256, 0)
    plan = plan_crop(400, 1001, 256, 512)
    assert (plan.resized_w, plan.resized_h) == (256, 641)
    assert (plan.crop_left, plan.crop_top) == (0, 64)  # 129 spare pixels: 64 above, 65 below
    plan = plan_crop(1001, 400, 512, 256)
    assert (plan.resized_w, plan.resized_h, plan.crop_left, plan.crop_top) == (641, 256, 64, 0)


def test_random_crop_varies_with_seed_and_reproduces():
    plans = [plan_crop(2000, 600, 512, 512, mode="random", seed=s) for s in range(20)]
    assert len({p.crop_left for p in plans}) > 10
    assert all(p.crop_top == 0 for p in plans)
    assert plans == [plan_crop(2000, 600, 512, 512, mode="random", seed=s) for s in range(20)]
    with pytest.raises(ValueError, match="needs a seed"):
        plan_crop(2000, 600, 512, 512, mode="random")
    with pytest.raises(ValueError, match="'middle'"):
        plan_crop(2000, 600, 512, 512, mode="middle")


def test_record_plans_depend_on_the_image_hash_and_seed():
    def record(sha):
        return ImageRecord(source=f"{sha}.png", sha256=sha, width=2000, height=600, captions=("x",))

    lefts = {plan_for_record(record(f"{i:064x}"), (512, 512), "random", seed=0).crop_left for i in range(20)}
    assert len(lefts) > 10
    a = plan_for_record(record("ab" * 32), (512, 512), "random", seed=1)
    assert a == plan_for_record(record("ab" * 32), (512, 512), "random", seed=1)
    assert a != plan_for_record(record("ab" * 32), (512, 512), "random", seed=2)


def test_apply_matches_resize_then_crop():
    img = gradient_image(1000, 600)
    plan = plan_crop(1000, 600, 512, 256, mode="random", seed=3)
    expected = np.asarray(img.resize((plan.resized_w, plan.resized_h), Image.Resampling.LANCZOS))
    expected = expected[plan.crop_top : plan.crop_top + 256, plan.crop_left : plan.crop_left + 512]
    assert np.array_equal(np.asarray(apply(img, plan)), expected)


def test_flip_mirrors_pixels_and_flipped_plan_keeps_the_region():
    img = gradient_image(900, 500)
    plan = plan_crop(900, 500, 448, 320, mode="random", seed=1)
    assert 2 * plan.crop_left != plan.resized_w - 448  # off-centre, so the mirrored offset differs
    mirror = flipped(plan)
    assert mirror.flip and not plan.flip and flipped(mirror) == plan
    a, b = np.asarray(apply(img, plan)), np.asarray(apply(img, mirror))
    assert not np.array_equal(a, b)
    assert np.array_equal(a[:, ::-1], b)
    top, left = mirror.crop_top_left
    assert (top, left) == (plan.crop_top, plan.resized_w - plan.crop_left - 448)
    # The SDXL convention: the output equals cropping the mirrored resized image at crop_top_left.
    resized_mirror = img.resize((plan.resized_w, plan.resized_h), Image.Resampling.LANCZOS).transpose(
        Image.Transpose.FLIP_LEFT_RIGHT
    )
    assert np.array_equal(b, np.asarray(resized_mirror.crop((left, top, left + 448, top + 320))))


def test_plan_round_trips_through_a_dict():
    plan = plan_crop(1000, 600, 512, 512, mode="random", seed=9, flip=True)
    d = plan.to_dict()
    assert d["orig_w"] == 1000 and d["orig_h"] == 600 and d["flip"] is True
    assert CropPlan.from_dict(d) == plan


def test_apply_rejects_an_image_of_another_size():
    with pytest.raises(ValueError, match="600x400 but the plan is for 1000x600"):
        apply(gradient_image(600, 400), plan_crop(1000, 600, 512, 512))


def test_to_tensor_scales_to_minus_one_one():
    img = Image.fromarray(np.array([[[0, 255, 128], [255, 0, 64]]], dtype=np.uint8))  # (h=1, w=2, 3)
    t = to_tensor(img)
    assert t.dtype == torch.float32 and t.shape == (3, 1, 2)
    expected = torch.tensor([[[-1.0, 1.0]], [[1.0, -1.0]], [[128 / 127.5 - 1, 64 / 127.5 - 1]]])
    assert t.is_contiguous() and torch.allclose(t, expected, rtol=0, atol=1e-6)
    assert to_tensor(Image.new("L", (4, 2), 255)).shape == (3, 2, 4)


def test_resized_size_is_exact_for_matching_aspect():
    assert resized_size(1024, 512, 512, 256) == (512, 256)
    assert resized_size(3, 1, 512, 512) == (1536, 512)
