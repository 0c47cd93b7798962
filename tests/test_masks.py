"""Inpainting masks: determined by the seed, kinds drawn by weight, shapes as named."""
import numpy as np
import pytest
import torch

from data_tools.masks import KINDS, MaskConfig, make_mask, mask_kind, mask_variants, masked_image, variant_seed

W, H = 48, 32


def only(kind: str) -> MaskConfig:
    return MaskConfig(weights={kind: 1.0})


def test_same_seed_same_mask_and_seeds_differ():
    cfg = MaskConfig()
    for seed in range(20):
        a, b = make_mask(W, H, seed, cfg), make_mask(W, H, seed, cfg)
        assert a.shape == (H, W) and a.dtype == bool
        assert np.array_equal(a, b)
    distinct = {make_mask(W, H, s, cfg).tobytes() for s in range(20)}
    assert len(distinct) > 15


def test_kinds_follow_weights():
    cfg = MaskConfig(weights={"rectangle": 1, "ellipse": 1, "brush": 2, "full": 0})
    n = 4000
    counts = {k: 0 for k in KINDS}
    for seed in range(n):
        counts[mask_kind(seed, cfg)] += 1
    assert counts["full"] == 0
    for kind, p in {"rectangle": 0.25, "ellipse": 0.25, "brush": 0.5}.items():
        assert abs(counts[kind] / n - p) < 0.03, counts


def test_mask_kind_is_the_kind_drawn():
    cfg = MaskConfig(weights={"rectangle": 1, "full": 1})
    for seed in range(50):
        mask = make_mask(W, H, seed, cfg)
        if mask_kind(seed, cfg) == "full":
            assert mask.all()
        else:
            assert _is_filled_box(mask) and not mask.all()


def test_full_weight_gives_all_ones():
    for seed in range(10):
        assert make_mask(W, H, seed, only("full")).all()


def _is_filled_box(mask: np.ndarray) -> bool:
    ys, xs = np.nonzero(mask)
    return mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1].all() and mask.sum() == (
        (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
    )


@pytest.mark.parametrize("kind", ["rectangle", "ellipse", "brush"])
def test_partial_kinds_are_neither_empty_nor_full(kind):
    covered = []
    for seed in range(100):
        mask = make_mask(W, H, seed, only(kind))
        assert mask.shape == (H, W)
        assert mask.any() and not mask.all()
        covered.append(mask.mean())
    assert 0.01 < np.mean(covered) < 0.6
    assert np.std(covered) > 0.01  # sizes vary


def test_each_kind_has_its_shape():
    for seed in range(30):
        assert _is_filled_box(make_mask(W, H, seed, only("rectangle")))
    # ellipses and strokes are not boxes (a tiny ellipse may be, so ask it of most of them)
    assert sum(not _is_filled_box(make_mask(W, H, s, only("ellipse"))) for s in range(30)) > 25
    assert sum(not _is_filled_box(make_mask(W, H, s, only("brush"))) for s in range(30)) > 25


def test_shape_size_range_is_respected():
    cfg = MaskConfig(weights={"rectangle": 1}, shape_size=(0.25, 0.5))
    for seed in range(50):
        ys, xs = np.nonzero(make_mask(80, 40, seed, cfg))
        assert 20 <= xs.max() - xs.min() + 1 <= 40
        assert 10 <= ys.max() - ys.min() + 1 <= 20


def test_to_dict_is_stable_and_normalised():
    a = MaskConfig(weights={"rectangle": 2, "brush": 2})
    b = MaskConfig(weights={"brush": 1, "rectangle": 1})
    assert a.to_dict() == b.to_dict()
    assert a.to_dict()["weights"] == {"rectangle": 0.5, "ellipse": 0.0, "brush": 0.5, "full": 0.0}
    assert a.to_dict() != MaskConfig(weights={"brush": 1}).to_dict()
    assert a.to_dict() != MaskConfig(weights={"rectangle": 1, "brush": 1}, brush_width=(0.1, 0.2)).to_dict()


@pytest.mark.parametrize("bad", [{"weights": {"circle": 1}}, {"weights": {"full": 0}}, {"weights": {"full": -1, "brush": 2}},
                                 {"shape_size": (0.5, 0.2)}, {"brush_strokes": (0, 2)}])
def test_bad_config_is_refused(bad):
    with pytest.raises(ValueError, match="MaskConfig"):
        MaskConfig(**bad)


def test_variants_are_deterministic_and_distinct():
    cfg = MaskConfig(weights={"brush": 1})
    first = mask_variants(W, H, 7, 4, cfg)
    again = mask_variants(W, H, 7, 4, cfg)
    assert len(first) == 4
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert len({m.tobytes() for m in first}) == 4
    # variant i of image 7 is not variant i-1 of image 8 (as base_seed + i would make it)
    assert variant_seed(7, 1) != variant_seed(8, 0)
    other = mask_variants(W, H, 8, 4, cfg)
    assert not any(np.array_equal(a, b) for a in first for b in other)


@pytest.mark.parametrize("as_type", ["bool", "uint8", "float", "torch"])
def test_masked_image_zeroes_exactly_the_region(as_type):
    g = torch.Generator().manual_seed(0)
    image = torch.rand(3, H, W, generator=g) * 1.8 - 0.9  # no exact zeros
    mask = make_mask(W, H, 3, only("rectangle"))
    given = {"bool": mask, "uint8": mask.astype(np.uint8) * 255, "float": mask.astype(np.float32),
             "torch": torch.from_numpy(mask)[None]}[as_type]
    out = masked_image(image, given)
    region = torch.from_numpy(mask)
    assert out.shape == image.shape
    assert (out[:, region] == 0).all()
    assert torch.equal(out[:, ~region], image[:, ~region])


def test_masked_image_rejects_mismatched_mask():
    with pytest.raises(ValueError, match="do not match"):
        masked_image(torch.zeros(3, H, W), np.zeros((W, H), bool))
