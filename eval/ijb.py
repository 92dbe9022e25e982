"""IJB-B / IJB-C 1:1 template verification, the pipeline behind the published TAR@FAR numbers.

Layout of ``<image_path>`` (InsightFace's IJB release)::

    meta/<ijbb|ijbc>_face_tid_mid.txt         img tid mid                  (one line per image)
    meta/<ijbb|ijbc>_name_5pts_score.txt      img x1 y1 ... x5 y5 score    (same images, same order)
    meta/<ijbb|ijbc>_template_pair_label.txt  tid1 tid2 label              (1 = same identity)
    loose_crop/<img>

Pipeline (each step as published; ``N`` images, ``T`` templates, ``P`` pairs, ``D`` dims):

1. align every image by the similarity transform of its 5 landmarks onto the ArcFace 112 x 112
   template (``insightface.utils.face_align.norm_crop``), in DataLoader workers;
2. embed the aligned image and its mirror: image features ``[N, 2D]`` = ``[plain | mirror]``;
3. ``f_i = (plain_i + mirror_i) * detector_score_i`` -- NOT L2-normalised;
4. template ``t``: ``v_t = sum over media m of t of mean(f_i, i in (t, m))``, then
   ``v_t / ||v_t||``, computed as ONE weighted segment sum ``v_t = sum_i f_i / n_(t, m_i)``
   (a sparse matrix product; no loop over templates);
5. pair score ``s = <v_t1, v_t2>``, by blocked float32 matrix products (no per-pair loop);
6. TAR@FAR from the ROC of ``sklearn.metrics.roc_curve`` (its defaults, ``drop_intermediate=True``;
   reproduced exactly by :func:`roc` from two value sorts and cumulative counts), at the
   point whose FPR is closest to the target (``rule="closest"``, the published reading: either
   side, a tie goes to the higher TPR) or the best TPR with FPR <= target (``rule="strict"``).
"""
from __future__ import annotations

import json
import logging
import os
import time
import warnings
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from data.image_codec import decode_rgb
from plugins.atomic_io import atomic_output, save_npy, save_text
from eval.model_io import Embedder

LOG = logging.getLogger(__name__)

TARGETS = ("IJBB", "IJBC")
FARS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
RULES = ("closest", "strict")
IMAGE_SIZE = 112


# --------------------------------------------------------------------------- meta files

@dataclass
class IJBMeta:
    """The three meta files of one IJB target, checked against each other.

    Attributes:
        names: ``[N]`` image file names (relative to ``loose_crop/``).
        landmarks: ``[N, 5, 2]`` float32 (x, y) of eyes, nose, mouth corners.
        det_scores: ``[N]`` float32 detector scores.
        templates, medias: ``[N]`` int64 template and media ids of each image.
        pairs: ``[P, 2]`` int64 template ids; labels: ``[P]`` int8, 1 = genuine.
        landmark_file: path of the 5-point file (error messages cite its line numbers).
    """

    target: str
    root: str
    names: List[str]
    landmarks: np.ndarray
    det_scores: np.ndarray
    templates: np.ndarray
    medias: np.ndarray
    pairs: np.ndarray
    labels: np.ndarray
    landmark_file: str

    @property
    def image_dir(self) -> str:
        return os.path.join(self.root, "loose_crop")


def meta_paths(root: str, target: str) -> Dict[str, str]:
    """Paths of the three meta files of ``target`` (``IJBB`` or ``IJBC``) under ``root``."""
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    prefix = os.path.join(root, "meta", target.lower())
    return {"tid_mid": f"{prefix}_face_tid_mid.txt",
            "landmarks": f"{prefix}_name_5pts_score.txt",
            "pairs": f"{prefix}_template_pair_label.txt"}


def _split_lines(path: str, num_fields: int, layout: str) -> List[List[str]]:
    if not os.path.isfile(path):
        raise ValueError(f"{path} does not exist: expected the IJB meta file ({layout})")
    with open(path, "r", encoding="utf-8") as handle:
        rows = [line.split() for line in handle.read().splitlines()]
    for i, row in enumerate(rows):
        if len(row) != num_fields:
            raise ValueError(f"{path}:{i + 1}: {len(row)} fields, expected {num_fields} "
                             f"({layout})")
    if not rows:
        raise ValueError(f"{path} is empty: expected lines '{layout}'")
    return rows


def _field_ok(field: str, dtype: type) -> bool:
    try:
        if dtype is np.float32:
            return bool(np.isfinite(float(field)))
        int(field)
        return True
    except ValueError:
        return False


def _parse_numbers(path: str, rows: List[List[str]], dtype: type, layout: str) -> np.ndarray:
    """``[len(rows), fields - 1]`` numbers after each row's name (float32 must be finite).

    One vectorised conversion; only when it fails are the rows rescanned to name the line."""
    try:
        values = np.array([row[1:] for row in rows], dtype=dtype)
    except ValueError:
        values = None
    if values is not None and (dtype is not np.float32 or np.isfinite(values).all()):
        return values
    kind = "a finite number" if dtype is np.float32 else "an integer"
    for i, row in enumerate(rows):
        for field in row[1:]:
            if not _field_ok(field, dtype):
                raise ValueError(f"{path}:{i + 1}: field {field!r} is not {kind} ({layout})")
    raise ValueError(f"{path}: cannot parse it as '{layout}' lines")


