"""Batch samplers: permutations per epoch, disjoint equal rank shares, exact mid-epoch resume."""

import random

import pytest
import torch

from hf_optcore.data.samplers import (
    BucketBatchSampler,
    MultipackBatchSampler,
    RandomBatchSampler,
    TokenBudgetBatchSampler,
    pack_best_fit_decreasing,
)

rng = random.Random(0)
LENGTHS = [rng.randint(5, 300) for _ in range(203)]  # 203: not a multiple of batch or world sizes


def make(kind, world=1, rank=0, seed=3, lengths=LENGTHS):
    if kind == "random":
        return RandomBatchSampler(lengths, 8, world, rank, seed)
    if kind == "bucket":
        return BucketBatchSampler(lengths, 8, world, rank, seed, bucket_size_multiplier=8)
    if kind == "token_budget":
        return TokenBudgetBatchSampler(lengths, 1024, world, rank, seed)
    return MultipackBatchSampler(lengths, 512, 2, world, rank, seed)


def examples_of(batch, kind):
    return [i for b in batch for i in b] if kind == "multipack" else list(batch)


def epoch(sampler, kind, e):
    sampler.set_epoch(e)
    return [examples_of(b, kind) for b in sampler]


KINDS = ["random", "bucket", "token_budget", "multipack"]


@pytest.mark.parametrize("kind", KINDS)
def test_each_epoch_is_a_permutation_and_epochs_differ(kind):
    s = make(kind)
    e0, e1 = epoch(s, kind, 0), epoch(s, kind, 1)
    for batches in (e0, e1):
        flat = [i for b in batches for i in b]
        assert sorted(flat) == list(range(len(LENGTHS)))
        assert len(batches) == len(s)
    assert e0 != e1
    assert epoch(make(kind), kind, 0) == e0  # a function of (seed, epoch) ...
    assert epoch(make(kind, seed=4), kind, 0) != e0


@pytest.mark.parametrize("kind", KINDS)
def test_global_rng_does_not_change_the_order(kind):
    torch.manual_seed(0)
    random.seed(0)
    a = epoch(make(kind), kind, 2)
    torch.manual_seed(123)
    random.seed(123)
    torch.rand(1000)
    assert epoch(make(kind), kind, 2) == a


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("world", [2, 3])
def test_ranks_are_disjoint_cover_the_data_and_have_equal_steps(kind, world):
    shares = [epoch(make(kind, world, r), kind, 1) for r in range(world)]
    assert len({len(s) for s in shares}) == 1
    assert len(shares[0]) == len(make(kind, world, 0))
    flat = [i for s in shares for b in s for i in b]
    assert sorted(flat) == list(range(len(LENGTHS)))  # disjoint (no repeat) and covering


@pytest.mark.parametrize("kind", KINDS)
def test_state_round_trips_mid_epoch_without_replay(kind):
    s = make(kind, world=2, rank=1)
    s.set_epoch(3)
    full = [b for b in s]
    s.set_epoch(4)  # a fresh pass of another epoch, then back
    s.set_epoch(3)
    it = iter(s)
    head = [next(it) for _ in range(5)]
    state = s.state_dict()
    assert state["epoch"] == 3 and state["consumed"] == 5
    resumed = make(kind, world=2, rank=1)
    resumed.load_state_dict(state)
    tail = list(resumed)
    assert head + tail == full
    assert resumed.state_dict()["consumed"] == len(full)
    # The next pass moves on to the next epoch by itself.
    assert [b for b in resumed] != full and resumed.epoch == 4


def test_load_state_dict_refuses_another_world_size():
    state = make("bucket", world=2).state_dict()
    with pytest.raises(ValueError, match="num_replicas=2 but this one has num_replicas=1"):
        make("bucket").load_state_dict(state)


def test_bucket_pads_less_than_random_and_is_not_longest_first():
    def padding(batches):
        real = sum(LENGTHS[i] for b in batches for i in b)
        padded = sum(len(b) * max(LENGTHS[i] for i in b) for b in batches)
        return 1 - real / padded

    rand = epoch(make("random"), "random", 0)
    firsts = []
    for e in range(6):
        bucket = epoch(make("bucket"), "bucket", e)
        assert padding(bucket) < padding(rand) / 3
        firsts.append(max(LENGTHS[i] for i in bucket[0]))
    longest_batch = max(max(LENGTHS[i] for i in b) for b in bucket)
    assert sum(f == longest_batch for f in firsts) <= 2  # no systematic longest-first order


