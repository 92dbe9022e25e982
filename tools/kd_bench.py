"""The pieces of the distillation-quality benchmark (bench/kd_quality.py) that hold no training:
the regimes (task, networks, schedules) and method tables, config digests (what a cached teacher
or run was made from), the aggregation of per-seed results into a table, the paired comparison
with the student alone, the convergence and capacity checks, and the markdown / JSON / PNG reports.

A method is ONE entry of ``method_table``: a name and the config keys it changes on top of the
regime's shared student config.  Everything else -- data, student network, schedule, steps,
seeds -- is the same for every method, so rows differ only by the method.  The schedule is the
regime's (``short``: the demo's cosine; ``converged`` / ``large``: the shape of GKD's recipe,
``recipe_config``, scaled to the regime's epochs); ``schedule="papers"`` instead runs each method
on the shape of its own paper's recipe (AdaDistill's step decay or GKD's) and compares it with
the student alone trained on that same recipe.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import platform
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

# The papers' recipes (docs/RECIPES.md) whose schedule SHAPES a regime can use.
ADADISTILL_RECIPE = "AdaDistill"
GKD_RECIPE = "GKD"
PAPERS = "papers"        # each method on its own paper's recipe, one baseline per recipe
SCHEDULES = (ADADISTILL_RECIPE, GKD_RECIPE, PAPERS)
GKD_BASELINE = "student alone, GKD recipe"
GKD_LONG_BASELINE = "student alone, GKD recipe, 2x epochs"

# The keys of every run (teacher and students); rec/num_classes/output/seed are filled in.
_SHARED: Dict[str, Any] = {
    "embedding_size": 512, "teacher_embedding_size": 512, "margin_scale": 32.0,
    "batch_size": 64, "lr": 0.1, "lr_schedule": "cosine", "warmup_epoch": 0,
    "momentum": 0.9, "weight_decay": 5e-4, "optimizer": "sgd", "fp16": False,
    "teacher_fp16": False, "num_workers": 0, "val_targets": [],
    "verbose": 10 ** 9, "frequent": 50, "save_every": 10 ** 9,
    "keep_checkpoints": 1, "grad_clip": 5.0}

# The ``short`` regime (the CPU demo's): data sizes, networks, the shared schedule.  A teacher
# signal on a short schedule: neither network is converged.  ``QUICK`` overrides a few keys.
TASK: Dict[str, Any] = {
    "data": {"num_ids": 200, "images_per_id": 24, "data_seed": 0, "bin_pairs": 600,
             "bin_ids": 100, "ijb_ids": 100, "ijb_templates_per_id": 4,
             "ijb_medias_per_template": 2, "ijb_images_per_media": 1,
             "ijb_impostor_ratio": 100},
    "shared": dict(_SHARED),
    "teacher": {"network": "tiny_t", "distill": "none", "margin_list": COS,
                "num_epoch": 4, "seed": 0},
    # gkd_warmup_epochs 0: GKD's KD ramp is per (integer) epoch, so a ramp of one epoch would
    # switch the KD term off for a third of the run
    "student": {"network": "kdb_student", "teacher_network": "tiny_t", "num_epoch": 3,
                "gkd_warmup_epochs": 0},
    "seeds": (0, 1, 2),
    "schedule": None,                # every run on the shared keys above
    "teacher_reference_epochs": (),  # extra teachers trained for the convergence evidence only
    "checks": {"gap_min": 5.0, "teacher_tolerance": 1.0},
    "device": "cpu",
}
QUICK: Dict[str, Any] = {
    "data": {"num_ids": 100, "images_per_id": 16, "bin_pairs": 300, "bin_ids": 50,
             "ijb_ids": 50},
    "seeds": (0,)}

# The ``converged`` regime: teacher and students trained to convergence (the evidence is in the
# report's checks: the teacher at half its epochs, the student alone at twice its epochs), on a
# task where the capacity gap survives convergence.  How it was sized (docs/RESULTS.md, "How the
# converged regime was sized"): within-identity variation 1.25 (at 1.0 the converged student
# alone comes within 3.5 points of the teacher, at 2.0 neither network converges in the hour);
# the patch-stem networks of tools/kd_bench_nets.py (about 2.4x the images per second of the
# short regime's, which is what makes a plateaued teacher and 33 student runs fit in the hour);
# students 48 epochs (at 24 the student alone still gained 2.89 points from doubling, more than
# its seed std of 2.02).
CONVERGED: Dict[str, Any] = {
    "data": {"num_ids": 200, "images_per_id": 24, "data_seed": 0, "variation": 1.25,
             "bin_pairs": 600, "bin_ids": 100, "ijb_ids": 200, "ijb_templates_per_id": 4,
             "ijb_medias_per_template": 1, "ijb_images_per_media": 1,
             "ijb_impostor_ratio": 100},
    "shared": dict(_SHARED),
    "teacher": {"network": "kdb_patch_teacher", "distill": "none", "margin_list": COS,
                "num_epoch": 48, "seed": 0},
    "student": {"network": "kdb_patch_student", "teacher_network": "kdb_patch_teacher",
                "num_epoch": 48},
    "seeds": (0, 1, 2),
    "schedule": GKD_RECIPE,
    # the rows the papers' claims are about (``CLAIMS``) and the convergence reference: 33 runs
    # of 48-96 epochs and the teacher fill the 60-minute budget on 2 cores (the other comparison
    # methods stay in the short regime; ``--methods`` names any row of ``method_table`` to add it)
    "methods": (BASELINE, "AdaArcDistill alpha'", "AdaArcDistill alpha", "AdaCosDistill alpha'",
                "AdaCosDistill alpha", "ArcDistill", "CosDistill", "GKD fixed-k", "GKD adaptive",
                "logit KD", LONG_BASELINE),
    "teacher_reference_epochs": (24,),
    "checks": {"gap_min": 5.0, "teacher_tolerance": 1.0},
    "device": "cpu",
}

# The ``large`` regime (``--device cuda``): a real iresnet50 teacher and AdaDistill's
# MobileFaceNet student on a few thousand synthetic identities, sized for about ten minutes on one
# GPU with several jobs side by side (not measured: no GPU was at hand when it was written).
LARGE: Dict[str, Any] = {
    "data": {"num_ids": 2000, "images_per_id": 8, "data_seed": 0, "variation": 2.0,
             "bin_pairs": 1200, "bin_ids": 300, "ijb_ids": 300, "ijb_templates_per_id": 4,
             "ijb_medias_per_template": 1, "ijb_images_per_media": 1,
             "ijb_impostor_ratio": 100},
    "shared": dict(_SHARED, batch_size=128, num_workers=2),
    "teacher": {"network": "r50", "distill": "none", "margin_list": COS,
                "num_epoch": 8, "seed": 0},
    "student": {"network": "mobilefacenet", "teacher_network": "r50", "num_epoch": 8},
    "seeds": (0, 1, 2),
    "schedule": GKD_RECIPE,
    "teacher_reference_epochs": (4,),
    "checks": {"gap_min": 5.0, "teacher_tolerance": 1.0},
    "device": "cuda",
}

REGIMES: Dict[str, Dict[str, Any]] = {"short": TASK, "converged": CONVERGED, "large": LARGE}


@dataclass(frozen=True)
class Method:
    """One row of the benchmark: ``name`` and the config keys it sets on the student run.

    ``recipe``: the paper recipe whose schedule shape the row runs on under
    ``schedule="papers"``; ``baseline``: the row it is compared with (the student alone on the
    same schedule); ``doubles``: for a reference row, the row whose epochs it doubles (the
    convergence check), else ""."""
    name: str
    config: Mapping[str, Any] = field(default_factory=dict)
    recipe: str = ADADISTILL_RECIPE
    baseline: str = BASELINE
    doubles: str = ""


def _gkd_k(num_classes: int) -> int:
    """GKD's fixed k at the paper's fraction of the classes (10,000 of 85,742)."""
    return max(1, round(num_classes * 10000 / 85742))


def scaled_milestones(milestones: Sequence[int], paper_epochs: int, epochs: int
                      ) -> List[int]:
    """The 0-based decay epochs ``milestones`` of a ``paper_epochs`` schedule at the same
    fractions of ``epochs`` (rounded; kept strictly increasing and inside ``[1, epochs - 1]``).
    AdaDistill's (7, 13, 19, 24) of 26 -> (4, 8, 12, 15) of 16."""
    if epochs < len(milestones) + 1:
        raise ValueError(f"scaled_milestones: {epochs} epochs cannot hold {len(milestones)} "
                         f"decays")
    out: List[int] = []
    for i, m in enumerate(milestones):
        value = int(math.floor(m * epochs / paper_epochs + 0.5))
        low = out[-1] + 1 if out else 1
        high = epochs - (len(milestones) - i)
        out.append(min(max(value, low), high))
    return out


