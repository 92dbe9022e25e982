"""The harness of bench/kd_quality.py (not its numbers): config digests and the teacher / run
caches keyed by them, the aggregation into a table, the paired statistic, the reports."""
import argparse
import concurrent.futures
import json
import math
import os

import numpy as np
import pytest
from scipy import stats

from bench import kd_quality
from tools import kd_bench
from tools.kd_bench import (aggregate, cached_result, config_digest, gap_closed, mean_std,
                           paired_comparison)


# --------------------------------------------------------------------------- digests

def test_config_digest_ignores_key_order_and_container_spelling():
    a = {"lr": 0.1, "margin_list": (1.0, 0.0, 0.35), "nested": {"x": 1, "y": [2, 3]}}
    b = {"nested": {"y": (2, 3), "x": 1.0}, "margin_list": [1, 0, 0.35], "lr": 0.1}
    assert config_digest(a) == config_digest(b)
    assert len(config_digest(a)) == 64 and int(config_digest(a), 16) >= 0


@pytest.mark.parametrize("change", [{"lr": 0.2}, {"margin_list": (1.0, 0.0, 0.4)},
                                    {"nested": {"x": 2, "y": [2, 3]}}, {"extra": None}])
def test_config_digest_changes_with_any_value(change):
    base = {"lr": 0.1, "margin_list": (1.0, 0.0, 0.35), "nested": {"x": 1, "y": [2, 3]}}
    assert config_digest(dict(base, **change)) != config_digest(base)


def test_code_digest_follows_every_source_file_and_nothing_else(tmp_path):
    (tmp_path / "pkg" / "sub").mkdir(parents=True)
    (tmp_path / "pkg" / "a.py").write_text("x = 1\n")
    (tmp_path / "pkg" / "sub" / "b.py").write_text("y = 2\n")
    (tmp_path / "one.py").write_text("z = 3\n")
    paths = ("pkg", "one.py")
    first = kd_bench.code_digest(str(tmp_path), paths)
    (tmp_path / "pkg" / "notes.txt").write_text("not code")            # not a .py file
    (tmp_path / "pkg" / "__pycache__").mkdir()
    (tmp_path / "pkg" / "__pycache__" / "a.py").write_text("cache")     # never hashed
    assert kd_bench.code_digest(str(tmp_path), paths) == first
    (tmp_path / "pkg" / "sub" / "b.py").write_text("y = 3\n")           # an edit
    edited = kd_bench.code_digest(str(tmp_path), paths)
    assert edited != first
    (tmp_path / "pkg" / "sub" / "b.py").rename(tmp_path / "pkg" / "c.py")  # a move, same bytes
    assert kd_bench.code_digest(str(tmp_path), paths) not in (first, edited)
    with pytest.raises(FileNotFoundError, match="missing.py"):
        kd_bench.code_digest(str(tmp_path), ("pkg", "missing.py"))


def test_the_benchmark_digests_the_repository_code():
    assert kd_quality.CODE == kd_bench.code_digest(kd_quality.REPO)
    assert len(kd_quality.CODE) == 64


def test_cached_result_needs_matching_digest(tmp_path):
    folder = str(tmp_path)
    assert cached_result(folder, "result.json", "abc") is None               # no file
    (tmp_path / "result.json").write_text(json.dumps({"digest": "abc", "x": 1}))
    assert cached_result(folder, "result.json", "abc") == {"digest": "abc", "x": 1}
    assert cached_result(folder, "result.json", "abd") is None               # other config
    (tmp_path / "result.json").write_text('{"digest": "abc", "x"')           # torn file
    assert cached_result(folder, "result.json", "abc") is None


def _args(root, **kw):
    ns = argparse.Namespace(quick=True, jobs=1, seeds="0,1", methods="AdaCosDistill alpha'",
                            root=str(root), out="", fresh=False, fresh_teacher=False,
                            report_only=False, argv=[], regime="short", device="",
                            schedule="", isa="avx2")
    for key, value in kw.items():
        setattr(ns, key, value)
    return ns


class _Fakes:
    """Stand-ins for the job functions: record calls, write the markers the real ones write."""

    def __init__(self):
        self.teacher_calls, self.student_calls, self.data_calls = [], [], []
        self.teacher_jobs, self.student_jobs = [], []

    def make_data(self, task, root):
        self.data_calls.append(root)
        os.makedirs(root, exist_ok=True)
        return root

    def train_teacher(self, job):
        self.teacher_calls.append(job["digest"])
        self.teacher_isa = os.environ.get("ATEN_CPU_CAPABILITY")
        self.teacher_jobs.append(job)
        os.makedirs(job["output"], exist_ok=True)
        result = {"name": job["name"], "digest": job["digest"], "seconds": 1.0,
                  "epochs": job["epochs"], "metrics": {k: 90.0 for k in kd_bench.METRICS}}
        (open(os.path.join(job["output"], "teacher.json"), "w")).write(json.dumps(result))
        return result

    def train_and_eval(self, job):
        assert not job["needs_teacher"] or os.path.isfile(
            os.path.join(os.path.dirname(job["config"]["teacher_checkpoint"]), "teacher.json"))
        self.student_calls.append((job["method"], job["seed"]))
        self.student_jobs.append(job)
        os.makedirs(job["output"], exist_ok=True)
        value = 50.0 + job["seed"] + (5.0 if job["config"]["distill"] != "none" else 0.0)
        result = {"name": job["name"], "method": job["method"], "seed": job["seed"],
                  "digest": job["digest"], "seconds": 1.0,
                  "metrics": {k: value for k in kd_bench.METRICS}}
        open(os.path.join(job["output"], "result.json"), "w").write(json.dumps(result))
        return result


