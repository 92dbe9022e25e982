"""Recipe fidelity: every shipped paper config loads with the official recipe's values, a real
training run of the paper configs (shrunk data, tiny networks) uses the official learning rate at
every step including the global-batch scaling, GKD refuses an ArcFace margin by name, and the
adaptive GKD k is chosen per GPU batch (or per fixed block of the global batch) as officially."""
import copy
import math
import os
import shutil
import textwrap

import pytest
import torch
import torch.nn.functional as F

from engine.config import get_config
from plugins.builders import build_head, check_config
from plugins.gkd import grouped_kd_loss
from plugins.heads import GKDHead, MarginSoftmaxHead
from tests.distributed_harness import run_distributed
from tests.test_lr_schedule import (ADADISTILL_FAMILY, GKD_FAMILY, official_adadistill_lr,
                                    official_gkd_lrs)
from tests.training_helpers import NUM_IDS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAPER_JOBS = ADADISTILL_FAMILY + GKD_FAMILY


def _job_text(job):
    with open(os.path.join(REPO, "configs", f"{job}.py")) as f:
        return f.read()


# ------------------------------------------------------------------ configs
@pytest.mark.parametrize("job", PAPER_JOBS)
def test_paper_config_states_its_row_and_the_official_recipe(job):
    cfg = get_config(f"configs/{job}", root=REPO)
    text = _job_text(job)
    assert "grad_reduction" not in text                  # the gradient convention is not a knob
    doc = text.split('"""')[1]
    assert "IJB-C" in doc or "paper" in doc or "not a published row" in doc, job
    assert cfg.optimizer == "sgd" and cfg.momentum == 0.9 and cfg.weight_decay == 5e-4
    assert cfg.batch_size == 128 and cfg.fp16 is False and cfg.sample_rate == 1.0
    assert cfg.num_classes == 85742 and cfg.num_image == 5822653 and cfg.flip is True
    if job in GKD_FAMILY:
        assert (cfg.lr, cfg.lr_reference_batch, cfg.nesterov, cfg.grad_clip) == (0.1, 1024, True, 0)
        assert (cfg.warmup_lr, cfg.lr_min, cfg.network) == (2.5e-7, 2.5e-7, "mbf")
        assert tuple(cfg.margin_list) == (1.0, 0.0, 0.4) and cfg.margin_scale == 64.0
        assert (cfg.gkd_temperature, cfg.gkd_alpha, cfg.gkd_lamda, cfg.gkd_warmup_epochs) == \
            (4.0, 1.0, 0.0, 10)
        assert cfg.teacher_classifier.endswith("ms1mv2_r50_cosface_teacher/classifier.pt")
    else:
        assert (cfg.lr, cfg.lr_reference_batch, cfg.nesterov, cfg.grad_clip) == (0.1, 512, False, 5)
        assert tuple(cfg.lr_steps) == (7, 13, 19, 24) and cfg.margin_scale == 64.0


