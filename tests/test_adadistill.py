import math

import pytest
import torch

from plugins.adadistill import occurrence_index
from plugins.heads import AdaDistillHead
from plugins.distributed import shard_range
from tests.distributed_harness import run_distributed

D = 6
TOL = dict(atol=1e-5, rtol=1e-5)


def reference_step(centers, student, teacher, labels, alpha, margin, s, m):
    """One AdaDistill step re-derived from the paper, float64, one sample at a time.

    EMA (before the loss, in batch order): w_y <- a_i w_y + (1 - a_i) t_i with t_i = f_t_i/|f_t_i|,
    a_i = clamp(cos_st, 1e-6, 1) (plain) or clamp(clamp(cos_st, -1, 1) * clamp(cos(w_y, t_i),
    1e-6, 1), 1e-6, 1) (weighted).  Loss: mean over samples of -log softmax of
    s * [cos(theta_y + m) | cos(theta_y) - m on the target, cos(theta_j) elsewhere].
    Returns (loss, new centers, grad wrt student, alphas used, alphas weighted, cos_st).
    """
    table = centers.double().clone()
    n = labels.numel()
    alphas_w, cos_sts = [], []
    for i in range(n):
        y = int(labels[i])
        t = teacher[i].double() / teacher[i].double().norm()
        f = student[i].double() / student[i].double().norm()
        cos_st = min(max(float(f @ t), -1.0), 1.0)
        w = table[y].clone()
        cos_wt = min(max(float(w @ t) / float(w.norm()), 1e-6), 1.0)
        a_weighted = min(max(cos_st * cos_wt, 1e-6), 1.0)
        a_plain = min(max(cos_st, 1e-6), 1.0)
        alphas_w.append(a_weighted)
        cos_sts.append(cos_st)
        if alpha != "fixed":
            a = a_weighted if alpha == "weighted" else a_plain
            table[y] = a * w + (1 - a) * t
    x = student.double().clone().requires_grad_(True)
    total = 0.0
    for i in range(n):
        y = int(labels[i])
        cos = torch.stack([(x[i] / x[i].norm()) @ (table[j] / table[j].norm())
                           for j in range(table.shape[0])])
        if margin == "arcface":
            target = torch.cos(torch.acos(cos[y]) + m)
        else:
            target = cos[y] - m
        logits = s * torch.where(torch.arange(len(cos)) == y, target, cos)
        total = total - torch.log(torch.exp(logits[y]) / torch.exp(logits).sum())
    loss = total / n
    loss.backward()
    return loss.item(), table, x.grad, alphas_w, cos_sts


def make_batch(seed, n, num_classes, labels=None):
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(n, D, generator=g)
    student = 0.7 * teacher + torch.randn(n, D, generator=g)  # correlated, like a real student
    if labels is None:
        labels = torch.randperm(num_classes, generator=g)[:n]
    return student, teacher, torch.as_tensor(labels)


def run_head(head, batches):
    """Forward + backward each (student, teacher, labels); returns per-step loss, grad, centers."""
    out = []
    for student, teacher, labels in batches:
        x = student.clone().requires_grad_(True)
        loss = head(x, labels, teacher)
        loss.backward()
        out.append({"loss": loss.item(), "grad": x.grad, "centers": head.centers.clone(),
                    "stats": {k: v.item() for k, v in head.stats.items()}})
    return out


@pytest.mark.parametrize("margin,s,m", [("arcface", 64.0, 0.45), ("cosface", 64.0, 0.35)])
@pytest.mark.parametrize("alpha", ["weighted", "plain"])
def test_three_steps_match_the_paper_equations(margin, s, m, alpha):
    torch.manual_seed(0)
    head = AdaDistillHead(D, 12, margin=margin, s=s, m=m, alpha=alpha)
    init = head.centers.clone()
    batches = [make_batch(seed, 8, 12) for seed in range(3)]  # distinct labels in each batch
    got = run_head(head, batches)
    table = init
    for step, (student, teacher, labels) in enumerate(batches):
        loss, table, grad, alphas_w, cos_sts = reference_step(table, student, teacher, labels,
                                                              alpha, margin, s, m)
        assert abs(got[step]["loss"] - loss) < 1e-5 * max(1.0, abs(loss))
        torch.testing.assert_close(got[step]["centers"].double(), table, **TOL)
        torch.testing.assert_close(got[step]["grad"].double(), grad, **TOL)
        stats = got[step]["stats"]
        assert abs(stats["mean_alpha_weighted"] - sum(alphas_w) / 8) < 1e-5
        assert abs(stats["mean_cos_st"] - sum(cos_sts) / 8) < 1e-5
        assert abs(stats["mean_alpha"] - sum(min(max(c, 1e-6), 1) for c in cos_sts) / 8) < 1e-5
    assert not torch.equal(got[-1]["centers"], init)