@pytest.fixture
def fakes(monkeypatch):
    f = _Fakes()
    monkeypatch.setattr(kd_quality, "make_data", f.make_data)
    monkeypatch.setattr(kd_quality, "train_teacher", f.train_teacher)
    monkeypatch.setattr(kd_quality, "train_and_eval", f.train_and_eval)
    monkeypatch.setattr(kd_quality, "_executor",
                        lambda jobs: concurrent.futures.ThreadPoolExecutor(1))
    monkeypatch.setattr(kd_quality, "machine", lambda device: {"cpus": 2})
    return f


def test_jobs_run_on_the_pinned_instruction_set_and_it_is_part_of_the_digest(tmp_path, fakes,
                                                                            monkeypatch):
    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    kd_quality.run(_args(tmp_path, methods=""))
    assert fakes.teacher_isa == "avx2"                     # the workers start inside the pin
    assert "ATEN_CPU_CAPABILITY" not in os.environ         # and the parent's is put back
    kd_quality.run(_args(tmp_path, methods="", isa="native"))
    assert fakes.teacher_isa is None
    assert len(set(fakes.teacher_calls)) == 2              # native kernels: another teacher


def test_teacher_is_trained_once_and_reused_by_digest(tmp_path, fakes, monkeypatch):
    payload = kd_quality.run(_args(tmp_path))
    assert len(fakes.teacher_calls) == 1
    assert sorted(fakes.student_calls) == sorted([(kd_bench.BASELINE, 0), (kd_bench.BASELINE, 1),
                                                  ("AdaCosDistill alpha'", 0),
                                                  ("AdaCosDistill alpha'", 1)])
    rows = payload["summary"]["rows"]
    assert [r["method"] for r in rows] == [kd_bench.BASELINE, "AdaCosDistill alpha'"]
    for name in ("results.json", "results.md", "kd_quality.png"):
        assert os.path.isfile(tmp_path / "quick" / name)

    # same command: nothing is trained again, the same table comes back
    again = kd_quality.run(_args(tmp_path))
    assert len(fakes.teacher_calls) == 1 and len(fakes.student_calls) == 4
    assert again["summary"] == payload["summary"]

    # another teacher config: a new teacher; the distilled runs depend on it, the student
    # alone does not
    task = kd_bench.merged_task(True)
    monkeypatch.setattr(kd_quality, "merged_task",
                        lambda quick, regime, schedule: dict(
                            task, teacher=dict(task["teacher"], num_epoch=3)))
    kd_quality.run(_args(tmp_path))
    assert len(fakes.teacher_calls) == 2 and fakes.teacher_calls[0] != fakes.teacher_calls[1]
    assert sorted(fakes.student_calls[4:]) == [("AdaCosDistill alpha'", 0),
                                               ("AdaCosDistill alpha'", 1)]


def test_fresh_flags_retrain(tmp_path, fakes):
    kd_quality.run(_args(tmp_path, seeds="0", methods=""))
    n_students = len(fakes.student_calls)
    kd_quality.run(_args(tmp_path, seeds="0", methods="", fresh=True))
    assert len(fakes.teacher_calls) == 1 and len(fakes.student_calls) == 2 * n_students
    kd_quality.run(_args(tmp_path, seeds="0", methods="", fresh_teacher=True))
    assert len(fakes.teacher_calls) == 2


def test_report_only_trains_nothing_and_tables_the_finished_runs(tmp_path, fakes, capsys):
    with pytest.raises(SystemExit, match="no finished teacher"):
        kd_quality.run(_args(tmp_path, report_only=True))
    kd_quality.run(_args(tmp_path, seeds="0"))
    calls = (len(fakes.teacher_calls), len(fakes.student_calls))
    payload = kd_quality.run(_args(tmp_path, seeds="0,1", report_only=True))
    assert (len(fakes.teacher_calls), len(fakes.student_calls)) == calls
    assert [r["n"] for r in payload["summary"]["rows"]] == [1, 1]
    assert "2 runs not finished" in capsys.readouterr().out


def test_unknown_method_is_refused(tmp_path, fakes):
    with pytest.raises(SystemExit, match="unknown"):
        kd_quality.run(_args(tmp_path, methods="AdaFooDistill"))


def test_teacher_digest_depends_on_teacher_and_data_only():
    task = kd_bench.merged_task(False)
    t1 = kd_quality.teacher_job(task, "/d", "data1", "/r")
    other_student = dict(task, student=dict(task["student"], num_epoch=99))
    assert kd_quality.teacher_job(other_student, "/d", "data1", "/r")["digest"] == t1["digest"]
    assert kd_quality.teacher_job(task, "/d", "data2", "/r")["digest"] != t1["digest"]
    other_teacher = dict(task, teacher=dict(task["teacher"], seed=1))
    assert kd_quality.teacher_job(other_teacher, "/d", "data1", "/r")["digest"] != t1["digest"]


def test_student_jobs_pair_seeds_and_point_at_the_teacher():
    task = kd_bench.merged_task(False)
    methods = kd_bench.method_table(task["data"]["num_ids"])
    teacher = kd_quality.teacher_job(task, "/d", "data", "/r")
    jobs = kd_quality.student_jobs(task, methods, "/d", "data", teacher, "/r")
    assert len(jobs) == len(methods) * len(task["seeds"])
    assert len({j["digest"] for j in jobs}) == len(jobs)
    assert len({j["output"] for j in jobs}) == len(jobs)
    for job in jobs:
        cfg = job["config"]
        assert cfg["seed"] == job["seed"] and cfg["network"] == task["student"]["network"]
        assert "grad_reduction" not in cfg
        if cfg["distill"] == "none":
            assert "teacher_cache" not in cfg
        else:
            assert cfg["teacher_cache"].startswith(teacher["output"])
        if cfg["distill"] == "adadistill":       # centers start from noise, as in the paper
            assert "teacher_classifier" not in cfg
        if cfg["distill"] in ("arcdistill", "cosdistill", "gkd"):
            assert cfg["teacher_classifier"].startswith(teacher["output"])


