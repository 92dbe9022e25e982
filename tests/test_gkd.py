"""GKD: the loss against a plain re-derivation, its numerics, the sharded head on 1/2/4 gloo
processes against the one-process computation, and the class-mean classifier."""
import math

import pytest
import torch
import torch.nn.functional as F

from plugins.class_means import ClassMeanAccumulator
from plugins.gkd import _kth_largest_key, _Local, _order_keys, grouped_kd_loss
from plugins.heads import GKDHead
from tests.distributed_harness import run_distributed

TOL = dict(rtol=1e-9, atol=1e-9)  # float64 throughout unless a test says otherwise


# ---------------------------------------------------------------- independent re-derivation
def _softmax(row):
    top = max(row)
    e = [math.exp(v - top) for v in row]
    return [v / sum(e) for v in e]


def _reference_k(rank, k, tau, k_step):
    """The adaptive rule written out: grow k by k_step until the sorted batch mass >= tau * N."""
    num, classes = len(rank), len(rank[0])
    if tau is None:
        return min(k, classes)
    mass = [sum(_softmax(row)[c] for row in rank) for c in range(classes)]
    mass.sort(reverse=True)
    for cand in range(1, classes, k_step):
        if sum(mass[:cand]) >= tau * num:
            return cand
    return classes


def _reference_primary(rank_row, label, k):
    """Target + every non-target class >= the (k-1)-th largest non-target ranking logit."""
    others = sorted((v for c, v in enumerate(rank_row) if c != label), reverse=True)
    if k - 1 <= 0:
        return {label}
    if k - 1 >= len(others):
        return set(range(len(rank_row)))
    bound = others[k - 2]
    return {label} | {c for c, v in enumerate(rank_row) if c != label and v >= bound}


def _kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)


def reference_gkd(zs, zt, labels, T=4.0, alpha=1.0, beta=8.0, lamda=0.0, k=10, tau=None,
                  rank_by="student", k_step=100):
    """Per-sample loops in Python floats: returns (total, binary, primary, secondary, k, masks)."""
    zs, zt, labels = zs.tolist(), zt.tolist(), labels.tolist()
    rank = zs if rank_by == "student" else zt
    k = _reference_k(rank, k, tau, k_step)
    binary = primary = secondary = 0.0
    masks = []
    for i, y in enumerate(labels):
        P = _reference_primary(rank[i], y, k)
        S = set(range(len(zs[i]))) - P
        masks.append(P)
        pt, ps = _softmax([v / T for v in zt[i]]), _softmax([v / T for v in zs[i]])
        mass_t = [sum(pt[c] for c in G) for G in (P, S)]
        mass_s = [sum(ps[c] for c in G) for G in (P, S)]
        binary += _kl(mass_t, mass_s)
        for G, mt, ms, which in ((P, mass_t[0], mass_s[0], 0), (S, mass_t[1], mass_s[1], 1)):
            if not G:
                continue
            part = _kl([pt[c] / mt for c in sorted(G)], [ps[c] / ms for c in sorted(G)])
            if which == 0:
                primary += part
            else:
                secondary += part
    n, s = len(labels), T * T
    binary, primary, secondary = s * binary / n, s * primary / n, s * secondary / n
    return alpha * binary + beta * primary + lamda * secondary, binary, primary, secondary, k, masks


def _logits(n=6, c=40, seed=0, scale=12.0):
    g = torch.Generator().manual_seed(seed)
    zs = torch.randn(n, c, generator=g, dtype=torch.float64) * scale
    zt = torch.randn(n, c, generator=g, dtype=torch.float64) * scale
    labels = torch.randint(0, c, (n,), generator=g)
    return zs, zt, labels


def _assert_parts(parts, ref):
    total, binary, primary, secondary, k, _ = ref
    assert parts.k_used == k
    for got, want in zip((parts.total, parts.binary, parts.primary, parts.secondary),
                         (total, binary, primary, secondary)):
        assert abs(got.item() - want) <= 1e-9 * max(1.0, abs(want)), (got.item(), want)