def read_template_media(path: str) -> Tuple[List[str], np.ndarray, np.ndarray]:
    """``img tid mid`` lines -> names ``[N]``, templates ``[N]`` int64, medias ``[N]`` int64."""
    layout = "img tid mid"
    rows = _split_lines(path, 3, layout)
    ids = _parse_numbers(path, rows, np.int64, layout)
    return [row[0] for row in rows], ids[:, 0].copy(), ids[:, 1].copy()


def read_landmarks(path: str) -> Tuple[List[str], np.ndarray, np.ndarray]:
    """``img x1 y1 ... x5 y5 score`` lines -> names, landmarks ``[N, 5, 2]``, scores ``[N]``."""
    layout = "img x1 y1 x2 y2 x3 y3 x4 y4 x5 y5 detector_score"
    rows = _split_lines(path, 12, layout)
    values = _parse_numbers(path, rows, np.float32, layout)
    return [row[0] for row in rows], values[:, :10].reshape(-1, 5, 2).copy(), values[:, 10].copy()


def read_pairs(path: str) -> Tuple[np.ndarray, np.ndarray]:
    """``tid1 tid2 label`` lines -> pairs ``[P, 2]`` int64 and labels ``[P]`` int8 (0/1).

    The fast path is ``np.loadtxt``; on a parse error the file is rescanned to name the line.
    """
    layout = "tid1 tid2 label"
    if not os.path.isfile(path):
        raise ValueError(f"{path} does not exist: expected the IJB meta file ({layout})")
    try:
        table = np.loadtxt(path, dtype=np.int64, ndmin=2, comments=None)
    except ValueError:
        table = None
    if table is None or table.shape[1:] != (3,):
        with open(path, "r", encoding="utf-8") as handle:
            for i, line in enumerate(handle):
                fields = line.split()
                if len(fields) != 3:
                    raise ValueError(f"{path}:{i + 1}: {len(fields)} fields, expected 3 "
                                     f"({layout})")
                for field in fields:
                    try:
                        int(field)
                    except ValueError:
                        raise ValueError(f"{path}:{i + 1}: field {field!r} is not an integer "
                                         f"({layout})") from None
        raise ValueError(f"{path}: cannot parse it as '{layout}' lines")
    if table.shape[0] == 0:
        raise ValueError(f"{path} is empty: expected lines '{layout}'")
    bad = np.flatnonzero((table[:, 2] != 0) & (table[:, 2] != 1))
    if bad.size:
        raise ValueError(f"{path}:{bad[0] + 1}: label {table[bad[0], 2]} is not 0 or 1")
    return table[:, :2].copy(), table[:, 2].astype(np.int8)


def load_meta(root: str, target: str) -> IJBMeta:
    """Read and cross-check the three meta files of ``target`` under ``root``.

    Raises:
        ValueError: a file is missing, a line has the wrong field count or a non-numeric field,
            the two per-image files list different images (count or order), or a pair names a
            template no image belongs to; the message names the file and line.
    """
    paths = meta_paths(root, target)
    names, templates, medias = read_template_media(paths["tid_mid"])
    lmk_names, landmarks, scores = read_landmarks(paths["landmarks"])
    if names != lmk_names:
        first = next((i for i, (a, b) in enumerate(zip(names, lmk_names)) if a != b),
                     min(len(names), len(lmk_names)))
        a = names[first] if first < len(names) else "<end of file>"
        b = lmk_names[first] if first < len(lmk_names) else "<end of file>"
        raise ValueError(
            f"{paths['landmarks']}:{first + 1}: image {b!r} but {paths['tid_mid']}:{first + 1} "
            f"has {a!r}; the two files must list the same images in the same order "
            f"({len(lmk_names)} vs {len(names)} lines)")
    pairs, labels = read_pairs(paths["pairs"])
    known = np.unique(templates)
    pos = np.clip(np.searchsorted(known, pairs), 0, known.size - 1)
    unknown = np.flatnonzero((known[pos] != pairs).any(axis=1))
    if unknown.size:
        row = unknown[0]
        raise ValueError(f"{paths['pairs']}:{row + 1}: template pair {pairs[row].tolist()} names "
                         f"a template with no image in {paths['tid_mid']} "
                         f"({unknown.size} such pairs)")
    return IJBMeta(target=target, root=root, names=names, landmarks=landmarks, det_scores=scores,
                   templates=templates, medias=medias, pairs=pairs, labels=labels,
                   landmark_file=paths["landmarks"])


# --------------------------------------------------------------------------- images -> features

_FACE_ALIGN = None


def norm_crop(image: np.ndarray, landmarks: np.ndarray, image_size: int = IMAGE_SIZE) -> np.ndarray:
    """InsightFace's ``face_align.norm_crop`` (imported on first use): ``[H, W, 3]`` -> aligned
    ``[S, S, 3]`` by the similarity transform of ``landmarks [5, 2]`` onto the ArcFace template."""
    global _FACE_ALIGN
    if _FACE_ALIGN is None:
        from insightface.utils import face_align
        _FACE_ALIGN = face_align
    with warnings.catch_warnings():  # scikit-image >= 0.26 deprecates the estimate() it calls
        warnings.filterwarnings("ignore", message=".*estimate.*deprecated", category=FutureWarning)
        return _FACE_ALIGN.norm_crop(image, landmark=landmarks, image_size=image_size)