def recipe_config(recipe: str, epochs: int, distill: str) -> Dict[str, Any]:
    """The schedule keys of a paper's recipe (docs/RECIPES.md) scaled from its epochs to
    ``epochs``; the peak lr, batch and margins stay the regime's.

    - ``AdaDistill`` (26 epochs): lr x 0.1 from the 0-based epochs 7, 13, 19, 24 (at the same
      fractions of ``epochs``), no warm-up, SGD momentum, grad-norm clip 5.
    - ``GKD`` (20 epochs): one cosine over all steps to 2.5e-7, its first 4/20 of the epochs
      replaced by a linear warm-up from 2.5e-7, SGD Nesterov, no clipping; GKD's KD weight
      ``min(epoch / W, 1)`` with W = 10/20 of the epochs (logit KD: no ramp, as in GKD's
      release).
    """
    if recipe == ADADISTILL_RECIPE:
        return {"lr_schedule": "step", "lr_steps": scaled_milestones((7, 13, 19, 24), 26, epochs),
                "warmup_epoch": 0, "grad_clip": 5.0, "nesterov": False}
    if recipe == GKD_RECIPE:
        keys: Dict[str, Any] = {"lr_schedule": "cosine", "warmup_epoch": epochs * 4 / 20,
                                "warmup_lr": 2.5e-7, "lr_min": 2.5e-7, "nesterov": True,
                                "grad_clip": 0.0}
        if distill == "gkd":
            keys["gkd_warmup_epochs"] = epochs * 10 / 20
        return keys
    raise ValueError(f"recipe_config: unknown recipe {recipe!r}; known: "
                     f"{[ADADISTILL_RECIPE, GKD_RECIPE]}")


