"""IJB-C post-feature stages: ours (eval/ijb.py) vs an upstream-equivalent implementation.

Stages, from image features ``[N, 2D]`` to TAR@FAR (image extraction is not included):

1. template aggregation -- ours: one sparse ``[T, N]`` weight matrix times the features
   (``ijb.template_features``); upstream-equivalent: the algorithm of insightface
   ``recognition/arcface_torch/eval_ijbc.py`` (``image2template_feature``): flip sum and detector
   scaling of every image, then a Python loop over templates with ``np.where`` per template and
   per media, a mean per media, a sum, and ``sklearn.preprocessing.normalize`` (float64 output);
2. pair scoring -- ours: only the P needed float32 dot products, as sampled dense-dense
   products (``torch.sparse.sampled_addmm``) per column block of 2048 templates, the pairs put in
   tile order by one counting sort (``ijb.score_pairs``, ``method="auto"`` -> ``sampled`` at
   IJB-C's 5.9 % pair density); upstream-equivalent (``verification``): a template-id lookup
   table filled by a Python loop, then batches of 100,000 pairs, both float64 rows gathered,
   multiplied and summed;
3. TAR@FAR -- ours: ``ijb.evaluate_scores`` (two value sorts + counts reproducing ``roc_curve``,
   the drop rule read from count changes, six points, AUC); upstream-equivalent:
   ``sklearn.metrics.roc_curve``, ``flipud``, a Python ``min`` over ``zip(|fpr - far|, index)``
   per FAR.

The upstream-equivalent functions below are written for this bench from that algorithm (no code
copied).  Every stage of both sides runs in the same process, interleaved: each round runs ours
then upstream (odd rounds) or upstream then ours (even rounds); min and median over the rounds
are printed with their ratios.  Agreement is checked on round 1: template features, scores, the
ROC point set against ``roc_curve`` (array-equal), and TAR@FAR of BOTH rules (``closest``: the
published reading, equal to upstream's ``min(zip(...))``; ``strict``: FPR <= target, read from
sklearn's curve) -- all must be identical.  Peak memory: per stage, the resident-set growth over
the stage's start (sampled every 5 ms; the stage's inputs already resident, its outputs counted),
max over rounds; and over the whole side run.  The 1-minute load average is printed at the start
and the end (other processes share the cores; both sides see the same load, interleaved).

Synthetic data at IJB-C scale ``s = 1`` (``--scale 1``): 469,375 images, 23,124 templates,
15,658,489 pairs (19,557 genuine), D = 512 (features ``[N, 1024]`` float32, 1.9 GB).  ``--scale s``
keeps the per-template image count and the pair DENSITY: images and templates x s, pairs and
genuine pairs x s^2 (both pair-scoring methods and the ROC then shrink alike).  DEFAULT
``--scale 0.5`` (upstream's side takes ~100 s per round at full scale on 2 free cores, several
times that on a loaded machine):

    python bench/bench_ijb_scoring.py                    # scale 0.5, 3 rounds
    python bench/bench_ijb_scoring.py --scale 1          # full IJB-C size
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from eval import ijb  # noqa: E402

NUM_IMAGES, NUM_TEMPLATES, NUM_PAIRS, NUM_GENUINE, DIM = 469_375, 23_124, 15_658_489, 19_557, 512
NUM_IDENTITIES = 3_531


def synthetic_ijbc(seed: int, scale: float = 1.0):
    """Images grouped into templates and medias, identity-structured features, pairs.

    Returns features ``[N, 2D]`` float32, detector scores ``[N]``, template and media ids
    ``[N]``, pairs ``[P, 2]`` template ids and labels ``[P]`` int8."""
    num_images, num_templates = int(NUM_IMAGES * scale), int(NUM_TEMPLATES * scale)
    num_pairs, num_genuine = int(NUM_PAIRS * scale ** 2), int(NUM_GENUINE * scale ** 2)
    num_ids = max(int(NUM_IDENTITIES * scale), 2)
    rng = np.random.default_rng(seed)
    tids = np.sort(rng.choice(200_000, num_templates, replace=False)) + 1
    image_template = np.concatenate([np.arange(num_templates),
                                     rng.integers(0, num_templates, num_images - num_templates)])
    rng.shuffle(image_template)
    templates = tids[image_template]
    medias = image_template * 8 + rng.integers(0, 4, num_images)   # ~3 medias per template
    scores = rng.uniform(0.5, 1.0, num_images).astype(np.float32)
    identity = rng.integers(0, num_ids, num_templates)
    centers = rng.standard_normal((num_ids, DIM), dtype=np.float32)
    feats = np.empty((num_images, 2 * DIM), dtype=np.float32)
    for start in range(0, num_images, 65_536):
        stop = min(start + 65_536, num_images)
        c = centers[identity[image_template[start:stop]]]
        feats[start:stop, :DIM] = c + 10.0 * rng.standard_normal((stop - start, DIM), np.float32)
        feats[start:stop, DIM:] = c + 10.0 * rng.standard_normal((stop - start, DIM), np.float32)
    by_id = np.argsort(identity, kind="stable")
    same = np.flatnonzero(identity[by_id[1:]] == identity[by_id[:-1]])[:num_genuine]
    genuine = np.stack([by_id[same], by_id[same + 1]], axis=1)
    impostor = np.empty((0, 2), dtype=np.int64)
    while len(impostor) < num_pairs - len(genuine):
        more = rng.integers(0, num_templates, (num_pairs - len(genuine) - len(impostor), 2))
        impostor = np.concatenate([impostor, more[identity[more[:, 0]] != identity[more[:, 1]]]])
    pairs = np.concatenate([genuine, impostor])
    labels = np.concatenate([np.ones(len(genuine), np.int8), np.zeros(len(impostor), np.int8)])
    order = rng.permutation(len(pairs))
    return feats, scores, templates, medias, tids[pairs[order]], labels[order]


# --------------------------------------------------------------------------- upstream-equivalent

def upstream_templates(img_feats, det_scores, templates, medias):
    """eval_ijbc's feature preparation + ``image2template_feature``: per-template Python loop."""
    from sklearn.preprocessing import normalize

    dim = img_feats.shape[1] // 2
    feats = (img_feats[:, :dim] + img_feats[:, dim:]) * det_scores[:, np.newaxis]
    unique_templates = np.unique(templates)
    out = np.zeros((len(unique_templates), dim))
    for k, template in enumerate(unique_templates):
        (in_template,) = np.where(templates == template)
        template_feats, template_medias = feats[in_template], medias[in_template]
        per_media = []
        for media, count in zip(*np.unique(template_medias, return_counts=True)):
            (in_media,) = np.where(template_medias == media)
            chosen = template_feats[in_media]
            per_media.append(chosen if count == 1 else np.mean(chosen, axis=0, keepdims=True))
        out[k] = np.sum(np.array(per_media), axis=0)
    return normalize(out), unique_templates


