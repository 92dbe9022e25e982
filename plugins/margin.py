"""Margin softmax over class shards: the margin functions and one distributed cross entropy.

Shared by ``AdaDistillHead`` (centers = EMA of teacher embeddings) and ``MarginSoftmaxHead``
(centers = learned Partial FC weights).  Every rank scores the whole global batch against the
classes it owns (the Partial FC rule of ``plugins.distributed.shard_range``); the softmax max and
sum are all-reduced, so no rank ever holds the ``[N, C]`` logit matrix.

Margins on the target cosine ``c = cos(theta_y)`` (ArcFace, Deng et al. CVPR 2019; CosFace,
Wang et al. CVPR 2018), scaled by ``s``:

    ArcFace:  z_y = s * cos(theta_y + m)        CosFace:  z_y = s * (cos(theta_y) - m)
    others:   z_j = s * cos(theta_j)

Two gradient conventions for the ArcFace target logit:

- ``straight_through=False`` (exact): differentiate ``cos(acos(c) + m)``, as the official
  AdaDistill head does.  ``d/dc = sin(theta + m) / sin(theta)`` is infinite at ``|c| = 1``, so ``c``
  is clamped to ``[-1 + ACOS_EPS, 1 - ACOS_EPS]`` first; a target cosine beyond that range (in
  practice only a numerically perfect match) gets no gradient through its target logit.
- ``straight_through=True``: the value is ``s * cos(theta + m)`` but the gradient is that of
  ``s * c``, i.e. the margin is applied without gradient, as arcface_torch's ``CombinedMarginLoss``
  does (it edits the logits in place under ``torch.no_grad()``).

No ``theta + m > pi`` fallback is applied (neither upstream code applies one).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Tuple

import torch

from .deferred_checks import require
from .distributed import all_reduce, all_reduce_sum_with_grad

MARGINS = ("arcface", "cosface")
ACOS_EPS = 1e-6


def arcface_margin(cos_target: torch.Tensor, m: float, straight_through: bool = False
                   ) -> torch.Tensor:
    """``cos(acos(c) + m)`` of target cosines ``[N]`` (gradient: see the module docstring)."""
    clamped = cos_target.clamp(-1.0 + ACOS_EPS, 1.0 - ACOS_EPS)
    with_margin = torch.cos(torch.acos(clamped) + m)
    if straight_through:
        return cos_target + (with_margin - cos_target).detach()
    return with_margin


def cosface_margin(cos_target: torch.Tensor, m: float, straight_through: bool = False
                   ) -> torch.Tensor:
    """``c - m`` of target cosines ``[N]``; the gradient is 1 under either convention."""
    return cos_target - m


def apply_margin(kind: str, cos_target: torch.Tensor, m: float, straight_through: bool = False
                 ) -> torch.Tensor:
    """Dispatch to ``arcface_margin`` or ``cosface_margin`` by name."""
    if kind == "arcface":
        return arcface_margin(cos_target, m, straight_through)
    if kind == "cosface":
        return cosface_margin(cos_target, m, straight_through)
    raise ValueError(f"margin must be one of {MARGINS}, got {kind!r}")


def check_margin_args(margin: str, s: float, m: float, sample_rate: float) -> None:
    """Validate the constructor arguments shared by the margin heads."""
    if margin not in MARGINS:
        raise ValueError(f"margin must be one of {MARGINS}, got {margin!r}")
    if not s > 0:
        raise ValueError(f"scale s must be > 0, got {s}")
    if not 0 <= m < math.pi:
        raise ValueError(f"margin m must be in [0, pi), got {m}")
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")


def select_classes(local_labels: torch.Tensor, num_local: int, sample_rate: float
                   ) -> Tuple[torch.Tensor | None, torch.Tensor]:
    """Partial FC class sampling on one rank.

    Args:
        local_labels: ``[N]`` labels of the global batch minus ``class_start``; values outside
            ``[0, num_local)`` belong to other ranks.
        num_local: number of classes this rank owns.
        sample_rate: fraction of the owned classes to keep.  Every positive class (a class of
            this rank present in the batch) is kept; the rest of the
            ``max(int(sample_rate * num_local), num_positive)`` kept classes are drawn at random
            with ``torch.rand`` on the labels' device, so the choice is deterministic given
            torch's RNG state.  No host read when ``static_sample_count`` fixes the count.

    Returns:
        ``(kept, target_col)``: ``kept`` ``[K]`` sorted local class indices, or ``None`` for "all
        ``num_local`` classes" (sample_rate 1); ``target_col`` ``[N]`` the column of each sample's
        class among the kept ones, ``-1`` where the class lives on another rank.
    """
    mine = (local_labels >= 0) & (local_labels < num_local)
    if sample_rate >= 1.0:
        return None, torch.where(mine, local_labels, torch.full_like(local_labels, -1))
    num_sample = static_sample_count(num_local, sample_rate, local_labels.numel())
    if num_sample is None:     # the count depends on the labels: read it (a host sync)
        positive = torch.unique(local_labels[mine])  # sorted
        num_sample = max(int(sample_rate * num_local), positive.numel())
        score = torch.rand(num_local, device=local_labels.device)
        score[positive] = 2.0  # above any uniform draw: positives always win
    else:                      # every positive fits: mark them without counting them
        score = torch.rand(num_local, device=local_labels.device)
        spare = torch.cat([score, score.new_zeros(1)])       # other ranks' labels land here
        spare.index_fill_(0, torch.where(mine, local_labels, num_local), 2.0)
        score = spare[:num_local]
    kept = torch.sort(torch.topk(score, k=num_sample).indices).values
    cols = torch.searchsorted(kept, local_labels.clamp(0, max(num_local - 1, 0)))
    return kept, torch.where(mine, cols, torch.full_like(local_labels, -1))


def static_sample_count(num_local: int, sample_rate: float, batch: int) -> Optional[int]:
    """How many classes ``select_classes`` keeps when that does not depend on the labels:
    ``int(sample_rate * num_local)`` when it can hold every positive of a batch of ``batch``
    samples (``batch <= int(sample_rate * num_local)``: e.g. 85,742 x 0.3 / 8 ranks = 3,215
    classes against a global batch of 1,024); None when the labels decide (then
    ``select_classes`` reads their count from the device)."""
    count = int(sample_rate * num_local)
    return count if batch <= count else None


def cosine_logits(embeddings: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """Cosines ``[N, K]`` between rows of ``embeddings`` ``[N, D]`` and ``centers`` ``[K, D]``.

    Both are L2-normalised in fp32 with autocast disabled; the matmul runs under the caller's
    autocast state (fp16/bf16 on GPU when enabled) and the result is returned as fp32.
    """
    device_type = embeddings.device.type
    with torch.autocast(device_type=device_type, enabled=False):
        e_hat = torch.nn.functional.normalize(embeddings.float(), dim=1)
        c_hat = torch.nn.functional.normalize(centers.float(), dim=1)
    return torch.matmul(e_hat, c_hat.t()).float()


def check_batch(embedding_size: int, labels: torch.Tensor, *embeddings: torch.Tensor,
                teacher_size: Optional[int] = None) -> None:
    """Raise ValueError unless ``labels`` is an integer ``[B]`` tensor and every tensor of
    ``embeddings`` is ``[B, width]``: ``embedding_size`` for the first (the student), and
    ``teacher_size`` (default ``embedding_size``) for the second (the teacher)."""
    if labels.dim() != 1 or labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor [B], got dtype {labels.dtype} "
                         f"shape {list(labels.shape)}")
    b = labels.shape[0]
    widths = [embedding_size] + [embedding_size if teacher_size is None else teacher_size] * (
        len(embeddings) - 1)
    for i, (x, width) in enumerate(zip(embeddings, widths)):
        if x.dim() != 2 or x.shape != (b, width):
            expected = ", ".join(f"[B, {w}]" for w in widths)
            found = ", ".join(str(list(t.shape)) for t in embeddings)
            raise ValueError(f"embeddings #{i} must be [B, D] = [{b}, {width}] (B from labels), "
                             f"got {list(x.shape)}: expected embeddings, labels of shapes "
                             f"{expected}, [B]; found {found}, {list(labels.shape)}")


def check_labels_range(labels: torch.Tensor, num_classes: int) -> None:
    """Raise ValueError if a label of the (gathered) batch is outside ``[0, num_classes)``.
    A ``plugins.deferred_checks.require``: read at once, or with the training step's one host
    read inside ``deferred()`` (no rank indexes a row outside its own shard meanwhile)."""
    if labels.numel() == 0:
        return

    def message() -> str:
        low, high = torch.stack([labels.min(), labels.max()]).tolist()
        return (f"labels must be in [0, {num_classes}), found min {low} max {high}; check "
                f"num_classes in the config against the dataset (all labels must lie in "
                f"[0, {num_classes}))")
    require((labels.min() >= 0) & (labels.max() < num_classes), message)


def target_mask(target_col: torch.Tensor, width: int) -> torch.Tensor:
    """Bool ``[N, width]``: True at each sample's target column (``target_col [N]``, ``-1``: the
    class lives on another rank, an all-False row).  Built without ``nonzero``, so no host read."""
    return target_col[:, None] == torch.arange(width, device=target_col.device)[None, :]


def target_values(x: torch.Tensor, target_col: torch.Tensor) -> torch.Tensor:
    """``[N]``: ``x[i, target_col[i]]`` where ``target_col[i] >= 0``, else 0 (gather at a clamped
    column, then masked: no host read)."""
    if x.shape[1] == 0:
        return x.new_zeros(x.shape[0])
    picked = x.gather(1, target_col.clamp(min=0)[:, None]).squeeze(1)
    return torch.where(target_col >= 0, picked, torch.zeros_like(picked))


class MarginCE(NamedTuple):
    """Result of ``distributed_margin_cross_entropy``: ``loss`` (scalar, with gradient) and
    ``mean_cos_target`` (detached mean target cosine of the global batch)."""
    loss: torch.Tensor
    mean_cos_target: torch.Tensor


def distributed_margin_cross_entropy(cos: torch.Tensor, target_col: torch.Tensor, margin: str,
                                     s: float, m, straight_through: bool = False
                                     ) -> MarginCE:
    """Mean margin-softmax cross entropy of the global batch, classes sharded over ranks.

    ``L = 1/N sum_i [ log sum_j exp(z_ij) - z_{i,y_i} ]`` with ``z`` the margin logits of the
    module docstring.  Each rank passes the cosines against its own (kept) classes; the row max
    is all-reduced without gradient (it cancels out of ``L``), the exp-sums and target logits are
    all-reduced with ``all_reduce_sum_with_grad``, so the loss is identical on every rank and the
    gradients are exact under the convention of ``plugins.distributed``.  All math runs in fp32.

    Args:
        cos: ``[N, K]`` cosines of the global batch against this rank's K kept classes.
        target_col: ``[N]`` long, the target's column in ``cos`` or ``-1`` if another rank owns it.
            Every sample's class must be owned by exactly one rank.
        margin: ``"arcface"`` or ``"cosface"``.
        s: logit scale.
        m: margin: a float, or a ``[N]`` tensor of per-sample margins (no gradient; e.g.
            MarginDistillation's teacher-derived margins), row ``i`` using ``m[i]``.
        straight_through: gradient convention of the ArcFace margin (module docstring).
    """
    device_type = cos.device.type
    with torch.autocast(device_type=device_type, enabled=False):
        cos = cos.float()
        owned = target_col >= 0
        # every row's target cosine (0 where another rank owns the class); rows are masked, not
        # compacted, so no host read of how many rows this rank owns
        cos_target = target_values(cos, target_col)
        if isinstance(m, torch.Tensor):
            if m.shape != target_col.shape:
                raise ValueError(f"distributed_margin_cross_entropy: per-sample margins must be "
                                 f"[N] = {list(target_col.shape)}, got {list(m.shape)}")
            m = m.detach().to(cos.device, cos.dtype)
        target_logit = s * apply_margin(margin, cos_target, m, straight_through)
        logits = torch.where(target_mask(target_col, cos.shape[1]), target_logit[:, None],
                             s * cos)
        local_cos = torch.where(owned, cos_target.detach(), torch.zeros_like(cos_target))
        loss, cos_sum = sharded_cross_entropy(logits, target_col, extra=local_cos)
        return MarginCE(loss, cos_sum.detach().mean())


def sharded_cross_entropy(logits: torch.Tensor, target_col: torch.Tensor,
                          extra: Optional[torch.Tensor] = None
                          ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Mean softmax cross entropy of the global batch whose classes are sharded over ranks.

    ``L = 1/N sum_i [ row_max_i + log sum_j exp(z_ij - row_max_i) - z_{i,y_i} ]``: the row max is
    all-reduced (max, no gradient: it cancels out of ``L``), the exp-sums and target logits with
    ``all_reduce_sum_with_grad`` in one call, so the loss is the same on every rank and every
    rank's gradient is exact.  Runs in the dtype of ``logits`` (fp32 or fp64), autocast off.

    Args:
        logits: ``[N, K]`` logits of the global batch against this rank's (kept) classes.
        target_col: ``[N]`` long, the target's column or ``-1`` where another rank owns it.
        extra: optional ``[N]`` per-sample values summed over ranks in the same all-reduce.

    Returns:
        ``(loss, extra summed over ranks [N] or None)``.
    """
    with torch.autocast(device_type=logits.device.type, enabled=False):
        n = logits.shape[0]
        local_target = target_values(logits, target_col)
        row_max = (logits.detach().max(dim=1).values if logits.shape[1] > 0
                   else logits.new_full((n,), float("-inf")))
        all_reduce(row_max, "max")
        sum_exp = torch.exp(logits - row_max[:, None]).sum(dim=1)
        columns = [sum_exp, local_target] + ([extra] if extra is not None else [])
        parts = all_reduce_sum_with_grad(torch.stack(columns, dim=1))
        loss = (torch.log(parts[:, 0]) + row_max - parts[:, 1]).mean()
        return loss, (parts[:, 2] if extra is not None else None)