class AlignedFaceDataset(Dataset):
    """Decode + align one IJB image per item: ``(uint8 [3, S, S] RGB, index)``.

    Args:
        image_dir: folder the names are relative to (``<root>/loose_crop``).
        names: ``[N]`` file names.
        landmarks: ``[N, 5, 2]`` float32.
        source: the file the names came from (errors cite ``source:line``).
        image_size: aligned size S (112).
        check_files: stat every file up front, so a missing image fails before extraction.
    """

    def __init__(self,
                 image_dir: str,
                 names: Sequence[str],
                 landmarks: np.ndarray,
                 source: str,
                 image_size: int = IMAGE_SIZE,
                 check_files: bool = True) -> None:
        if landmarks.shape != (len(names), 5, 2):
            raise ValueError(f"landmarks must be [{len(names)}, 5, 2], got {landmarks.shape}")
        self.image_dir, self.names, self.landmarks = image_dir, list(names), landmarks
        self.source, self.image_size = source, image_size
        if check_files:
            missing = [i for i, name in enumerate(self.names)
                       if not os.path.isfile(os.path.join(image_dir, name))]
            if missing:
                first = os.path.join(image_dir, self.names[missing[0]])
                raise ValueError(f"{source}:{missing[0] + 1}: image {first} does not exist "
                                 f"({len(missing)} of {len(self.names)} listed images are "
                                 f"missing under {image_dir})")

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int]:
        path = os.path.join(self.image_dir, self.names[index])
        try:
            with open(path, "rb") as handle:
                data = handle.read()
            rgb = decode_rgb(data)
        except (OSError, ValueError) as error:
            raise ValueError(f"{self.source}:{index + 1}: cannot read image {path}: {error}") \
                from error
        aligned = norm_crop(rgb, self.landmarks[index], self.image_size)
        return torch.from_numpy(np.ascontiguousarray(aligned.transpose(2, 0, 1))), index


def extract_features(embedder: Embedder,
                     dataset: Dataset,
                     batch_size: int = 128,
                     num_workers: int = 4,
                     progress: bool = True) -> np.ndarray:
    """Image features ``[N, 2D]`` float32 = ``[embed(x) | embed(mirror(x))]`` in dataset order.

    Decoding and alignment run in ``num_workers`` DataLoader processes; each batch of ``B``
    images goes through the model as one ``[2B, 3, S, S]`` batch (images then mirrors).
    """
    from tqdm import tqdm

    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        pin_memory=torch.cuda.is_available())
    out: Optional[np.ndarray] = None
    for images, index in tqdm(loader, desc="IJB features", unit="batch", disable=not progress):
        both = torch.cat([images, images.flip(3)])
        feats = embedder(both).numpy()
        if out is None:
            out = np.empty((len(dataset), 2 * feats.shape[1]), dtype=np.float32)
        dim = feats.shape[1]
        idx = index.numpy()
        out[idx, :dim] = feats[:len(idx)]
        out[idx, dim:] = feats[len(idx):]
    if out is None:
        raise ValueError("the dataset is empty: no image features extracted")
    return out


# --------------------------------------------------------------------------- features -> scores