# ---------------------------------------------------------------- grouped_kd_loss
@pytest.mark.parametrize("rank_by", ["student", "teacher"])
@pytest.mark.parametrize("k", [1, 7, 39, 40, 500])
def test_fixed_k_matches_reference(rank_by, k):
    zs, zt, labels = _logits()
    opts = dict(T=3.0, alpha=1.5, beta=8.0, lamda=0.7, k=k, rank_by=rank_by)
    parts = grouped_kd_loss(zs, zt, labels, temperature=3.0, alpha=1.5, beta=8.0, lamda=0.7,
                            k=k, rank_by=rank_by)
    _assert_parts(parts, reference_gkd(zs, zt, labels, **opts))


@pytest.mark.parametrize("rank_by", ["student", "teacher"])
@pytest.mark.parametrize("tau,k_step", [(0.5, 3), (0.93, 5), (0.99, 100), (1e-6, 100),
                                        (1.0, 100)])
def test_adaptive_k_matches_reference(rank_by, tau, k_step):
    zs, zt, labels = _logits(n=8, c=150, seed=1, scale=4.0)
    parts = grouped_kd_loss(zs, zt, labels, lamda=0.3, tau=tau, k_step=k_step, rank_by=rank_by)
    ref = reference_gkd(zs, zt, labels, lamda=0.3, tau=tau, k_step=k_step, rank_by=rank_by)
    _assert_parts(parts, ref)
    if tau == 1e-6:
        assert parts.k_used == 1          # the first candidate already holds the mass
    if tau == 1.0:
        assert parts.k_used == 150        # no candidate (1, 101) reaches all the mass
    if k_step == 3:
        assert parts.k_used % 3 == 1 and 1 < parts.k_used < 150


def test_ties_at_the_boundary_all_join_the_primary_group():
    zs, zt, labels = _logits(n=3, c=12, seed=2)
    zs[:, :] = torch.tensor([5.0, 4.0, 3.0, 3.0, 3.0, 1.0, 0.0, -1.0, -2.0, -3.0, -4.0, -5.0])
    labels[:] = torch.tensor([11, 0, 3])
    parts = grouped_kd_loss(zs, zt, labels, k=4, lamda=1.0)        # k - 1 = 3: third value ties
    ref = reference_gkd(zs, zt, labels, k=4, lamda=1.0)
    _assert_parts(parts, ref)
    assert ref[5][0] == {11, 0, 1, 2, 3, 4} and ref[5][2] == {3, 0, 1, 2, 4}


def test_decomposition_identity_on_the_parts():
    """T^2 KL(p_T || p_S) = Binary + p_T(P) * Primary + p_T(S) * Secondary, per sample."""
    zs, zt, labels = _logits(n=5, c=30, seed=3, scale=6.0)
    T = 4.0
    for i in range(5):
        parts = grouped_kd_loss(zs[i:i + 1], zt[i:i + 1], labels[i:i + 1], temperature=T,
                                alpha=1.0, beta=1.0, lamda=1.0, k=8)
        P = reference_gkd(zs[i:i + 1], zt[i:i + 1], labels[i:i + 1], T=T, k=8)[5][0]
        pt = F.softmax(zt[i] / T, dim=0)
        mass_p = pt[sorted(P)].sum()
        full = T * T * F.kl_div(F.log_softmax(zs[i] / T, dim=0), pt, reduction="sum")
        rebuilt = parts.binary + mass_p * parts.primary + (1 - mass_p) * parts.secondary
        torch.testing.assert_close(rebuilt, full, **TOL)
        assert parts.secondary > 0 and parts.binary > 0


def test_k_extremes_give_exact_zeros():
    zs, zt, labels = _logits(n=4, c=20, seed=4)
    everything = grouped_kd_loss(zs, zt, labels, k=25, lamda=1.0)
    assert everything.k_used == 20
    assert everything.binary.item() == 0.0 and everything.secondary.item() == 0.0
    full = 16.0 * F.kl_div(F.log_softmax(zs / 4, 1), F.softmax(zt / 4, 1), reduction="batchmean")
    torch.testing.assert_close(everything.primary, full, **TOL)
    target_only = grouped_kd_loss(zs, zt, labels, k=1, lamda=1.0)    # DKD: P = {target}
    assert target_only.primary.item() == 0.0


def test_gradient_matches_finite_differences():
    zs, zt, labels = _logits(n=3, c=15, seed=5, scale=3.0)
    zs.requires_grad_(True)
    func = lambda x: grouped_kd_loss(x, zt, labels, lamda=0.5, k=5).total  # noqa: E731
    assert torch.autograd.gradcheck(func, (zs,), eps=1e-6, atol=1e-6)


