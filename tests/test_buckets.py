"""Aspect-ratio buckets and the bucketed batch sampler: bucket limits, assignment, epochs, ranks, resume."""
import math
from collections import Counter

import pytest

from data_tools.buckets import BucketBatchSampler, BucketConfig, assign_bucket, make_buckets

B512 = make_buckets(512 * 512)


@pytest.mark.parametrize("resolution", [512, 768])
def test_buckets_are_multiples_of_step_within_area_and_aspect(resolution):
    buckets = make_buckets(resolution * resolution)
    assert (resolution, resolution) in buckets
    assert len(buckets) > 10
    for w, h in buckets:
        assert w % 64 == 0 and h % 64 == 0, (w, h)
        assert w * h <= resolution * resolution, (w, h)
        assert max(w, h) <= 4 * min(w, h), (w, h)
        assert min(w, h) >= 256, (w, h)
        assert (h, w) in buckets  # portrait and landscape alike
    assert buckets == sorted(set(buckets), key=lambda b: (b[0] / b[1], b[0]))  # sorted, no duplicates


def test_buckets_are_deterministic_and_config_matches():
    assert make_buckets(768 * 768, max_aspect=2.0) == make_buckets(768 * 768, max_aspect=2.0)
    config = BucketConfig.from_resolution(512)
    assert config.buckets() == B512
    assert config.to_dict() == {
        "max_area": 512 * 512, "step": 64, "min_side": 256, "max_side": 1024, "max_aspect": 4.0, "no_upscale": False
    }
    assert BucketConfig.from_resolution(512, max_side=1024).to_dict() == config.to_dict()


def test_bad_limits_name_the_value():
    with pytest.raises(ValueError, match="min_side=100"):
        make_buckets(512 * 512, min_side=100)
    with pytest.raises(ValueError, match="max_area=10000"):
        make_buckets(100 * 100)


@pytest.mark.parametrize(
    "size, expected",
    [((512, 512), (512, 512)), ((1024, 512), (704, 320)), ((512, 1024), (320, 704)), ((4000, 1000), (1024, 256))],
)
def test_assignment_picks_the_closest_aspect(size, expected):
    w, h = size
    assert assign_bucket(w, h, B512) == expected
    best = min(abs(math.log(bw / bh) - math.log(w / h)) for bw, bh in B512)
    assert abs(math.log(expected[0] / expected[1]) - math.log(w / h)) == pytest.approx(best)


def test_assignment_ties_prefer_larger_area_then_smaller_width():
    # A square image is equally far (in log aspect) from 2:1 and 1:2: the smaller width wins.
    assert assign_bucket(100, 100, [(512, 256), (256, 512)]) == (256, 512)
    assert assign_bucket(100, 100, [(256, 256), (512, 512), (128, 128)]) == (512, 512)
    assert assign_bucket(100, 100, [(512, 256), (256, 512)][::-1]) == (256, 512)  # order does not matter


def test_assignment_distance_is_in_log_aspect():
    # From a square image, 1.9:1 is nearer than 1:2 in log aspect (0.64 < 0.69), though not in plain ratio.
    assert assign_bucket(100, 100, [(256, 512), (608, 320)]) == (608, 320)


@pytest.mark.parametrize("size", [(300, 200), (200, 300), (500, 500), (130, 70), (2000, 200), (700, 300)])
def test_no_upscale_never_enlarges(size):
    w, h = size
    bw, bh = assign_bucket(w, h, B512, no_upscale=True)
    assert bw <= w and bh <= h and bw % 64 == 0 and bh % 64 == 0 and bw * bh <= 512 * 512
    assert assign_bucket(w, h, B512) != (bw, bh)  # these images are all smaller than their usual bucket


def test_no_upscale_keeps_the_usual_bucket_for_large_images():
    assert assign_bucket(3000, 1500, B512, no_upscale=True) == assign_bucket(3000, 1500, B512) == (704, 320)
    assert assign_bucket(500, 500, B512, no_upscale=True) == (448, 448)  # floored, not 512


def sizes(n=37, seed=0):
    import random

    rng = random.Random(seed)
    return [B512[rng.randrange(4, 9)] for _ in range(n)]  # five buckets, uneven counts


def test_every_batch_is_one_bucket_and_an_epoch_covers_each_index_once():
    bucket_of = sizes()
    sampler = BucketBatchSampler(bucket_of, batch_size=4, seed=0)
    batches = list(sampler)
    assert len(batches) == len(sampler)
    for batch in batches:
        assert 1 <= len(batch) <= 4 and len({bucket_of[i] for i in batch}) == 1
    assert sorted(i for b in batches for i in b) == list(range(len(bucket_of)))


