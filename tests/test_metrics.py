"""quantkit.metrics.CodebookUsage: hand-computed metrics, masks, multi-index, bad input, and a 2-rank gloo all-reduce."""
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from quantkit.metrics import CodebookUsage
from quantkit.quantizers.base import batch_usage_stats


def test_hand_computed_histogram_perplexity_entropy_and_dead_codes():
    usage = CodebookUsage(codebook_size=4)
    usage.update(torch.tensor([0, 0, 1, 3]))
    r = usage.compute()
    assert r.counts.tolist() == [2, 1, 0, 1] and r.counts.dtype == torch.int64
    assert int(r.total) == 4
    assert float(r.utilization) == 0.75
    # p = (1/2, 1/4, 0, 1/4): H = 1/2 ln 2 + 2 * 1/4 ln 4 = 1.5 ln 2 nats = 1.5 bits.
    assert math.isclose(float(r.entropy), 1.5 * math.log(2), rel_tol=1e-12)
    assert math.isclose(float(r.entropy_bits), 1.5, rel_tol=1e-12)
    assert math.isclose(float(r.perplexity), 2 ** 1.5, rel_tol=1e-12)
    assert r.probabilities.tolist() == [0.5, 0.25, 0.0, 0.25]
    assert int(r.num_dead) == 1 and r.dead_code_indices.tolist() == [2]
    dead2 = usage.compute(dead_threshold=2)
    assert int(dead2.num_dead) == 3 and dead2.dead_code_indices.tolist() == [1, 2, 3]


def test_uniform_usage_has_perplexity_equal_to_codebook_size():
    usage = CodebookUsage(codebook_size=8)
    usage.update(torch.arange(8).repeat(5))
    r = usage.compute()
    assert math.isclose(float(r.perplexity), 8.0, rel_tol=1e-12)
    assert math.isclose(float(r.entropy_bits), 3.0, rel_tol=1e-12)
    assert float(r.utilization) == 1.0 and int(r.num_dead) == 0 and r.dead_code_indices.numel() == 0


def test_batches_accumulate_like_one_batch_and_reset_forgets():
    torch.manual_seed(0)
    batches = [torch.randint(0, 32, (5, 7)) for _ in range(4)]
    one, many = CodebookUsage(32), CodebookUsage(32)
    one.update(torch.cat([b.reshape(-1) for b in batches]))
    for b in batches:
        many.update(b)
    assert torch.equal(one.counts, many.counts)
    assert torch.equal(many.compute().counts, torch.bincount(torch.cat(batches).reshape(-1), minlength=32))
    many.reset()
    r = many.compute()
    assert int(r.total) == 0 and float(r.perplexity) == 0.0 and float(r.utilization) == 0.0
    assert float(r.entropy) == 0.0 and int(r.num_dead) == 32


def test_mask_drops_vectors():
    usage = CodebookUsage(codebook_size=4)
    usage.update(torch.tensor([[0, 1], [2, 3]]), mask=torch.tensor([[True, False], [False, True]]))
    assert usage.compute().counts.tolist() == [1, 0, 0, 1]


def test_multi_index_keeps_one_histogram_per_depth():
    usage = CodebookUsage(codebook_size=3, num_indices=2)
    # (B=2, T=2, M=2): depth 0 sees 0, 0, 1, 2; depth 1 sees 2, 2, 2, 2.
    indices = torch.tensor([[[0, 2], [0, 2]], [[1, 2], [2, 2]]])
    usage.update(indices, mask=torch.ones(2, 2, dtype=torch.bool))
    r = usage.compute()
    assert r.counts.tolist() == [[2, 1, 1], [0, 0, 4]]
    assert r.total.tolist() == [4, 4]
    assert r.utilization.tolist() == [1.0, 1 / 3]
    assert math.isclose(float(r.entropy_bits[0]), 1.5, rel_tol=1e-12) and float(r.entropy_bits[1]) == 0.0
    assert float(r.perplexity[1]) == 1.0
    assert [d.tolist() for d in r.dead_code_indices] == [[], [0, 1]]
    assert set(r.scalars("rq/")) == {f"rq/{k}/{m}" for k in ("utilization", "perplexity", "entropy_bits",
                                                             "num_dead") for m in (0, 1)}


