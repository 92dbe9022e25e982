"""Re-split class-sharded state (centers, classifier shards, their optimizer moments) between
world sizes.

Every head names in ``sharded_keys`` the state entries whose first dimension holds its rank's
classes under the Partial FC rule (plugins.distributed.shard_range).  Shards are contiguous and in
rank order, so a full table is their concatenation and any other world size's shard is a slice.
"""
from __future__ import annotations

from typing import Dict, List, Mapping, Sequence

import torch

from .distributed import shard_range


def join_shards(shards: Sequence[torch.Tensor], num_classes: int, source: str = "") -> torch.Tensor:
    """Concatenate the shards of ranks 0..W-1 into the full ``[C, ...]`` table, checking every
    shard's row count against the sharding rule for ``W = len(shards)``."""
    world = len(shards)
    for rank, shard in enumerate(shards):
        expected = shard_range(num_classes, rank, world)[1]
        if shard.shape[0] != expected:
            raise ValueError(f"{source or 'sharded state'}: shard of rank {rank}/{world} has "
                             f"{shard.shape[0]} rows, the sharding rule for {num_classes} classes "
                             f"gives {expected}")
    return torch.cat(list(shards), dim=0)


def take_shard(full: torch.Tensor, num_classes: int, rank: int, world_size: int) -> torch.Tensor:
    """Rows of ``rank`` in a world of ``world_size`` from a full ``[C, ...]`` table."""
    if full.shape[0] != num_classes:
        raise ValueError(f"full table has {full.shape[0]} rows, expected {num_classes} classes")
    start, count = shard_range(num_classes, rank, world_size)
    return full[start:start + count].clone()


def reshard_state(per_rank: List[Mapping[str, torch.Tensor]], keys: Sequence[str],
                  num_classes: int, rank: int, world_size: int,
                  source: str = "") -> Dict[str, torch.Tensor]:
    """From the state dicts saved by the W ranks of an earlier run, build the state of ``rank``
    in a world of ``world_size``: sharded ``keys`` are joined and re-sliced, every other entry is
    taken from rank 0 (it is replicated)."""
    state = dict(per_rank[0])
    for key in keys:
        missing = [r for r, s in enumerate(per_rank) if key not in s]
        if missing:
            raise ValueError(f"{source or 'sharded state'}: key '{key}' missing in the state of "
                             f"rank(s) {missing}")
        full = join_shards([s[key] for s in per_rank], num_classes, f"{source} key '{key}'")
        state[key] = take_shard(full, num_classes, rank, world_size)
    return state


def gather_full_table(shard: torch.Tensor, num_classes: int) -> torch.Tensor:
    """All-gather the class shards of every rank into the full ``[C, ...]`` table (on every rank).

    Shards may differ by one row (the sharding rule); they are padded for the collective."""
    import torch.distributed as dist

    from .distributed import rank_and_world, shard_sizes

    _, world = rank_and_world()
    if world == 1:
        return join_shards([shard], num_classes)
    sizes = shard_sizes(num_classes, world)
    padded = shard.new_zeros((max(sizes),) + tuple(shard.shape[1:]))
    padded[:shard.shape[0]] = shard
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous())
    return join_shards([p[:n] for p, n in zip(parts, sizes)], num_classes)