def method_table(num_classes: int, student_epochs: int = 3, per_recipe: bool = False
                 ) -> List[Method]:
    """The methods, in table order (``num_classes`` sizes GKD's k).

    One baseline, every row on the regime's schedule, and the reference row ``student alone,
    2x epochs``; ``per_recipe=True`` (``schedule="papers"``): the AdaDistill paper's rows and the
    comparison methods its recipe family serves (docs/RECIPES.md, the shipped
    ``configs/ms1mv2_mbf_*``) on AdaDistill's schedule, then GKD's rows and the methods of its
    family (logit KD, FitNet, RKD) on GKD's, each family with its own student alone and that
    student trained twice as long."""
    step, cosine = ADADISTILL_RECIPE, GKD_RECIPE
    gkd_base = GKD_BASELINE if per_recipe else BASELINE
    core = [
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
                               "gkd_beta": 8.0, "gkd_tau": None}, cosine, gkd_base),
        Method("GKD adaptive", {"distill": "gkd", "margin_list": COS, "gkd_tau": 0.93,
                                "gkd_beta": 4.0}, cosine, gkd_base),
        Method("feature MSE", {"distill": "feature_mse", "margin_list": COS,
                               "feature_kd_weight": 1.0}),
        # the comparison methods of both papers (weights: their heads' registered defaults)
        Method("logit KD", {"distill": "kd", "margin_list": COS}, cosine, gkd_base),
        Method("FitNet", {"distill": "fitnet", "margin_list": COS}, cosine, gkd_base),
        Method("angular (ShrinkTeaNet)", {"distill": "angular", "margin_list": ARC}),
        Method("RKD", {"distill": "rkd", "margin_list": COS}, cosine, gkd_base),
        Method("SP", {"distill": "sp", "margin_list": ARC}),
        Method("CCKD", {"distill": "cckd", "margin_list": ARC}),
        Method("EKD", {"distill": "ekd", "margin_list": (1.0, 0.4, 0.0)}),
        Method("MarginDistillation", {"distill": "margin_distillation",
                                      "margin_list": (1.0, 0.5, 0.0), "margin_grad": "exact"}),
    ]
    # reference rows, not methods: the student alone trained twice as long, to tell whether the
    # student alone has converged (and, on the short schedule, how much of the gap is schedule)
    long_step = Method(LONG_BASELINE, {"distill": "none", "margin_list": COS,
                                       "num_epoch": 2 * student_epochs}, doubles=BASELINE)
    if not per_recipe:
        return core + [long_step]
    by_recipe = [m for m in core if m.recipe == step] + [long_step]
    by_recipe.append(Method(GKD_BASELINE, {"distill": "none", "margin_list": COS}, cosine,
                            GKD_BASELINE))
    by_recipe += [m for m in core if m.recipe == cosine]
    by_recipe.append(Method(GKD_LONG_BASELINE, {"distill": "none", "margin_list": COS,
                                                "num_epoch": 2 * student_epochs}, cosine,
                            GKD_BASELINE, doubles=GKD_BASELINE))
    return by_recipe


