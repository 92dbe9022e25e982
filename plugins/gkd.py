r"""GKD: Grouped Knowledge Distillation (Zhao et al., AAAI 2023, arXiv 2304.04462), class-sharded.

For one sample with student logits :math:`z^S`, teacher logits :math:`z^T` (both CosFace margin
logits) and temperature :math:`T`, let :math:`p = \mathrm{softmax}(z / T)` over the classes.  The
classes split into a *primary* group :math:`P` (the target class and the classes ranked highest)
and the *secondary* group :math:`S` (the rest).  With group masses
:math:`p(G) = \sum_{c \in G} p_c` and the distributions renormalised inside a group,
:math:`\tilde p^G_c = p_c / p(G)`:

.. math::

    \mathcal{L}_{bin} &= T^2 \sum_{G \in \{P, S\}} p^T(G) \log \frac{p^T(G)}{p^S(G)}

    \mathcal{L}_{P} &= T^2 \sum_{c \in P} \tilde p^{T,P}_c \log \frac{\tilde p^{T,P}_c}
                                                                   {\tilde p^{S,P}_c}
    \qquad \mathcal{L}_{S} = \text{the same over } S

    \mathcal{L}_{GKD} &= \alpha \mathcal{L}_{bin} + \beta \mathcal{L}_{P} + \lambda \mathcal{L}_{S}

each averaged over the batch.  The parts decompose the full distillation term exactly:

.. math::

    \mathrm{KL}(p^T \,\|\, p^S) = \mathrm{KL}_{bin} + p^T(P)\,\mathrm{KL}_P + p^T(S)\,\mathrm{KL}_S

Primary group (as the official training script does it): the target class plus the ``k - 1``
highest *non-target* classes of each sample, ranked by the student's logits (``rank_by="student"``)
or the teacher's; so ``|P| = k`` (``k`` is capped at the class count).  Ties at the boundary:
every non-target class whose ranking logit is ``>=`` the ``(k-1)``-th largest non-target ranking
logit is primary, so exact ties can make ``P`` larger than ``k`` (never smaller).

Adaptive ``k`` (``tau`` set; the ``k`` argument is then not used): sum the softmax (temperature 1)
of the ranking logits over the batch, sort the classes by that mass, and take the smallest
``k`` in ``1, 1 + k_step, 1 + 2 k_step, ...`` (``k_step = 100`` officially) whose top-``k`` mass
reaches ``tau * batch_size``, or ``k = C`` (all classes) when no candidate below ``C`` does
(the official loop has no such fallback).  That one ``k`` then
defines every sample's own top-``k`` group as above.  The official script (gkd_adaptive.py) sums
over each GPU's OWN batch of 128, so ``k`` is chosen per block of ``k_group`` consecutive samples
(``grouped_kd_loss``: the whole batch by default; ``GKDHead``: each rank's own batch by default,
or ``tau_batch`` samples of the global batch, which keeps the run identical on any GPU count).

Margin: CosFace only, for both classifiers, as in the official code; ``GKDHead`` refuses an
ArcFace margin by name rather than silently training CosFace.

Numerics: every log-sum-exp is taken over its own group with its own maximum, masked entries are
``-inf`` through ``torch.where`` (no ``-1000`` offsets), and an empty group contributes exactly
zero (e.g. ``k >= C`` leaves ``S`` empty), so huge logit gaps give neither NaN nor inf in the
loss or its gradient.

Sharded computation (``GKDHead``): rank ``r`` holds the logits of its classes only
(``[N, C / W]`` for the global batch of ``N``).  Group maxima are all-reduced (max), group sums
with ``all_reduce_sum_with_grad`` (identity backward, so gradients are exact), and each sample's
``(k-1)``-th largest ranking logit is found by bisection on the order-preserving integer key of
its float bit pattern with all-reduced counts (exact, at most 32 rounds in float32 and 64 in
float64, each moving ``[N]`` integers).  No rank ever holds a full logit row.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Tuple, Union

import torch
import torch.nn.functional as F

from .distributed import all_gather_no_grad, all_reduce, all_reduce_sum_with_grad

RANKINGS = ("student", "teacher")


class GKDParts(NamedTuple):
    """What ``grouped_kd_loss`` returns: scalar tensors (batch means) and the ``k`` used.

    ``total = alpha * binary + beta * primary + lamda * secondary``; every part already carries
    the ``T^2`` factor.  ``k_used`` is the primary-group size before ties (after the class-count
    cap, or as chosen by the adaptive rule; with several adaptive blocks, their mean -- an int
    when they agree).
    """
    total: torch.Tensor
    binary: torch.Tensor
    primary: torch.Tensor
    secondary: torch.Tensor
    k_used: Union[int, float]


class _Local:
    """Reductions over the class axis when one process holds every class (all no-ops)."""

    distributed = False

    def sum_with_grad(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def max(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def min(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        return t


class _Sharded(_Local):
    """Reductions over the class axis when every rank holds a slice of the classes."""

    distributed = True

    def sum_with_grad(self, t: torch.Tensor) -> torch.Tensor:
        return all_reduce_sum_with_grad(t)

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        return all_reduce(t.detach().clone(), "sum")

    def max(self, t: torch.Tensor) -> torch.Tensor:
        return all_reduce(t.detach().clone(), "max")

    def min(self, t: torch.Tensor) -> torch.Tensor:
        return all_reduce(t.detach().clone(), "min")

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        return all_gather_no_grad(t)


def _masked_max(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Row-wise max of ``x [N, L]`` over ``mask``; ``-inf`` for an empty row (also when L = 0)."""
    if x.shape[1] == 0:
        return x.new_full((x.shape[0],), -math.inf)
    return torch.where(mask, x, -math.inf).amax(dim=1)


