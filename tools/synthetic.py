"""Synthetic face data in the real formats: RecordIO training sets, verification ``.bin`` pickles
and IJB-B/C-style folders, for tests and CPU demos.

Faces are drawn with numpy (no per-pixel Python loops) in the ArcFace 112 x 112 frame: eyes, nose
tip and mouth corners sit near the ArcFace template points (``ARCFACE_TEMPLATE``).  An identity is
a set of parameters drawn from ``default_rng([seed, identity])`` -- face and head shape, skin,
hair, eye and lip colours, a skin texture pattern, feature geometry, moles, beard, glasses -- so
every image of an identity shares them; each image adds pose jitter, expression, illumination,
colour cast, background and noise.  The task is learnable but not trivial: a network beats chance
and a bigger one does better.

Identities are numbered; training sets use ``first_id = 0`` and evaluation sets default to
``EVAL_FIRST_ID`` (a disjoint range of identities from the same generator, as real benchmarks are
disjoint from the training set); pass ``first_id=0`` to evaluate on training identities.

Command line (writes ``train.rec/.idx``, ``property``, ``<name>.bin`` and ``<IJB>/``)::

    python -m tools.synthetic --out data/synth --num-ids 50 --images-per-id 20 \\
        --bins lfw,cfp_fp --num-pairs 300 --ijb IJBC --ijb-ids 40
"""
from __future__ import annotations

import argparse
import concurrent.futures
import math
import multiprocessing
import os
import pickle
import sys
import time
import zlib
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from data.image_codec import encode_jpeg
from plugins.atomic_io import save_bytes
from plugins.recordio import RecordWriter, make_header

ARCFACE_TEMPLATE = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                             [41.5493, 92.3655], [70.7299, 92.2041]], dtype=np.float64)
"""The 5 ArcFace landmarks (left eye, right eye, nose tip, left and right mouth corner) in the
112 x 112 aligned frame, pixel-centre coordinates (x, y)."""

EVAL_FIRST_ID = 1_000_000
"""First identity of evaluation sets by default: disjoint from training identities 0..N-1."""

_TAG_TRAIN, _TAG_BIN, _TAG_IJB = 1, 2, 3
_CENTER = 56.0

_SKIN_LIGHT = np.array([236.0, 200.0, 172.0])
_SKIN_DARK = np.array([92.0, 60.0, 42.0])
_HAIR = np.array([[25, 20, 18], [70, 45, 30], [120, 80, 45], [200, 165, 100], [150, 70, 35],
                  [170, 170, 170], [60, 60, 65]], dtype=np.float64)
_IRIS = np.array([[70, 45, 25], [60, 100, 150], [70, 110, 70], [110, 110, 115], [35, 25, 20]],
                 dtype=np.float64)


@dataclass(frozen=True)
class IdentityParams:
    """Everything an identity's images share (canonical 112 x 112 frame, pixels; colours RGB)."""
    identity: int
    skin: np.ndarray            # [3]
    hair: np.ndarray            # [3]
    iris: np.ndarray            # [3]
    lips: np.ndarray            # [3]
    face: np.ndarray            # [4] centre x, centre y, radius x, radius y
    head: np.ndarray            # [4] hair ellipse
    hairline: np.ndarray        # [4] height, wave amplitude, wave frequency, phase
    eye_offset: np.ndarray      # [2, 2] (dx, dy) of each eye from the template
    eye_size: np.ndarray        # [3] radius x, radius y, iris radius
    brow: np.ndarray            # [4] height above the eye, half length, thickness, tilt
    nose: np.ndarray            # [3] length, half width, darkness
    mouth: np.ndarray           # [3] half width, half height, dy
    texture: np.ndarray         # [3, 3] frequencies x, y (rad/px) and phase of 3 waves
    texture_amp: float
    moles: np.ndarray           # [K, 3] x, y, radius
    beard: float                # 0 = none, else darkness
    glasses: float              # 0 = none, else frame thickness