def methods_of(task: Mapping[str, Any], every: bool = False) -> List[Method]:
    """``method_table`` for a merged regime ``task``: the rows its ``methods`` names (in table
    order; with ``schedule="papers"`` each kept row's baselines come along), all rows when the
    task names none or ``every``."""
    table = method_table(task["data"]["num_ids"], int(task["student"]["num_epoch"]),
                         task["schedule"] == PAPERS)
    names = task.get("methods")
    if every or not names:
        return table
    kept = {m.name for m in rows_named(table, names, "the regime's methods")}
    kept |= {m.name for m in table if m.doubles in kept}
    return [m for m in table if m.name in kept]


def rows_named(table: Sequence[Method], names, what: str) -> List[Method]:
    """The rows of ``table`` named in ``names`` and the baseline of each, in table order;
    ValueError (``what``: who named them) for a name that is not a row."""
    unknown = set(names) - {m.name for m in table}
    if unknown:
        raise ValueError(f"{what}: unknown {sorted(unknown)}; known: {[m.name for m in table]}")
    kept = set(names) | {m.baseline for m in table if m.name in names}
    return [m for m in table if m.name in kept]


def _schedule_keys(task: Mapping[str, Any], recipe: str, epochs: int, distill: str
                   ) -> Dict[str, Any]:
    """The schedule keys of a run of ``epochs`` under the task's schedule (none: the shared
    keys stand; a recipe name: that recipe for every run; ``papers``: ``recipe``)."""
    schedule = task["schedule"]
    if schedule is None:
        return {}
    return recipe_config(recipe if schedule == PAPERS else schedule, epochs, distill)


def student_config(task: Mapping[str, Any], method: Method) -> Dict[str, Any]:
    """The config keys of ``method``'s runs (no seed, paths or data sizes): the regime's shared
    and student keys, the schedule scaled to the run's epochs, and the method's own keys."""
    config = dict(task["shared"], **task["student"])
    epochs = int(method.config.get("num_epoch", config["num_epoch"]))
    config.update(_schedule_keys(task, method.recipe, epochs, method.config["distill"]))
    config.update(method.config)
    return config


def teacher_config(task: Mapping[str, Any], epochs: Optional[int] = None) -> Dict[str, Any]:
    """The teacher's config keys, for ``epochs`` (default: the regime's): the shared and teacher
    keys with the regime's schedule (the GKD shape under ``papers``: one teacher serves both
    recipes)."""
    config = dict(task["shared"], **task["teacher"])
    if epochs is not None:
        config["num_epoch"] = int(epochs)
    schedule = task["schedule"]
    if schedule is not None:
        recipe = GKD_RECIPE if schedule == PAPERS else schedule
        config.update(recipe_config(recipe, int(config["num_epoch"]), "none"))
    return config


