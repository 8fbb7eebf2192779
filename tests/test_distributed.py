"""Under torch.distributed (2 CPU processes, gloo), the codebook machinery keeps every rank identical: EMA
statistics are all-reduced, k-means runs on rank 0 and is broadcast, revival candidates are drawn identically.
Ranks get different data, different batch sizes and masks on purpose."""
import os

import faiss
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from quantkit import VectorQuantizer
from quantkit.quantizers import DeadCodeConfig, EMAConfig, KMeansInit

WORLD = 2
STEPS = 3
K, DIM = 16, 6
KMEANS = KMeansInit(min_vectors=40, niter=5, seed=7)


def _batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank- and step-specific data: rank r has 12 + 5 r rows, every fourth masked out."""
    g = torch.Generator().manual_seed(100 * rank + step)
    x = torch.randn(12 + 5 * rank, DIM, generator=g) + rank
    return x, torch.arange(x.shape[0]) % 4 != 3


def _make(kind: str) -> VectorQuantizer:
    torch.manual_seed(0)  # same initial codebook on every rank
    if kind == "ema":
        return VectorQuantizer(DIM, K, ema=EMAConfig(decay=0.8))
    return VectorQuantizer(DIM, K, ema=EMAConfig(decay=0.8), kmeans_init=KMEANS,
                           dead_code=DeadCodeConfig(threshold=1.5))


def _worker(rank: int, tmp: str) -> None:
    """Every scenario in one process group; each saves what the tests compare to {tmp}/{scenario}{rank}.pt."""
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=WORLD)
    try:
        for kind in ("ema", "kmeans_revival"):
            q = _make(kind)
            for step in range(STEPS):
                x, mask = _batch(rank, step)
                q(x, mask=mask)
            torch.save(q.state_dict(), os.path.join(tmp, f"{kind}{rank}.pt"))
        torch.manual_seed(0)
        q = VectorQuantizer(DIM, K, ema=None, kmeans_init=KMEANS)  # gradient codebook: nothing moves it after
        for step in range(2):
            x, mask = _batch(rank, step)
            q(x, mask=mask)
        assert bool(q.codebook.initialized)
        torch.save(q.codebook.weight.detach().clone(), os.path.join(tmp, f"kmeans{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("distributed")
    mp.spawn(_worker, args=(str(tmp),), nprocs=WORLD, join=True)
    return lambda kind: [torch.load(tmp / f"{kind}{r}.pt", weights_only=True) for r in range(WORLD)]


def _assert_identical(states: list[dict]) -> None:
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), f"{key} differs between ranks"


def test_ema_statistics_are_all_reduced_identically_and_equal_one_process_on_all_data(results):
    states = results("ema")
    _assert_identical(states)
    single = _make("ema")
    for step in range(STEPS):  # one process seeing both ranks' masked-in rows
        rows = [x[m] for x, m in (_batch(r, step) for r in range(WORLD))]
        single(torch.cat(rows))
    for key, value in single.state_dict().items():
        torch.testing.assert_close(states[0][key], value, rtol=1e-5, atol=1e-5)


def test_kmeans_init_and_dead_code_revival_are_identical_on_every_rank(results):
    states = results("kmeans_revival")
    _assert_identical(states)
    assert bool(states[0]["codebook.initialized"])
    # the revived codes really are rows of some rank's masked-in data of the last step
    rows = torch.cat([x[m] for x, m in (_batch(r, STEPS - 1) for r in range(WORLD))])
    weight = states[0]["codebook.weight"]
    revived = [i for i in range(K) if any(torch.equal(weight[i], r) for r in rows)]
    assert revived, "expected some dead codes to be revived with a batch vector"
    assert all(states[0]["codebook.usage"][i] == 1.5 for i in revived)


def test_kmeans_init_broadcasts_rank0_faiss_centroids_of_the_pooled_vectors(results):
    got = results("kmeans")
    assert torch.equal(got[0], got[1])
    # step 0 collects 9 + 13 = 22 masked-in rows, step 1 another 22: 44 >= 40, and each rank's pool is its rows
    pool = torch.cat([torch.cat([_batch(r, s)[0][_batch(r, s)[1]] for s in range(2)]) for r in range(WORLD)])
    km = faiss.Kmeans(DIM, K, niter=5, seed=7, max_points_per_centroid=256, min_points_per_centroid=1,
                      verbose=False)
    km.train(pool.numpy())
    torch.testing.assert_close(got[0], torch.from_numpy(km.centroids), rtol=1e-4, atol=1e-4)


if not dist.is_available():  # pragma: no cover
    pytestmark = pytest.mark.skip(reason="torch.distributed is not available")
