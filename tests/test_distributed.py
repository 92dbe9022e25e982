import torch

from plugins.distributed import (all_gather_with_grad, all_reduce_sum_with_grad, shard_range,
                                 shard_sizes)
from tests.distributed_harness import run_distributed


def test_shard_range_matches_partial_fc_rule():
    # 10 classes on 4 ranks: 3, 3, 2, 2 rows starting at 0, 3, 6, 8
    assert [shard_range(10, r, 4) for r in range(4)] == [(0, 3), (3, 3), (6, 2), (8, 2)]
    assert shard_sizes(85742, 8) == [10718] * 6 + [10717] * 2
    assert sum(shard_sizes(7, 8)) == 7 and shard_sizes(7, 8)[-1] == 0


def test_shard_range_rejects_bad_arguments():
    import pytest
    with pytest.raises(ValueError, match="rank < world_size"):
        shard_range(10, 4, 4)


def _gather_worker(rank, world, full):
    rows = full.shape[0] // world
    local = full[rank * rows:(rank + 1) * rows].clone().requires_grad_(True)
    gathered = all_gather_with_grad(local)
    # each rank owns one column of a shared loss L = sum_r sum(gathered[:, r] * (r + 1))**2 / 2
    partial = (gathered[:, rank] * (rank + 1)).sum()
    total = all_reduce_sum_with_grad(partial)
    (total ** 2 / 2).backward()
    return {"gathered": gathered.detach(), "grad": local.grad, "total": total.item()}


def test_gather_and_reduce_give_the_one_process_gradient():
    full = torch.arange(8 * 2, dtype=torch.float64).reshape(8, 2) / 10
    ref = full.clone().requires_grad_(True)
    total = sum((ref[:, r] * (r + 1)).sum() for r in range(2))
    (total ** 2 / 2).backward()
    results = run_distributed(_gather_worker, world_size=2, args=(full,))
    for rank, res in enumerate(results):
        assert torch.equal(res["gathered"], full)
        assert abs(res["total"] - total.item()) < 1e-12
        torch.testing.assert_close(res["grad"], ref.grad[rank * 4:(rank + 1) * 4])