def test_huge_logit_gaps_stay_finite():
    c = 50
    zs = torch.full((4, c), -3.0e4)
    zt = torch.full((4, c), -2.0e4)
    zs[:, :3] = torch.tensor([3.0e4, 0.0, -1.0e4])
    zt[:, :3] = torch.tensor([2.0e4, 1.0e4, 0.0])
    zs[:, 10:] += torch.arange(c - 10, dtype=torch.float32)  # a secondary tail ~1e4 below
    labels = torch.tensor([0, 1, 2, 30])
    for k in (1, 3, 10, c):
        x = zs.clone().requires_grad_(True)
        parts = grouped_kd_loss(x, zt, labels, lamda=1.0, k=k)
        parts.total.backward()
        assert all(torch.isfinite(v) for v in parts[:4]), (k, parts)
        assert torch.isfinite(x.grad).all(), k
        assert parts.secondary >= 0 and parts.primary >= 0
    # the secondary term is a real KL of the tail even though its mass underflows
    tail = grouped_kd_loss(zs.double(), zt.double(), labels, lamda=1.0, k=3)
    assert tail.secondary.item() > 1.0


def test_bisection_selects_the_exact_kth_largest():
    g = torch.Generator().manual_seed(6)
    for dtype in (torch.float32, torch.float64):
        x = (torch.randn(5, 64, generator=g) * 1e3).to(dtype)
        x[0, :10] = 7.25                 # ties
        x[1, :20] = -0.0
        x[1, 20:30] = 0.0                # both zeros count as one value
        x[2, :5] = -math.inf
        keys = _order_keys(x)
        for m in (1, 2, 9, 10, 11, 33, 63, 64):
            want = _order_keys(x.topk(m, dim=1).values[:, -1])
            got = _kth_largest_key(keys, m, _Local())
            assert torch.equal(got, want.long()), (dtype, m)
        assert (keys[1, :20] == keys[1, 20]).all()


def test_loss_rejects_bad_input():
    zs, zt, labels = _logits(n=2, c=5)
    with pytest.raises(ValueError, match=r"both be \[N, C\]"):
        grouped_kd_loss(zs, zt[:, :4], labels)
    with pytest.raises(ValueError, match=r"labels must be \[2\]"):
        grouped_kd_loss(zs, zt, labels[:1])
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 5\), found \[.*, 5\]"):
        grouped_kd_loss(zs, zt, torch.tensor([0, 5]))
    for opts, msg in ((dict(k=0), "k .* >= 1"), (dict(tau=1.5), "tau"),
                      (dict(rank_by="both"), "rank_by must be one of"),
                      (dict(temperature=0.0), "temperature"), (dict(k_step=0), "k_step")):
        with pytest.raises(ValueError, match=msg):
            grouped_kd_loss(zs, zt, labels, **opts)


# ---------------------------------------------------------------- GKDHead
C, DS, DT, N = 23, 8, 6, 8
CONFIGS = [  # (options, epoch)
    (dict(k=5, lamda=0.5), 3),
    (dict(tau=0.6, k_step=4, rank_by="teacher", beta=4.0), 12),
    (dict(k=100, warmup_epochs=0, lamda=1.0), 0),
    # int(0.05 * num_local) <= positives on every world size: exactly the positive classes kept
    (dict(k=4, lamda=0.5, sample_rate=0.05), 4),
]


def _head_data(seed=7):
    g = torch.Generator().manual_seed(seed)
    return dict(f_s=torch.randn(N, DS, generator=g, dtype=torch.float64),
                f_t=torch.randn(N, DT, generator=g, dtype=torch.float64),
                w_s=torch.randn(C, DS, generator=g, dtype=torch.float64),
                w_t=torch.randn(C, DT, generator=g, dtype=torch.float64),
                labels=torch.tensor([3, 3, 22, 0, 9, 15, 6, 11]))