def _order_keys(x: torch.Tensor) -> torch.Tensor:
    """Integers ordered like the floats ``x`` (float32 -> int32, float64 -> int64; -0 == +0)."""
    x = x.detach() + 0.0  # -0.0 + 0.0 == +0.0, so the two zeros share one key
    if x.dtype == torch.float64:
        bits, flip = x.view(torch.int64), 0x7FFF_FFFF_FFFF_FFFF
    else:
        bits, flip = x.float().view(torch.int32), 0x7FFF_FFFF
    return torch.where(bits < 0, bits ^ flip, bits)


def _kth_largest_key(keys: torch.Tensor, m: int, reduce: _Local) -> torch.Tensor:
    """Key of the ``m``-th largest entry of each row of the (sharded) key matrix ``[N, L]``.

    Bisection on the key value: the answer is the largest ``t`` with ``#{key >= t} >= m``, counts
    summed over ranks.  It runs the number of rounds that closes any interval of the key type
    (32 for int32 keys, 64 for int64): a converged row stays put (``mid == lo``), so no round
    needs the host to ask whether all rows have converged -- no host-device synchronisation, and
    every rank runs the same rounds.  Returns ``[N]`` int64.
    """
    n = keys.shape[0]
    big = torch.iinfo(keys.dtype)
    if keys.shape[1] == 0:
        local_lo, local_hi = keys.new_full((n,), big.max), keys.new_full((n,), big.min)
    else:
        local_lo, local_hi = keys.amin(dim=1), keys.amax(dim=1)
    lo = reduce.min(local_lo.long())             # count(key >= lo) = all classes >= m
    hi = reduce.max(local_hi.long()) + 1         # count(key >= hi) = 0 < m
    for _ in range(torch.iinfo(keys.dtype).bits):   # hi - lo <= 2 ** bits at the start
        mid = (lo >> 1) + (hi >> 1) + (lo & hi & 1)  # floor((lo + hi) / 2) without overflow
        count = reduce.sum((keys >= mid.to(keys.dtype)[:, None]).sum(dim=1))
        take = count >= m
        lo, hi = torch.where(take, mid, lo), torch.where(take, hi, mid)
    return lo


def _primary_mask(rank_logits: torch.Tensor, target: torch.Tensor, k: Union[int, torch.Tensor],
                  num_classes: int, reduce: _Local) -> torch.Tensor:
    """Bool ``[N, L]``: target class, plus non-target classes ranked within the top ``k - 1``.

    ``k`` is one int for every sample or a ``[N]`` int64 tensor (one per sample)."""
    if not isinstance(k, torch.Tensor):
        m = k - 1
        if m <= 0:
            return target
        if m >= num_classes - 1:
            return torch.ones_like(target)
    else:
        m = (k - 1).clamp(min=1, max=max(num_classes - 2, 1))
    non_target = torch.where(target, -math.inf, rank_logits.detach())
    if reduce.distributed:
        keys = _order_keys(non_target)
        threshold = _kth_largest_key(keys, m, reduce)
        mask = target | (keys >= threshold.to(keys.dtype)[:, None])
    elif isinstance(k, torch.Tensor):
        top = non_target.topk(int(m.max()), dim=1).values if non_target.shape[0] else non_target
        threshold = top.gather(1, (m - 1)[:, None]) if non_target.shape[0] else top[:, :1]
        mask = target | (non_target >= threshold)
    else:
        threshold = non_target.topk(m, dim=1).values[:, -1:]
        return target | (non_target >= threshold)
    if isinstance(k, torch.Tensor):   # the per-sample edge cases the clamp above papered over
        mask = torch.where((k <= 1)[:, None], target, mask)
        mask = torch.where((k >= num_classes)[:, None], torch.ones_like(mask), mask)
    return mask