def identity_params(identity: int, seed: int = 0) -> IdentityParams:
    """Parameters of ``identity``: a pure function of ``(seed, identity)``."""
    if identity < 0:
        raise ValueError(f"identity must be >= 0, got {identity}")
    rng = np.random.default_rng([seed, identity, 0x1D])
    u = rng.uniform
    t = u(0, 1)
    skin = (1 - t) * _SKIN_LIGHT + t * _SKIN_DARK + rng.normal(0, 8, 3)
    hair = _HAIR[rng.integers(len(_HAIR))] + rng.normal(0, 12, 3)
    iris = _IRIS[rng.integers(len(_IRIS))] + rng.normal(0, 10, 3)
    lips = skin * 0.72 + np.array([45.0, 5.0, 10.0]) + rng.normal(0, 6, 3)
    face = np.array([_CENTER + rng.normal(0, 1.0), u(58, 64), u(29, 37), u(40, 49)])
    head = np.array([face[0], face[1] - u(4, 9), face[2] + u(3, 9), face[3] + u(2, 8)])
    hairline = np.array([u(20, 33), u(0, 5), u(0.05, 0.25), u(0, 2 * np.pi)])
    n_moles = int(rng.integers(0, 4))
    moles = np.column_stack([u(35, 77, n_moles), u(50, 95, n_moles), u(0.8, 2.2, n_moles)])
    return IdentityParams(
        identity=int(identity), skin=np.clip(skin, 30, 250), hair=np.clip(hair, 5, 250),
        iris=np.clip(iris, 5, 250), lips=np.clip(lips, 20, 250), face=face, head=head,
        hairline=hairline, eye_offset=rng.normal(0, 1.3, (2, 2)),
        eye_size=np.array([u(5.0, 8.0), u(2.4, 4.0), u(1.8, 3.2)]),
        brow=np.array([u(6.5, 11.0), u(6.0, 11.0), u(1.2, 3.2), u(-0.3, 0.3)]),
        nose=np.array([u(10.0, 18.0), u(3.5, 7.5), u(0.12, 0.35)]),
        mouth=np.array([u(9.0, 15.0), u(1.8, 3.8), rng.normal(0, 1.5)]),
        texture=np.column_stack([rng.normal(0, 0.18, 3), rng.normal(0, 0.18, 3),
                                 u(0, 2 * np.pi, 3)]),
        texture_amp=float(u(0.04, 0.14)), moles=moles,
        beard=float(u(0.25, 0.6)) if u(0, 1) < 0.3 else 0.0,
        glasses=float(u(1.0, 2.0)) if u(0, 1) < 0.2 else 0.0)


def similarity(scale: float, angle: float, tx: float, ty: float,
               center: Tuple[float, float] = (_CENTER, _CENTER)) -> np.ndarray:
    """``[2, 3]`` map ``p -> scale * R(angle) (p - center) + center + (tx, ty)``."""
    c, s = scale * np.cos(angle), scale * np.sin(angle)
    a = np.array([[c, -s], [s, c]])
    return np.column_stack([a, a @ -np.asarray(center) + np.asarray(center) + [tx, ty]])


def compose(outer: np.ndarray, inner: np.ndarray) -> np.ndarray:
    """``[2, 3]`` affine map ``outer(inner(p))``."""
    return np.column_stack([outer[:, :2] @ inner[:, :2], outer[:, :2] @ inner[:, 2] + outer[:, 2]])