def test_skipped_depth_sentinel_is_ignored_by_default_and_an_error_without_ignore_index():
    indices = torch.tensor([[0, -1], [1, 1]])
    usage = CodebookUsage(codebook_size=2, num_indices=2)
    usage.update(indices)
    assert usage.compute().counts.tolist() == [[1, 1], [0, 1]]
    strict = CodebookUsage(codebook_size=2, num_indices=2, ignore_index=None)
    with pytest.raises(ValueError, match=r"\[0, 2\).*\[-1, 1\]"):
        strict.update(indices)
    assert int(strict.counts.sum()) == 0


@pytest.mark.parametrize(
    "indices, mask, match",
    [
        (torch.tensor([0, 4]), None, r"indices must lie in \[0, 4\), got range \[0, 4\]"),
        (torch.tensor([-2, 1]), None, r"indices must lie in \[0, 4\)"),
        (torch.tensor([0.0, 1.0]), None, "integer dtype"),
        (torch.tensor([True, False]), None, "integer dtype"),
        (torch.tensor([0, 1]), torch.tensor([True]), "mask must be a bool tensor of shape"),
        (torch.tensor([0, 1]), torch.tensor([1, 0]), "mask must be a bool tensor of shape"),
    ],
)
def test_bad_input_raises_value_error_and_counts_nothing(indices, mask, match):
    usage = CodebookUsage(codebook_size=4)
    usage.update(torch.tensor([1]))
    with pytest.raises(ValueError, match=match):
        usage.update(indices, mask=mask)
    assert usage.counts.tolist() == [[0, 1, 0, 0]]


def test_multi_index_rejects_wrong_last_dim():
    with pytest.raises(ValueError, match=r"\(\.\.\., 3\)"):
        CodebookUsage(codebook_size=4, num_indices=3).update(torch.zeros(5, 2, dtype=torch.long))


@pytest.mark.parametrize("kwargs, match", [(dict(codebook_size=0), "codebook_size"),
                                           (dict(codebook_size=4, num_indices=0), "num_indices"),
                                           (dict(codebook_size=4, dead_threshold=-1), "dead_threshold"),
                                           (dict(codebook_size=4, ignore_index=2), "ignore_index")])
def test_bad_config_raises_value_error_naming_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CodebookUsage(**kwargs)


def test_agrees_with_the_quantizers_batch_stats():
    torch.manual_seed(0)
    indices = torch.randint(0, 50, (300,)) % 37  # some codes never used
    usage = CodebookUsage(codebook_size=50)
    usage.update(indices)
    r = usage.compute()
    stats = batch_usage_stats(indices, 50)
    assert math.isclose(float(r.perplexity), float(stats["perplexity"]), rel_tol=1e-5)
    assert math.isclose(float(r.utilization), float(stats["usage"]), rel_tol=1e-6)


def test_state_dict_round_trip_and_large_codebook_without_one_hot():
    usage = CodebookUsage(codebook_size=1 << 18)
    usage.update(torch.randint(0, 1 << 18, (4096,)))
    restored = CodebookUsage(codebook_size=1 << 18)
    restored.load_state_dict(usage.state_dict())
    assert torch.equal(restored.counts, usage.counts) and int(restored.compute().total) == 4096


# ---------------------------------------------------------------------------------------------------------------
# two ranks on gloo


def _rank_indices(rank: int) -> torch.Tensor:
    return torch.tensor([[0, 1], [1, 1], [2, 0]]) if rank == 0 else torch.tensor([[3, 1], [3, 1]])


def _worker(rank: int, world: int, init_file: str, result_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        usage = CodebookUsage(codebook_size=4, num_indices=2)
        usage.update(_rank_indices(rank))
        local = usage.counts.clone()
        report = usage.compute()
        report_again = usage.compute()  # reducing never changes the local counts
        torch.save({"local": local, "after": usage.counts.clone(), "global": report.counts,
                    "again": report_again.counts, "unsynced": usage.compute(sync=False).counts,
                    "perplexity": report.perplexity}, os.path.join(result_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_all_reduce_to_the_global_counts(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    expected = CodebookUsage(codebook_size=4, num_indices=2)
    expected.update(torch.cat([_rank_indices(0), _rank_indices(1)]))
    want = expected.compute()
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        local = CodebookUsage(codebook_size=4, num_indices=2)
        local.update(_rank_indices(rank))
        assert torch.equal(got["global"], want.counts) and torch.equal(got["again"], want.counts)
        assert torch.equal(got["local"], local.counts) and torch.equal(got["after"], local.counts)
        assert torch.equal(got["unsynced"], local.counts)
        assert torch.allclose(got["perplexity"], want.perplexity)