def merged_task(quick: bool, regime: str = "short", schedule: Optional[str] = None
                ) -> Dict[str, Any]:
    """The regime's task (a deep copy; tuples become lists), with ``QUICK``'s overrides applied
    when ``quick`` (the short regime only) and ``schedule`` (one of ``SCHEDULES``) replacing the
    regime's schedule when given."""
    if regime not in REGIMES:
        raise ValueError(f"unknown regime {regime!r}; known: {sorted(REGIMES)}")
    if quick and regime != "short":
        raise ValueError(f"--quick is a smoke test of the short regime; the {regime} regime has "
                         f"no quick variant")
    task = json.loads(json.dumps(REGIMES[regime]))          # deep copy; tuples become lists
    task["regime"] = regime
    if quick:
        for key, value in QUICK.items():
            if isinstance(value, dict):
                task[key].update(value)
            else:
                task[key] = list(value)
    if schedule is not None:
        if schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {schedule!r}; known: {list(SCHEDULES)}")
        task["schedule"] = schedule
        try:                           # a shape the regime's epochs cannot hold fails here
            for method in methods_of(task):
                student_config(task, method)
        except ValueError as exc:
            raise ValueError(f"--schedule {schedule} in the {regime} regime: {exc}") from None
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
              "tools/kd_bench_jobs.py", "tools/kd_bench_nets.py")


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


def environment() -> Dict[str, str]:
    """The versions a run's numbers depend on besides the code: Python, torch, numpy and the JPEG
    encoder (OpenCV, else Pillow) and decoder of the synthetic data (another libjpeg-turbo moves
    pixels by a grey level).  Part of every data / teacher / run digest, so a cache made under
    other packages is not reused."""
    import numpy
    import torch

    from data.image_codec import decoder_name
    env = {"python": platform.python_version(), "torch": torch.__version__,
           "numpy": numpy.__version__, "machine": platform.machine(),
           "jpeg_decoder": decoder_name()}
    for module in ("cv2", "PIL", "simplejpeg"):
        try:
            env[module] = str(__import__(module).__version__)
        except ImportError:
            env[module] = "absent"
    return env


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
              baseline: str = BASELINE, baselines: Optional[Mapping[str, str]] = None
              ) -> Dict[str, Any]:
    """Rows of the table from per-run results ``{"method", "seed", "metrics": {key: value}}``.

    Each row (methods in ``order``; a method without runs is left out): per metric the mean, std
    and per-seed values, the fraction of the teacher - baseline gap closed, and the paired
    comparison with its baseline on the same seeds (None for a baseline itself).  A row's
    baseline is ``baselines[name]`` when given, else ``baseline``; the summary's ``baseline`` is
    the first, ``baselines`` lists every baseline with runs, in ``order``."""
    by_method: Dict[str, Dict[int, Mapping[str, float]]] = {}
    for run in runs:
        seeds = by_method.setdefault(run["method"], {})
        if run["seed"] in seeds:
            raise ValueError(f"two results for {run['method']!r} seed {run['seed']}")
        seeds[run["seed"]] = run["metrics"]
    if baseline not in by_method:
        raise ValueError(f"no runs of the baseline {baseline!r}")
    baseline_of = {name: (baselines or {}).get(name, baseline) for name in order}
    rows = []
    for name in order:
        if name not in by_method:
            continue
        own = baseline_of[name]
        if own not in by_method:
            raise ValueError(f"no runs of {own!r}, the baseline of {name!r}")
        base = by_method[own]
        seeds = by_method[name]
        row: Dict[str, Any] = {"method": name, "n": len(seeds), "seeds": sorted(seeds),
                               "baseline": own, "metrics": {}}
        for key in metrics:
            values = {s: float(m[key]) for s, m in sorted(seeds.items())}
            mean, std = mean_std(list(values.values()))
            base_mean, _ = mean_std([float(m[key]) for m in base.values()])
            row["metrics"][key] = {
                "mean": mean, "std": std, "values": values,
                "gap_closed": gap_closed(mean, base_mean, float(teacher[key])),
                "paired": None if name == own else paired_comparison(
                    {s: float(m[key]) for s, m in base.items()}, values)}
        rows.append(row)
    names = [r["method"] for r in rows]
    used = [b for b in order if b in names and any(r["baseline"] == b for r in rows)]
    return {"teacher": {k: float(teacher[k]) for k in metrics}, "rows": rows,
            "baseline": baseline, "baselines": used or [baseline], "metrics": list(metrics)}


