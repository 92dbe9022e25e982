"""1:1 verification on arcface_torch's ``.bin`` sets (lfw, cfp_fp, agedb_30, calfw, cplfw, cfp_ff).

A ``.bin`` is a pickle of ``(bins, issame_list)``: ``bins[2i]`` and ``bins[2i + 1]`` are the
encoded images (JPEG bytes; some packing scripts stored ``cv2.imencode`` uint8 arrays) of pair
``i``, ``issame_list[i]`` its label.  Files written by Python 2 need ``encoding='bytes'``.  They
are read by ``RestrictedUnpickler``, which can rebuild only bytes, numbers, lists/tuples and
numpy arrays/scalars: a crafted file cannot call anything else (``os.system``, ``eval``, ...).

Protocol (as arcface_torch reports it, "Accuracy-Flip"):

* embedding ``e = normalize(f(x) + f(flip(x)))``; distance ``d = ||e_1 - e_2||^2``;
* thresholds ``0, 0.01, ..., 3.99``; pair predicted genuine when ``d < threshold``;
* 10 folds in file order (``KFold(n_splits=10, shuffle=False)``): the threshold with the best
  accuracy on the 9 training folds (first one on ties) is applied to the held-out fold;
* report mean and (population) std of the 10 fold accuracies, in percent, and
  ``XNorm`` = mean L2 norm of the raw (un-normalised) embeddings of all images AND all their
  mirrors, each counted separately.

CLI (same flags as before, JSON output optional)::

    python -m eval.bin_verification --model-prefix work_dirs/r50/model.pt --network r50 \
        --data-dir datasets/faces_emore --targets lfw,cfp_fp,agedb_30 --json results/ver.json
    python -m eval.bin_verification --model-prefix student.onnx --data-dir datasets/faces_emore

(named ``bin_verification``, not ``verification``: an arcface_torch fork has its own
``eval/verification.py``, which this module sits beside without replacing it)
"""
from __future__ import annotations

import codecs
import logging
import os
import pickle
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from data.image_codec import decode_rgb
from eval.model_io import Embedder, TorchEmbedder

LOG = logging.getLogger(__name__)

THRESHOLDS = np.arange(0, 4, 0.01)


# --------------------------------------------------------------------------- safe loading

def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """How Python 3 pickles ``bytes`` at protocol < 3: ``_codecs.encode(str, 'latin1')``.
    Only that encoding is accepted."""
    if not isinstance(text, str) or codecs.lookup(encoding).name != "iso8859-1":
        raise pickle.UnpicklingError(f"_codecs.encode({type(text).__name__}, {encoding!r}) is "
                                     f"not a bytes literal")
    return text.encode("latin1")