def upstream_verification(template_feats, unique_templates, first, second, batch=100_000):
    """eval_ijbc's ``verification``: id lookup by a Python loop, float64 gathers per batch."""
    row_of = np.zeros((max(unique_templates) + 1, 1), dtype=int)
    for k, template in enumerate(unique_templates):
        row_of[template] = k
    out = np.zeros((len(first),))
    for start in range(0, len(first), batch):
        sel = np.arange(start, min(start + batch, len(first)))
        a = template_feats[row_of[first[sel]]]
        b = template_feats[row_of[second[sel]]]
        out[sel] = np.sum(a * b, -1).flatten()
    return out


def upstream_tar(labels, scores):
    """eval_ijbc's TAR@FAR: roc_curve, flipud, the closest FPR by ``min(zip(dist, index))``."""
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(labels, scores)
    fpr, tpr = np.flipud(fpr), np.flipud(tpr)
    result = []
    for far in ijb.FARS:
        _, index = min(list(zip(abs(fpr - far), range(len(fpr)))))
        result.append(100.0 * tpr[index])
    return result


# --------------------------------------------------------------------------- measuring

def _rss() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Resident-set peak above the value at ``__enter__``, sampled every 5 ms by a thread."""

    def __enter__(self):
        self.base = self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())
        self.growth = self.peak - self.base


class Stage:
    """Time and resident-set peak growth of one stage: ``times[name]``, ``peaks[name]``."""

    def __init__(self, name, times, peaks):
        self.name, self.times, self.peaks = name, times, peaks

    def __enter__(self):
        self.rss = PeakRSS().__enter__()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.times[self.name] = time.perf_counter() - self.start
        self.rss.__exit__(*exc)
        self.peaks[self.name] = self.rss.growth


def run_ours(data):
    feats, det, templates, medias, pairs, labels = data
    times, peaks, out = {}, {}, {}
    with PeakRSS() as total:
        with Stage("templates", times, peaks):
            out["tfeats"], out["tids"] = ijb.template_features(feats, det, templates, medias)
        with Stage("pairs", times, peaks):
            out["scores"] = ijb.score_pairs(out["tfeats"], out["tids"], pairs)
        with Stage("tar_at_far", times, peaks):
            report = ijb.evaluate_scores(labels, out["scores"], "closest")
    out["tar"] = [report["tar_at_far"][ijb.far_key(f)] for f in ijb.FARS]
    peaks["total"] = total.growth
    return times, out, peaks


def run_upstream(data):
    feats, det, templates, medias, pairs, labels = data
    times, peaks, out = {}, {}, {}
    with PeakRSS() as total:
        with Stage("templates", times, peaks):
            out["tfeats"], out["tids"] = upstream_templates(feats, det, templates, medias)
        with Stage("pairs", times, peaks):
            out["scores"] = upstream_verification(out["tfeats"], out["tids"], pairs[:, 0],
                                                  pairs[:, 1])
        with Stage("tar_at_far", times, peaks):
            out["tar"] = upstream_tar(labels, out["scores"])
    peaks["total"] = total.growth
    return times, out, peaks


def check_agreement(labels, ours, upstream):
    """Round-1 agreement; returns printable lines and whether every TAR is identical."""
    template_diff = float(np.abs(ours["tfeats"] - upstream["tfeats"]).max())
    score_diff = float(np.abs(ours["scores"] - upstream["scores"]).max())
    mine, reference = ijb.roc(labels, ours["scores"]), ijb.roc_sklearn(labels, ours["scores"])
    roc_equal = all(np.array_equal(x, y) for x, y in zip(mine, reference))
    closest_equal = ours["tar"] == upstream["tar"]
    strict_ours = ijb.evaluate_scores(labels, ours["scores"], "strict")["tar_at_far"]
    strict_ref = [100.0 * p.tar for p in ijb.operating_points(*reference, ijb.FARS, "strict")]
    strict_equal = [strict_ours[ijb.far_key(f)] for f in ijb.FARS] == strict_ref
    # upstream's TAR from its own float64 scores (the published numbers) vs ours
    upstream_on_ours = upstream_tar(labels, ours["scores"]) == ours["tar"]
    lines = [f"template features max |ours - upstream| {template_diff:.2e}; "
             f"scores max |diff| {score_diff:.2e}",
             f"ROC point set == sklearn roc_curve (fpr, tpr, thresholds array-equal): {roc_equal}",
             f"TAR@FAR closest rule: ours == upstream min(zip) on the same scores: "
             f"{upstream_on_ours}; ours == upstream's own float64 pipeline: {closest_equal}",
             f"TAR@FAR strict rule: ours == read from sklearn roc_curve: {strict_equal}",
             "TAR@FAR closest (%): " + ", ".join(f"{ijb.far_key(f)}: {t:.4f}"
                                                 for f, t in zip(ijb.FARS, ours["tar"])),
             "TAR@FAR strict  (%): " + ", ".join(f"{ijb.far_key(f)}: {t:.4f}"
                                                 for f, t in zip(ijb.FARS, strict_ref))]
    return lines, roc_equal and upstream_on_ours and strict_equal


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scale", type=float, default=0.5,
                        help="1 = full IJB-C size; images/templates x s, pairs x s^2 (default 0.5)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (>= 1)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not 0 < args.scale <= 1 or args.rounds < 1:
        parser.error("--scale must be in (0, 1] and --rounds >= 1")

    import scipy.sparse  # noqa: F401  (imports outside the timed stages)
    import sklearn.metrics  # noqa: F401
    import sklearn.preprocessing  # noqa: F401

    start = time.perf_counter()
    data = synthetic_ijbc(args.seed, args.scale)
    feats, _, templates, _, pairs, labels = data
    print(f"synthetic IJB-C x{args.scale:g}: {len(feats):,} images, "
          f"{np.unique(templates).size:,} templates, {len(pairs):,} pairs "
          f"({int(labels.sum()):,} genuine), D={DIM} ({time.perf_counter() - start:.1f} s to "
          f"generate); {args.rounds} interleaved rounds", flush=True)

    stages = ("templates", "pairs", "tar_at_far")
    times = {"ours": [], "upstream": []}
    peaks = {"ours": {}, "upstream": {}}
    agreement = None
    print(f"load average (1, 5, 15 min) at start: {os.getloadavg()}", flush=True)
    for r in range(args.rounds):
        order = ("ours", "upstream") if r % 2 == 0 else ("upstream", "ours")
        outputs = {}
        for side in order:
            t, outputs[side], growth = (run_ours if side == "ours" else run_upstream)(data)
            t["total"] = sum(t.values())
            times[side].append(t)
            for k, v in growth.items():
                peaks[side][k] = max(peaks[side].get(k, 0), v)
            print(f"round {r + 1} {side:<9}" + "  ".join(f"{k} {v:7.2f} s" for k, v in t.items()),
                  flush=True)
        if agreement is None:
            agreement = check_agreement(labels, outputs["ours"], outputs["upstream"])
        del outputs

    mib = 2 ** 20
    print(f"\n{'stage':<12}{'ours min/med (s)':>18}{'upstream min/med (s)':>23}"
          f"{'ratio min/med':>16}{'peak MiB ours/upstream':>25}")
    for stage in stages + ("total",):
        ours = [t[stage] for t in times["ours"]]
        ups = [t[stage] for t in times["upstream"]]
        o_min, o_med, u_min, u_med = min(ours), statistics.median(ours), min(ups), \
            statistics.median(ups)
        print(f"{stage:<12}{o_min:>8.2f} /{o_med:>7.2f}{u_min:>12.2f} /{u_med:>7.2f}"
              f"{u_min / o_min:>10.1f}x /{u_med / o_med:>5.1f}x"
              f"{peaks['ours'][stage] / mib:>15,.0f} /{peaks['upstream'][stage] / mib:>7,.0f}")
    print(f"(peak MiB: resident-set growth over the stage's start, max over rounds; 'total' over "
          f"the whole side run; input features {feats.nbytes / mib:,.0f} MiB not counted)")
    print(f"load average (1, 5, 15 min) at end: {os.getloadavg()}")
    lines, identical = agreement
    print("\n".join(lines))
    print(f"all TAR@FAR identical (both rules): {identical}")


if __name__ == "__main__":
    main()