def convergence_checks(summary: Mapping[str, Any], teacher_curve: Sequence[Mapping[str, Any]],
                       doubles: Mapping[str, str], gap_min: float, teacher_tolerance: float,
                       key: str = HEADLINE) -> Dict[str, Any]:
    """Whether the regime's premises hold, from the finished runs (at the headline metric):

    - ``teacher``: ``teacher_curve`` (``[{"epochs", "metrics"}]``, the benchmark's teacher and
      the same teacher trained for fewer epochs) sorted by epochs; it has stopped improving when
      its last doubling-or-more of epochs gained at most ``teacher_tolerance`` points.
    - ``students``: for each reference row ``R`` with ``doubles[R] = B`` (B's student alone
      trained twice as long), B has converged when ``|mean(R) - mean(B)| < std(B)`` (the seed
      std over B's seeds; n >= 2 needed).
    - ``gaps``: teacher - mean(B) >= ``gap_min`` for every such B (the capacity gap).
    Each entry holds its numbers and ``holds`` (True / False / None when not computable)."""
    rows = {r["method"]: r for r in summary["rows"]}
    teacher = float(summary["teacher"][key])
    curve = sorted(({"epochs": int(p["epochs"]), "value": float(p["metrics"][key])}
                    for p in teacher_curve), key=lambda p: p["epochs"])
    teacher_check: Dict[str, Any] = {"curve": curve, "tolerance": teacher_tolerance,
                                     "gain": None, "holds": None}
    if len(curve) >= 2:
        gain = curve[-1]["value"] - curve[-2]["value"]
        teacher_check.update(gain=gain, holds=gain <= teacher_tolerance)
    students, gaps = [], []
    for long_name, base_name in doubles.items():
        base, long = rows.get(base_name), rows.get(long_name)
        if base is None:
            continue
        b = base["metrics"][key]
        entry: Dict[str, Any] = {"baseline": base_name, "reference": long_name,
                                 "mean": b["mean"], "std": b["std"], "n": base["n"],
                                 "long_mean": None, "long_std": None, "change": None,
                                 "holds": None}
        if long is not None:
            r = long["metrics"][key]
            change = r["mean"] - b["mean"]
            entry.update(long_mean=r["mean"], long_std=r["std"], change=change,
                         holds=(abs(change) < b["std"]) if base["n"] >= 2 else None)
        students.append(entry)
        gap = teacher - b["mean"]
        gaps.append({"baseline": base_name, "gap": gap, "gap_min": gap_min,
                     "long_gap": None if long is None else teacher - long["metrics"][key]["mean"],
                     "holds": gap >= gap_min})
    return {"metric": key, "teacher": teacher_check, "students": students, "gaps": gaps}


# The papers' claims, each as (better row, worse row) pairs; BASELINE stands for the row's own
# baseline (the student alone on the same schedule).
CLAIMS = (
    ("distilled > student alone (AdaDistill)",
     (("AdaArcDistill alpha'", BASELINE), ("AdaCosDistill alpha'", BASELINE))),
    ("distilled > student alone (GKD)",
     (("GKD fixed-k", BASELINE), ("GKD adaptive", BASELINE))),
    ("AdaDistill > ArcDistill / CosDistill",
     (("AdaArcDistill alpha'", "ArcDistill"), ("AdaCosDistill alpha'", "CosDistill"))),
    ("alpha' > plain alpha",
     (("AdaArcDistill alpha'", "AdaArcDistill alpha"),
      ("AdaCosDistill alpha'", "AdaCosDistill alpha"))),
    ("GKD > plain logit KD", (("GKD fixed-k", "logit KD"), ("GKD adaptive", "logit KD"))),
)