@pytest.mark.parametrize("alpha", ["weighted", "plain"])
def test_repeated_labels_update_sequentially_in_batch_order(alpha):
    torch.manual_seed(1)
    head = AdaDistillHead(D, 5, margin="arcface", s=32.0, m=0.45, alpha=alpha)
    labels = [2, 0, 2, 2, 4, 0, 1, 2]  # class 2 four times, class 0 twice
    batches = [make_batch(seed, 8, 5, labels) for seed in (10, 11)]
    init = head.centers.clone()
    got = run_head(head, batches)
    table = init
    for step, (student, teacher, labels) in enumerate(batches):
        loss, table, grad, _, _ = reference_step(table, student, teacher, labels, alpha,
                                                 "arcface", 32.0, 0.45)
        assert abs(got[step]["loss"] - loss) < 1e-5 * max(1.0, abs(loss))
        torch.testing.assert_close(got[step]["centers"].double(), table, **TOL)
        torch.testing.assert_close(got[step]["grad"].double(), grad, **TOL)
    # class 3 never appears: its center is untouched
    torch.testing.assert_close(got[-1]["centers"][3], init[3], atol=0, rtol=0)


def test_last_writer_only_would_differ():
    # the sequential rule is not "one write wins": the result depends on all four samples
    torch.manual_seed(2)
    head = AdaDistillHead(D, 3, alpha="plain", s=16.0)
    init = head.centers.clone()
    student, teacher, labels = make_batch(3, 4, 3, [1, 1, 1, 1])
    head(student, labels, teacher)
    _, table_last, _, _, _ = reference_step(init, student[3:], teacher[3:], labels[3:], "plain",
                                            "arcface", 16.0, 0.45)
    assert (head.centers[1].double() - table_last[1]).abs().max() > 1e-3


def test_fixed_mode_keeps_the_teacher_classifier():
    torch.manual_seed(3)
    head = AdaDistillHead(D, 10, margin="cosface", s=64.0, m=0.35, alpha="fixed")
    with pytest.raises(RuntimeError, match="load_full_centers"):
        head(*(lambda s, t, y: (s, y, t))(*make_batch(0, 4, 10)))
    classifier = torch.randn(10, D)
    head.load_full_centers(classifier)
    batches = [make_batch(seed, 6, 10, [1, 4, 4, 0, 9, 1]) for seed in range(2)]
    got = run_head(head, batches)
    for step, (student, teacher, labels) in enumerate(batches):
        loss, table, grad, _, _ = reference_step(classifier, student, teacher, labels, "fixed",
                                                 "cosface", 64.0, 0.35)
        torch.testing.assert_close(got[step]["centers"], classifier, atol=0, rtol=0)
        assert abs(got[step]["loss"] - loss) < 1e-5 * max(1.0, abs(loss))
        torch.testing.assert_close(got[step]["grad"].double(), grad, **TOL)
    # a state_dict load also counts as loading the classifier
    fresh = AdaDistillHead(D, 10, margin="cosface", alpha="fixed")
    fresh.load_state_dict(head.state_dict())
    fresh(batches[0][0], batches[0][2], batches[0][1])
    torch.testing.assert_close(fresh.centers, classifier, atol=0, rtol=0)