def test_token_budget_bounds_padded_tokens():
    s = TokenBudgetBatchSampler(LENGTHS, 1000, pad_to_multiple_of=8)
    for b in s:
        width = -(-max(LENGTHS[i] for i in b) // 8) * 8
        assert len(b) * width <= 1000
    assert len({len(b) for b in s}) > 3  # the batch size varies with length
    with pytest.raises(ValueError, match="max_tokens must hold the longest example"):
        TokenBudgetBatchSampler([10, 900], 512)


def test_best_fit_decreasing_packs_tightly():
    bins = pack_best_fit_decreasing(LENGTHS, 512)
    assert sorted(i for b in bins for i in b) == list(range(len(LENGTHS)))
    assert all(sum(LENGTHS[i] for i in b) <= 512 for b in bins)
    lower_bound = -(-sum(LENGTHS) // 512)
    assert len(bins) <= lower_bound + 2
    assert MultipackBatchSampler(LENGTHS, 512, 2).packing_efficiency() > 0.95


def test_uneven_split_for_ranks_never_drops_or_repeats():
    lengths = [10] * 9  # 2 batches of 8 -> 2 ranks is even; 3 ranks needs a split
    shares = [list(RandomBatchSampler(lengths, 8, 3, r)) for r in range(3)]
    assert [len(s) for s in shares] == [1, 1, 1]
    assert sorted(i for s in shares for b in s for i in b) == list(range(9))
    with pytest.raises(ValueError, match="cannot give 4 ranks the same number of batches"):
        len(RandomBatchSampler([10, 10, 10], 8, 4, 0))


def make_per_device(kind, per_device, world=1, rank=0, seed=3, lengths=LENGTHS):
    """A sampler whose per-rank size is ``per_device`` examples (multipack: packed rows)."""
    if kind == "random":
        return RandomBatchSampler(lengths, per_device, world, rank, seed)
    if kind == "bucket":
        return BucketBatchSampler(lengths, per_device, world, rank, seed, bucket_size_multiplier=4)
    return MultipackBatchSampler(lengths, 320, per_device, world, rank, seed)


@pytest.mark.parametrize("kind", ["random", "bucket", "multipack"])
@pytest.mark.parametrize("world", [2, 3])
def test_union_of_ranks_at_each_step_is_the_one_rank_batch_of_world_times_the_size(kind, world):
    lengths = LENGTHS[:190]  # 190 examples: a short last global batch for B=4 at 2 and 3 ranks
    merged = []
    for e in (0, 5):
        s = make_per_device(kind, 4 * world, lengths=lengths)
        s.set_epoch(e)
        one = [examples_of(b, kind) for b in s]
        if len(list(s)[-1]) < world:  # fewer leftover items than ranks: they join the step before
            one[-2:] = [one[-2] + one[-1]]
            merged.append(kind)
        ranks = [epoch(make_per_device(kind, 4, world, r, lengths=lengths), kind, e) for r in range(world)]
        assert len({len(r) for r in ranks}) == 1 and len(ranks[0]) == len(one)
        for k, batch in enumerate(one):
            assert sorted(i for r in ranks for i in r[k]) == sorted(batch), (e, k)
        if kind != "multipack":  # full global batches are sliced into exactly B per rank
            assert all(len(r[k]) == 4 for r in ranks for k in range(len(one) - 1))
    assert merged == (["multipack", "multipack"] if (kind, world) == ("multipack", 2) else [])  # 89 bins = 11 x 8 + 1


def test_token_budget_ranks_take_consecutive_batches_of_the_one_rank_plan():
    one = epoch(make("token_budget"), "token_budget", 2)
    assert len(one) % 2 == 1  # the last step needs a split
    two = [epoch(make("token_budget", 2, r), "token_budget", 2) for r in range(2)]
    steps = len(two[0])
    assert steps == len(two[1]) == len(one) // 2 + 1
    for k in range(steps - 1):
        assert [two[0][k], two[1][k]] == one[2 * k : 2 * k + 2]
    # The leftover batch is split in two for the last step: nothing dropped, nothing repeated.
    assert sorted(two[0][-1] + two[1][-1]) == sorted(one[-1])


def test_fewer_leftover_items_than_ranks_join_the_step_before():
    # 9 examples, 2 ranks x 2 = global 4: batches of 4, 4, 1; the lone example joins the second step.
    shares = [list(RandomBatchSampler([10] * 9, 2, 2, r, seed=1)) for r in range(2)]
    one = list(RandomBatchSampler([10] * 9, 4, seed=1))
    assert [len(s) for s in shares] == [2, 2] and len(one) == 3
    assert sorted(shares[0][0] + shares[1][0]) == sorted(one[0])
    assert sorted(shares[0][1] + shares[1][1]) == sorted(one[1] + one[2])
    assert sorted(len(s[1]) for s in shares) == [2, 3]
    # Batch size 1 with an odd count works too (one step of 2 + 1 examples).
    assert [len(list(RandomBatchSampler([10] * 5, 1, 2, r))) for r in range(2)] == [2, 2]
