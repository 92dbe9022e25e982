"""The pieces of the distillation-quality benchmark (bench/kd_quality.py) that hold no training:
the task and method tables, config digests (what a cached teacher or run was made from), the
aggregation of per-seed results into a table, the paired comparison with the student alone, and
the markdown / JSON / PNG reports.

A method is ONE entry of ``METHODS``: a name and the config keys it changes on top of the task's
shared student config (``TASK['student']``).  Everything else -- data, student network, schedule,
steps, seeds -- is the same for every method, so rows differ only by the method.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence

ARC = (1.0, 0.45, 0.0)     # AdaDistill's best ArcFace margin
COS = (1.0, 0.0, 0.35)     # AdaDistill's CosFace margin (GKD's is 0.4)

# The metrics of every row, in table order: key -> column title.
METRICS = {"tar@0.0001": "TAR@FAR=1e-4", "tar@0.001": "TAR@FAR=1e-3",
           "tar@0.01": "TAR@FAR=1e-2", "bin_acc": ".bin acc"}
HEADLINE = "tar@0.001"
BASELINE = "student alone"
LONG_BASELINE = "student alone, 2x epochs"

# The synthetic task: data sizes, networks, the shared schedule.  ``quick`` overrides a few keys.
TASK: Dict[str, Any] = {
    "data": {"num_ids": 200, "images_per_id": 24, "data_seed": 0, "bin_pairs": 600,
             "bin_ids": 100, "ijb_ids": 100, "ijb_templates_per_id": 4,
             "ijb_medias_per_template": 2, "ijb_images_per_media": 1,
             "ijb_impostor_ratio": 100},
    # keys of every run (teacher and students); rec/num_classes/output/seed are filled in
    "shared": {"embedding_size": 512, "teacher_embedding_size": 512, "margin_scale": 32.0,
               "batch_size": 64, "lr": 0.1, "lr_schedule": "cosine", "warmup_epoch": 0,
               "momentum": 0.9, "weight_decay": 5e-4, "optimizer": "sgd", "fp16": False,
               "teacher_fp16": False, "num_workers": 0, "val_targets": [],
               "verbose": 10 ** 9, "frequent": 50, "save_every": 10 ** 9,
               "keep_checkpoints": 1, "grad_clip": 5.0},
    "teacher": {"network": "tiny_t", "distill": "none", "margin_list": COS,
                "num_epoch": 4, "seed": 0},
    # gkd_warmup_epochs 0: GKD's KD ramp is per (integer) epoch, so a ramp of one epoch would
    # switch the KD term off for a third of the run
    "student": {"network": "kdb_student", "teacher_network": "tiny_t", "num_epoch": 3,
                "gkd_warmup_epochs": 0},
    "seeds": (0, 1, 2),
}
QUICK: Dict[str, Any] = {
    "data": {"num_ids": 100, "images_per_id": 16, "bin_pairs": 300, "bin_ids": 50,
             "ijb_ids": 50},
    "seeds": (0,)}


@dataclass(frozen=True)
class Method:
    """One row of the benchmark: ``name`` and the config keys it sets on the student run."""
    name: str
    config: Mapping[str, Any] = field(default_factory=dict)


def _gkd_k(num_classes: int) -> int:
    """GKD's fixed k at the paper's fraction of the classes (10,000 of 85,742)."""
    return max(1, round(num_classes * 10000 / 85742))


def method_table(num_classes: int) -> List[Method]:
    """The methods, in table order (``num_classes`` sizes GKD's k)."""
    return [
        Method(BASELINE, {"distill": "none", "margin_list": COS}),
        Method("AdaArcDistill alpha'", {"distill": "adadistill", "alpha": "weighted",
                                        "margin_list": ARC}),
        Method("AdaArcDistill alpha", {"distill": "adadistill", "alpha": "plain",
                                       "margin_list": ARC}),
        Method("AdaCosDistill alpha'", {"distill": "adadistill", "alpha": "weighted",
                                        "margin_list": COS}),
        Method("AdaCosDistill alpha", {"distill": "adadistill", "alpha": "plain",
                                       "margin_list": COS}),
        Method("ArcDistill", {"distill": "arcdistill", "margin_list": ARC}),
        Method("CosDistill", {"distill": "cosdistill", "margin_list": COS}),
        Method("GKD fixed-k", {"distill": "gkd", "margin_list": COS, "gkd_k": _gkd_k(num_classes),
                               "gkd_beta": 8.0, "gkd_tau": None}),
        Method("GKD adaptive", {"distill": "gkd", "margin_list": COS, "gkd_tau": 0.93,
                                "gkd_beta": 4.0}),
        Method("feature MSE", {"distill": "feature_mse", "margin_list": COS,
                               "feature_kd_weight": 1.0}),
        # the comparison methods of both papers (weights: their heads' registered defaults)
        Method("logit KD", {"distill": "kd", "margin_list": COS}),
        Method("FitNet", {"distill": "fitnet", "margin_list": COS}),
        Method("angular (ShrinkTeaNet)", {"distill": "angular", "margin_list": ARC}),
        Method("RKD", {"distill": "rkd", "margin_list": COS}),
        Method("SP", {"distill": "sp", "margin_list": ARC}),
        Method("CCKD", {"distill": "cckd", "margin_list": ARC}),
        Method("EKD", {"distill": "ekd", "margin_list": (1.0, 0.4, 0.0)}),
        Method("MarginDistillation", {"distill": "margin_distillation",
                                      "margin_list": (1.0, 0.5, 0.0), "margin_grad": "exact"}),
        # a reference row, not a method: the student alone trained twice as long, to tell how
        # much of the teacher - student gap is the short schedule rather than capacity
        Method(LONG_BASELINE, {"distill": "none", "margin_list": COS, "num_epoch": 6}),
    ]


def merged_task(quick: bool) -> Dict[str, Any]:
    """``TASK`` with ``QUICK``'s overrides applied when ``quick``."""
    task = json.loads(json.dumps(TASK))          # deep copy; tuples become lists
    if quick:
        for key, value in QUICK.items():
            if isinstance(value, dict):
                task[key].update(value)
            else:
                task[key] = list(value)
    return task


# --------------------------------------------------------------------------- digests

def _canonical(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _canonical(v) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, (list, tuple)):
        return [_canonical(v) for v in obj]
    if isinstance(obj, float) and obj.is_integer():
        return int(obj) if abs(obj) < 2 ** 53 else obj
    return obj


def config_digest(obj: Any) -> str:
    """sha256 (hex) of ``obj`` as canonical JSON: key order, tuple vs list and ``1.0`` vs ``1``
    do not change it; any value that does change it makes a new digest."""
    text = json.dumps(_canonical(obj), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


# The source a run's numbers depend on: the trainer, the plugin, data reading, evaluation, the
# synthetic data and this harness.  Its digest is part of every teacher / run identity, so a
# changed line of code retrains instead of reusing a run made by other code.
# (This file is not hashed: what in it changes a run -- TASK, a method's keys -- reaches the run's
# digest through its config; the rest only formats reports.)
CODE_PATHS = ("plugins", "engine", "data", "eval", "configs/base.py", "tools/synthetic.py",
              "tools/kd_bench_jobs.py")


def code_digest(repo: str, paths: Sequence[str] = CODE_PATHS) -> str:
    """sha256 (hex) over the ``*.py`` files under ``paths`` of ``repo`` (relative path + bytes of
    each, in sorted order).  Raises FileNotFoundError naming a path that does not exist."""
    files = []
    for rel in paths:
        full = os.path.join(repo, rel)
        if os.path.isfile(full):
            files.append(rel)
        elif os.path.isdir(full):
            for folder, dirs, names in os.walk(full):
                dirs[:] = sorted(d for d in dirs if d != "__pycache__")
                files += [os.path.relpath(os.path.join(folder, n), repo) for n in names
                          if n.endswith(".py")]
        else:
            raise FileNotFoundError(f"code_digest: {full} does not exist (CODE_PATHS names the "
                                    f"sources a benchmark run depends on)")
    digest = hashlib.sha256()
    for rel in sorted(set(files)):
        digest.update(rel.replace(os.sep, "/").encode() + b"\0")
        with open(os.path.join(repo, rel), "rb") as handle:
            digest.update(handle.read())
        digest.update(b"\0")
    return digest.hexdigest()


def cached_result(folder: str, marker: str, digest: str) -> Optional[Dict[str, Any]]:
    """The result JSON ``folder/marker`` if it exists and was made from ``digest``, else None
    (a marker of another digest -- a hash-prefix clash or a hand edit -- is not reused)."""
    path = os.path.join(folder, marker)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as handle:
            result = json.load(handle)
    except (OSError, ValueError):
        return None
    return result if result.get("digest") == digest else None


def job_folder(root: str, kind: str, digest: str) -> str:
    """``root/<kind>_<first 12 hex digits of digest>``."""
    return os.path.join(root, f"{kind}_{digest[:12]}")


# --------------------------------------------------------------------------- statistics

def mean_std(values: Sequence[float]) -> tuple:
    """Mean and sample standard deviation (n - 1; 0.0 for one value)."""
    n = len(values)
    if n == 0:
        raise ValueError("mean_std of no values")
    mean = sum(values) / n
    if n == 1:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def t_two_sided_p(t: float, df: int) -> float:
    """Two-sided p-value of Student's t with ``df`` degrees of freedom."""
    from scipy import stats
    return float(2.0 * stats.t.sf(abs(t), df))


def paired_comparison(baseline: Mapping[int, float], method: Mapping[int, float]
                      ) -> Dict[str, Any]:
    """Paired differences ``method[seed] - baseline[seed]`` over the seeds both have.

    Returns ``n``, ``mean_diff``, ``std_diff`` (n - 1), ``t`` = mean / (std / sqrt(n)) and its
    two-sided ``p`` (df = n - 1; None when n < 2 or all differences are equal -- then ``t`` is
    +-inf for a non-zero mean, 0 for a zero mean), and the sign count ``wins`` / ``losses`` /
    ``ties``.  Raises ValueError when no seed is shared."""
    seeds = sorted(set(baseline) & set(method))
    if not seeds:
        raise ValueError(f"no common seeds: baseline {sorted(baseline)}, method {sorted(method)}")
    diffs = [float(method[s]) - float(baseline[s]) for s in seeds]
    n = len(diffs)
    mean, std = mean_std(diffs)
    t: Optional[float]
    p: Optional[float] = None
    if n < 2:
        t = None
    elif std == 0.0:
        t = 0.0 if mean == 0.0 else math.copysign(math.inf, mean)
    else:
        t = mean / (std / math.sqrt(n))
        p = t_two_sided_p(t, n - 1)
    return {"n": n, "seeds": seeds, "mean_diff": mean, "std_diff": std, "t": t, "p": p,
            "wins": sum(d > 0 for d in diffs), "losses": sum(d < 0 for d in diffs),
            "ties": sum(d == 0 for d in diffs)}


def gap_closed(method_mean: float, student_mean: float, teacher: float) -> Optional[float]:
    """``(method - student) / (teacher - student)``: 0 = no better than the student alone,
    1 = as good as the teacher; None when the teacher is not above the student."""
    gap = teacher - student_mean
    if gap <= 0:
        return None
    return (method_mean - student_mean) / gap


def aggregate(runs: Sequence[Mapping[str, Any]], teacher: Mapping[str, float],
              order: Sequence[str], metrics: Sequence[str] = tuple(METRICS),
              baseline: str = BASELINE) -> Dict[str, Any]:
    """Rows of the table from per-run results ``{"method", "seed", "metrics": {key: value}}``.

    Each row (methods in ``order``; a method without runs is left out): per metric the mean, std
    and per-seed values, the fraction of the teacher - student-alone gap closed, and the paired
    comparison with ``baseline`` on the same seeds (None for the baseline itself)."""
    by_method: Dict[str, Dict[int, Mapping[str, float]]] = {}
    for run in runs:
        seeds = by_method.setdefault(run["method"], {})
        if run["seed"] in seeds:
            raise ValueError(f"two results for {run['method']!r} seed {run['seed']}")
        seeds[run["seed"]] = run["metrics"]
    if baseline not in by_method:
        raise ValueError(f"no runs of the baseline {baseline!r}")
    base = by_method[baseline]
    rows = []
    for name in order:
        if name not in by_method:
            continue
        seeds = by_method[name]
        row: Dict[str, Any] = {"method": name, "n": len(seeds), "seeds": sorted(seeds),
                               "metrics": {}}
        for key in metrics:
            values = {s: float(m[key]) for s, m in sorted(seeds.items())}
            mean, std = mean_std(list(values.values()))
            base_mean, _ = mean_std([float(m[key]) for m in base.values()])
            row["metrics"][key] = {
                "mean": mean, "std": std, "values": values,
                "gap_closed": gap_closed(mean, base_mean, float(teacher[key])),
                "paired": None if name == baseline else paired_comparison(
                    {s: float(m[key]) for s, m in base.items()}, values)}
        rows.append(row)
    return {"teacher": {k: float(teacher[k]) for k in metrics}, "rows": rows,
            "baseline": baseline, "metrics": list(metrics)}


# --------------------------------------------------------------------------- reports

def _fmt(value: Optional[float], digits: int = 2, signed: bool = False) -> str:
    if value is None:
        return "--"
    if math.isinf(value):
        return "+inf" if value > 0 else "-inf"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def markdown_tables(summary: Mapping[str, Any], titles: Mapping[str, str] = METRICS) -> str:
    """Three markdown tables over every metric: mean +- std (teacher first); the fraction of the
    teacher - student-alone gap closed; the paired difference with the baseline on the same
    seeds (mean +- std, t, two-sided p, wins/losses/ties); then ``per_seed_table`` of the
    headline metric (the first metric when the headline is not among them)."""
    metrics = summary["metrics"]
    head = " | ".join(titles[k] for k in metrics)
    rule = "|---|" + "---|" * len(metrics)
    lines = ["| method | n | " + head + " |", "|---" + rule]
    lines.append("| teacher | 1 | " + " | ".join(_fmt(summary["teacher"][k]) for k in metrics)
                 + " |")
    for row in summary["rows"]:
        cells = [f"{_fmt(row['metrics'][k]['mean'])} +- {_fmt(row['metrics'][k]['std'])}"
                 for k in metrics]
        lines.append(f"| {row['method']} | {row['n']} | " + " | ".join(cells) + " |")
    base = next((r for r in summary["rows"] if r["method"] == summary["baseline"]), None)
    gaps = [_fmt(summary["teacher"][k] - base["metrics"][k]["mean"]) if base else "--"
            for k in metrics]
    lines += ["", "Fraction of the teacher - student-alone gap closed, "
              "(method - student alone) / (teacher - student alone), on the means:", "",
              "| method | " + head + " |", rule,
              "| (gap, points) | " + " | ".join(gaps) + " |"]
    for row in summary["rows"]:
        lines.append(f"| {row['method']} | " + " | ".join(
            _fmt(row["metrics"][k]["gap_closed"]) for k in metrics) + " |")
    lines += ["", f"Paired difference with {summary['baseline']} (same seeds): mean +- std of "
              "the per-seed differences, t = mean / (std / sqrt(n)), two-sided p (df = n - 1), "
              "wins/losses/ties:", "", "| method | " + head + " |", rule]
    for row in summary["rows"]:
        if row["method"] == summary["baseline"]:
            continue
        cells = []
        for k in metrics:
            paired = row["metrics"][k]["paired"]
            cells.append(f"{_fmt(paired['mean_diff'], signed=True)} +- "
                         f"{_fmt(paired['std_diff'])} (t {_fmt(paired['t'])}, p "
                         f"{_fmt(paired['p'], 3)}, {paired['wins']}/{paired['losses']}/"
                         f"{paired['ties']})")
        lines.append(f"| {row['method']} | " + " | ".join(cells) + " |")
    headline = HEADLINE if HEADLINE in metrics else metrics[0]
    return "\n".join(lines + [""] + per_seed_table(summary, headline, titles)) + "\n"


def per_seed_table(summary: Mapping[str, Any], key: str = HEADLINE,
                   titles: Mapping[str, str] = METRICS) -> List[str]:
    """Markdown lines: every seed's ``key`` per row, and whether the row's WORST seed is above
    the baseline's BEST seed (a statement that needs no distributional assumption)."""
    rows = summary["rows"]
    base = next((r for r in rows if r["method"] == summary["baseline"]), None)
    seeds = sorted({s for r in rows for s in r["metrics"][key]["values"]})
    lines = [f"{titles[key]} per seed, and whether every seed of the row is above every seed "
             f"of {summary['baseline']}:", "",
             "| method | " + " | ".join(f"seed {s}" for s in seeds) + " | all above |",
             "|---|" + "---|" * (len(seeds) + 1)]
    best_base = max(base["metrics"][key]["values"].values()) if base else None
    for row in rows:
        values = row["metrics"][key]["values"]
        above = "--" if row is base or best_base is None else \
            ("yes" if min(values.values()) > best_base else "no")
        lines.append(f"| {row['method']} | " + " | ".join(
            _fmt(values.get(s)) for s in seeds) + f" | {above} |")
    return lines


def plot_summary(summary: Mapping[str, Any], path: str,
                 titles: Mapping[str, str] = METRICS) -> str:
    """Bars (mean +- std, seeds as dots) per metric, teacher and student-alone levels as lines;
    written atomically as PNG (matplotlib Agg canvas, no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from plugins.atomic_io import atomic_output

    metrics = summary["metrics"]
    rows = summary["rows"]
    fig = Figure(figsize=(4.2 * len(metrics), 0.45 * len(rows) + 2.0))
    FigureCanvasAgg(fig)
    names = [r["method"] for r in rows]
    for i, key in enumerate(metrics):
        ax = fig.add_subplot(1, len(metrics), i + 1)
        means = [r["metrics"][key]["mean"] for r in rows]
        stds = [r["metrics"][key]["std"] for r in rows]
        ys = list(range(len(rows)))[::-1]
        ax.barh(ys, means, xerr=stds, color="#8fb3d9", ecolor="#333333", capsize=3)
        for y, r in zip(ys, rows):
            vals = list(r["metrics"][key]["values"].values())
            ax.plot(vals, [y] * len(vals), "k.", markersize=4)
        ax.axvline(summary["teacher"][key], color="#c0392b", linestyle="--", label="teacher")
        base = next(r for r in rows if r["method"] == summary["baseline"])
        ax.axvline(base["metrics"][key]["mean"], color="#555555", linestyle=":",
                   label=summary["baseline"])
        lo = min(min(means) - max(stds + [0.0]), summary["teacher"][key])
        hi = max(max(means) + max(stds + [0.0]), summary["teacher"][key])
        ax.set_xlim(max(0.0, lo - 0.15 * (hi - lo) - 0.5), min(100.0, hi + 0.1 * (hi - lo) + 0.5))
        ax.set_yticks(ys)
        ax.set_yticklabels(names if i == 0 else [""] * len(names))
        ax.set_title(f"{titles[key]} (%)")
        if i == 0:
            ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    with atomic_output(path) as handle:
        fig.savefig(handle, format="png", dpi=110)
    return path