def test_every_method_config_is_a_valid_trainer_config():
    from tools.kd_bench_jobs import run_config
    task = kd_bench.merged_task(False)
    methods = kd_bench.method_table(task["data"]["num_ids"])
    names = [m.name for m in methods]
    assert len(set(names)) == len(names) and names[0] == kd_bench.BASELINE
    teacher = kd_quality.teacher_job(task, "/d", "data", "/r")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for job in kd_quality.student_jobs(task, methods, "/d", "data", teacher, "/r")[:len(methods)]:
        cfg = run_config(dict(job, repo=repo))
        assert cfg.distill == job["config"]["distill"]
        assert cfg.start_over   # an interrupted attempt's checkpoints do not block the rerun
    assert kd_bench._gkd_k(85742) == 10000 and kd_bench._gkd_k(1000) == 117


def test_slug():
    assert kd_quality.slug("AdaArcDistill alpha'") == "adaarcdistill_alpha_p"
    assert kd_quality.slug("GKD fixed-k") == "gkd_fixed_k"


# --------------------------------------------------------------------------- statistics

def test_mean_std_is_the_sample_std():
    values = [1.0, 2.0, 4.0]
    mean, std = mean_std(values)
    assert mean == pytest.approx(np.mean(values)) and std == pytest.approx(np.std(values, ddof=1))
    assert mean_std([3.0]) == (3.0, 0.0)
    with pytest.raises(ValueError):
        mean_std([])


def test_paired_comparison_matches_scipy_ttest_rel():
    base = {0: 60.0, 1: 62.5, 2: 61.0, 3: 59.0}
    method = {0: 61.0, 1: 65.0, 2: 60.5, 3: 62.0}
    out = paired_comparison(base, method)
    ref = stats.ttest_rel([method[s] for s in range(4)], [base[s] for s in range(4)])
    diffs = np.array([1.0, 2.5, -0.5, 3.0])
    assert out["n"] == 4 and out["seeds"] == [0, 1, 2, 3]
    assert out["mean_diff"] == pytest.approx(diffs.mean())
    assert out["std_diff"] == pytest.approx(diffs.std(ddof=1))
    assert out["t"] == pytest.approx(ref.statistic) and out["p"] == pytest.approx(ref.pvalue)
    assert (out["wins"], out["losses"], out["ties"]) == (3, 1, 0)


def test_paired_comparison_uses_only_common_seeds_and_edge_cases():
    out = paired_comparison({0: 1.0, 1: 2.0, 5: 9.0}, {1: 2.0, 0: 3.0, 7: 0.0})
    assert out["seeds"] == [0, 1] and out["mean_diff"] == pytest.approx(1.0)
    assert (out["wins"], out["losses"], out["ties"]) == (1, 0, 1)
    one = paired_comparison({0: 1.0}, {0: 1.5})
    assert one["n"] == 1 and one["t"] is None and one["p"] is None
    same = paired_comparison({0: 1.0, 1: 2.0}, {0: 2.0, 1: 3.0})     # differences all +1
    assert same["t"] == math.inf and same["p"] is None
    zero = paired_comparison({0: 1.0, 1: 2.0}, {0: 1.0, 1: 2.0})
    assert zero["t"] == 0.0 and zero["ties"] == 2
    with pytest.raises(ValueError, match="no common seeds"):
        paired_comparison({0: 1.0}, {1: 1.0})


def test_gap_closed():
    assert gap_closed(60.0, 50.0, 70.0) == pytest.approx(0.5)
    assert gap_closed(45.0, 50.0, 70.0) == pytest.approx(-0.25)
    assert gap_closed(75.0, 50.0, 70.0) == pytest.approx(1.25)
    assert gap_closed(60.0, 50.0, 50.0) is None and gap_closed(60.0, 50.0, 40.0) is None


def _runs():
    metrics = ("a", "b")
    vals = {"student alone": {0: (50.0, 90.0), 1: (52.0, 91.0), 2: (51.0, 89.0)},
            "M1": {0: (55.0, 92.0), 1: (53.0, 90.0), 2: (57.0, 93.0)},
            "M2": {2: (49.0, 88.0), 0: (50.0, 90.0)}}
    runs = [{"method": m, "seed": s, "metrics": dict(zip(metrics, v))}
            for m, seeds in vals.items() for s, v in seeds.items()]
    return runs, vals


def test_aggregate_rows_means_gaps_and_pairs():
    runs, vals = _runs()
    summary = aggregate(runs, {"a": 61.0, "b": 95.0}, ["student alone", "M1", "M2", "absent"],
                        metrics=("a", "b"))
    assert [r["method"] for r in summary["rows"]] == ["student alone", "M1", "M2"]
    m1 = summary["rows"][1]
    assert m1["n"] == 3 and m1["seeds"] == [0, 1, 2]
    a = np.array([v[0] for v in vals["M1"].values()])
    assert m1["metrics"]["a"]["mean"] == pytest.approx(a.mean())
    assert m1["metrics"]["a"]["std"] == pytest.approx(a.std(ddof=1))
    assert m1["metrics"]["a"]["values"] == {0: 55.0, 1: 53.0, 2: 57.0}
    assert m1["metrics"]["a"]["gap_closed"] == pytest.approx((55.0 - 51.0) / (61.0 - 51.0))
    ref = stats.ttest_rel([55.0, 53.0, 57.0], [50.0, 52.0, 51.0])
    assert m1["metrics"]["a"]["paired"]["t"] == pytest.approx(ref.statistic)
    m2 = summary["rows"][2]                     # only seeds 0 and 2: paired on those
    assert m2["metrics"]["b"]["paired"]["seeds"] == [0, 2]
    assert m2["metrics"]["b"]["paired"]["mean_diff"] == pytest.approx(((88 - 89) + (90 - 90)) / 2)
    assert summary["rows"][0]["metrics"]["a"]["paired"] is None
    assert summary["rows"][0]["metrics"]["a"]["gap_closed"] == pytest.approx(0.0)