@torch.no_grad()
def _adaptive_k(rank_logits: torch.Tensor, tau: float, k_step: int, num_classes: int,
                reduce: _Local, group: int) -> torch.Tensor:
    """Per-sample ``k`` ``[N]`` (int64): for each block of ``group`` consecutive rows, the smallest
    ``k`` in ``1, 1 + k_step, ...`` below ``num_classes`` whose top-``k`` block-summed softmax
    mass (temperature 1) reaches ``tau * group``; ``num_classes`` if none does."""
    n, width = rank_logits.shape
    blocks = n // group
    x = rank_logits.double()
    row_max = reduce.max(_masked_max(x, torch.ones_like(x, dtype=torch.bool)))
    row_sum = reduce.sum(torch.exp(x - row_max[:, None]).sum(dim=1))
    prob = torch.exp(x - row_max[:, None] - row_sum.log()[:, None])              # [N, L]
    mass = prob.reshape(blocks, group, width).sum(dim=1)                          # [G, L]
    if reduce.distributed:  # pad to a common width with zero mass, gather -> [G, W * max L]
        max_width = int(reduce.max(torch.tensor([width], device=x.device)).item())
        gathered = reduce.gather(F.pad(mass, (0, max_width - width)))             # [W * G, Lm]
        mass = gathered.reshape(-1, blocks, max_width).transpose(0, 1).reshape(blocks, -1)
    cumulative = mass.sort(dim=1, descending=True).values.cumsum(dim=1)
    candidates = torch.arange(1, num_classes, k_step, device=x.device)
    reached = cumulative[:, candidates - 1] >= tau * group                        # [G, K]
    first = candidates[reached.int().argmax(dim=1)] if candidates.numel() else \
        torch.full((blocks,), num_classes, dtype=torch.long, device=x.device)
    k = torch.where(reached.any(dim=1), first, torch.full_like(first, num_classes))
    return k.repeat_interleave(group)


def _group_kd(student: torch.Tensor, teacher: torch.Tensor, primary: torch.Tensor,
              temperature: float, reduce: _Local) -> Tuple[torch.Tensor, ...]:
    """Per-sample ``(binary, KL_P, KL_S)``, each ``[N]`` and without the ``T^2`` factor."""
    a, b = teacher.detach() / temperature, student / temperature
    groups = (primary, ~primary)
    maxima = reduce.max(torch.stack(
        [_masked_max(x, g) for g in groups for x in (a, b.detach())], dim=1))   # [N, 4]
    counts = reduce.sum(torch.stack([g.sum(dim=1) for g in groups], dim=1))     # [N, 2]
    shift = maxima.nan_to_num(neginf=0.0)   # an empty group's shift is never used
    # one exponential per logit, shifted by the maximum of its own group (so <= 1): [N, L] each
    e_a = torch.exp(a - torch.where(primary, shift[:, 0:1], shift[:, 2:3]))
    e_b = torch.exp(b - torch.where(primary, shift[:, 1:2], shift[:, 3:4]))
    weighted = e_a * (a - b)
    sums = [torch.where(g, x, 0.0).sum(dim=1) for g in groups for x in (e_a, e_b, weighted)]
    sums = reduce.sum_with_grad(torch.stack(sums, dim=1))                     # [N, 6]

    log_t, log_s, kl_within = [], [], []
    for i in range(2):
        present = counts[:, i] > 0
        m_a, m_b = shift[:, 2 * i], shift[:, 2 * i + 1]
        s_a, s_b, u = (torch.where(present, sums[:, 3 * i + j], 1.0) for j in (0, 1, 2))
        lse_a, lse_b = m_a + s_a.log(), m_b + s_b.log()            # log-sum-exp of the group
        kl_within.append(torch.where(present, u / s_a - lse_a + lse_b, 0.0))
        log_t.append(torch.where(present, lse_a, -math.inf))
        log_s.append(torch.where(present, lse_b, -math.inf))
    total_t = torch.logaddexp(*log_t)
    total_s = torch.logaddexp(*log_s)
    binary = 0.0
    for i in range(2):
        present = counts[:, i] > 0
        lt, ls = (torch.where(present, v[i] - tot, 0.0)
                  for v, tot in ((log_t, total_t), (log_s, total_s)))
        binary = binary + torch.where(present, lt.exp() * (lt - ls), 0.0)
    return binary, kl_within[0], kl_within[1]


def _check_options(temperature: float, k: int, tau: Optional[float], rank_by: str,
                   k_step: int) -> None:
    if temperature <= 0:
        raise ValueError(f"GKD temperature must be > 0, got {temperature}")
    if k < 1:
        raise ValueError(f"GKD k (primary-group size) must be >= 1, got {k}")
    if tau is not None and not 0.0 < tau <= 1.0:
        raise ValueError(f"GKD tau (adaptive mass) must lie in (0, 1] or be None, got {tau}")
    if rank_by not in RANKINGS:
        raise ValueError(f"GKD rank_by must be one of {RANKINGS}, got {rank_by!r}")
    if k_step < 1:
        raise ValueError(f"GKD k_step must be >= 1, got {k_step}")