def test_rows_that_differ_from_the_paper_config():
    load = lambda job: get_config(f"configs/{job}", root=REPO)   # noqa: E731
    margins = {"ms1mv2_mbf_adadistill": (1.0, 0.45, 0.0), "ms1mv2_mbf_adadistill_m040": (1.0, 0.4, 0.0),
               "ms1mv2_mbf_adadistill_m050": (1.0, 0.5, 0.0),
               "ms1mv2_mbf_adacosdistill": (1.0, 0.0, 0.35),
               "ms1mv2_mbf_adacosdistill_m030": (1.0, 0.0, 0.3),
               "ms1mv2_mbf_adacosdistill_m040": (1.0, 0.0, 0.4),
               "ms1mv2_mbf_arcdistill": (1.0, 0.5, 0.0), "ms1mv2_mbf_arcdistill_m045": (1.0, 0.45, 0.0),
               "ms1mv2_mbf_cosdistill": (1.0, 0.0, 0.35), "ms1mv2_mbf_standalone": (1.0, 0.5, 0.0),
               "ms1mv2_r50_arcface_teacher": (1.0, 0.5, 0.0),
               "ms1mv2_r50_cosface_teacher": (1.0, 0.0, 0.4)}
    for job, margin in margins.items():
        assert tuple(load(job).margin_list) == margin, job
    assert load("ms1mv2_mbf_adadistill").margin_list == (1.0, 0.45, 0.0)   # parent untouched
    assert load("ms1mv2_mbf_adadistill_plain").alpha == "plain"
    assert load("ms1mv2_mbf_adadistill").alpha == "weighted"
    assert [load(j).distill for j in ("ms1mv2_mbf_arcdistill", "ms1mv2_mbf_cosdistill")] == \
        ["arcdistill", "cosdistill"]
    solo = load("ms1mv2_mbf_standalone")
    assert (solo.distill, solo.margin_grad, solo.network) == ("none", "exact", "mobilefacenet")
    for job in ("ms1mv2_r50_arcface_teacher", "ms1mv2_r50_cosface_teacher"):
        cfg = load(job)
        assert (cfg.distill, cfg.network, cfg.num_epoch) == ("none", "r50", 26)
    ada = load("ms1mv2_mbf_adadistill")
    assert ada.teacher_checkpoint == "work_dirs/ms1mv2_r50_arcface_teacher/model.pt"
    assert load("ms1mv2_mbf_arcdistill").teacher_classifier == \
        "work_dirs/ms1mv2_r50_arcface_teacher/classifier.pt"
    fixed, adaptive = load("ms1mv2_mbf_gkd"), load("ms1mv2_mbf_gkd_adaptive")
    assert (fixed.gkd_k, fixed.gkd_tau, fixed.gkd_beta) == (10000, None, 8.0)
    assert (adaptive.gkd_tau, adaptive.gkd_beta, adaptive.gkd_tau_batch) == (0.93, 4.0, 128)
    assert load("ms1mv2_mbf_gkd").gkd_tau is None                          # parent untouched


def test_a_derived_job_imports_the_paper_config_of_its_own_root(tmp_path):
    """``from configs.<paper> import config`` resolves below the root being loaded, also after
    the repository's own configs package was imported."""
    get_config("configs/ms1mv2_mbf_adadistill_m040", root=REPO)        # caches REPO's package
    configs = tmp_path / "configs"
    configs.mkdir()
    shutil.copy(os.path.join(REPO, "configs", "base.py"), configs / "base.py")
    paper = _job_text("ms1mv2_mbf_adadistill").replace("config.lr = 0.1 ", "config.lr = 0.3 ")
    (configs / "ms1mv2_mbf_adadistill.py").write_text(paper)
    (configs / "derived.py").write_text(textwrap.dedent("""
        import copy
        from configs.ms1mv2_mbf_adadistill import config as _paper
        config = copy.deepcopy(_paper)
        config.margin_list = (1.0, 0.4, 0.0)
    """))
    cfg = get_config("configs/derived", root=str(tmp_path))
    assert cfg.lr == 0.3 and tuple(cfg.margin_list) == (1.0, 0.4, 0.0)
    assert cfg.output == os.path.join("work_dirs", "derived")
    assert get_config("configs/ms1mv2_mbf_adadistill_m040", root=REPO).lr == 0.1


# ------------------------------------------------------------------ a real run's learning rate
RECIPE_IMAGES = 32     # 2 images of each of the 16 classes: 2 steps per epoch at global batch 16