def test_aggregate_refuses_duplicates_and_a_missing_baseline():
    runs, _ = _runs()
    with pytest.raises(ValueError, match="two results"):
        aggregate(runs + [runs[0]], {"a": 1.0, "b": 1.0}, ["student alone"], metrics=("a", "b"))
    with pytest.raises(ValueError, match="baseline"):
        aggregate([r for r in runs if r["method"] != "student alone"], {"a": 1.0, "b": 1.0},
                  ["M1"], metrics=("a", "b"))


def test_markdown_and_plot(tmp_path):
    runs, _ = _runs()
    titles = {"a": "A", "b": "B"}
    summary = aggregate(runs, {"a": 61.0, "b": 95.0}, ["student alone", "M1", "M2"],
                        metrics=("a", "b"))
    text = kd_bench.markdown_tables(summary, titles=titles)
    lines = text.splitlines()
    assert lines[0] == "| method | n | A | B |" and lines[1] == "|---|---|---|---|"
    assert "| teacher | 1 | 61.00 | 95.00 |" in lines
    assert any(line.startswith("| M1 | 3 | 55.00 +- 2.00 |") for line in lines)
    assert "| (gap, points) | 10.00 | 5.00 |" in lines
    assert "| M1 | 0.40 | 0.33 |" in lines          # (55 - 51) / 10, (91.67 - 90) / 5
    m1 = [line for line in lines if line.startswith("| M1 | +4.00 +- 2.65 (t 2.62, p 0.120, "
                                                        "3/0/0)")]
    assert len(m1) == 1
    path = kd_bench.plot_summary(summary, str(tmp_path / "p.png"), titles=titles)
    with open(path, "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"


def test_per_seed_table_says_whether_every_seed_beats_every_baseline_seed():
    runs, _ = _runs()
    summary = aggregate(runs, {"a": 61.0, "b": 95.0}, ["student alone", "M1", "M2"],
                        metrics=("a", "b"))
    lines = kd_bench.per_seed_table(summary, "a", titles={"a": "A", "b": "B"})
    assert lines[2] == "| method | seed 0 | seed 1 | seed 2 | all above |"
    assert "| student alone | 50.00 | 52.00 | 51.00 | -- |" in lines
    assert "| M1 | 55.00 | 53.00 | 57.00 | yes |" in lines    # worst 53 > best baseline 52
    assert "| M2 | 50.00 | -- | 49.00 | no |" in lines       # seed 1 missing -> "--"
    assert kd_bench.markdown_tables(summary, titles={"a": "A", "b": "B"}).splitlines()[
        -len(lines):] == lines                                   # the report ends with it


# --------------------------------------------------------------------------- evaluation

def test_ijb_eval_from_cached_aligned_images_equals_the_ijb_pipeline(tmp_path):
    """The benchmark's IJB evaluation (aligned images kept in a .npy) gives the numbers of
    eval.ijb's own pipeline (extract_features -> score_features -> evaluate_scores)."""
    import torch

    from eval.ijb import (AlignedFaceDataset, evaluate_scores, extract_features, far_key,
                          load_meta, score_features)
    from tools.kd_bench_jobs import ALIGNED_FILE, ijb_tar_at_far, register_backbones
    from eval.model_io import TorchEmbedder
    from tools.synthetic import write_ijb
    from plugins.backbones import get_model

    root = str(tmp_path / "IJBC")
    write_ijb(root, "IJBC", num_ids=4, templates_per_id=2, medias_per_template=2,
              images_per_media=1, impostor_ratio=10, seed=3)
    register_backbones()
    torch.manual_seed(0)
    model = get_model("kdb_student", num_features=16).eval()
    fars = (1e-2, 1e-1)
    ours = ijb_tar_at_far(model, root, "IJBC", fars, batch_size=5)
    assert os.path.isfile(os.path.join(root, ALIGNED_FILE.format(size=112)))
    again = ijb_tar_at_far(model, root, "IJBC", fars, batch_size=5)     # from the .npy
    meta = load_meta(root, "IJBC")
    data = AlignedFaceDataset(meta.image_dir, meta.names, meta.landmarks, meta.landmark_file)
    feats = extract_features(TorchEmbedder(model, autocast=False), data, batch_size=5,
                             num_workers=0, progress=False)
    ref = evaluate_scores(meta.labels, score_features(meta, feats)[0], "closest", fars)
    for far in fars:
        assert ours[f"tar@{far_key(far)}"] == ref["tar_at_far"][far_key(far)]
    assert ours == again and ours["ijb_auc"] == ref["auc"]
    assert ours["ijb_genuine"] == ref["num_genuine"] == 4      # 4 ids x C(2, 2) template pairs


# --------------------------------------------------------------------------- regimes

def test_short_regime_keeps_one_schedule_and_one_baseline():
    task = kd_bench.merged_task(False)
    assert task["regime"] == "short" and task["schedule"] is None
    methods = kd_bench.methods_of(task)
    assert [m.name for m in methods][0] == kd_bench.BASELINE and len(methods) == 19
    assert {m.baseline for m in methods} == {kd_bench.BASELINE}
    for method in methods:
        cfg = kd_bench.student_config(task, method)
        assert cfg == {**task["shared"], **task["student"], **method.config}
        assert cfg["lr_schedule"] == "cosine" and cfg["warmup_epoch"] == 0
    assert kd_bench.teacher_config(task) == {**task["shared"], **task["teacher"]}
    long = methods[-1]
    assert long.name == kd_bench.LONG_BASELINE and long.doubles == kd_bench.BASELINE
    assert long.config["num_epoch"] == 2 * task["student"]["num_epoch"] == 6


def test_converged_regime_runs_the_claims_rows_on_one_gkd_shaped_schedule():
    task = kd_bench.merged_task(False, "converged")
    assert task["schedule"] == kd_bench.GKD_RECIPE
    epochs = task["student"]["num_epoch"]
    methods = kd_bench.methods_of(task)
    short = {m.name: dict(m.config) for m in kd_bench.methods_of(kd_bench.merged_task(False))}
    assert [m.name for m in methods] == list(task["methods"])   # the claims' rows, table order
    assert all(dict(m.config) == short[m.name] for m in methods[:-1])   # same keys as short
    claimed = {name for _, pairs in kd_bench.CLAIMS for pair in pairs for name in pair}
    assert claimed <= {m.name for m in methods}
    assert len(kd_bench.methods_of(task, every=True)) == len(short)
    assert {m.baseline for m in methods} == {kd_bench.BASELINE}
    for method in methods:
        cfg = kd_bench.student_config(task, method)
        run_epochs = cfg["num_epoch"]
        assert run_epochs == (2 * epochs if method.doubles else epochs)
        assert cfg["lr_schedule"] == "cosine" and cfg["nesterov"] and cfg["grad_clip"] == 0
        assert cfg["warmup_epoch"] == pytest.approx(run_epochs * 4 / 20)
        assert cfg["lr_min"] == cfg["warmup_lr"] == 2.5e-7
        if cfg["distill"] == "gkd":                          # the KD ramp, 10 of 20 epochs
            assert cfg["gkd_warmup_epochs"] == pytest.approx(run_epochs / 2)
        else:
            assert "gkd_warmup_epochs" not in cfg
        assert all(cfg[k] == v for k, v in method.config.items())   # nothing per method
    teacher = kd_bench.teacher_config(task)
    assert teacher["warmup_epoch"] == pytest.approx(teacher["num_epoch"] * 4 / 20)
    half = kd_bench.teacher_config(task, task["teacher_reference_epochs"][0])
    assert half["warmup_epoch"] == pytest.approx(half["num_epoch"] * 4 / 20)   # scaled too
    assert task["teacher"]["num_epoch"] > kd_bench.TASK["teacher"]["num_epoch"]
    assert all(e < task["teacher"]["num_epoch"] for e in task["teacher_reference_epochs"])
    assert len(task["seeds"]) >= 3 and task["data"]["variation"] > 1


def test_a_regime_naming_an_unknown_row_is_refused():
    task = kd_bench.merged_task(False, "converged")
    task["methods"] = [kd_bench.BASELINE, "AdaDistil"]
    with pytest.raises(ValueError, match="AdaDistil"):
        kd_bench.methods_of(task)


def test_papers_schedule_runs_each_method_on_its_own_recipe_with_its_own_baseline():
    task = kd_bench.merged_task(False, "converged", kd_bench.PAPERS)
    epochs = task["student"]["num_epoch"]
    methods = kd_bench.methods_of(task, every=True)
    short = {m.name for m in kd_bench.methods_of(kd_bench.merged_task(False))}
    assert {m.name for m in methods} == short | {kd_bench.GKD_BASELINE,
                                                 kd_bench.GKD_LONG_BASELINE}
    kept = {m.name for m in kd_bench.methods_of(task)}       # the regime's rows + their baselines
    assert kept == set(task["methods"]) | {kd_bench.GKD_BASELINE, kd_bench.GKD_LONG_BASELINE}
    gkd_family = {"GKD fixed-k", "GKD adaptive", "logit KD", "FitNet", "RKD",
                  kd_bench.GKD_BASELINE, kd_bench.GKD_LONG_BASELINE}
    for method in methods:
        cfg = kd_bench.student_config(task, method)
        run_epochs = cfg["num_epoch"]
        if method.name in gkd_family:
            assert method.recipe == kd_bench.GKD_RECIPE
            assert method.baseline == kd_bench.GKD_BASELINE
            assert cfg["lr_schedule"] == "cosine" and cfg["nesterov"]
        else:
            assert method.recipe == kd_bench.ADADISTILL_RECIPE
            assert method.baseline == kd_bench.BASELINE
            assert cfg["lr_schedule"] == "step" and not cfg["nesterov"] and cfg["grad_clip"] == 5
            assert cfg["lr_steps"] == kd_bench.scaled_milestones((7, 13, 19, 24), 26, run_epochs)
    doubles = {m.name: m.doubles for m in methods if m.doubles}
    assert doubles == {kd_bench.LONG_BASELINE: kd_bench.BASELINE,
                       kd_bench.GKD_LONG_BASELINE: kd_bench.GKD_BASELINE}
    assert kd_bench.teacher_config(task) == kd_bench.teacher_config(
        kd_bench.merged_task(False, "converged"))               # one teacher serves both
    step = kd_bench.merged_task(False, "converged", kd_bench.ADADISTILL_RECIPE)
    assert {kd_bench.student_config(step, m)["lr_schedule"]
            for m in kd_bench.methods_of(step)} == {"step"}
    with pytest.raises(ValueError, match="cannot hold"):       # 3 epochs, 4 decays
        kd_bench.merged_task(False, "short", kd_bench.PAPERS)
    with pytest.raises(ValueError, match="unknown schedule"):
        kd_bench.merged_task(False, "short", "SGDR")


def test_recipes_at_the_papers_own_epochs_are_the_papers_values():
    step = kd_bench.recipe_config(kd_bench.ADADISTILL_RECIPE, 26, "adadistill")
    assert step["lr_steps"] == [7, 13, 19, 24] and step["grad_clip"] == 5.0
    cosine = kd_bench.recipe_config(kd_bench.GKD_RECIPE, 20, "gkd")
    assert cosine["warmup_epoch"] == 4 and cosine["gkd_warmup_epochs"] == 10
    assert kd_bench.scaled_milestones((7, 13, 19, 24), 26, 16) == [4, 8, 12, 15]
    assert kd_bench.scaled_milestones((7, 13, 19, 24), 26, 5) == [1, 2, 3, 4]   # kept distinct
    with pytest.raises(ValueError, match="cannot hold"):
        kd_bench.scaled_milestones((7, 13, 19, 24), 26, 4)
    with pytest.raises(ValueError, match="unknown recipe"):
        kd_bench.recipe_config("SGDR", 10, "none")


def test_the_schedules_the_trainer_builds_follow_the_recipes():
    """The lr the trainer would use at each epoch start, from the regime's configs."""
    from plugins.lr_schedule import schedule_from_config
    from tools.kd_bench_jobs import run_config
    task = kd_bench.merged_task(False, "converged", kd_bench.PAPERS)
    methods = {m.name: m for m in kd_bench.methods_of(task)}
    teacher = kd_quality.teacher_job(task, "/d", "data", "/r")
    jobs = {j["method"]: j for j in kd_quality.student_jobs(task, list(methods.values()), "/d",
                                                            "data", teacher, "/r")}
    repo = kd_quality.REPO
    epochs = task["student"]["num_epoch"]
    spe = 10
    step = schedule_from_config(run_config(dict(jobs[kd_bench.BASELINE], repo=repo)), spe,
                                spe * epochs)
    decays = kd_bench.scaled_milestones((7, 13, 19, 24), 26, epochs)
    for epoch in range(epochs):
        assert step.lr_at(epoch * spe) == pytest.approx(0.1 * 0.1 ** sum(d <= epoch
                                                                          for d in decays))
    cfg = run_config(dict(jobs["GKD fixed-k"], repo=repo))
    cosine = schedule_from_config(cfg, spe, spe * epochs)
    warm = round(epochs * 4 / 20 * spe)
    assert cosine.warmup_steps == warm and cosine.lr_at(1) < 1e-2
    # GKD's (timm's) warm-up replaces the start of ONE cosine (not shifted): the peak is the
    # ramp's last step or that cosine at the end of the warm-up, a little under the base lr
    ramp_end = 2.5e-7 + (warm - 1) * (0.1 - 2.5e-7) / warm
    cos_end = 2.5e-7 + (0.1 - 2.5e-7) * (1 + math.cos(math.pi * warm / (spe * epochs))) / 2
    assert max(cosine.lr_at(t) for t in range(spe * epochs)) == pytest.approx(
        max(ramp_end, cos_end), rel=1e-9)
    assert cosine.lr_at(spe * epochs - 1) < 1e-3
    from plugins.gkd import kd_warmup_weight
    ramp = [kd_warmup_weight(e, cfg.gkd_warmup_epochs) for e in range(epochs)]
    assert ramp[0] == 0 and ramp[-1] == 1 and ramp == sorted(ramp)


def test_merged_task_selects_the_regime_and_refuses_quick_elsewhere():
    assert kd_bench.merged_task(False, "converged")["schedule"] == kd_bench.GKD_RECIPE
    assert kd_bench.merged_task(True)["seeds"] == [0]
    with pytest.raises(ValueError, match="no quick variant"):
        kd_bench.merged_task(True, "converged")
    with pytest.raises(ValueError, match="unknown regime"):
        kd_bench.merged_task(False, "long")
    with pytest.raises(SystemExit):
        kd_quality.main(["--regime", "converged", "--quick"])


# --------------------------------------------------------------------------- convergence checks

def _summary_with(values, teacher=90.0):
    runs = [{"method": m, "seed": s, "metrics": {"tar@0.001": v}}
            for m, per_seed in values.items() for s, v in enumerate(per_seed)]
    return aggregate(runs, {"tar@0.001": teacher}, list(values), metrics=("tar@0.001",),
                     baselines={"B2": "B2", "M2": "B2", "B2 long": "B2"})


def test_convergence_checks_hold_only_within_the_seed_std_and_with_the_gap():
    summary = _summary_with({"student alone": [80.0, 82.0, 84.0],        # std 2
                             "student alone, 2x epochs": [81.5, 83.5, 85.5],   # +1.5 < 2
                             "B2": [86.0, 86.5, 87.0],                   # std 0.5, gap 3.5
                             "B2 long": [87.5, 88.0, 88.5]})             # +1.5 > 0.5
    curve = [{"epochs": 8, "metrics": {"tar@0.001": 89.5}},
             {"epochs": 16, "metrics": {"tar@0.001": 90.0}}]
    checks = kd_bench.convergence_checks(
        summary, curve, {"student alone, 2x epochs": "student alone", "B2 long": "B2"},
        gap_min=5.0, teacher_tolerance=1.0)
    assert checks["teacher"]["gain"] == pytest.approx(0.5) and checks["teacher"]["holds"]
    first, second = checks["students"]
    assert first["change"] == pytest.approx(1.5) and first["std"] == pytest.approx(2.0)
    assert first["holds"] is True and second["holds"] is False
    assert [g["holds"] for g in checks["gaps"]] == [True, False]
    assert checks["gaps"][0]["gap"] == pytest.approx(8.0)
    lines = kd_bench.checks_table(checks, titles={"tar@0.001": "T3"})
    assert lines[0] == "Convergence and capacity checks (T3):"
    assert lines[4] == ("| teacher stopped improving | 89.50 (8 ep) / 90.00 (16 ep); last gain "
                        "+0.50 (tolerance 1) | yes |")
    assert lines[5] == ("| student alone converged | 82.00 +- 2.00 -> 83.50 +- 2.00 at 2x epochs "
                        "(change +1.50; must be below the seed std 2.00 in size) | yes |")
    assert lines[5].endswith("| yes |") and lines[6].endswith("| NO |")
    assert lines[7] == ("| capacity gap teacher - student alone | 8.00 points (>= 5 needed); "
                        "6.50 to its 2x-epochs row | yes |")
    # a teacher that still gains more than the tolerance has not stopped improving; a missing
    # reference row or one seed leaves the student check undecided
    late = kd_bench.convergence_checks(summary, curve[:1] + [
        {"epochs": 16, "metrics": {"tar@0.001": 91.5}}], {}, 5.0, 1.0)
    assert late["teacher"]["holds"] is False and late["students"] == []
    one = _summary_with({"student alone": [80.0], "student alone, 2x epochs": [80.5]})
    undecided = kd_bench.convergence_checks(one, curve[1:], {
        "student alone, 2x epochs": "student alone", "absent": "student alone"}, 5.0, 1.0)
    assert undecided["teacher"]["holds"] is None
    assert [s["holds"] for s in undecided["students"]] == [None, None]


def test_rows_compare_with_the_student_alone_of_their_own_recipe():
    summary = _summary_with({"student alone": [50.0, 52.0, 51.0], "M1": [55.0, 53.0, 57.0],
                             "B2": [60.0, 61.0, 62.0], "M2": [62.5, 63.0, 61.5]})
    rows = {r["method"]: r for r in summary["rows"]}
    assert summary["baselines"] == ["student alone", "B2"]
    assert rows["M2"]["baseline"] == "B2" and rows["M1"]["baseline"] == "student alone"
    m2 = rows["M2"]["metrics"]["tar@0.001"]
    assert m2["gap_closed"] == pytest.approx((62.333333 - 61.0) / (90.0 - 61.0), rel=1e-5)
    assert m2["paired"]["mean_diff"] == pytest.approx((2.5 + 2.0 - 0.5) / 3)
    assert rows["B2"]["metrics"]["tar@0.001"]["paired"] is None
    lines = kd_bench.per_seed_table(summary, "tar@0.001", titles={"tar@0.001": "T3"})
    assert "of its baseline (student alone / B2)" in lines[0]
    assert "| M1 | 55.00 | 53.00 | 57.00 | yes |" in lines
    assert "| M2 | 62.50 | 63.00 | 61.50 | no |" in lines    # 61.5 is not above B2's 62
    assert "| B2 | 60.00 | 61.00 | 62.00 | -- |" in lines
    text = kd_bench.markdown_tables(summary, titles={"tar@0.001": "T3"})
    assert "| (gap to student alone, points) | 39.00 |" in text
    assert "| (gap to B2, points) | 29.00 |" in text


def test_a_converged_run_trains_the_reference_teacher_and_reports_the_checks(tmp_path, fakes):
    payload = kd_quality.run(_args(tmp_path, quick=False, regime="converged", seeds="0,1,2",
                                   schedule=kd_bench.PAPERS,
                                   methods="GKD fixed-k,AdaArcDistill alpha'," +
                                           kd_bench.LONG_BASELINE))
    task = kd_bench.merged_task(False, "converged")
    refs = [j for j in fakes.teacher_jobs if not j["build_cache"]]
    main = [j for j in fakes.teacher_jobs if j["build_cache"]]
    assert [j["epochs"] for j in refs] == list(task["teacher_reference_epochs"])
    assert [j["epochs"] for j in main] == [task["teacher"]["num_epoch"]]
    assert {m for m, _ in fakes.student_calls} == {
        kd_bench.BASELINE, kd_bench.GKD_BASELINE, "GKD fixed-k", "AdaArcDistill alpha'",
        kd_bench.LONG_BASELINE}
    checks = payload["checks"]
    assert [p["epochs"] for p in checks["teacher"]["curve"]] == sorted(
        list(task["teacher_reference_epochs"]) + [task["teacher"]["num_epoch"]])
    assert [s["baseline"] for s in checks["students"]] == [kd_bench.BASELINE]
    assert [g["baseline"] for g in checks["gaps"]] == [kd_bench.BASELINE]
    report = (tmp_path / "converged" / "results.md").read_text()
    assert report.startswith("Convergence and capacity checks (TAR@FAR=1e-3):")
    assert payload["regime"] == "converged" and payload["device"] == "cpu"
    # the same command again trains nothing: the reference teacher is cached too
    kd_quality.run(_args(tmp_path, quick=False, regime="converged", seeds="0,1,2",
                         schedule=kd_bench.PAPERS, methods="GKD fixed-k"))
    assert len(fakes.teacher_jobs) == 2


# --------------------------------------------------------------------------- device and digests

def test_device_option_reaches_every_job_and_its_digest(tmp_path, fakes):
    cpu = kd_quality.run(_args(tmp_path, seeds="0"))
    cuda = kd_quality.run(_args(tmp_path, seeds="0", device="cuda"))
    assert cpu["device"] == "cpu" and cuda["device"] == "cuda"
    assert len(fakes.teacher_jobs) == 2 and len(fakes.student_jobs) == 4     # nothing reused
    assert {j["device"] for j in fakes.teacher_jobs} == {"cpu", "cuda"}
    assert sorted(j["device"] for j in fakes.student_jobs) == ["cpu", "cpu", "cuda", "cuda"]
    # the large regime is the GPU one: real networks, cuda unless told otherwise
    kd_quality.run(_args(tmp_path, quick=False, regime="large", seeds="0", methods=""))
    large = [j for j in fakes.student_jobs if j["config"]["network"] == "mobilefacenet"]
    assert large and {j["device"] for j in large} == {"cuda"}
    assert fakes.teacher_jobs[-1]["config"]["network"] == "r50"


def test_every_large_regime_config_is_a_valid_trainer_config():
    from tools.kd_bench_jobs import run_config
    task = kd_bench.merged_task(False, "large")
    methods = kd_bench.methods_of(task)
    teacher = kd_quality.teacher_job(task, "/d", "data", "/r", "cuda")
    assert run_config(dict(teacher, repo=kd_quality.REPO)).network == "r50"
    for job in kd_quality.student_jobs(task, methods, "/d", "data", teacher, "/r", "cuda"
                                       )[:len(methods)]:
        assert job["device"] == "cuda"
        cfg = run_config(dict(job, repo=kd_quality.REPO))
        assert cfg.network == "mobilefacenet" and cfg.distill == job["config"]["distill"]


def test_pin_process_hides_the_gpu_for_cpu_jobs_and_requires_one_for_cuda(monkeypatch):
    import torch
    from tools import kd_bench_jobs
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="--device cuda: no CUDA device"):
        kd_bench_jobs.pin_process(device="cuda")
    with pytest.raises(ValueError, match="device must be"):
        kd_bench_jobs.pin_process(device="tpu")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    with pytest.raises(RuntimeError, match="cannot hide the GPU"):
        kd_bench_jobs.pin_process(device="cpu")
    assert os.environ["CUDA_VISIBLE_DEVICES"] == ""      # hidden before torch could start CUDA