def test_ema_stays_fp32_under_autocast():
    torch.manual_seed(4)
    batch = make_batch(5, 8, 12)
    plain_head = AdaDistillHead(D, 12, s=16.0)
    auto_head = AdaDistillHead(D, 12, s=16.0)
    auto_head.load_state_dict(plain_head.state_dict())
    ref = run_head(plain_head, [batch])[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = run_head(auto_head, [batch])[0]
    assert auto_head.centers.dtype == torch.float32
    torch.testing.assert_close(got["centers"], ref["centers"], atol=0, rtol=0)
    assert abs(got["loss"] - ref["loss"]) < 0.05 * abs(ref["loss"])  # bf16 logit matmul
    assert got["grad"].dtype == torch.float32


def test_occurrence_index():
    labels = torch.tensor([5, 3, 5, 5, 1, 3, 7])
    assert occurrence_index(labels).tolist() == [0, 0, 1, 2, 0, 1, 0]
    assert occurrence_index(torch.empty(0, dtype=torch.long)).tolist() == []


def test_input_and_argument_errors():
    with pytest.raises(ValueError, match="alpha must be one of"):
        AdaDistillHead(D, 10, alpha="adaptive")
    with pytest.raises(ValueError, match="margin must be one of"):
        AdaDistillHead(D, 10, margin="sphereface")
    head = AdaDistillHead(D, 10)
    student, teacher, labels = make_batch(0, 4, 10)
    with pytest.raises(ValueError, match=r"embeddings #1 must be \[B, D\]"):
        head(student, labels, teacher[:, :4])
    with pytest.raises(ValueError, match=r"labels must be in \[0, 10\)"):
        head(student, torch.tensor([0, 1, 2, 10]), teacher)
    with pytest.raises(ValueError, match=r"expects a \[C, D\] = \[10, 6\] table, got \[6, 10\]"):
        head.load_full_centers(torch.zeros(D, 10))
    head.half()
    with pytest.raises(RuntimeError, match="centers must stay fp32"):
        head(student, labels, teacher)


# ---------------------------------------------------------------- world-size invariance
C_MAIN = 10


def scenarios():
    g = torch.Generator().manual_seed(123)
    out = []

    def add(name, margin, alpha, num_classes, label_lists, sample_rate=1.0):
        init = torch.randn(num_classes, D, generator=g) * 0.01
        batches = [make_batch(len(out) * 10 + k, 8, num_classes, labels)
                   for k, labels in enumerate(label_lists)]
        out.append({"name": name, "margin": margin, "alpha": alpha, "num_classes": num_classes,
                    "init": init, "batches": batches, "sample_rate": sample_rate})

    add("arc-weighted", "arcface", "weighted", C_MAIN, [None, None, None])
    add("arc-weighted-repeats", "arcface", "weighted", C_MAIN,
        [[2, 7, 2, 2, 0, 7, 9, 2], [9, 9, 1, 3, 9, 6, 6, 1]])
    add("cos-plain-repeats", "cosface", "plain", C_MAIN, [[4, 4, 4, 8, 8, 0, 5, 4], None])
    add("arc-fixed", "arcface", "fixed", C_MAIN, [[1, 2, 1, 3, 5, 8, 13 % C_MAIN, 1]])
    add("empty-shard", "arcface", "weighted", 3, [[0, 2, 2, 1, 0, 2, 1, 1]])
    add("sampled", "arcface", "weighted", 40,
        [[0, 11, 11, 23, 39, 5, 30, 17], [38, 2, 2, 21, 9, 12, 29, 33]], sample_rate=0.25)
    return out


def _invariance_worker(rank, world, cases):
    results = {}
    for case in cases:
        torch.manual_seed(1000 + rank)
        head = AdaDistillHead(D, case["num_classes"], margin=case["margin"], s=64.0, m=0.45,
                              alpha=case["alpha"], sample_rate=case["sample_rate"])
        head.load_full_centers(case["init"])
        steps = []
        for student, teacher, labels in case["batches"]:
            rows = slice(rank * 8 // world, (rank + 1) * 8 // world)
            x = student[rows].clone().requires_grad_(True)
            loss = head(x, labels[rows], teacher[rows])
            loss.backward()
            steps.append({"loss": loss.item(), "grad": x.grad, "centers": head.centers.clone(),
                          "stats": {k: v.item() for k, v in head.stats.items()},
                          "kept": head.last_kept_classes.clone()})
        results[case["name"]] = {"steps": steps, "state": head.state_dict(),
                                 "class_start": head.class_start, "num_local": head.num_local}
    return results


@pytest.fixture(scope="module")
def runs():
    cases = scenarios()
    return {1: [_invariance_worker(0, 1, cases)],
            2: run_distributed(_invariance_worker, 2, (cases,)),
            4: run_distributed(_invariance_worker, 4, (cases,))}


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("name", ["arc-weighted", "arc-weighted-repeats", "cos-plain-repeats",
                                  "arc-fixed", "empty-shard"])
def test_same_loss_gradients_and_centers_on_any_world_size(runs, world, name):
    single = runs[1][0][name]["steps"]
    per_rank = [r[name]["steps"] for r in runs[world]]
    for step, ref in enumerate(single):
        for rank in range(world):
            assert abs(per_rank[rank][step]["loss"] - ref["loss"]) < 1e-5 * max(1, ref["loss"])
            for key, value in ref["stats"].items():
                assert abs(per_rank[rank][step]["stats"][key] - value) < 1e-5, key
        grad = torch.cat([per_rank[r][step]["grad"] for r in range(world)])
        torch.testing.assert_close(grad, ref["grad"], **TOL)
        centers = torch.cat([per_rank[r][step]["centers"] for r in range(world)])
        torch.testing.assert_close(centers, ref["centers"], **TOL)
    if name == "empty-shard" and world == 4:
        assert runs[4][3][name]["num_local"] == 0


@pytest.mark.parametrize("world", [1, 2, 4])
def test_sampled_classes_always_contain_the_positives(runs, world):
    cases = {c["name"]: c for c in scenarios()}
    case = cases["sampled"]
    single = runs[1][0]["sampled"]["steps"]
    for rank, result in enumerate(runs[world]):
        start, num_local = shard_range(40, rank, world)
        for step, (_, _, labels) in enumerate(case["batches"]):
            kept = result["sampled"]["steps"][step]["kept"]
            positives = {y for y in labels.tolist() if start <= y < start + num_local}
            assert positives <= set(kept.tolist())
            assert kept.numel() == max(int(0.25 * num_local), len(positives))
            assert all(start <= k < start + num_local for k in kept.tolist())
            assert math.isfinite(result["sampled"]["steps"][step]["loss"])
    # the EMA does not depend on the sampling
    for step in range(2):
        centers = torch.cat([r["sampled"]["steps"][step]["centers"] for r in runs[world]])
        torch.testing.assert_close(centers, single[step]["centers"], **TOL)


def reshard(shards, num_classes, world):
    """Concatenate per-rank shards in rank order and re-split for ``world`` ranks."""
    full = torch.cat(shards, dim=0)
    assert full.shape[0] == num_classes
    return [full[start:start + n] for start, n in
            (shard_range(num_classes, r, world) for r in range(world))]


def test_state_saved_on_4_ranks_reloads_on_1_and_2(runs):
    assert AdaDistillHead.sharded_keys == ("centers",)
    saved = [r["arc-weighted"]["state"]["centers"] for r in runs[4]]
    single_state = runs[1][0]["arc-weighted"]["state"]["centers"]
    one = reshard(saved, C_MAIN, 1)
    torch.testing.assert_close(one[0], single_state, **TOL)
    head = AdaDistillHead(D, C_MAIN)
    head.load_state_dict({"centers": one[0]})
    torch.testing.assert_close(head.centers, single_state, **TOL)
    two = reshard(saved, C_MAIN, 2)
    for rank in range(2):
        torch.testing.assert_close(two[rank], runs[2][rank]["arc-weighted"]["state"]["centers"],
                                   **TOL)


def test_non_finite_sample_does_not_poison_its_center():
    torch.manual_seed(0)
    head = AdaDistillHead(8, 5, margin="arcface", s=16.0, m=0.3)
    student, teacher = torch.randn(4, 8), torch.randn(4, 8)
    labels = torch.tensor([0, 1, 2, 3])
    before = head.centers.clone()
    bad = student.clone()
    bad[1] = float("inf")                       # fp16 overflow in one student embedding
    bad_teacher = teacher.clone()
    bad_teacher[2] = float("nan")               # and one broken teacher embedding
    loss = head(bad, labels, bad_teacher)
    assert not torch.isfinite(loss)             # the trainer skips this step
    assert torch.isfinite(head.centers).all()
    torch.testing.assert_close(head.centers[1:3], before[1:3])   # bad samples updated nothing
    assert not torch.equal(head.centers[0], before[0])           # good ones did
    assert torch.isfinite(head(student, labels, teacher))        # the run goes on