def _check_group(n: int, group: Optional[int], where: str) -> int:
    """The adaptive block size for ``n`` rows (``None``: all of them); must divide ``n``."""
    group = n if group is None else int(group)
    if group < 1 or (n > 0 and n % group):
        raise ValueError(f"{where}: the adaptive-k block of {group} samples must be >= 1 and "
                         f"divide the (global) batch of {n} samples")
    return group


def _gkd_parts(student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor,
               num_classes: int, temperature: float, alpha: float, beta: float, lamda: float,
               k: int, tau: Optional[float], rank_by: str, k_step: int,
               reduce: _Local, k_group: Optional[int] = None) -> GKDParts:
    """Shared core: logits ``[N, L]`` of this process's classes, ``target`` bool ``[N, L]``;
    ``k_group`` rows per adaptive block (None: all ``N``)."""
    rank_logits = (student if rank_by == "student" else teacher).detach()
    n = rank_logits.shape[0]
    if tau is not None and n > 0:
        per_sample = _adaptive_k(rank_logits, tau, k_step, num_classes, reduce,
                                 _check_group(n, k_group, "GKD"))
        if bool((per_sample == per_sample[0]).all()):
            k = int(per_sample[0])
            k_used: Union[int, float] = k
        else:
            k, k_used = per_sample, float(per_sample.double().mean())
    else:
        k = min(k, num_classes)
        k_used = k
    primary = _primary_mask(rank_logits, target, k, num_classes, reduce)
    binary, kl_p, kl_s = _group_kd(student, teacher, primary, temperature, reduce)
    scale = temperature ** 2
    binary, kl_p, kl_s = (scale * v.mean() for v in (binary, kl_p, kl_s))
    return GKDParts(alpha * binary + beta * kl_p + lamda * kl_s, binary, kl_p, kl_s, k_used)


def grouped_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                    labels: torch.Tensor, temperature: float = 4.0, alpha: float = 1.0,
                    beta: float = 8.0, lamda: float = 0.0, k: int = 10000,
                    tau: Optional[float] = None, rank_by: str = "student",
                    k_step: int = 100, k_group: Optional[int] = None) -> GKDParts:
    r"""GKD loss of full logit rows on one process (see the module docstring for the equations).

    Args:
        student_logits: ``[N, C]`` student (margin) logits; gradients flow into them.
        teacher_logits: ``[N, C]`` teacher (margin) logits; treated as constants.
        labels: ``[N]`` target classes in ``[0, C)``; always in the primary group.
        temperature: ``T`` of the softened distributions; the parts carry ``T^2``.
        alpha, beta, lamda: weights of the binary, primary and secondary terms.
        k: primary-group size including the target (capped at ``C``); unused when ``tau`` is set.
        tau: adaptive mass fraction (0.93 in the paper), or None for the fixed ``k``.
        rank_by: ``"student"`` (official script) or ``"teacher"``: whose logits rank the classes.
        k_step: step of the adaptive search over ``k`` (100 officially).
        k_group: adaptive ``k`` only: rows per block that choose their own ``k`` (each block of
            ``k_group`` consecutive rows sums its own softmax mass); None: the whole batch.

    Returns:
        ``GKDParts(total, binary, primary, secondary, k_used)``; ``total`` is the scalar
        :math:`\mathcal{L}_{GKD}` to add to the classification loss.
    """
    _check_options(temperature, k, tau, rank_by, k_step)
    if student_logits.dim() != 2 or student_logits.shape != teacher_logits.shape:
        raise ValueError(f"grouped_kd_loss: student and teacher logits must both be [N, C], got "
                         f"{list(student_logits.shape)} and {list(teacher_logits.shape)}")
    n, num_classes = student_logits.shape
    if labels.shape != (n,):
        raise ValueError(f"grouped_kd_loss: labels must be [{n}], got {list(labels.shape)}")
    if n > 0 and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"grouped_kd_loss: labels must lie in [0, {num_classes}), found "
                         f"[{int(labels.min())}, {int(labels.max())}]")
    target = F.one_hot(labels.long(), num_classes).bool()
    dtype = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
    return _gkd_parts(student_logits.to(dtype), teacher_logits.to(dtype), target, num_classes,
                      temperature, alpha, beta, lamda, k, tau, rank_by, k_step, _Local(),
                      k_group)


def kd_warmup_weight(epoch: float, warmup_epochs: int) -> float:
    """``min(epoch / warmup_epochs, 1)`` (epochs counted from 0); 1 when ``warmup_epochs == 0``."""
    return 1.0 if warmup_epochs == 0 else min(epoch / warmup_epochs, 1.0)