def test_digests_follow_packages_and_device_but_not_paths():
    task = kd_bench.merged_task(False, "converged")
    env = kd_bench.environment()
    assert {"torch", "numpy", "cv2", "jpeg_decoder"} <= set(env)
    data = kd_quality.data_digest_of(task, env)
    assert kd_quality.data_digest_of(task, dict(env, cv2="5.0.0")) != data
    assert kd_quality.data_digest_of(kd_bench.merged_task(False), env) != data
    here = kd_quality.teacher_job(task, "/a/data", data, "/a")
    there = kd_quality.teacher_job(task, "/elsewhere/data", data, "/elsewhere/root")
    assert here["digest"] == there["digest"] and here["output"] != there["output"]
    assert kd_quality.teacher_job(task, "/a/data", data, "/a", "cuda")["digest"] != \
        here["digest"]
    ref = kd_quality.teacher_job(task, "/a/data", data, "/a", epochs=8)
    assert ref["digest"] != here["digest"] and ref["build_cache"] is False
    assert ref["epochs"] == 8 and here["build_cache"] and here["name"] == "teacher"
    methods = kd_bench.methods_of(task)
    a = kd_quality.student_jobs(task, methods, "/a/data", data, here, "/a")
    b = kd_quality.student_jobs(task, methods, "/b/data", data, there, "/b")
    c = kd_quality.student_jobs(task, methods, "/a/data", data, here, "/a", "cuda")
    assert [j["digest"] for j in a] == [j["digest"] for j in b]
    assert not {j["digest"] for j in a} & {j["digest"] for j in c}
    assert kd_quality.DEFAULT_ROOT == os.path.join(kd_quality.REPO, "work_dirs", "kd_bench")