def _allowed_globals() -> Dict[Tuple[str, str], Any]:
    import builtins

    allowed: Dict[Tuple[str, str], Any] = {}
    for module in ("builtins", "__builtin__"):
        for name in ("bytes", "bytearray", "bool", "int", "float", "list", "tuple"):
            allowed[(module, name)] = getattr(builtins, name)
    allowed[("_codecs", "encode")] = _latin1_encode
    multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
    numeric = np._core.numeric if hasattr(np, "_core") else np.core.numeric
    for prefix in ("numpy.core", "numpy._core"):
        allowed[(f"{prefix}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{prefix}.multiarray", "scalar")] = multiarray.scalar
        allowed[(f"{prefix}.numeric", "_frombuffer")] = numeric._frombuffer
    allowed[("numpy", "ndarray")] = np.ndarray
    allowed[("numpy", "dtype")] = np.dtype
    return allowed


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler whose ``find_class`` knows only the globals a ``.bin`` needs.

    Allowed: ``bytes``, ``bytearray``, ``bool``, ``int``, ``float``, ``list``, ``tuple`` (as
    ``builtins`` or Python 2's ``__builtin__``), ``_codecs.encode`` restricted to latin-1, and
    numpy's array / dtype / scalar reconstructors.  Anything else raises ``UnpicklingError``.
    """

    _ALLOWED: Optional[Dict[Tuple[str, str], Any]] = None

    def find_class(self, module: str, name: str) -> Any:
        if RestrictedUnpickler._ALLOWED is None:
            RestrictedUnpickler._ALLOWED = _allowed_globals()
        try:
            return RestrictedUnpickler._ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"global '{module}.{name}' is forbidden in a verification .bin (only bytes, "
                f"numbers, lists and numpy arrays may be stored)") from None


def restricted_load(path: str) -> Any:
    """Unpickle ``path`` with ``RestrictedUnpickler`` (Python 3 default, then ``encoding='bytes'``
    for Python 2 files)."""
    for encoding in ("ASCII", "bytes"):
        with open(path, "rb") as handle:
            try:
                return RestrictedUnpickler(handle, encoding=encoding).load()
            except UnicodeDecodeError:
                continue
            except pickle.UnpicklingError as error:
                raise ValueError(f"{path}: refused to load: {error}") from error
            except (EOFError, ValueError, TypeError) as error:
                raise ValueError(f"{path}: not a readable .bin pickle ({error})") from error
    raise ValueError(f"{path}: undecodable strings even with encoding='bytes'")


@dataclass
class VerificationSet:
    """One decoded ``.bin``: ``images`` ``[2P, 3, H, W]`` uint8 RGB, ``issame`` ``[P]`` bool."""

    name: str
    images: torch.Tensor
    issame: np.ndarray


def _as_bytes(item: Any, path: str, index: int) -> bytes:
    if isinstance(item, (bytes, bytearray)):
        return bytes(item)
    if isinstance(item, np.ndarray) and item.dtype == np.uint8:
        return item.tobytes()
    raise ValueError(f"{path}: image {index} is a {type(item).__name__}, expected encoded "
                     f"image bytes")


def load_bin(path: str, image_size: Tuple[int, int] = (112, 112)) -> VerificationSet:
    """Read and decode a verification ``.bin`` (see module docstring).

    Square images of another size are resized (bicubic) to ``image_size``; anything else
    (wrong structure, count mismatch, non-boolean labels, undecodable image) raises ValueError
    naming the file and the image index.
    """
    if not os.path.isfile(path):
        raise ValueError(f"verification set {path} does not exist")
    content = restricted_load(path)
    if not isinstance(content, (tuple, list)) or len(content) != 2:
        raise ValueError(f"{path}: expected a pickled (bins, issame_list) pair, got "
                         f"{type(content).__name__} of length "
                         f"{len(content) if hasattr(content, '__len__') else '?'}")
    bins, issame_list = content
    issame = np.asarray(issame_list)
    if issame.ndim != 1 or not np.isin(issame, (0, 1)).all():
        raise ValueError(f"{path}: issame_list must be a flat list of booleans")
    if len(bins) != 2 * len(issame):
        raise ValueError(f"{path}: {len(bins)} images for {len(issame)} pairs; expected "
                         f"{2 * len(issame)} (images 2i and 2i+1 form pair i)")
    height, width = image_size
    images = torch.empty((len(bins), 3, height, width), dtype=torch.uint8)
    for i, item in enumerate(bins):
        try:
            rgb = decode_rgb(_as_bytes(item, path, i))
        except ValueError as error:
            raise ValueError(f"{path}: image {i}: {error}") from error
        if rgb.shape[:2] != (height, width):
            if rgb.shape[0] != rgb.shape[1] or height != width:
                raise ValueError(f"{path}: image {i} is {rgb.shape[1]}x{rgb.shape[0]}; only "
                                 f"square images can be resized to {width}x{height}")
            import cv2
            rgb = cv2.resize(rgb, (width, height), interpolation=cv2.INTER_CUBIC)
        images[i] = torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1)))
    name = os.path.splitext(os.path.basename(path))[0]
    return VerificationSet(name, images, issame.astype(bool))


# --------------------------------------------------------------------------- accuracy

def kfold_accuracy(dist: np.ndarray,
                   issame: np.ndarray,
                   nfolds: int = 10,
                   thresholds: np.ndarray = THRESHOLDS) -> Tuple[np.ndarray, np.ndarray]:
    """Fold accuracies ``[nfolds]`` (fractions) and the threshold chosen for each fold.

    Args:
        dist: ``[P]`` squared L2 distances of the pairs.
        issame: ``[P]`` bool labels.
        nfolds: folds in file order (sklearn ``KFold(shuffle=False)``).
        thresholds: ``[K]`` candidate thresholds; a pair is "same" when ``dist < threshold``.
    """
    from sklearn.model_selection import KFold

    if dist.shape != issame.shape or dist.ndim != 1 or len(dist) < nfolds:
        raise ValueError(f"need [P] distances and labels with P >= nfolds={nfolds}, got "
                         f"{dist.shape} and {issame.shape}")
    correct = (dist[:, None] < thresholds[None, :]) == issame[:, None]   # [P, K]
    accuracies = np.zeros(nfolds)
    chosen = np.zeros(nfolds)
    for fold, (train, test) in enumerate(KFold(n_splits=nfolds, shuffle=False).split(dist)):
        best = int(np.argmax(correct[train].mean(axis=0)))
        chosen[fold] = thresholds[best]
        accuracies[fold] = correct[test, best].mean()
    return accuracies, chosen


@dataclass
class VerificationResult:
    """``accuracy`` and ``std`` in percent over the folds, ``xnorm`` the mean raw embedding norm."""

    name: str
    accuracy: float
    std: float
    xnorm: float
    num_pairs: int
    thresholds: List[float] = field(default_factory=list)


def embed_set(embedder: Embedder, images: torch.Tensor,
              batch_size: int = 64) -> Tuple[np.ndarray, np.ndarray]:
    """Raw embeddings ``[2P, D]`` (float64) of the images and of their mirrors."""
    plain, mirrored = [], []
    for start in range(0, images.shape[0], batch_size):
        batch = images[start:start + batch_size]
        feats = embedder(torch.cat([batch, batch.flip(3)])).double().numpy()
        plain.append(feats[:len(batch)])
        mirrored.append(feats[len(batch):])
    return np.concatenate(plain), np.concatenate(mirrored)


def evaluate_embeddings(name: str, plain: np.ndarray, mirrored: np.ndarray,
                        issame: np.ndarray, nfolds: int = 10) -> VerificationResult:
    """Accuracy-Flip and XNorm from raw embeddings ``[2P, D]`` of images and mirrors."""
    xnorm = float(np.concatenate([np.linalg.norm(plain, axis=1),
                                  np.linalg.norm(mirrored, axis=1)]).mean())
    emb = plain + mirrored
    norms = np.linalg.norm(emb, axis=1, keepdims=True)
    emb = emb / np.where(norms > 0, norms, 1.0)
    dist = ((emb[0::2] - emb[1::2]) ** 2).sum(axis=1)
    accuracies, chosen = kfold_accuracy(dist, np.asarray(issame, dtype=bool), nfolds)
    return VerificationResult(name, 100.0 * float(accuracies.mean()),
                              100.0 * float(accuracies.std()), xnorm, len(issame),
                              [float(t) for t in chosen])


def verify(data: VerificationSet, embedder: Embedder, batch_size: int = 64,
           nfolds: int = 10) -> VerificationResult:
    """Embed one set (images and mirrors) and evaluate it."""
    plain, mirrored = embed_set(embedder, data.images, batch_size)
    return evaluate_embeddings(data.name, plain, mirrored, data.issame, nfolds)


def format_results(results: Sequence[VerificationResult]) -> str:
    """A prettytable of results (accuracy and std in percent)."""
    from prettytable import PrettyTable

    table = PrettyTable(["Target", "Accuracy-Flip (%)", "Std (%)", "XNorm", "Pairs"])
    for r in results:
        table.add_row([r.name, f"{r.accuracy:.2f}", f"{r.std:.2f}", f"{r.xnorm:.4f}",
                       r.num_pairs])
    return table.get_string()


# --------------------------------------------------------------------------- trainer callback

class VerificationCallback:
    """Periodic verification for the trainer (rank 0 only: the trainer calls it there).

    Args:
        val_targets: set names, e.g. ``["lfw", "cfp_fp", "agedb_30"]``; ``<rec_dir>/<name>.bin``
            must exist (a missing one raises ValueError: remove it from ``config.val_targets``).
        rec_dir: folder of the ``.bin`` files (arcface_torch keeps them next to ``train.rec``).
        image_size: ``(H, W)`` of the network input.
        batch_size: images per forward (each forward also carries their mirrors).
        nfolds: cross-validation folds.
        summary_writer: optional TensorBoard ``SummaryWriter``; scalar tag = set name.
    """

    def __init__(self,
                 val_targets: Sequence[str],
                 rec_dir: str,
                 image_size: Tuple[int, int] = (112, 112),
                 batch_size: int = 64,
                 nfolds: int = 10,
                 summary_writer: Optional[Any] = None) -> None:
        self.sets = []
        for name in val_targets:
            path = os.path.join(rec_dir, f"{name}.bin")
            if not os.path.isfile(path):
                raise ValueError(f"verification set {path} does not exist; put {name}.bin in "
                                 f"{rec_dir} or remove {name!r} from config.val_targets")
            self.sets.append(load_bin(path, image_size))
            LOG.info("loaded verification set %s: %d pairs", path, len(self.sets[-1].issame))
        self.batch_size, self.nfolds = batch_size, nfolds
        self.summary_writer = summary_writer
        self.highest: Dict[str, float] = {s.name: 0.0 for s in self.sets}

    def __call__(self, step: int, backbone: nn.Module) -> Dict[str, Tuple[float, float, float]]:
        """Evaluate ``backbone`` on every set: ``{name: (accuracy %, std %, xnorm)}``.

        The backbone is put in eval mode for the evaluation and restored afterwards.
        """
        embedder = TorchEmbedder(backbone, autocast=False)
        results = {}
        for data in self.sets:
            r = verify(data, embedder, self.batch_size, self.nfolds)
            self.highest[r.name] = max(self.highest[r.name], r.accuracy)
            LOG.info("[%s][%d]XNorm: %f", r.name, step, r.xnorm)
            LOG.info("[%s][%d]Accuracy-Flip: %1.5f+-%1.5f", r.name, step, r.accuracy, r.std)
            LOG.info("[%s][%d]Accuracy-Highest: %1.5f", r.name, step, self.highest[r.name])
            if self.summary_writer is not None:
                self.summary_writer.add_scalar(r.name, r.accuracy, step)
            results[r.name] = (r.accuracy, r.std, r.xnorm)
        return results


def main(argv: Optional[List[str]] = None) -> List[VerificationResult]:
    """CLI: ``python -m eval.bin_verification`` from the repository root (or a fork's folder,
    beside the fork's own eval/verification.py, which this module's name does not clash with)."""
    import argparse
    import dataclasses
    import json

    from plugins.atomic_io import save_text
    from eval.model_io import load_embedder

    parser = argparse.ArgumentParser(description="10-fold verification on .bin sets")
    parser.add_argument("--model-prefix", required=True, help="backbone checkpoint or .onnx")
    parser.add_argument("--network", default="r50", help="backbone name of a torch checkpoint")
    parser.add_argument("--num-features", default=512, type=int, help="embedding size D")
    parser.add_argument("--data-dir", required=True, help="folder holding <target>.bin")
    parser.add_argument("--targets", default="lfw,cfp_fp,agedb_30",
                        help="comma-separated set names (files <data-dir>/<name>.bin)")
    parser.add_argument("--batch-size", default=64, type=int, help="images per forward")
    parser.add_argument("--nfolds", default=10, type=int, help="cross-validation folds")
    parser.add_argument("--device", default=None, help="torch device (default cuda if present)")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)

    embedder = load_embedder(args.model_prefix, args.network, args.device, args.num_features,
                             autocast=False)
    results = []
    for name in [t for t in args.targets.split(",") if t]:
        data = load_bin(os.path.join(args.data_dir, f"{name}.bin"))
        results.append(verify(data, embedder, args.batch_size, args.nfolds))
    print(format_results(results))
    if args.json:
        payload = {"model": embedder.description, "nfolds": args.nfolds,
                   "results": {r.name: dataclasses.asdict(r) for r in results}}
        save_text(args.json, json.dumps(payload, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