def apply_affine(m: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Apply ``[2, 3]`` ``m`` to ``[K, 2]`` points."""
    return points @ m[:, :2].T + m[:, 2]


def _soft_step(signed_px: np.ndarray) -> np.ndarray:
    """Anti-aliased coverage from a signed distance in pixels (positive = inside), in place."""
    signed_px += 0.5
    return np.clip(signed_px, 0.0, 1.0, out=signed_px)


def _invert(m: np.ndarray) -> np.ndarray:
    a_inv = np.linalg.inv(m[:, :2])
    return np.column_stack([a_inv, -a_inv @ m[:, 2]])


class _Canvas:
    """An image being drawn; ``u, v`` = canonical coordinates of every pixel."""

    def __init__(self, size: Tuple[int, int], to_pixel: np.ndarray) -> None:
        h, w = size
        self.h, self.w, self.to_pixel = h, w, to_pixel
        self._affine = to_pixel.tolist()
        inv = _invert(to_pixel).astype(np.float32)
        xs = np.arange(w, dtype=np.float32)[None, :]
        ys = np.arange(h, dtype=np.float32)[:, None]
        self.u = inv[0, 0] * xs + inv[0, 1] * ys + inv[0, 2]
        self.v = inv[1, 0] * xs + inv[1, 1] * ys + inv[1, 2]
        self.px = float(np.sqrt(abs(np.linalg.det(inv[:, :2].astype(np.float64)))))  # canon/px
        self.img = np.empty((3, h, w), dtype=np.float32)     # channel-first: fast blending

    def window(self, cx: float, cy: float, radius: float) -> Optional[Tuple[slice, slice]]:
        """Pixel window covering the canonical square of ``radius`` around ``(cx, cy)``."""
        (a, b, c), (d, e, f) = self._affine
        cx, cy = float(cx), float(cy)
        px, py = a * cx + b * cy + c, d * cx + e * cy + f       # centre in pixels
        hx, hy = (abs(a) + abs(b)) * (radius + 2.0), (abs(d) + abs(e)) * (radius + 2.0)
        x0, y0 = max(int(px - hx), 0), max(int(py - hy), 0)
        x1, y1 = min(int(px + hx) + 2, self.w), min(int(py + hy) + 2, self.h)
        if x0 >= x1 or y0 >= y1:
            return None
        return slice(y0, y1), slice(x0, x1)

    def ellipse(self, sl: Tuple[slice, slice], cx: float, cy: float, rx: float, ry: float,
                tilt: float = 0.0) -> np.ndarray:
        """Soft (anti-aliased) mask of an ellipse on window ``sl``, values in [0, 1]."""
        # python floats keep the arithmetic in float32 (numpy scalars would promote to float64)
        cx, cy, rx, ry = float(cx), float(cy), float(rx), float(ry)
        du, dv = self.u[sl] - cx, self.v[sl] - cy
        if tilt:
            c, s = math.cos(tilt), math.sin(tilt)
            du, dv = c * du + s * dv, c * dv - s * du
        du *= 1.0 / rx
        dv *= 1.0 / ry
        r = np.sqrt(du * du + dv * dv)
        return _soft_step((1.0 - r) * (min(rx, ry) / self.px))

    def paint(self, sl: Tuple[slice, slice], mask: np.ndarray, color: np.ndarray) -> None:
        """Blend ``color`` ([3] or [3, h, w]) into window ``sl`` with coverage ``mask``."""
        target = self.img[(slice(None),) + sl]
        color = np.asarray(color, dtype=np.float32)
        delta = (color[:, None, None] if color.ndim == 1 else color) - target
        delta *= mask
        target += delta

    def blob(self, cx: float, cy: float, rx: float, ry: float, color: np.ndarray,
             tilt: float = 0.0, alpha: float = 1.0) -> None:
        sl = self.window(cx, cy, max(rx, ry))
        if sl is not None:
            self.paint(sl, alpha * self.ellipse(sl, cx, cy, rx, ry, tilt), color)


def render_face(params: IdentityParams,
                rng: np.random.Generator,
                size: Tuple[int, int] = (112, 112),
                transform: Optional[np.ndarray] = None,
                variation: float = 1.0) -> np.ndarray:
    """Draw one image of an identity.

    Args:
        params: the identity (``identity_params``).
        rng: source of this image's variation (pose jitter, expression, light, colour, noise).
        size: output ``(height, width)``.
        transform: ``[2, 3]`` map from the aligned 112 x 112 frame to output pixels (default:
            identity, i.e. an aligned face).  Aligning the output with the landmarks
            ``apply_affine(transform, ARCFACE_TEMPLATE)`` recovers the aligned face.
        variation: scale of the within-identity variation (> 0): the spread of the pose jitter
            (scale, angle and its +-10 degree bound, shift), of the illumination gradient, of the
            colour gain and of the sensor noise is multiplied by it.  1.0 is the default task
            (the draws and the images are exactly those of the generator without this knob);
            larger values make a harder task (more intra-class variation, the same identities).

    Returns ``[H, W, 3]`` uint8 RGB; the draws from ``rng`` do not depend on size/transform/
    variation.
    """
    if not variation > 0:
        raise ValueError(f"variation must be > 0, got {variation}")
    v = float(variation)
    # -- this image's variation (always the same number of draws) -------------------------------
    jitter = similarity(1.0 + rng.normal(0, 0.035 * v),
                        np.deg2rad(np.clip(rng.normal(0, 4.0 * v), -10 * v, 10 * v)),
                        rng.normal(0, 1.5 * v), rng.normal(0, 1.5 * v))
    light_dir, light = rng.uniform(0, 2 * np.pi), rng.uniform(0.0, 0.45 * v)
    gain = (1.0 + rng.normal(0, 0.12 * v)) * (1.0 + rng.normal(0, 0.05 * v, 3))
    if v != 1.0:      # a large spread could flip the image's sign; the default never gets near
        gain = np.maximum(gain, 0.1)
    bg = rng.uniform(0, 255, (2, 3)).astype(np.float32)
    bg_dir = rng.uniform(0, 2 * np.pi)
    mouth_open, eye_open = rng.uniform(0.0, 1.0), rng.uniform(0.55, 1.0)
    noise_sigma = rng.uniform(1.0, 7.0) * v
    noise_seed = int(rng.integers(1 << 62))

    to_pixel = jitter if transform is None else compose(np.asarray(transform, float), jitter)
    cv = _Canvas(size, to_pixel)
    p = params
    # background: a gradient between two colours
    g = np.clip((math.cos(bg_dir) / 160.0) * (cv.u - _CENTER) +
                (math.sin(bg_dir) / 160.0) * (cv.v - _CENTER) + 0.5, 0, 1)
    cv.img[:] = bg[0][:, None, None] + g * (bg[1] - bg[0])[:, None, None]
    # head (hair), face with texture, fringe
    cv.blob(*p.head, color=p.hair)
    fx, fy, frx, fry = p.face
    sl = cv.window(fx, fy, max(frx, fry))
    if sl is not None:
        u, v = cv.u[sl], cv.v[sl]
        tex = np.zeros(u.shape, dtype=np.float32)
        for kx, ky, phase in p.texture.tolist():
            tex += np.cos(kx * u + ky * v + phase)
        tex *= p.texture_amp / 3
        face_mask = cv.ellipse(sl, fx, fy, frx, fry)
        tex += 1.0
        cv.paint(sl, face_mask, p.skin.astype(np.float32)[:, None, None] * tex)
        height, amp, freq, phase = p.hairline.tolist()
        line = height + amp * np.cos(freq * u + phase)
        fringe = face_mask * _soft_step((line - v) * (1.0 / cv.px))
        cv.paint(sl, fringe, p.hair)
        if p.beard:
            chin = face_mask * np.clip((v - 80.0) * (1.0 / 6.0), 0, 1) * p.beard
            cv.paint(sl, chin, p.hair)
    # eyes, brows, glasses
    for side in range(2):
        ex, ey = ARCFACE_TEMPLATE[side] + p.eye_offset[side]
        erx, ery, iris_r = p.eye_size
        cv.blob(ex, ey, erx, ery * eye_open, color=np.array([245.0, 245.0, 240.0]))
        cv.blob(ex, ey, iris_r, min(iris_r, ery * eye_open), color=p.iris)
        cv.blob(ex, ey, iris_r * 0.45, min(iris_r * 0.45, ery * eye_open), color=np.zeros(3))
        tilt = p.brow[3] * (1 if side == 0 else -1)
        cv.blob(ex, ey - p.brow[0], p.brow[1], p.brow[2], color=p.hair * 0.8, tilt=tilt)
        if p.glasses:
            ring = erx + 4.0
            sl = cv.window(ex, ey, ring)
            if sl is not None:
                outer = cv.ellipse(sl, ex, ey, ring, ring * 0.8)
                inner = cv.ellipse(sl, ex, ey, ring - p.glasses, ring * 0.8 - p.glasses)
                cv.paint(sl, np.clip(outer - inner, 0, 1), np.array([30.0, 30.0, 35.0]))
    # nose: a shadow along the bridge and a darker tip
    nx, ny = ARCFACE_TEMPLATE[2]
    shade = p.skin * (1.0 - p.nose[2])
    cv.blob(nx + 1.0, ny - p.nose[0] / 2, p.nose[1] * 0.45, p.nose[0] / 2, color=shade, alpha=0.6)
    cv.blob(nx, ny + 1.5, p.nose[1], p.nose[1] * 0.55, color=shade)
    # mouth
    mx, my = ARCFACE_TEMPLATE[3:].mean(0)
    my += p.mouth[2]
    cv.blob(mx, my, p.mouth[0], p.mouth[1] * (1.0 + 1.2 * mouth_open), color=p.lips)
    if mouth_open > 0.5:
        cv.blob(mx, my, p.mouth[0] * 0.7, p.mouth[1] * (mouth_open - 0.5) * 1.6,
                color=np.array([60.0, 20.0, 25.0]))
    for mole_x, mole_y, mole_r in p.moles:
        cv.blob(mole_x, mole_y, mole_r, mole_r, color=p.skin * 0.45)
    # illumination, colour cast, sensor noise
    shading = 1.0 + (light / 80.0) * (math.cos(light_dir) * (cv.u - _CENTER) +
                                      math.sin(light_dir) * (cv.v - _CENTER))
    img = cv.img
    img *= shading
    img *= gain.astype(np.float32)[:, None, None]
    noise = np.random.default_rng(noise_seed).random((cv.h, cv.w), dtype=np.float32)
    noise -= 0.5
    noise *= noise_sigma * math.sqrt(12.0)     # uniform noise of std noise_sigma (cheaper)
    img += noise
    np.clip(img, 0, 255, out=img)
    return np.ascontiguousarray(img.astype(np.uint8).transpose(1, 2, 0))


def _image_rng(*entropy: int) -> np.random.Generator:
    return np.random.default_rng([int(e) for e in entropy])


class _Progress:
    """Prints ``label: done/total (rate/s)`` to stderr every ``every`` items when verbose."""

    def __init__(self, label: str, total: int, verbose: bool, every: int = 2000) -> None:
        self.label, self.total, self.verbose, self.every = label, total, verbose, every
        self.done, self.start = 0, time.perf_counter()

    def step(self, n: int = 1) -> None:
        self.done += n
        if self.verbose and (self.done % self.every < n or self.done == self.total):
            rate = self.done / max(time.perf_counter() - self.start, 1e-9)
            print(f"{self.label}: {self.done}/{self.total} images ({rate:.0f}/s)",
                  file=sys.stderr, flush=True)


def _identity_jpegs(seed: int, identity: int, count: int, variation: float = 1.0
                    ) -> List[bytes]:
    """JPEG bytes of the first ``count`` training images of ``identity``."""
    params = identity_params(identity, seed)
    return [encode_jpeg(render_face(params, _image_rng(seed, _TAG_TRAIN, identity, j),
                                    variation=variation))
            for j in range(count)]


def _star_identity_jpegs(job: Tuple[int, int, int, float]) -> List[bytes]:
    return _identity_jpegs(*job)


def _render_pool(workers: int) -> Optional[concurrent.futures.ProcessPoolExecutor]:
    """Spawned renderer processes, or None for rendering in this process.

    Spawned children re-import the caller's main module; when it has no file (``python -``, a
    notebook) that fails, so those callers render in-process.  ProcessPoolExecutor raises
    BrokenProcessPool if a child dies (multiprocessing.Pool would respawn it forever and hang)."""
    main_file = getattr(sys.modules.get("__main__"), "__file__", None)
    if workers <= 1 or not (main_file and os.path.isfile(main_file)):
        return None
    return concurrent.futures.ProcessPoolExecutor(
        workers, mp_context=multiprocessing.get_context("spawn"))


def write_train_set(root: str, num_ids: int, images_per_id: int, seed: int = 0,
                    first_id: int = 0, workers: int = 1, verbose: bool = False,
                    variation: float = 1.0) -> Dict[str, object]:
    """Write an InsightFace-style training set: ``root/train.rec``, ``train.idx``, ``property``.

    Args:
        root: output folder (created).
        num_ids: number of identities (classes); labels ``0..num_ids-1``.
        images_per_id: images per identity.
        seed: generator seed (identities and images).
        first_id: generator identity of class 0 (class ``c`` draws identity ``first_id + c``).
        workers: processes rendering identities in parallel; the files are identical for any
            number of workers (images are written in class order by this process).
        verbose: print progress to stderr.
        variation: within-identity variation of every image (``render_face``).

    Layout as InsightFace's packed sets: images at keys ``1..N`` grouped by class (IRHeader flag 0,
    label = class, id = key), identity records at keys ``N+1..N+C`` (flag 2, label
    ``[first key, end key)``, empty body), header record key 0 (flag 2, label ``[N+1, N+1+C]``,
    id2 = 1) written last, as in the mxnet-written fixture.

    Returns ``{"root", "num_classes", "num_images", "labels"}`` (labels ``[N]`` int64 in key order).
    """
    if num_ids < 1 or images_per_id < 1:
        raise ValueError(f"num_ids and images_per_id must be >= 1, got {num_ids}, {images_per_id}")
    os.makedirs(root, exist_ok=True)
    n = num_ids * images_per_id
    progress = _Progress(f"train set {root}", n, verbose)
    jobs = [(seed, first_id + c, images_per_id, variation) for c in range(num_ids)]
    pool = _render_pool(workers)
    try:
        per_id = pool.map(_star_identity_jpegs, jobs) if pool else \
            (_identity_jpegs(*job) for job in jobs)
        with RecordWriter(os.path.join(root, "train.rec"), os.path.join(root, "train.idx")) as w:
            key = 1
            for c, jpegs in enumerate(per_id):
                for jpeg in jpegs:
                    w.write(key, make_header(float(c), id=key), jpeg)
                    key += 1
                progress.step(len(jpegs))
            for c in range(num_ids):
                start = 1 + c * images_per_id
                w.write(n + 1 + c, make_header([start, start + images_per_id], id=n + 1 + c))
            w.write(0, make_header([n + 1, n + 1 + num_ids], id=0, id2=1))
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    save_bytes(os.path.join(root, "property"), f"{num_ids},112,112".encode())
    labels = np.repeat(np.arange(num_ids, dtype=np.int64), images_per_id)
    return {"root": root, "num_classes": num_ids, "num_images": n, "labels": labels}


def write_verification_bin(path: str, num_pairs: int, seed: int = 0, num_ids: int = 50,
                           first_id: int = EVAL_FIRST_ID, variant: int = 0,
                           verbose: bool = False, variation: float = 1.0) -> None:
    """Write a verification set as arcface_torch reads it: pickle of ``(bins, issame_list)``.

    Args:
        path: output ``.bin`` file.
        num_pairs: pairs; images ``2i`` and ``2i+1`` (112 x 112 JPEG bytes) form pair ``i``.
        seed: generator seed (identities and images).
        num_ids: identities used, ``first_id .. first_id + num_ids - 1`` (>= 2).
        first_id: first generator identity; the default is disjoint from training sets.
        variant: salts pair sampling and image variation (not the identities), so several sets
            written with one seed differ (the CLI uses a hash of the set name).
        verbose: print progress to stderr.
        variation: within-identity variation of every image (``render_face``).

    Half the pairs (``num_pairs // 2``, at random positions) are genuine (two images of one
    identity), the rest impostors (two identities).
    """
    if num_pairs < 1 or num_ids < 2:
        raise ValueError(f"need num_pairs >= 1 and num_ids >= 2, got {num_pairs}, {num_ids}")
    rng = np.random.default_rng([seed, _TAG_BIN, variant])
    issame = np.zeros(num_pairs, dtype=bool)
    issame[rng.permutation(num_pairs)[:num_pairs // 2]] = True
    cache: Dict[int, IdentityParams] = {}
    bins: List[bytes] = []
    progress = _Progress(f"verification set {path}", 2 * num_pairs, verbose)
    for i in range(num_pairs):
        a = int(rng.integers(num_ids))
        b = a if issame[i] else int((a + rng.integers(1, num_ids)) % num_ids)
        for side, ident in enumerate((a, b)):
            ident += first_id
            params = cache.setdefault(ident, identity_params(ident, seed))
            img = render_face(params, _image_rng(seed, _TAG_BIN, variant, ident, 2 * i + side),
                              variation=variation)
            bins.append(encode_jpeg(img))
            progress.step()
    save_bytes(path, pickle.dumps((bins, issame.tolist()), protocol=4))


def write_ijb(root: str, target: str = "IJBC", num_ids: int = 20, templates_per_id: int = 2,
              medias_per_template: int = 2, images_per_media: int = 2, impostor_ratio: int = 10,
              seed: int = 0, first_id: int = EVAL_FIRST_ID, verbose: bool = False,
              variation: float = 1.0) -> Dict[str, object]:
    """Write an IJB-B/C-style folder: ``root/meta/*.txt`` and ``root/loose_crop/*.jpg``.

    Args:
        root: output folder, e.g. ``data/IJBC``.
        target: ``"IJBC"`` or ``"IJBB"`` (file prefix ``ijbc_`` / ``ijbb_``).
        num_ids: identities (>= 2); templates of one identity form the genuine pairs.
        templates_per_id: templates per identity (>= 2 for genuine pairs).
        medias_per_template: media ids per template.
        images_per_media: images per media id.
        impostor_ratio: impostor pairs per genuine pair (capped by the number of possible ones).
        seed: generator seed.
        first_id: first generator identity; the default is disjoint from training sets.
        verbose: print progress to stderr.
        variation: within-identity variation of every face (``render_face``; the placement in
            the loose crop is not scaled).

    Each image is a loose crop (150-200 px) in which the aligned face was placed by a random
    similarity transform; ``*_name_5pts_score.txt`` gives the transformed ArcFace template points,
    so aligning with them (``norm_crop``) recovers the face.  Returns ``{"root", "num_images",
    "num_templates", "num_pairs", "num_genuine", "templates" ([T] identity of each template)}``.
    """
    if target not in ("IJBC", "IJBB"):
        raise ValueError(f"target must be 'IJBC' or 'IJBB', got {target!r}")
    if num_ids < 2 or templates_per_id < 2 or medias_per_template < 1 or images_per_media < 1:
        raise ValueError("write_ijb needs num_ids >= 2, templates_per_id >= 2, "
                         "medias_per_template >= 1 and images_per_media >= 1")
    prefix = target.lower()
    meta, crops = os.path.join(root, "meta"), os.path.join(root, "loose_crop")
    os.makedirs(meta, exist_ok=True)
    os.makedirs(crops, exist_ok=True)
    rng = np.random.default_rng([seed, _TAG_IJB, 0x1B])
    tid_mid, landmarks = [], []
    template_ids: List[int] = []
    n_images = num_ids * templates_per_id * medias_per_template * images_per_media
    progress = _Progress(f"{target} {root}", n_images, verbose)
    img_no, mid = 0, 0
    for ident in range(num_ids):
        params = identity_params(first_id + ident, seed)
        for _ in range(templates_per_id):
            tid = len(template_ids) + 1
            template_ids.append(ident)
            for _ in range(medias_per_template):
                mid += 1
                for _ in range(images_per_media):
                    img_no += 1
                    name = f"{img_no}.jpg"
                    side = int(rng.integers(150, 201))
                    scale = rng.uniform(0.9, min(1.5, side / 125.0))
                    angle = np.deg2rad(rng.uniform(-20, 20))
                    shift = rng.uniform(-8, 8, 2)
                    place = similarity(scale, angle, side / 2 - _CENTER + shift[0],
                                       side / 2 - _CENTER + shift[1])
                    img = render_face(params, _image_rng(seed, _TAG_IJB, first_id + ident,
                                                         img_no), (side, side), place,
                                      variation=variation)
                    save_bytes(os.path.join(crops, name), encode_jpeg(img), durable=False)
                    pts = apply_affine(place, ARCFACE_TEMPLATE)
                    score = rng.uniform(0.6, 1.0)
                    tid_mid.append(f"{name} {tid} {mid}")
                    landmarks.append(name + " " + " ".join(f"{c:.4f}" for c in pts.reshape(-1))
                                     + f" {score:.6f}")
                    progress.step()
    owner = np.asarray(template_ids)
    t1, t2 = np.triu_indices(owner.size, k=1)
    genuine = owner[t1] == owner[t2]
    gen_pairs = np.column_stack([t1[genuine], t2[genuine]])
    imp_all = np.column_stack([t1[~genuine], t2[~genuine]])
    n_imp = min(len(imp_all), impostor_ratio * len(gen_pairs))
    imp_pairs = imp_all[np.sort(rng.permutation(len(imp_all))[:n_imp])]
    pairs = [f"{a + 1} {b + 1} 1" for a, b in gen_pairs] + \
            [f"{a + 1} {b + 1} 0" for a, b in imp_pairs]
    order = rng.permutation(len(pairs))
    for suffix, lines in (("face_tid_mid", tid_mid), ("name_5pts_score", landmarks),
                          ("template_pair_label", [pairs[i] for i in order])):
        save_bytes(os.path.join(meta, f"{prefix}_{suffix}.txt"),
                      ("\n".join(lines) + "\n").encode())
    return {"root": root, "num_images": n_images, "num_templates": owner.size,
            "num_pairs": len(pairs), "num_genuine": len(gen_pairs), "templates": owner}


def main(argv: Optional[Sequence[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--num-ids", type=int, default=50, help="training identities (classes)")
    ap.add_argument("--images-per-id", type=int, default=20, help="training images per identity")
    ap.add_argument("--seed", type=int, default=0, help="generator seed")
    ap.add_argument("--workers", type=int, default=1,
                    help="processes rendering the training set (output identical for any value)")
    ap.add_argument("--bins", default="lfw,cfp_fp",
                    help="comma-separated verification sets to write as <out>/<name>.bin ('' for none)")
    ap.add_argument("--num-pairs", type=int, default=300, help="pairs per verification set")
    ap.add_argument("--bin-ids", type=int, default=50, help="identities per verification set")
    ap.add_argument("--ijb", default="", choices=["", "IJBB", "IJBC"],
                    help="also write an IJB-style folder <out>/<IJB>")
    ap.add_argument("--ijb-ids", type=int, default=40, help="IJB identities")
    ap.add_argument("--templates-per-id", type=int, default=2, help="IJB templates per identity")
    ap.add_argument("--eval-first-id", type=int, default=EVAL_FIRST_ID,
                    help="first generator identity of the evaluation sets (0 = training ids)")
    ap.add_argument("--variation", type=float, default=1.0,
                    help="scale of the within-identity variation (pose, light, colour, noise)")
    args = ap.parse_args(argv)
    start = time.perf_counter()
    info = write_train_set(args.out, args.num_ids, args.images_per_id, args.seed,
                           workers=args.workers, verbose=True, variation=args.variation)
    print(f"wrote {info['num_images']} images of {info['num_classes']} identities to {args.out}")
    for name in filter(None, (s.strip() for s in args.bins.split(","))):
        path = os.path.join(args.out, f"{name}.bin")
        write_verification_bin(path, args.num_pairs, args.seed, args.bin_ids, args.eval_first_id,
                               variant=zlib.crc32(name.encode()), verbose=True,
                               variation=args.variation)
        print(f"wrote {path} ({args.num_pairs} pairs)")
    if args.ijb:
        ijb = write_ijb(os.path.join(args.out, args.ijb), args.ijb, args.ijb_ids,
                        args.templates_per_id, seed=args.seed, first_id=args.eval_first_id,
                        verbose=True, variation=args.variation)
        print(f"wrote {ijb['root']}: {ijb['num_images']} images, {ijb['num_templates']} "
              f"templates, {ijb['num_pairs']} pairs ({ijb['num_genuine']} genuine)")
    print(f"done in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