def test_epochs_differ_and_seeds_reproduce():
    bucket_of = sizes()

    def run(seed, epoch):
        sampler = BucketBatchSampler(bucket_of, batch_size=4, seed=seed)
        sampler.set_epoch(epoch)
        return list(sampler)

    assert run(0, 0) == run(0, 0)
    assert run(0, 0) != run(0, 1)
    assert run(0, 0) != run(1, 0)
    # Items are shuffled within buckets, so batches hold different items from epoch to epoch.
    assert {frozenset(b) for b in run(0, 0)} != {frozenset(b) for b in run(0, 1)}
    # Batch order is shuffled across buckets, not bucket after bucket.
    buckets_in_order = [bucket_of[b[0]] for b in run(0, 0)]
    switches = sum(a != b for a, b in zip(buckets_in_order, buckets_in_order[1:]))
    assert switches > len(set(bucket_of)) - 1
    # Iterating again without set_epoch moves on to the next epoch's order.
    sampler = BucketBatchSampler(bucket_of, batch_size=4, seed=0)
    assert [list(sampler), list(sampler)] == [run(0, 0), run(0, 1)]


def test_no_shuffle_keeps_index_order_within_buckets():
    bucket_of = [(512, 512), (704, 320)] * 5
    batches = list(BucketBatchSampler(bucket_of, batch_size=2, seed=0, shuffle=False))
    assert batches == [[0, 2], [4, 6], [8], [1, 3], [5, 7], [9]]


@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("world", [2, 3])
def test_ranks_get_equal_counts_and_disjoint_batches(drop_last, world):
    bucket_of = sizes()
    per_rank = []
    for rank in range(world):
        sampler = BucketBatchSampler(bucket_of, batch_size=4, seed=3, num_replicas=world, rank=rank, drop_last=drop_last)
        sampler.set_epoch(2)
        per_rank.append(list(sampler))
        assert len(per_rank[-1]) == len(sampler)
        assert all(len({bucket_of[i] for i in b}) == 1 for b in per_rank[-1])
        if drop_last:
            assert all(len(b) == 4 for b in per_rank[-1])
    assert len({len(b) for b in per_rank}) == 1
    single = BucketBatchSampler(bucket_of, batch_size=4, seed=3, drop_last=drop_last)
    single.set_epoch(2)
    order = list(single)
    # Interleaving the ranks gives back the single-process order (padded by its first batches, or cut).
    interleaved = [b for round_ in zip(*per_rank) for b in round_]
    total = len(interleaved)
    assert interleaved == (order * 2)[:total]
    assert total % world == 0 and (total - len(order) < world if not drop_last else 0 <= len(order) - total < world)
    counts = Counter(i for b in interleaved for i in b)
    if drop_last:
        assert max(counts.values()) == 1  # no index on two ranks
    else:
        assert set(counts) == set(range(len(bucket_of)))  # union covers everything
        padding = Counter(i for b in order[: total - len(order)] for i in b)
        assert counts == Counter(range(len(bucket_of))) + padding  # repeats are the documented padding only


def test_resume_yields_exactly_the_remaining_batches():
    bucket_of = sizes()
    kwargs = dict(batch_size=3, seed=7, num_replicas=2, rank=1)
    reference = BucketBatchSampler(bucket_of, **kwargs)
    reference.set_epoch(4)
    full = list(reference)

    sampler = BucketBatchSampler(bucket_of, **kwargs)
    sampler.set_epoch(4)
    it = iter(sampler)
    head = [next(it) for _ in range(3)]
    state = sampler.state_dict()
    assert state == {"epoch": 4, "batches_done": 3}

    restored = BucketBatchSampler(bucket_of, **kwargs)
    restored.load_state_dict(state)
    restored.set_epoch(4)  # the trainer's loop calls this on resume; it must not rewind
    assert head + list(restored) == full
    assert restored.state_dict() == {"epoch": 5, "batches_done": 0}
    restored.set_epoch(5)
    nxt = BucketBatchSampler(bucket_of, **kwargs)
    nxt.set_epoch(5)
    assert list(restored) == list(nxt)


def test_resume_rejects_a_state_from_another_dataset():
    sampler = BucketBatchSampler(sizes(), batch_size=4, seed=0)
    with pytest.raises(ValueError, match="batches_done=99"):
        sampler.load_state_dict({"epoch": 0, "batches_done": 99})
    with pytest.raises(KeyError, match="batches_done"):
        sampler.load_state_dict({"epoch": 0})


def test_sampler_works_in_a_dataloader():
    import torch
    from torch.utils.data import DataLoader

    bucket_of = sizes(12)
    dataset = [torch.zeros(3, h // 64, w // 64) for w, h in bucket_of]
    loader = DataLoader(dataset, batch_sampler=BucketBatchSampler(bucket_of, batch_size=3, seed=0))
    shapes = [tuple(batch.shape) for batch in loader]
    assert len(shapes) == len(loader.batch_sampler) and all(s[1] == 3 for s in shapes)
