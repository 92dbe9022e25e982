"""Dataset items/s against the pure decode + flip (+ normalise) of the same records, and the
training loader's images/s with 0 and N workers.

One process, one run, torch and OpenCV on one thread as in a DataLoader worker; the rows take
turns every ``--chunk`` items within each of ``--rounds`` rounds (so load from other processes
hits every row alike), and every ratio is taken within a round (median and range printed):

  decode + flip               the JPEG bytes already in memory, decoded, mirrored (OpenCV): the
                              floor of any reader
  decode + flip + normalise   the same plus arcface_torch's ``(x / 255 - 0.5) / 0.5`` written as
                              numpy float32 operations: what a float item must contain
  FaceRecordDataset float     our items as the CPU path trains on them (record read from the
                              mmap, header, decode, flip, normalise by table, tensors)
  FaceRecordDataset uint8     our items as a GPU run loads them (normalised on the GPU)
  Pillow reader               a straightforward mxnet-free port (seek + read + PIL), float items

then the training DataLoader (``data.dataset.make_loader``, ``collate_batch``) over the same
records in batches of ``--batch-size``, float and uint8, with 0 workers and with ``--workers``
(default: what ``num_workers = "auto"`` gives a GPU run on this machine).

    python bench/bench_dataset.py                 # generates a synthetic set in a temp folder
    python bench/bench_dataset.py --root data/synth --rounds 5 --workers 4
"""
from __future__ import annotations

import argparse
import io
import os
import statistics
import struct
import sys
import tempfile
import time
from typing import Callable, Dict, List

import cv2
import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data.dataset import (FaceRecordDataset, ResumableDistributedSampler,  # noqa: E402
                          make_loader)
from data.image_codec import decoder_name, get_decoder  # noqa: E402
from data.pixels import normalise_batch  # noqa: E402
from engine.runtime import resolve_num_workers  # noqa: E402
from tools.synthetic import write_train_set  # noqa: E402


class PillowReader:
    """Baseline: whole records only (no split records), IRHeader parsed with struct."""

    def __init__(self, root: str) -> None:
        self.offsets: Dict[int, int] = {}
        with open(os.path.join(root, "train.idx")) as f:
            for line in f:
                key, offset = line.split("\t")
                self.offsets[int(key)] = int(offset)
        self.file = open(os.path.join(root, "train.rec"), "rb")

    def item(self, key: int, flip: bool) -> torch.Tensor:
        self.file.seek(self.offsets[key])
        _, lrec = struct.unpack("<II", self.file.read(8))
        data = self.file.read(lrec & ((1 << 29) - 1))
        flag = struct.unpack_from("<I", data, 0)[0]
        img = np.asarray(Image.open(io.BytesIO(data[24 + 4 * flag:])).convert("RGB"))
        x = torch.from_numpy(img.copy()).permute(2, 0, 1).float().div(255).sub(0.5).div(0.5)
        return x.flip(2) if flip else x


def pure_rows(ds: FaceRecordDataset, n: int) -> Dict[str, Callable[[int], object]]:
    """The pure work on the same records: bytes read beforehand, no file, no dataset."""
    decode = get_decoder("auto")
    bodies = [ds.reader.read(int(k))[1] for k in ds.keys[:n]]
    flips = ds.flip_flags(ds.epoch)

    def decode_flip(i: int) -> np.ndarray:
        img = decode(bodies[i])
        return cv2.flip(img, 1) if flips[i] else img      # an image, not a view

    def decode_flip_normalise(i: int) -> np.ndarray:
        chw = decode(bodies[i]).transpose(2, 0, 1)
        x = (chw[:, :, ::-1] if flips[i] else chw).astype(np.float32)
        x /= 255.0
        x -= 0.5
        x /= 0.5
        return x
    return {"decode + flip": decode_flip, "decode + flip + normalise": decode_flip_normalise}


def interleaved_items_per_second(rows: Dict[str, Callable[[int], object]], n: int,
                                 chunk: int) -> Dict[str, float]:
    """items/s of every row over items ``0 .. n-1``, the rows taking turns every ``chunk``
    items, so that a burst of load from elsewhere hits them alike."""
    seconds = {name: 0.0 for name in rows}
    for lo in range(0, n, chunk):
        for name, fn in rows.items():
            start = time.perf_counter()
            for i in range(lo, min(lo + chunk, n)):
                fn(i)
            seconds[name] += time.perf_counter() - start
    return {name: n / seconds[name] for name in rows}