def _reference_head(data, opts, epoch, s=64.0, m=0.4):
    """One process, full logits: CE + warm-up * grouped_kd_loss, with plain margin logits."""
    f_s, w_s = data["f_s"].clone().requires_grad_(True), data["w_s"].clone().requires_grad_(True)
    kept = torch.arange(C)
    if "sample_rate" in opts:      # the configs above keep exactly the classes of the batch
        kept = torch.unique(data["labels"])
    labels = torch.searchsorted(kept, data["labels"])
    onehot = F.one_hot(labels, kept.numel()).double()
    z_s = s * (F.normalize(f_s) @ F.normalize(w_s[kept]).T - m * onehot)
    z_t = s * (F.normalize(data["f_t"]) @ F.normalize(data["w_t"][kept]).T - m * onehot)
    kd_opts = {key: v for key, v in opts.items() if key not in ("warmup_epochs", "sample_rate")}
    parts = grouped_kd_loss(z_s, z_t, labels, **kd_opts)
    warm = opts.get("warmup_epochs", 10)
    weight = 1.0 if warm == 0 else min(epoch / warm, 1.0)
    loss = F.cross_entropy(z_s, labels) + weight * parts.total
    loss.backward()
    return loss.detach(), f_s.grad, w_s.grad, parts.k_used, weight


def _run_head(rank, world, data, opts, epoch):
    head = GKDHead(DS, C, data["w_t"], **opts).double()
    with torch.no_grad():
        head.weight.copy_(data["w_s"][head.class_start:head.class_start + head.num_local])
    rows = N // world
    local = data["f_s"][rank * rows:(rank + 1) * rows].clone().requires_grad_(True)
    loss = head(local, data["labels"][rank * rows:(rank + 1) * rows],
                data["f_t"][rank * rows:(rank + 1) * rows], epoch)
    loss.backward()
    return dict(loss=loss.detach(), grad_f=local.grad, grad_w=head.weight.grad,
                start=head.class_start, num_local=head.num_local,
                stats={key: v.item() for key, v in head.stats.items()})


def _head_worker(rank, world, data):
    out = [_run_head(rank, world, data, opts, epoch) for opts, epoch in CONFIGS]
    acc = ClassMeanAccumulator(4, 3)   # each rank streams its own half of a small data set
    emb = torch.arange(24, dtype=torch.float64).reshape(8, 3) % 5 + 1
    lab = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    acc.update(emb[rank::world], lab[rank::world])
    out.append(acc.all_reduce().result(torch.float64))
    return out