def template_features(img_feats: np.ndarray,
                      det_scores: np.ndarray,
                      templates: np.ndarray,
                      medias: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """L2-normalised template features ``[T, D]`` float32 and the sorted template ids ``[T]``.

    ``v_t = sum_m mean_{i in (t, m)} f_i = sum_{i in t} w_i [plain_i | mirror_i]`` folded over the
    two halves, with ``f_i = (plain_i + mirror_i) * score_i`` and ``w_i = score_i / n_(t, m_i)``:
    ONE sparse ``[T, N]`` CSR matrix (rows = templates, built from a stable argsort of the
    template index, no loop over templates) times the ``[N, 2D]`` features as given (no copy of
    them), then ``v_t = sum[:, :D] + sum[:, D:]`` and ``v_t / ||v_t||`` in float64 (a zero vector
    stays 0).  The sums accumulate in float32, like the published script (its per-media
    ``np.mean`` and ``np.sum`` run on float32 arrays); they agree with a float64 evaluation to
    about 1e-7.

    Args:
        img_feats: ``[N, 2D]`` image features ``[plain | mirror]`` (float32; may be a memmap).
        det_scores: ``[N]`` detector scores; templates, medias: ``[N]`` ids.
    """
    import scipy.sparse

    n = len(templates)
    if img_feats.ndim != 2 or img_feats.shape[0] != n or img_feats.shape[1] % 2:
        raise ValueError(f"image features must be [N={n}, 2D], got {list(img_feats.shape)}")
    if det_scores.shape != (n,) or medias.shape != (n,):
        raise ValueError(f"det_scores, templates and medias must all be [N={n}]")
    dim = img_feats.shape[1] // 2
    unique_templates, t_index = np.unique(templates, return_inverse=True)
    t_index = t_index.reshape(-1)
    unique_medias, m_index = np.unique(medias, return_inverse=True)
    pair_key = t_index.astype(np.int64) * len(unique_medias) + m_index.reshape(-1)
    _, tm_index, tm_count = np.unique(pair_key, return_inverse=True, return_counts=True)
    weight = (det_scores.astype(np.float64) / tm_count[tm_index.reshape(-1)]).astype(np.float32)
    num_templates = len(unique_templates)
    order = np.argsort(t_index, kind="stable")
    indptr = np.zeros(num_templates + 1, dtype=np.int64)
    np.cumsum(np.bincount(t_index, minlength=num_templates), out=indptr[1:])
    weights = scipy.sparse.csr_matrix((weight[order], order, indptr), shape=(num_templates, n))
    feats = np.asarray(img_feats)
    if feats.dtype != np.float32:
        feats = feats.astype(np.float32)
    summed = weights @ feats                                                  # [T, 2D] float32
    acc = summed[:, :dim].astype(np.float64)
    acc += summed[:, dim:]
    norm = np.sqrt(np.einsum("ij,ij->i", acc, acc))                          # one pass, no temp
    acc /= np.where(norm > 0, norm, 1.0)[:, None]
    return acc.astype(np.float32), unique_templates


def template_rows(unique_templates: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Row of each template id in ``unique_templates`` (sorted), as int32 (int64 from 2^31
    templates): a lookup table when the ids are small non-negative integers (IJB ids are
    < 200,000; one clipped gather, the table's last slot and, when 0 is not an id, its first
    slot marking ids outside it), else a binary search.

    Raises ValueError if an id has no row."""
    ids = np.asarray(ids)
    num = len(unique_templates)
    dtype = np.int32 if num < 2 ** 31 - 1 else np.int64
    if ids.size == 0:
        return np.empty(ids.shape, dtype=dtype)
    if num and unique_templates[0] >= 0 and unique_templates[-1] < max(4 * ids.size, 1 << 22):
        lookup = np.full(int(unique_templates[-1]) + 2, -1, dtype=dtype)
        lookup[unique_templates] = np.arange(num, dtype=dtype)
        inside = ids
        if unique_templates[0] == 0 and ids.min() < 0:
            inside = np.where(ids < 0, lookup.size - 1, ids)
        rows = np.take(lookup, inside, mode="clip")        # ids < 0 -> slot 0, too large -> last
        valid = rows >= 0
    else:
        rows = np.searchsorted(unique_templates, ids).astype(dtype)
        valid = (rows < num) & (unique_templates[np.minimum(rows, num - 1)] == ids)
    if not valid.all():
        raise ValueError(f"template id {ids[~valid].flat[0]} has no features (no image of it in "
                         f"the template/media list)")
    return rows


def _smallest_uint(bound: int) -> type:
    """The narrowest unsigned dtype holding ``0 .. bound - 1`` (radix argsort below 17 bits)."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if bound <= np.iinfo(dtype).max + 1:
            return dtype
    return np.int64


def _block_of(index: np.ndarray, size: int) -> Tuple[np.ndarray, int]:
    """``index // size`` in the narrowest unsigned dtype, and the number of blocks."""
    top = int(index.max()) if index.size else 0
    if size > top:
        return np.zeros(index.size, dtype=np.uint8), 1
    num_blocks = top // size + 1
    return (index // index.dtype.type(size)).astype(_smallest_uint(num_blocks)), num_blocks


def pair_tiles(first: np.ndarray, second: np.ndarray, num_templates: int, block_cols: int
               ) -> Tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Group the pairs by tile: column block ``second // block_cols``, then first row.

    One linear counting sort (no comparison sort): the pair indices ``0 .. P-1`` are the
    columns of a ``[num_blocks * T, P]`` CSR matrix whose row is the tile key
    ``block * T + first`` and whose value is ``second``'s column inside its block, plus one
    (``scipy.sparse`` builds it by a stable bucket pass; no value is zero and no (row, column)
    repeats, so nothing is summed or dropped -- checked).  Its ``indices`` are the pair order
    (within a key, input order), its ``data`` the column offsets in that order, and
    ``indptr[k T : (k + 1) T + 1]`` (less its first entry) the CSR row pointer of column block
    ``k``.  ``block_cols`` is raised while ``num_blocks * T`` exceeds ``4 P + 2^20`` (bounded
    memory for many templates and few pairs).

    Args:
        first, second: ``[P]`` template rows (``0 <= row < T``).
        num_templates: ``T``. block_cols: templates per column block.

    Returns:
        order ``[P]`` (int32 below 2^31 pairs), indptr ``[num_blocks * T + 1]``, offsets ``[P]``
        (column of each ordered pair inside its block, plus one), the block_cols used.
    """
    import scipy.sparse

    num_pairs = first.size
    block_cols = max(1, min(block_cols, num_templates))
    while -(-num_templates // block_cols) * num_templates > 4 * num_pairs + (1 << 20):
        block_cols *= 2
    num_blocks = -(-num_templates // block_cols)
    num_keys = num_blocks * num_templates
    dtype = np.int32 if max(num_keys, num_pairs, num_templates + 1) < 2 ** 31 - 1 else np.int64
    block, offset = np.divmod(second.astype(dtype), dtype(block_cols))
    offset += 1
    key = block
    key *= num_templates
    key += first
    grouped = scipy.sparse.csr_matrix((offset, (key, np.arange(num_pairs, dtype=dtype))),
                                      shape=(num_keys, num_pairs))
    if grouped.nnz != num_pairs:
        raise RuntimeError(f"scipy.sparse grouped {grouped.nnz} of {num_pairs} pairs")
    return grouped.indices, grouped.indptr, grouped.data, block_cols


def _score_pairs_sampled(feats: torch.Tensor, first: np.ndarray, second: np.ndarray,
                         block_cols: int) -> np.ndarray:
    """``<feats[first_p], feats[second_p]>`` for every pair, only those: per column block of
    ``block_cols`` templates, one sampled product ``torch.sparse.sampled_addmm`` (SDDMM) whose
    CSR pattern holds the block's pairs, rows = first templates (visited in ascending order),
    columns = the block's templates (a slab small enough to stay in cache)."""
    num_templates = feats.shape[0]
    order, indptr, offsets, block_cols = pair_tiles(first, second, num_templates, block_cols)
    scores = np.empty(first.size, dtype=np.float32)
    with warnings.catch_warnings():   # "sparse CSR support is in beta state"
        warnings.filterwarnings("ignore", message=".*[Ss]parse.*", category=UserWarning)
        for col0 in range(0, num_templates, block_cols):
            seg = indptr[col0 // block_cols * num_templates:][:num_templates + 1]
            start, stop = int(seg[0]), int(seg[-1])
            if start == stop:
                continue
            col1 = min(col0 + block_cols, num_templates)
            crow = torch.from_numpy(seg.astype(np.int64) - start)
            col = torch.from_numpy(offsets[start:stop].astype(np.int64) - 1)
            other = feats[col0:col1]
            # torch caps a CSR's nnz at rows x cols; only repeated pairs can exceed it (tiny
            # inputs): zero columns widen the block then, none of them is referenced
            extra = -(-(stop - start) // num_templates) - (col1 - col0)
            if extra > 0:
                other = torch.cat([other, other.new_zeros(extra, other.shape[1])])
            pattern = torch.sparse_csr_tensor(crow, col, torch.zeros(stop - start),
                                              size=(num_templates, other.shape[0]),
                                              check_invariants=False).to(feats.device)
            product = torch.sparse.sampled_addmm(pattern, feats, other.T, beta=0.0)
            # intp indices: numpy scatters faster with them than with int32 ones
            scores[order[start:stop].astype(np.intp)] = product.values().cpu().numpy()
    return scores


def _score_pairs_dense(feats: torch.Tensor, low: np.ndarray, high: np.ndarray,
                       block_rows: int) -> np.ndarray:
    """Every ``<v_a, v_b>`` of the upper triangle by blocked float32 GEMMs, then gathered:
    ``low <= high`` rows; pairs bucketed by the block of ``block_rows`` templates holding
    ``low``; each block multiplied with the templates from its first row on (or only those its
    pairs need, when fewer than half), one product buffer reused for every block."""
    num_templates = feats.shape[0]
    block, num_blocks = _block_of(low, block_rows)
    order = np.argsort(block, kind="stable")
    bounds = np.concatenate([[0], np.cumsum(np.bincount(block, minlength=num_blocks))])
    scores = np.empty(len(low), dtype=np.float32)
    col_pos = np.empty(num_templates, dtype=np.int64)
    buffer = torch.empty(min(block_rows, num_templates) * num_templates, device=feats.device)
    for k in range(num_blocks):
        sel = order[bounds[k]:bounds[k + 1]]
        if sel.size == 0:
            continue
        row0 = k * block_rows
        a, b = low[sel].astype(np.int64) - row0, high[sel].astype(np.int64)
        needed = np.zeros(num_templates, dtype=bool)
        needed[b] = True
        cols = np.flatnonzero(needed)
        if cols.size > (num_templates - row0) // 2:
            other, col = feats[row0:], b - row0
        else:
            col_pos[cols] = np.arange(cols.size)
            other, col = feats[torch.from_numpy(cols).to(feats.device)], col_pos[b]
        lhs = feats[row0:row0 + block_rows]
        product = buffer[:lhs.shape[0] * other.shape[0]].view(lhs.shape[0], other.shape[0])
        torch.mm(lhs, other.T, out=product)
        flat = product.view(-1) if product.device.type == "cpu" else product.cpu().view(-1)
        scores[sel] = flat.numpy()[a * other.shape[0] + col]
    return scores


PAIR_METHODS = ("auto", "sampled", "dense")


def score_pairs(template_feats: np.ndarray,
                unique_templates: np.ndarray,
                pairs: np.ndarray,
                block_rows: int = 2048,
                device: Optional[str] = None,
                method: str = "auto",
                block_cols: int = 2048) -> np.ndarray:
    """Pair scores ``[P]`` float32: ``<v_t1, v_t2>`` for every template pair.

    Two exact float32 methods (the same numbers as per-pair dot products up to float32
    summation order):

    * ``sampled``: only the ``P`` needed dot products (``P D`` multiply-adds), as sampled dense
      products (SDDMM) tile by tile: pairs grouped by column block of ``block_cols`` templates
      (a slab that stays in cache) and by first template (:func:`pair_tiles`, one counting
      sort), one ``torch.sparse.sampled_addmm`` per block.
    * ``dense``: the whole upper triangle of template similarities by blocked GEMMs (``T^2 D / 2``
      multiply-adds, memory ``block_rows x T`` floats), scores gathered from it.

    ``auto`` takes ``sampled`` unless the pairs cover more than a tenth of the ``T (T + 1) / 2``
    template pairs (IJB-C: 15.7M of 267M, 5.9 %; a GEMM wastes 17x the multiply-adds there).

    Args:
        template_feats: ``[T, D]`` float32 (L2-normalised). unique_templates: ``[T]`` sorted ids.
        pairs: ``[P, 2]`` template ids, any order, repeats allowed.
        block_rows: rows per GEMM block of the dense method.
        device: torch device for the products (default CPU).
        method: ``auto``, ``sampled`` or ``dense``.
        block_cols: templates per column block of the sampled method (2048 x 512 floats =
            4 MB, inside the L3 cache; full IJB-C scale on 2 cores: 2048-4096 fastest, 256 and
            the whole 23,124 about twice slower -- every block streams all ``T`` row features).
    """
    if method not in PAIR_METHODS:
        raise ValueError(f"method must be one of {PAIR_METHODS}, got {method!r}")
    pairs = np.asarray(pairs)
    if pairs.ndim != 2 or pairs.shape[1] != 2:
        raise ValueError(f"pairs must be [P, 2] template ids, got {list(pairs.shape)}")
    num_templates = len(unique_templates)
    if template_feats.shape[0] != num_templates:
        raise ValueError(f"template_feats has {template_feats.shape[0]} rows for "
                         f"{num_templates} template ids")
    if block_rows < 1 or block_cols < 1:
        raise ValueError(f"block_rows and block_cols must be >= 1, got {block_rows}, "
                         f"{block_cols}")
    rows = template_rows(unique_templates, pairs)
    if len(pairs) == 0:
        return np.empty(0, dtype=np.float32)
    feats = torch.from_numpy(np.ascontiguousarray(template_feats, dtype=np.float32))
    feats = feats.to(device) if device else feats
    small = _smallest_uint(max(num_templates, 1))
    if method == "auto":
        method = "sampled" if len(pairs) <= 0.1 * num_templates * (num_templates + 1) / 2 \
            else "dense"
    if method == "sampled":
        return _score_pairs_sampled(feats, rows[:, 0], rows[:, 1], block_cols)
    low = np.minimum(rows[:, 0], rows[:, 1]).astype(small)
    high = np.maximum(rows[:, 0], rows[:, 1]).astype(small)
    return _score_pairs_dense(feats, low, high, block_rows)


# --------------------------------------------------------------------------- scores -> TAR@FAR

@dataclass(frozen=True)
class OperatingPoint:
    """The ROC point read for one target FAR: its TPR (TAR), actual FPR and score threshold."""

    far: float
    tar: float
    fpr: float
    threshold: float


def _distinct_sorted(values: np.ndarray, count_dtype: type = np.int64
                     ) -> Tuple[np.ndarray, np.ndarray]:
    """Distinct values of an ascending array and how often each occurs (``count_dtype``)."""
    if values.size == 0:
        return values, np.zeros(0, dtype=count_dtype)
    new = np.empty(values.size, dtype=bool)
    new[0] = True
    np.not_equal(values[1:], values[:-1], out=new[1:])
    starts = np.flatnonzero(new)
    counts = np.empty(starts.size, dtype=count_dtype)
    np.subtract(starts[1:], starts[:-1], out=counts[:-1], casting="unsafe")
    counts[-1] = values.size - starts[-1]
    return values[starts], counts


def roc(labels: np.ndarray, scores: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``sklearn.metrics.roc_curve(labels, scores)`` (defaults, ``drop_intermediate=True``),
    bit for bit, from one value sort per class instead of an argsort of all ``P`` scores.

    Genuine and impostor scores are sorted separately (no index array); ties are grouped into
    distinct values with their counts; the few genuine values are merged into the impostor ones
    (insertion at binary-search positions).  In descending threshold order, with ``c_i`` the
    (impostor, genuine) counts at distinct threshold ``i``, sklearn's rule "drop where the second
    difference of both ``fps`` and ``tps`` is zero" keeps an inner point ``i`` iff
    ``c_(i+1) != c_i`` -- one comparison of the counts, no second differences; ``fps``/``tps``
    (cumulative counts) are then read at the kept points only; ``(0, 0, inf)`` is prepended,
    ``fpr = fps / fps[-1]``, ``tpr = tps / tps[-1]`` in float64 from integer counts -- the same
    numbers sklearn gets.  Counts are int32 when ``P < 2^31`` (less memory traffic).

    Returns ``fpr``, ``tpr``, ``thresholds`` (float64, thresholds descending from ``inf``).
    """
    labels = np.asarray(labels)
    scores = np.asarray(scores)
    if labels.shape != scores.shape or labels.ndim != 1:
        raise ValueError(f"labels {labels.shape} and scores {scores.shape} must be [P]")
    genuine = labels == 1
    if not ((labels == 0) | genuine).all():
        raise ValueError("labels must be 0 (impostor) or 1 (genuine)")
    num_genuine = int(np.count_nonzero(genuine))
    if not 0 < num_genuine < labels.size:
        raise ValueError("TAR@FAR needs both genuine (1) and impostor (0) pairs")
    if not np.issubdtype(scores.dtype, np.floating):
        scores = scores.astype(np.float64)
    if not np.isfinite(scores).all():
        raise ValueError("scores contain NaN or inf")
    count_dtype = np.int32 if labels.size < 2 ** 31 - 1 else np.int64
    imp_values, imp_counts = _distinct_sorted(np.sort(scores[~genuine]), count_dtype)
    gen_values, gen_counts = _distinct_sorted(np.sort(scores[genuine]), count_dtype)
    pos = np.searchsorted(imp_values, gen_values)
    fresh = pos == imp_values.size
    fresh[~fresh] = imp_values[pos[~fresh]] != gen_values[~fresh]
    values = np.insert(imp_values, pos[fresh], gen_values[fresh])           # ascending, distinct
    fp_counts = np.insert(imp_counts, pos[fresh], 0)
    tp_counts = np.zeros(values.size, dtype=count_dtype)
    # merged position of genuine value j: its impostor position + fresh values inserted before
    tp_counts[pos + np.cumsum(fresh) - fresh] = gen_counts
    fp_desc, tp_desc = fp_counts[::-1], tp_counts[::-1]                      # descending views
    size = values.size
    keep = np.ones(size, dtype=bool)
    if size > 2:
        np.not_equal(fp_desc[2:], fp_desc[1:-1], out=keep[1:-1])
        keep[1:-1] |= tp_desc[2:] != tp_desc[1:-1]
    kept = np.flatnonzero(keep)
    fps = np.zeros(kept.size + 1)
    tps = np.zeros(kept.size + 1)
    fps[1:] = np.cumsum(fp_desc, dtype=count_dtype)[kept]
    tps[1:] = np.cumsum(tp_desc, dtype=count_dtype)[kept]
    thresholds = np.empty(kept.size + 1)
    thresholds[0] = np.inf
    thresholds[1:] = values[size - 1 - kept]
    return fps / fps[-1], tps / tps[-1], thresholds


def roc_sklearn(labels: np.ndarray, scores: np.ndarray) -> Tuple[np.ndarray, np.ndarray,
                                                                   np.ndarray]:
    """The reference :func:`roc` reproduces: ``sklearn.metrics.roc_curve`` with its defaults."""
    from sklearn.metrics import roc_curve

    return roc_curve(labels, scores)


def operating_points(fpr: np.ndarray, tpr: np.ndarray, thresholds: np.ndarray,
                     fars: Sequence[float] = FARS, rule: str = "closest") -> List[OperatingPoint]:
    """Read TAR at each target FAR from an ROC curve.

    ``closest``: the point minimising ``|fpr - far|`` (exact float comparison, as published);
    among equally close points the one with the highest TPR.  ``strict``: the highest TPR
    among points with ``fpr <= far`` (``fpr[0] = 0`` always qualifies).
    """
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    points = []
    for far in fars:
        if rule == "closest":
            dist = np.abs(fpr - far)
            candidates = np.flatnonzero(dist == dist.min())
        else:
            candidates = np.flatnonzero(fpr <= far)
        best = candidates[np.argmax(tpr[candidates])]
        points.append(OperatingPoint(float(far), float(tpr[best]), float(fpr[best]),
                                     float(thresholds[best])))
    return points


def far_key(far: float) -> str:
    """JSON / table key of a target FAR: ``str(float)``, e.g. ``1e-06``, ``0.0001``."""
    return str(float(far))


def evaluate_scores(labels: np.ndarray, scores: np.ndarray, rule: str = "closest",
                    fars: Sequence[float] = FARS) -> Dict:
    """TAR@FAR report of one score vector: ``tar_at_far`` (percent), points, AUC, counts."""
    from sklearn.metrics import auc

    fpr, tpr, thresholds = roc(labels, scores)
    points = operating_points(fpr, tpr, thresholds, fars, rule)
    return {
        "rule": rule,
        "tar_at_far": {far_key(p.far): 100.0 * p.tar for p in points},
        "operating_points": {far_key(p.far): {"tar": p.tar, "fpr": p.fpr,
                                               "threshold": p.threshold} for p in points},
        "auc": 100.0 * float(auc(fpr, tpr)),
        "num_pairs": int(len(labels)),
        "num_genuine": int((np.asarray(labels) == 1).sum()),
        "num_impostor": int((np.asarray(labels) == 0).sum()),
        "roc": (fpr, tpr),
    }


# --------------------------------------------------------------------------- reports

def format_table(reports: Mapping[str, Dict], target: str, fars: Sequence[float] = FARS) -> str:
    """A prettytable: one row per method, TAR (percent, 2 decimals) at each FAR."""
    from prettytable import PrettyTable

    table = PrettyTable(["Methods"] + [far_key(f) for f in fars])
    for name, report in reports.items():
        table.add_row([f"{name}-{target}"] + [f"{report['tar_at_far'][far_key(f)]:.2f}"
                                               for f in fars])
    return table.get_string()


def plot_roc(reports: Mapping[str, Dict], stem: str, target: str) -> List[str]:
    """ROC curves of every report on one log-FPR plot, saved atomically as ``stem.png`` and
    ``stem.pdf`` (matplotlib Agg canvas; no pyplot global state)."""
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.8))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    cmap = matplotlib.colormaps["Set2"]
    for i, (name, report) in enumerate(reports.items()):
        fpr, tpr = report["roc"]
        ax.plot(fpr, tpr, color=cmap(i % cmap.N), lw=1,
                label=f"[{name} (AUC = {report['auc']:.4f} %)]")
    ax.set_xlim([FARS[0], FARS[-1]])
    ax.set_ylim([0.3, 1.0])
    ax.grid(linestyle="--", linewidth=1)
    ax.set_xscale("log")
    ax.set_xticks(list(FARS))
    ax.set_yticks(np.linspace(0.3, 1.0, 8))
    ax.set_xlabel("False Positive Rate")
    ax.set_ylabel("True Positive Rate")
    ax.set_title(f"ROC on {target}")
    ax.legend(loc="lower right")
    written = []
    for fmt in ("png", "pdf"):
        path = f"{stem}.{fmt}"
        with atomic_output(path) as handle:
            fig.savefig(handle, format=fmt)
        written.append(path)
    return written


def _json_report(report: Dict) -> Dict:
    return {k: v for k, v in report.items() if k != "roc"}


def write_json(path: str, payload: Dict) -> None:
    """Indented JSON, written atomically."""
    save_text(path, json.dumps(payload, indent=2, sort_keys=False) + "\n")


# --------------------------------------------------------------------------- whole runs

def score_features(meta: IJBMeta, img_feats: np.ndarray,
                   device: Optional[str] = None) -> Tuple[np.ndarray, Dict[str, float]]:
    """Pair scores ``[P]`` from image features ``[N, 2D]``, and the seconds of each stage."""
    if img_feats.shape[0] != len(meta.names):
        raise ValueError(f"image features have {img_feats.shape[0]} rows but "
                         f"{meta.landmark_file} lists {len(meta.names)} images")
    times = {}
    start = time.perf_counter()
    feats, unique_templates = template_features(img_feats, meta.det_scores, meta.templates,
                                                meta.medias)
    times["templates_s"] = time.perf_counter() - start
    start = time.perf_counter()
    scores = score_pairs(feats, unique_templates, meta.pairs, device=device)
    times["pairs_s"] = time.perf_counter() - start
    return scores, times


def output_paths(result_dir: str, job: str, target: str) -> Dict[str, str]:
    """Where a run writes: ``<result_dir>/<job>/<target lower-case>{.npy,_features.npy,.json,
    _roc.png,_roc.pdf}``."""
    base = os.path.join(result_dir, job, target.lower())
    return {"scores": f"{base}.npy", "features": f"{base}_features.npy",
            "json": f"{base}.json", "plot_stem": f"{base}_roc"}


def run_ijb(meta: IJBMeta,
            result_dir: str,
            job: str,
            rule: str = "closest",
            embedder: Optional[Embedder] = None,
            features_path: Optional[str] = None,
            batch_size: int = 128,
            num_workers: int = 4,
            progress: bool = True) -> Dict:
    """Full evaluation of one model (or precomputed features): write scores, features, JSON and
    ROC plots under ``<result_dir>/<job>/``; return the JSON payload (``tar_at_far`` in %)."""
    if (embedder is None) == (features_path is None):
        raise ValueError("pass exactly one of a model (embedder) or a features .npy file")
    paths = output_paths(result_dir, job, meta.target)
    times: Dict[str, float] = {}
    start = time.perf_counter()
    if embedder is not None:
        dataset = AlignedFaceDataset(meta.image_dir, meta.names, meta.landmarks,
                                     meta.landmark_file)
        img_feats = extract_features(embedder, dataset, batch_size, num_workers, progress)
        save_npy(paths["features"], img_feats)
        model = embedder.description
    else:
        img_feats = np.load(features_path, mmap_mode="r", allow_pickle=False)
        if img_feats.ndim != 2 or img_feats.shape[0] != len(meta.names) or img_feats.shape[1] % 2:
            raise ValueError(f"{features_path}: shape {list(img_feats.shape)}, expected "
                             f"[{len(meta.names)}, 2D] ([plain | mirror] per line of "
                             f"{meta.landmark_file})")
        model = f"features:{os.path.basename(features_path)}"
    times["features_s"] = time.perf_counter() - start
    scores, stage_times = score_features(meta, np.asarray(img_feats, dtype=np.float32))
    times.update(stage_times)
    save_npy(paths["scores"], scores)
    start = time.perf_counter()
    report = evaluate_scores(meta.labels, scores, rule)
    times["tar_at_far_s"] = time.perf_counter() - start
    plots = plot_roc({job: report}, paths["plot_stem"], meta.target)
    payload = {"target": meta.target, "model": model, **_json_report(report),
               "num_images": len(meta.names), "num_templates": int(np.unique(meta.templates).size),
               "files": {"scores": paths["scores"], "plots": plots,
                         **({"features": paths["features"]} if embedder is not None else {})},
               "seconds": times}
    write_json(paths["json"], payload)
    print(format_table({job: report}, meta.target))
    return payload


def compare_scores(labels: np.ndarray,
                   score_files: Sequence[str],
                   result_dir: str,
                   job: str,
                   target: str,
                   rule: str = "closest") -> Dict:
    """Several score files (``[NAME=]path.npy``, e.g. teacher, baseline, students) scored on the
    same pairs: one table, one ROC plot, one JSON ``<target>_compare.json``."""
    reports: Dict[str, Dict] = {}
    for spec in score_files:
        name, _, path = spec.rpartition("=")
        if not name:
            parent = os.path.basename(os.path.dirname(os.path.abspath(path)))
            name = os.path.splitext(os.path.basename(path))[0]
            if name in reports or name == target.lower():
                name = f"{parent}/{name}"
        if name in reports:
            raise ValueError(f"two score files are both named {name!r}; use NAME=path")
        scores = np.load(path, allow_pickle=False)
        if scores.shape != labels.shape:
            raise ValueError(f"{path}: {scores.shape[0] if scores.ndim else 0} scores but the "
                             f"pair file has {labels.shape[0]} pairs ({target})")
        reports[name] = evaluate_scores(labels, scores, rule)
    base = os.path.join(result_dir, job, f"{target.lower()}_compare")
    plots = plot_roc(reports, f"{base}_roc", target)
    payload = {"target": target, "rule": rule, "files": {"plots": plots},
               "methods": {k: _json_report(v) for k, v in reports.items()}}
    write_json(f"{base}.json", payload)
    print(format_table(reports, target))
    return payload
