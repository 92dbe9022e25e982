"""IJB-C post-feature stages at full scale: ours (host/ijb.py) vs a straightforward implementation.

Stages, from image features ``[N, 2D]`` to TAR@FAR (image extraction is not included):

1. template aggregation -- ours: one weighted float64 segment sum (``index_add_``) over image
   chunks; straightforward: a Python loop over templates, ``np.where`` per template and per
   media, mean per media, sum, then ``sklearn.preprocessing.normalize`` (the published script's
   approach);
2. pair scoring -- ours: float32 blocked matrix products, scores gathered per block;
   straightforward: float64 blocks of 100,000 pairs, gather both template rows, multiply, sum;
3. TAR@FAR -- both ``sklearn.metrics.roc_curve``; ours reads the six points vectorised,
   straightforward with a Python ``min`` over ``zip(|fpr - far|, index)`` per FAR (each side
   run twice, alternating, best time kept: the shared roc_curve dominates both).

Synthetic data at IJB-C scale: 469,375 images, 23,124 templates, 15,658,489 pairs (19,557
genuine), D = 512 (features ``[N, 1024]`` float32, 1.9 GB).  Both sides run in the same process,
same run.  The straightforward stages 1 and 2 are slow, so by default they are timed on a
fraction (``--ref-templates`` templates, ``--ref-pairs`` pairs) and extrapolated linearly (the
per-template loop and the pair blocks are linear; one-off work is counted once); ``--full`` times
them completely.  Their outputs are
compared with ours on the part they computed.

    python bench/bench_ijb_scoring.py                # ~2-3 minutes, ~6 GB RAM
    python bench/bench_ijb_scoring.py --full
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from host import ijb  # noqa: E402

NUM_IMAGES, NUM_TEMPLATES, NUM_PAIRS, NUM_GENUINE, DIM = 469_375, 23_124, 15_658_489, 19_557, 512


def synthetic_ijbc(seed: int):
    """Images grouped into templates and medias, identity-structured features, pairs."""
    rng = np.random.default_rng(seed)
    tids = np.sort(rng.choice(200_000, NUM_TEMPLATES, replace=False)) + 1
    image_template = np.concatenate([np.arange(NUM_TEMPLATES),
                                     rng.integers(0, NUM_TEMPLATES, NUM_IMAGES - NUM_TEMPLATES)])
    rng.shuffle(image_template)
    templates = tids[image_template]
    medias = image_template * 8 + rng.integers(0, 4, NUM_IMAGES)   # ~3 medias per template
    scores = rng.uniform(0.5, 1.0, NUM_IMAGES).astype(np.float32)
    identity = rng.integers(0, 3_531, NUM_TEMPLATES)
    centers = rng.standard_normal((3_531, DIM), dtype=np.float32)
    feats = np.empty((NUM_IMAGES, 2 * DIM), dtype=np.float32)
    for start in range(0, NUM_IMAGES, 65_536):
        stop = min(start + 65_536, NUM_IMAGES)
        c = centers[identity[image_template[start:stop]]]
        feats[start:stop, :DIM] = c + 10.0 * rng.standard_normal((stop - start, DIM), np.float32)
        feats[start:stop, DIM:] = c + 10.0 * rng.standard_normal((stop - start, DIM), np.float32)
    by_id = np.argsort(identity, kind="stable")
    same = np.flatnonzero(identity[by_id[1:]] == identity[by_id[:-1]])[:NUM_GENUINE]
    genuine = np.stack([by_id[same], by_id[same + 1]], axis=1)
    impostor = rng.integers(0, NUM_TEMPLATES, (NUM_PAIRS - len(genuine), 2))
    impostor = impostor[identity[impostor[:, 0]] != identity[impostor[:, 1]]]
    while len(impostor) < NUM_PAIRS - len(genuine):
        more = rng.integers(0, NUM_TEMPLATES, (NUM_PAIRS - len(genuine) - len(impostor), 2))
        impostor = np.concatenate([impostor, more[identity[more[:, 0]] != identity[more[:, 1]]]])
    pairs = np.concatenate([genuine, impostor])
    labels = np.concatenate([np.ones(len(genuine), np.int8), np.zeros(len(impostor), np.int8)])
    order = rng.permutation(NUM_PAIRS)
    return feats, scores, templates, medias, tids[pairs[order]], labels[order]


def straightforward_templates(feats, scores, templates, medias, num):
    """Published-script aggregation for the first ``num`` sorted templates.

    Returns the normalised features, their ids, the seconds of the one-off work (flip sum,
    detector scaling, unique ids) and of the per-template part (loop and normalisation)."""
    from sklearn.preprocessing import normalize

    start = time.perf_counter()
    dim = feats.shape[1] // 2
    f = (feats[:, :dim] + feats[:, dim:]) * scores[:, None]
    unique_templates = np.unique(templates)[:num]
    out = np.zeros((len(unique_templates), dim))
    fixed = time.perf_counter() - start
    start = time.perf_counter()
    for k, uqt in enumerate(unique_templates):
        (ind_t,) = np.where(templates == uqt)
        face_feats, face_medias = f[ind_t], medias[ind_t]
        media_feats = []
        for u in np.unique(face_medias):
            (ind_m,) = np.where(face_medias == u)
            media_feats.append(np.mean(face_feats[ind_m], axis=0))
        out[k] = np.sum(np.array(media_feats), axis=0)
    out = normalize(out)
    return out, unique_templates, fixed, time.perf_counter() - start


def straightforward_scores(template_feats, unique_templates, pairs, block=100_000):
    """Float64 blocks: gather both rows of every pair, multiply, sum."""
    lookup = np.zeros(unique_templates.max() + 1, dtype=np.int64)
    lookup[unique_templates] = np.arange(len(unique_templates))
    out = np.zeros(len(pairs))
    for start in range(0, len(pairs), block):
        sel = slice(start, start + block)
        out[sel] = np.sum(template_feats[lookup[pairs[sel, 0]]]
                          * template_feats[lookup[pairs[sel, 1]]], -1)
    return out


def straightforward_tar(labels, scores):
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(labels, scores)
    fpr, tpr = np.flipud(fpr), np.flipud(tpr)
    result = []
    for far in ijb.FARS:
        _, index = min(zip(abs(fpr - far), range(len(fpr))))
        result.append(100.0 * tpr[index])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ref-templates", type=int, default=2_000,
                        help="templates the straightforward aggregation is timed on")
    parser.add_argument("--ref-pairs", type=int, default=2_000_000,
                        help="pairs the straightforward scoring is timed on")
    parser.add_argument("--full", action="store_true", help="time the straightforward side fully")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    ref_templates = NUM_TEMPLATES if args.full else min(args.ref_templates, NUM_TEMPLATES)
    ref_pairs = NUM_PAIRS if args.full else min(args.ref_pairs, NUM_PAIRS)

    start = time.perf_counter()
    feats, det, templates, medias, pairs, labels = synthetic_ijbc(args.seed)
    print(f"synthetic IJB-C: {NUM_IMAGES:,} images, {NUM_TEMPLATES:,} templates, "
          f"{NUM_PAIRS:,} pairs ({int(labels.sum()):,} genuine), D={DIM} "
          f"({time.perf_counter() - start:.1f} s to generate)")

    ours = {}
    start = time.perf_counter()
    tfeats, tids = ijb.template_features(feats, det, templates, medias)
    ours["templates"] = time.perf_counter() - start
    start = time.perf_counter()
    scores = ijb.score_pairs(tfeats, tids, pairs)
    ours["pairs"] = time.perf_counter() - start

    ref = {}
    ref_tfeats, ref_tids, fixed, loop = straightforward_templates(feats, det, templates, medias,
                                                                  ref_templates)
    ref["templates"] = fixed + loop * NUM_TEMPLATES / ref_templates
    template_diff = float(np.abs(ref_tfeats - tfeats[:ref_templates]).max())
    start = time.perf_counter()
    ref_scores = straightforward_scores(tfeats.astype(np.float64), tids, pairs[:ref_pairs])
    ref["pairs"] = (time.perf_counter() - start) * NUM_PAIRS / ref_pairs
    score_diff = float(np.abs(ref_scores - scores[:ref_pairs]).max())
    # both TAR@FAR sides are dominated by the same roc_curve: alternate them twice, keep the best
    ours["tar_at_far"] = ref["tar_at_far"] = float("inf")
    for _ in range(2):
        start = time.perf_counter()
        report = ijb.evaluate_scores(labels, scores, "closest")
        ours["tar_at_far"] = min(ours["tar_at_far"], time.perf_counter() - start)
        start = time.perf_counter()
        ref_tar = straightforward_tar(labels, scores)
        ref["tar_at_far"] = min(ref["tar_at_far"], time.perf_counter() - start)
    ours_tar = [report["tar_at_far"][ijb.far_key(f)] for f in ijb.FARS]

    extrapolated = ref_templates < NUM_TEMPLATES or ref_pairs < NUM_PAIRS
    print(f"\n{'stage':<12}{'ours (s)':>10}{'straightforward (s)':>22}{'ratio':>8}")
    for stage in ("templates", "pairs", "tar_at_far"):
        print(f"{stage:<12}{ours[stage]:>10.2f}{ref[stage]:>22.2f}"
              f"{ref[stage] / ours[stage]:>7.1f}x")
    total_ours, total_ref = sum(ours.values()), sum(ref.values())
    print(f"{'total':<12}{total_ours:>10.2f}{total_ref:>22.2f}{total_ref / total_ours:>7.1f}x")
    if extrapolated:
        print(f"\nstraightforward times EXTRAPOLATED linearly (one-off work counted once): "
              f"aggregation loop timed on "
              f"{ref_templates:,} of {NUM_TEMPLATES:,} templates, scoring on {ref_pairs:,} of "
              f"{NUM_PAIRS:,} pairs (use --full to time everything)")
    print(f"agreement: template features max |diff| {template_diff:.2e} (first {ref_templates:,}"
          f" templates), scores max |diff| {score_diff:.2e} (first {ref_pairs:,} pairs), "
          f"TAR@FAR equal: {np.allclose(ours_tar, ref_tar, rtol=0, atol=1e-9)}")
    print("TAR@FAR (%): " + ", ".join(f"{ijb.far_key(f)}: {t:.2f}"
                                      for f, t in zip(ijb.FARS, ours_tar)))


if __name__ == "__main__":
    main()
