"""Records read + decoded + normalised per second: FaceRecordDataset vs a plain Pillow reader.

Both sides read the same files in one process in the same run (alternating rounds, best round
kept, so load from other processes hits both alike) and produce the same float tensor
``(x / 255 - 0.5) / 0.5`` of shape [3, 112, 112].  The Pillow reader is what a straightforward
mxnet-free port does: offsets from the .idx, ``seek`` + ``read``, ``PIL.Image.open`` on BytesIO.

    python bench/bench_dataset.py                 # generates a synthetic set in a temp folder
    python bench/bench_dataset.py --root data/synth --rounds 5
"""
from __future__ import annotations

import argparse
import io
import os
import struct
import sys
import tempfile
import time
from typing import Callable, Dict

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data.dataset import FaceRecordDataset  # noqa: E402
from data.image_codec import decoder_name  # noqa: E402
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

    def item(self, key: int) -> torch.Tensor:
        self.file.seek(self.offsets[key])
        _, lrec = struct.unpack("<II", self.file.read(8))
        data = self.file.read(lrec & ((1 << 29) - 1))
        flag = struct.unpack_from("<I", data, 0)[0]
        body = data[24 + 4 * flag:]
        img = np.asarray(Image.open(io.BytesIO(body)).convert("RGB"))
        return torch.from_numpy(img.copy()).permute(2, 0, 1).float().div(255).sub(0.5).div(0.5)


def rate(fn: Callable[[int], object], n: int) -> float:
    start = time.perf_counter()
    for i in range(n):
        fn(i)
    return n / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", default=None, help="folder with train.rec/.idx (default: "
                                                 "generate a synthetic one in a temp folder)")
    ap.add_argument("--num-images", type=int, default=2000, help="records timed per round")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds; best one kept")
    args = ap.parse_args()
    torch.set_num_threads(1)    # one process, as in a DataLoader worker (torch sets 1 there)
    with tempfile.TemporaryDirectory() as tmp:
        root = args.root
        if root is None:
            root = tmp
            write_train_set(root, num_ids=40, images_per_id=max(1, args.num_images // 40))
        ours = FaceRecordDataset(root, flip=False)
        base = PillowReader(root)
        n = min(args.num_images, len(ours))
        keys = ours.keys.tolist()
        np.testing.assert_allclose(ours[0][0].numpy(), base.item(keys[0]).numpy(), atol=2 / 127.5)
        best = {"ours": 0.0, "pillow": 0.0}
        for _ in range(args.rounds):
            best["ours"] = max(best["ours"], rate(lambda i: ours[i], n))
            best["pillow"] = max(best["pillow"], rate(lambda i: base.item(keys[i]), n))
        print(f"records: {n} from {root}, decoder: {decoder_name()}, torch threads: 1")
        print(f"FaceRecordDataset : {best['ours']:8.0f} records/s")
        print(f"Pillow reader     : {best['pillow']:8.0f} records/s")
        print(f"ratio (ours / Pillow): {best['ours'] / best['pillow']:.2f}x")


if __name__ == "__main__":
    main()