def claim_verdicts(summary: Mapping[str, Any], key: str = HEADLINE,
                   claims: Sequence = CLAIMS) -> List[Dict[str, Any]]:
    """Each comparison of ``claims`` whose two rows have runs: ``diff`` = mean(better) -
    mean(worse), ``spread`` = the larger of the two rows' seed stds, ``all_above`` (every seed
    of the first above every seed of the second), and the verdict: ``reproduced`` when
    diff > spread, ``not reproduced`` when diff < -spread (the opposite holds), else
    ``inconclusive`` (the spread is larger than the difference)."""
    rows = {r["method"]: r for r in summary["rows"]}
    out = []
    for claim, pairs in claims:
        for better, worse in pairs:
            if better not in rows:
                continue
            if worse == BASELINE:
                worse = rows[better].get("baseline", summary["baseline"])
            if worse not in rows:
                continue
            a, b = rows[better]["metrics"][key], rows[worse]["metrics"][key]
            diff = a["mean"] - b["mean"]
            spread = max(a["std"], b["std"])
            verdict = "reproduced" if diff > spread else (
                "not reproduced" if diff < -spread else "inconclusive")
            out.append({"claim": claim, "better": better, "worse": worse, "diff": diff,
                        "spread": spread, "verdict": verdict,
                        "all_above": min(a["values"].values()) > max(b["values"].values())})
    return out


def claims_table(verdicts: Sequence[Mapping[str, Any]], title: str = METRICS[HEADLINE]
                 ) -> List[str]:
    """Markdown lines of ``claim_verdicts``."""
    lines = [f"The papers' claims at {title} (diff = mean of the first row - mean of the second; "
             "spread = the larger seed std of the two; reproduced when diff > spread, not "
             "reproduced when diff < -spread, else inconclusive):", "",
             "| claim | comparison | diff | spread | every seed above | verdict |",
             "|---|---|---|---|---|---|"]
    for v in verdicts:
        lines.append(f"| {v['claim']} | {v['better']} vs {v['worse']} | "
                     f"{_fmt(v['diff'], signed=True)} | {v['spread']:.2f} | "
                     f"{'yes' if v['all_above'] else 'no'} | {v['verdict']} |")
    return lines


def checks_table(checks: Mapping[str, Any], titles: Mapping[str, str] = METRICS) -> List[str]:
    """Markdown lines of ``convergence_checks``: one row per check, its numbers and whether it
    holds."""
    def verdict(holds: Optional[bool]) -> str:
        return "--" if holds is None else ("yes" if holds else "NO")

    title = titles[checks["metric"]]
    lines = [f"Convergence and capacity checks ({title}):", "",
             "| check | numbers | holds |", "|---|---|---|"]
    t = checks["teacher"]
    if t["curve"]:
        points = " / ".join(f"{p['value']:.2f} ({p['epochs']} ep)" for p in t["curve"])
        gain = "" if t["gain"] is None else \
            f"; last gain {_fmt(t['gain'], signed=True)} (tolerance {t['tolerance']:g})"
        lines.append(f"| teacher stopped improving | {points}{gain} | {verdict(t['holds'])} |")
    for s in checks["students"]:
        if s["change"] is None:
            numbers = f"{s['mean']:.2f} +- {s['std']:.2f}; {s['reference']}: not run"
        else:
            numbers = (f"{s['mean']:.2f} +- {s['std']:.2f} -> {s['long_mean']:.2f} +- "
                       f"{s['long_std']:.2f} at 2x epochs (change {_fmt(s['change'], signed=True)}"
                       f"; must be below the seed std {s['std']:.2f} in size)")
        lines.append(f"| {s['baseline']} converged | {numbers} | {verdict(s['holds'])} |")
    for g in checks["gaps"]:
        long = "" if g["long_gap"] is None else f"; {g['long_gap']:.2f} to its 2x-epochs row"
        lines.append(f"| capacity gap teacher - {g['baseline']} | {g['gap']:.2f} points "
                     f"(>= {g['gap_min']:g} needed){long} | {verdict(g['holds'])} |")
    return lines