@pytest.fixture(scope="module")
def recipe_data(workdir):
    """A small training set for the schedule runs (what they check is the lr of every step of
    every epoch, not what the images hold), next to the session's teacher."""
    from tools.synthetic import write_train_set
    write_train_set(str(workdir / "data_recipes"), NUM_IDS, RECIPE_IMAGES // NUM_IDS, seed=4)
    return workdir


def _paper_job(root, paper, name, **overrides):
    """root/configs/<name>.py: the paper config (copied from the repo) shrunk to the test data."""
    shutil.copy(os.path.join(REPO, "configs", f"{paper}.py"), root / "configs" / f"{paper}.py")
    values = dict(network="tiny_s", teacher_network="tiny_t",
                  teacher_checkpoint=str(root / "teacher.pt"), rec=str(root / "data_recipes"),
                  num_classes=NUM_IDS, num_image=RECIPE_IMAGES, num_workers=0,
                  val_targets=[], frequent=1000, save_every=10 ** 6,
                  output=str(root / "runs" / name))
    values.update(overrides)
    lines = ["import copy", f"from configs.{paper} import config as _paper",
             "config = copy.deepcopy(_paper)"]
    lines += [f"config.{k} = {v!r}" for k, v in values.items()]
    (root / "configs" / f"{name}.py").write_text("\n".join(lines) + "\n")
    return get_config(f"configs/{name}", root=str(root))


def _train_recording_lr(rank, world, cfg):
    """Run the real trainer; record the lr of every optimizer.step (what the run trains with)."""
    from engine.trainer import train
    used, original = [], torch.optim.SGD.step

    def step(self, *args, **kwargs):
        used.append([group["lr"] for group in self.param_groups])
        return original(self, *args, **kwargs)

    torch.optim.SGD.step = step
    try:
        summary = train(cfg)
    finally:
        torch.optim.SGD.step = original
    return {"lrs": used, "steps": summary["steps"]}


def test_adadistill_run_trains_with_the_official_lr_on_two_processes(recipe_data):
    # global batch 2 ranks x 4 x gradient_acc 2 = 16: 32 images -> 2 steps in each of 26 epochs
    cfg = _paper_job(recipe_data, "ms1mv2_mbf_adadistill", "recipe_ada", batch_size=4,
                     gradient_acc=2)
    results = run_distributed(_train_recording_lr, 2, args=(cfg,))
    for res in results:
        assert res["steps"] == 52 and len(res["lrs"]) == 52
        for step, lrs in enumerate(res["lrs"]):
            expected = official_adadistill_lr(step // 2, batch_size=16, world_size=1)
            assert lrs == pytest.approx([expected] * len(lrs), rel=1e-12), step
    assert results[0]["lrs"][0][0] == pytest.approx(0.1 * 16 / 512)
    with open(os.path.join(cfg.output, "training.log")) as f:
        log = f.read()
    assert ("the recipe's lr 0.1 holds at global batch 512; this run's global batch is 16" in log
            and "uses lr 0.003125" in log)


def test_gkd_run_trains_with_the_official_timm_cosine(recipe_data):
    # global batch 8 x gradient_acc 2 = 16: 32 images -> 2 steps in each of 20 epochs
    cfg = _paper_job(recipe_data, "ms1mv2_mbf_gkd", "recipe_gkd", batch_size=8, gradient_acc=2,
                     teacher_classifier=str(recipe_data / "classifier.pt"), gkd_k=4)
    res = _train_recording_lr(0, 1, cfg)
    official = official_gkd_lrs(2)                        # 2 iterations per epoch, 20 epochs
    assert res["steps"] == 40 and len(res["lrs"]) == 40
    for step, lrs in enumerate(res["lrs"]):
        assert lrs == pytest.approx([official[step] * 16 / 1024] * len(lrs), rel=1e-12), step


# ------------------------------------------------------------------ GKD margin
def test_gkd_refuses_an_arcface_margin_by_name(workdir):
    cfg = get_config("configs/ms1mv2_mbf_gkd", root=REPO)
    cfg.update(teacher_checkpoint=str(workdir / "teacher.pt"), num_classes=NUM_IDS,
               teacher_classifier=str(workdir / "classifier.pt"), margin_list=(1.0, 0.5, 0.0))
    with pytest.raises(ValueError, match=r"distill='gkd' needs a CosFace margin_list .*0\.5"):
        check_config(cfg)
    with pytest.raises(ValueError, match="distill='gkd' needs a CosFace margin_list"):
        build_head(cfg)
    with pytest.raises(ValueError, match="margin 'arcface' is not supported"):
        GKDHead(4, 5, torch.randn(5, 4), margin="arcface")
    cfg.margin_list = (1.0, 0.0, 0.4)
    assert isinstance(build_head(cfg), GKDHead)


# ------------------------------------------------------------------ standalone margin gradient
def test_standalone_config_builds_the_exact_gradient_arcface():
    cfg = get_config("configs/ms1mv2_mbf_standalone", root=REPO)
    cfg.update(num_classes=7, embedding_size=4)
    head = build_head(cfg)
    assert isinstance(head, MarginSoftmaxHead)
    assert (head.margin, head.m, head.margin_grad) == ("arcface", 0.5, "exact")
    torch.manual_seed(0)
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 3, 6, 3, 1])
    head = head.double()
    head(x, labels).backward()
    # the official ArcFace: logits s * cos(acos(cos) + m) at the target, differentiated through
    w = head.weight.detach().clone().requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    cos = F.normalize(x_ref) @ F.normalize(w).T
    theta = torch.acos(cos.clamp(-1, 1))
    logits = 64.0 * torch.where(F.one_hot(labels, 7).bool(), torch.cos(theta + 0.5), cos)
    F.cross_entropy(logits, labels).backward()
    # the head's margin math runs in fp32: float32 tolerances
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(head.weight.grad, w.grad, rtol=1e-4, atol=1e-6)
    # ... and it is not arcface_torch's straight-through gradient
    x_st = x.detach().clone().requires_grad_(True)
    cos_st = F.normalize(x_st) @ F.normalize(w.detach()).T
    margin = torch.where(F.one_hot(labels, 7).bool(), torch.cos(theta.detach() + 0.5) - cos_st, 0)
    F.cross_entropy(64.0 * (cos_st + margin.detach()), labels).backward()
    assert (x_st.grad - x.grad).abs().max() > 1e-2 * x.grad.abs().max()
    default = copy.deepcopy(cfg)
    del default["margin_grad"]
    assert build_head(default).margin_grad == "straight_through"