def _check_world(results, world, data):
    rows = N // world
    for i, (opts, epoch) in enumerate(CONFIGS):
        loss, grad_f, grad_w, k, weight = _reference_head(data, opts, epoch)
        gathered_w = torch.cat([results[r][i]["grad_w"] for r in range(world)])
        torch.testing.assert_close(gathered_w, grad_w, rtol=1e-5, atol=1e-5)
        for rank in range(world):
            res = results[rank][i]
            torch.testing.assert_close(res["loss"], loss, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(res["grad_f"], grad_f[rank * rows:(rank + 1) * rows],
                                       rtol=1e-5, atol=1e-5)
            assert res["stats"]["k"] == k and res["stats"]["kd_weight"] == weight
            rebuilt = res["stats"]["ce"] + weight * res["stats"]["kd"]
            assert abs(rebuilt - loss.item()) < 1e-6


def test_head_one_process_matches_reference():
    data = _head_data()
    _check_world([[_run_head(0, 1, data, opts, epoch) for opts, epoch in CONFIGS]], 1, data)


@pytest.mark.parametrize("world", [2, 4])
def test_head_is_world_size_invariant(world):
    data = _head_data()
    results = run_distributed(_head_worker, world, args=(data,))
    _check_world(results, world, data)
    assert [r[0]["num_local"] for r in results] == ([12, 11] if world == 2 else [6, 6, 6, 5])
    expected = F.normalize(torch.stack([
        F.normalize(torch.arange(24, dtype=torch.float64).reshape(8, 3) % 5 + 1)[[c, c + 4]].sum(0)
        for c in range(4)]))
    for r in results:
        torch.testing.assert_close(r[-1], expected, **TOL)


def test_head_warmup_weight_and_stats():
    data = _head_data()
    for epoch, weight in ((0, 0.0), (2.5, 0.25), (10, 1.0), (37, 1.0)):
        res = _run_head(0, 1, data, dict(k=5, warmup_epochs=10), epoch)
        assert res["stats"]["kd_weight"] == weight
        assert abs(res["stats"]["ce"] + weight * res["stats"]["kd"] - res["loss"].item()) < 1e-9
        assert set(res["stats"]) == {"ce", "kd", "binary", "primary", "secondary", "kd_weight",
                                     "k"}
    assert res["stats"]["kd"] > 0


def test_head_sample_rate_distills_over_kept_classes():
    data = _head_data()
    torch.manual_seed(0)
    head = GKDHead(DS, C, data["w_t"], k=4, lamda=0.5, sample_rate=0.5).double()
    with torch.no_grad():
        head.weight.copy_(data["w_s"])
    loss = head(data["f_s"], data["labels"], data["f_t"], 20)
    kept = head.sampled_index
    assert kept.numel() == 11 and set(data["labels"].tolist()) <= set(kept.tolist())
    column = {c: i for i, c in enumerate(kept.tolist())}
    y = torch.tensor([column[c] for c in data["labels"].tolist()])
    onehot = F.one_hot(y, kept.numel()).double()
    z_s = 64 * (F.normalize(data["f_s"]) @ F.normalize(data["w_s"][kept]).T - 0.4 * onehot)
    z_t = 64 * (F.normalize(data["f_t"]) @ F.normalize(data["w_t"][kept]).T - 0.4 * onehot)
    want = F.cross_entropy(z_s, y) + grouped_kd_loss(z_s, z_t, y, k=4, lamda=0.5).total
    torch.testing.assert_close(loss.detach(), want, **TOL)


def test_head_rejects_mismatched_teacher_and_inputs():
    w_t = torch.randn(C, DT)
    with pytest.raises(ValueError, match=r"expected shape .* = \[23, 6\], found \[22, 6\]"):
        GKDHead(DS, C, w_t[:22])
    with pytest.raises(ValueError, match=r"= \[23, 7\], found \[23, 6\]"):
        GKDHead(DS, C, w_t, teacher_embedding_size=7)
    with pytest.raises(ValueError, match="must be the teacher's classifier tensor"):
        GKDHead(DS, C, None)
    with pytest.raises(ValueError, match="sample_rate"):
        GKDHead(DS, C, w_t, sample_rate=0.0)
    with pytest.raises(ValueError, match="rank_by"):
        GKDHead(DS, C, w_t, rank_by="mean")
    head = GKDHead(DS, C, w_t)
    assert head.sharded_keys == ("weight", "teacher_weight")
    assert head.state_dict()["teacher_weight"].shape == (C, DT)
    f_s, f_t, labels = torch.randn(4, DS), torch.randn(4, DT), torch.tensor([0, 1, 2, 3])
    with pytest.raises(ValueError, match=r"\[B, 8\], \[B, 6\], \[B\]; found"):
        head(f_s, labels, torch.randn(4, DS), 0)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 23\)"):
        head(f_s, torch.tensor([0, 1, 2, 23]), f_t, 0)
    with pytest.raises(ValueError, match="epoch"):
        head(f_s, labels, f_t, -1)


# ---------------------------------------------------------------- ClassMeanAccumulator
def test_class_means_stream_and_normalise():
    g = torch.Generator().manual_seed(8)
    emb, lab = torch.randn(30, 5, generator=g), torch.randint(0, 4, (30,), generator=g)
    lab[:4] = torch.arange(4)
    acc = ClassMeanAccumulator(4, 5)
    acc.update(emb[:13], lab[:13])
    acc.update(emb[13:].half(), lab[13:])
    unit = F.normalize(emb.double(), dim=1)
    unit[13:] = F.normalize(emb[13:].half().double(), dim=1)
    want = F.normalize(torch.stack([unit[lab == c].mean(0) for c in range(4)]), dim=1)
    torch.testing.assert_close(acc.result(torch.float64), want, **TOL)
    raw = ClassMeanAccumulator(4, 5, normalize_inputs=False)
    raw.update(emb, lab)
    want_raw = F.normalize(torch.stack([emb[lab == c].double().mean(0) for c in range(4)]), dim=1)
    torch.testing.assert_close(raw.result(torch.float64), want_raw, **TOL)


def test_class_means_errors():
    acc = ClassMeanAccumulator(6, 2)
    acc.update(torch.ones(3, 2), torch.tensor([0, 2, 4]))
    with pytest.raises(ValueError, match=r"3 of 6 classes have no sample \(first: \[1, 3, 5\]\)"):
        acc.result()
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 6\), found range \[0, 6\]"):
        acc.update(torch.ones(2, 2), torch.tensor([0, 6]))
    with pytest.raises(ValueError, match=r"embeddings must be \[N, 2\]"):
        acc.update(torch.ones(2, 3), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"labels must be \[2\]"):
        acc.update(torch.ones(2, 2), torch.tensor([0]))