# --------------------------------------------------------------------------- reports

def _fmt(value: Optional[float], digits: int = 2, signed: bool = False) -> str:
    if value is None:
        return "--"
    if math.isinf(value):
        return "+inf" if value > 0 else "-inf"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def _baseline_phrase(summary: Mapping[str, Any]) -> str:
    """``student alone`` for one baseline; ``its baseline (a / b)`` for several."""
    names = summary.get("baselines") or [summary["baseline"]]
    return names[0] if len(names) == 1 else "its baseline (" + " / ".join(names) + ")"


def markdown_tables(summary: Mapping[str, Any], titles: Mapping[str, str] = METRICS) -> str:
    """Three markdown tables over every metric: mean +- std (teacher first); the fraction of the
    teacher - baseline gap closed; the paired difference with the row's baseline on the same
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
    names = summary.get("baselines") or [summary["baseline"]]
    by_name = {r["method"]: r for r in summary["rows"]}
    many = len(names) > 1
    lines += ["", "Fraction of the teacher - student-alone gap closed, "
              "(method - student alone) / (teacher - student alone), on the means"
              + (" (each row against the student alone of its recipe):" if many else ":"), "",
              "| method | " + head + " |", rule]
    for name in names:
        base = by_name.get(name)
        gaps = [_fmt(summary["teacher"][k] - base["metrics"][k]["mean"]) if base else "--"
                for k in metrics]
        label = f"(gap to {name}, points)" if many else "(gap, points)"
        lines.append(f"| {label} | " + " | ".join(gaps) + " |")
    for row in summary["rows"]:
        lines.append(f"| {row['method']} | " + " | ".join(
            _fmt(row["metrics"][k]["gap_closed"]) for k in metrics) + " |")
    lines += ["", f"Paired difference with {_baseline_phrase(summary)} (same seeds): mean +- std "
              "of the per-seed differences, t = mean / (std / sqrt(n)), two-sided p (df = n - 1), "
              "wins/losses/ties:", "", "| method | " + head + " |", rule]
    for row in summary["rows"]:
        if row["method"] == row.get("baseline", summary["baseline"]):
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
    the BEST seed of its baseline (a statement that needs no distributional assumption)."""
    rows = summary["rows"]
    by_name = {r["method"]: r for r in rows}
    seeds = sorted({s for r in rows for s in r["metrics"][key]["values"]})
    lines = [f"{titles[key]} per seed, and whether every seed of the row is above every seed "
             f"of {_baseline_phrase(summary)}:", "",
             "| method | " + " | ".join(f"seed {s}" for s in seeds) + " | all above |",
             "|---|" + "---|" * (len(seeds) + 1)]
    for row in rows:
        values = row["metrics"][key]["values"]
        base = by_name.get(row.get("baseline", summary["baseline"]))
        if row is base or base is None:
            above = "--"
        else:
            best_base = max(base["metrics"][key]["values"].values())
            above = "yes" if min(values.values()) > best_base else "no"
        lines.append(f"| {row['method']} | " + " | ".join(
            _fmt(values.get(s)) for s in seeds) + f" | {above} |")
    return lines


def plot_summary(summary: Mapping[str, Any], path: str,
                 titles: Mapping[str, str] = METRICS) -> str:
    """Bars (mean +- std, seeds as dots) per metric, teacher and baseline levels as lines;
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
        for name, style in zip(summary.get("baselines") or [summary["baseline"]],
                               (":", "-.", "--")):
            base = next(r for r in rows if r["method"] == name)
            ax.axvline(base["metrics"][key]["mean"], color="#555555", linestyle=style,
                       label=name)
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