def test_variation_knob_keeps_the_default_images_and_spreads_the_others():
    from tools import synthetic
    params = synthetic.identity_params(7, 0)
    default = synthetic.render_face(params, synthetic._image_rng(0, 1, 7, 3))
    same = synthetic.render_face(params, synthetic._image_rng(0, 1, 7, 3), variation=1.0)
    assert np.array_equal(default, same)
    # pixel spread over one identity's images grows with the variation
    def spread(v):
        imgs = np.stack([synthetic.render_face(params, synthetic._image_rng(0, 1, 7, j),
                                               variation=v).astype(np.float64)
                         for j in range(12)])
        return imgs.std(axis=0).mean()
    assert spread(2.0) > 1.2 * spread(1.0)
    with pytest.raises(ValueError, match="variation must be > 0"):
        synthetic.render_face(params, synthetic._image_rng(0, 1, 7, 3), variation=0.0)


def test_claim_verdicts_weigh_the_difference_against_the_seed_spread():
    summary = _summary_with({"student alone": [50.0, 52.0, 51.0],
                             "AdaArcDistill alpha'": [60.0, 61.0, 62.0],    # +10, spread 1
                             "AdaArcDistill alpha": [60.5, 61.5, 61.0],     # +0.33 vs alpha'
                             "ArcDistill": [70.0, 71.0, 72.0],              # -10: reversed
                             "B2": [60.0, 61.0, 62.0],
                             "GKD fixed-k": [61.0, 62.0, 63.0]})
    summary_rows = {r["method"]: r for r in summary["rows"]}
    summary_rows["GKD fixed-k"]["baseline"] = "B2"                      # a per-recipe baseline
    verdicts = {(v["better"], v["worse"]): v for v in kd_bench.claim_verdicts(summary)}
    assert set(verdicts) == {("AdaArcDistill alpha'", "student alone"),
                             ("AdaArcDistill alpha'", "ArcDistill"),
                             ("AdaArcDistill alpha'", "AdaArcDistill alpha"),
                             ("GKD fixed-k", "B2")}                      # absent rows skipped
    first = verdicts[("AdaArcDistill alpha'", "student alone")]
    assert first["verdict"] == "reproduced" and first["all_above"]
    assert first["diff"] == pytest.approx(10.0) and first["spread"] == pytest.approx(1.0)
    assert verdicts[("AdaArcDistill alpha'", "ArcDistill")]["verdict"] == "not reproduced"
    assert verdicts[("AdaArcDistill alpha'", "AdaArcDistill alpha")]["verdict"] == "inconclusive"
    assert verdicts[("GKD fixed-k", "B2")]["diff"] == pytest.approx(1.0)
    assert verdicts[("GKD fixed-k", "B2")]["verdict"] == "inconclusive"   # 1.0 is not > 1.0
    lines = kd_bench.claims_table(kd_bench.claim_verdicts(summary), "T3")
    assert lines[2] == "| claim | comparison | diff | spread | every seed above | verdict |"
    assert ("| distilled > student alone (AdaDistill) | AdaArcDistill alpha' vs student alone "
            "| +10.00 | 1.00 | yes | reproduced |") in lines