# ------------------------------------------------------------------ adaptive k per GPU batch
C_ADAPT, N_ADAPT, D_ADAPT = 300, 8, 32


def _official_adaptive_k(logits_student, rate=0.93, frequency=100):
    """gkd_adaptive.py's rule on ONE GPU's batch: sum the student softmax over its rows, sort,
    grow idx = 1, 1 + frequency, ... until the top-idx mass reaches rate * its batch size."""
    mass = F.softmax(logits_student, dim=1).sum(dim=0).sort(descending=True).values
    for idx in range(1, mass.shape[0], frequency):
        if mass[:idx].sum() >= rate * logits_student.shape[0]:
            return idx
    return None


def _adaptive_logits():
    """Two halves with different adaptive k: the first peaked on its labels, the second flat."""
    g = torch.Generator().manual_seed(11)
    labels = torch.arange(N_ADAPT) * 7
    zs = torch.randn(N_ADAPT, C_ADAPT, generator=g, dtype=torch.float64)
    zs[:4] *= 0.5
    zs[torch.arange(4), labels[:4]] += 14.0
    zs[4:] *= 2.0
    zt = torch.randn(N_ADAPT, C_ADAPT, generator=g, dtype=torch.float64)
    return zs, zt, labels


def test_adaptive_k_is_chosen_per_block_like_each_official_gpu():
    zs, zt, labels = _adaptive_logits()
    k_first, k_second = _official_adaptive_k(zs[:4]), _official_adaptive_k(zs[4:])
    assert k_first is not None and k_second is not None and k_first != k_second
    per_block = grouped_kd_loss(zs, zt, labels, tau=0.93, beta=4.0, k_group=4)
    halves = [grouped_kd_loss(zs[i:i + 4], zt[i:i + 4], labels[i:i + 4], tau=0.93, beta=4.0)
              for i in (0, 4)]
    assert [h.k_used for h in halves] == [k_first, k_second]
    assert per_block.k_used == pytest.approx((k_first + k_second) / 2)
    torch.testing.assert_close(per_block.total, (halves[0].total + halves[1].total) / 2,
                               rtol=1e-12, atol=1e-12)
    whole = grouped_kd_loss(zs, zt, labels, tau=0.93, beta=4.0)      # one k for all 8 rows
    assert whole.k_used == _official_adaptive_k(zs)
    assert not torch.allclose(whole.total, per_block.total)
    with pytest.raises(ValueError, match="block of 3 samples .* divide"):
        grouped_kd_loss(zs, zt, labels, tau=0.93, k_group=3)