def loader_images_per_second(loader) -> float:
    """One epoch of the loader (its persistent workers already started), images/s."""
    start, images = time.perf_counter(), 0
    for batch in loader:
        images += batch[0].shape[0]
    return images / (time.perf_counter() - start)


RATIOS = (("FaceRecordDataset float", "decode + flip + normalise"),
          ("FaceRecordDataset uint8", "decode + flip"),
          ("FaceRecordDataset float", "Pillow reader"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", default=None, help="folder with train.rec/.idx (default: "
                                                 "generate a synthetic one in a temp folder)")
    ap.add_argument("--num-images", type=int, default=2000, help="records timed per round")
    ap.add_argument("--rounds", type=int, default=5, help="rounds (median and range printed)")
    ap.add_argument("--chunk", type=int, default=50, help="items per turn of a row")
    ap.add_argument("--batch-size", type=int, default=128, help="loader batch")
    ap.add_argument("--workers", type=int, default=None,
                    help="loader workers of the N-worker rows (default: num_workers='auto' of "
                         "a GPU run here)")
    args = ap.parse_args()
    torch.set_num_threads(1)    # one process, as in a DataLoader worker (torch sets 1 there)
    cv2.setNumThreads(1)
    workers = args.workers if args.workers is not None else resolve_num_workers("auto", "cuda")
    with tempfile.TemporaryDirectory() as tmp:
        root = args.root
        if root is None:
            root = tmp
            write_train_set(root, num_ids=40, images_per_id=max(1, args.num_images // 40))
        datasets = {p: FaceRecordDataset(root, flip=True, pixels=p) for p in ("float", "uint8")}
        n = min(args.num_images, len(datasets["float"]))
        keys = datasets["float"].keys.tolist()
        flips = datasets["float"].flip_flags(0)
        pillow = PillowReader(root)
        np.testing.assert_allclose(datasets["float"][0][0].numpy(),
                                   pillow.item(keys[0], bool(flips[0])).numpy(), atol=2 / 127.5)
        rows = pure_rows(datasets["float"], n)
        rows["FaceRecordDataset float"] = datasets["float"].__getitem__
        rows["FaceRecordDataset uint8"] = datasets["uint8"].__getitem__
        rows["Pillow reader"] = lambda i: pillow.item(keys[i], bool(flips[i]))

        loaders = {}
        for pixels, ds in datasets.items():
            for w in sorted({0, workers}):
                sampler = ResumableDistributedSampler(n, args.batch_size, 1, 0, seed=0)
                loaders[(pixels, w)] = make_loader(ds, sampler, args.batch_size, w, seed=0)
                for _ in loaders[(pixels, w)]:          # start the workers, warm the page cache
                    pass
        batch_u8 = next(iter(loaders[("uint8", 0)]))[0]

        item_rates: List[Dict[str, float]] = []
        loader_rates: List[Dict[tuple, float]] = []
        norm_rates: List[float] = []
        for _ in range(args.rounds):
            item_rates.append(interleaved_items_per_second(rows, n, args.chunk))
            loader_rates.append({key: loader_images_per_second(loader)
                                 for key, loader in loaders.items()})
            start = time.perf_counter()
            normalise_batch(batch_u8)
            norm_rates.append(batch_u8.shape[0] / (time.perf_counter() - start))

    def summary(values: List[float], fmt: str) -> str:
        low, high = format(min(values), fmt).strip(), format(max(values), fmt).strip()
        return f"{format(statistics.median(values), fmt)} (range {low}-{high})"

    print(f"records: {n} from {root}, decoder: {decoder_name()}, torch/OpenCV threads: 1; "
          f"{args.rounds} rounds, rows taking turns every {args.chunk} items; median (range)")
    print("per item, one process                items/s")
    for name in rows:
        print(f"  {name:<28} {summary([r[name] for r in item_rates], '7.0f')}")
    for ours, base in RATIOS:
        ratios = [r[ours] / r[base] for r in item_rates]
        print(f"ratio {ours} / ({base}): {summary(ratios, '.2f')}")
    print(f"\ntraining loader (data.dataset.make_loader), batches of {args.batch_size}, "
          f"{os.cpu_count()} CPUs here; images/s")
    for key in loaders:
        pixels, w = key
        rates = [r[key] for r in loader_rates]
        print(f"  {pixels:<5} batches, {w} workers    {summary(rates, '7.0f')}   "
              f"= {statistics.median(rates) / args.batch_size:.1f} batches/s")
    print(f"  uint8 batch normalised by the table on this CPU: {summary(norm_rates, '.0f')} "
          f"images/s (on a GPU: one kernel after the copy)")


if __name__ == "__main__":
    main()