def _adaptive_head_worker(rank, world, data, tau_batch):
    head = GKDHead(D_ADAPT, C_ADAPT, data["w_t"], s=64.0, m=0.4, tau=0.93, beta=4.0,
                   tau_batch=tau_batch).double()
    with torch.no_grad():
        head.weight.copy_(data["w_s"][head.class_start:head.class_start + head.num_local])
    rows = N_ADAPT // world
    local = data["f_s"][rank * rows:(rank + 1) * rows].clone().requires_grad_(True)
    loss = head(local, data["labels"][rank * rows:(rank + 1) * rows],
                data["f_t"][rank * rows:(rank + 1) * rows], 12)
    loss.backward()
    return dict(loss=loss.detach(), grad_f=local.grad, k=head.stats["k"].item())


def _adaptive_head_data():
    """The first GPU's 4 samples all sit on class 7 (their summed softmax mass is on one class:
    k = 1), the second GPU's are random (k = 101)."""
    g = torch.Generator().manual_seed(5)
    labels = torch.tensor([7, 7, 7, 7, 14, 21, 28, 35])
    w_s = torch.randn(C_ADAPT, D_ADAPT, generator=g, dtype=torch.float64)
    f_s = torch.randn(N_ADAPT, D_ADAPT, generator=g, dtype=torch.float64)
    f_s[:4] = w_s[labels[:4]] + 0.05 * f_s[:4]
    return dict(f_s=f_s, w_s=w_s, labels=labels,
                f_t=torch.randn(N_ADAPT, D_ADAPT, generator=g, dtype=torch.float64),
                w_t=torch.randn(C_ADAPT, D_ADAPT, generator=g, dtype=torch.float64))


def test_adaptive_head_takes_k_from_each_gpu_batch_and_is_reproducible_on_one_process():
    data = _adaptive_head_data()
    two = run_distributed(_adaptive_head_worker, 2, args=(data, None))      # official: per GPU
    one = _adaptive_head_worker(0, 1, data, 4)                              # blocks of 4
    ks = []
    for rank in range(2):                                                    # per-GPU reference
        rows = slice(rank * 4, (rank + 1) * 4)
        z_s = 64.0 * (F.normalize(data["f_s"][rows]) @ F.normalize(data["w_s"]).T
                      - 0.4 * F.one_hot(data["labels"][rows], C_ADAPT))
        ks.append(_official_adaptive_k(z_s))
    assert ks == [1, 101]
    assert one["k"] == pytest.approx(sum(ks) / 2)
    for rank, res in enumerate(two):
        torch.testing.assert_close(res["loss"], one["loss"], rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(res["grad_f"], one["grad_f"][rank * 4:(rank + 1) * 4],
                                   rtol=1e-7, atol=1e-9)
        assert res["k"] == pytest.approx(one["k"])
    whole = _adaptive_head_worker(0, 1, data, None)             # one GPU holding all 8 samples
    assert not math.isclose(whole["loss"].item(), one["loss"].item(), rel_tol=1e-6)
