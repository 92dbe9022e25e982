"""Run upstream arcface_torch's own scripts (a real checkout, never committed here) on a CPU.

``install()`` makes, in the calling process only, what upstream's code asks of a CUDA machine
answer on the CPU, and stands in for the packages a CPU test environment lacks:

- ``.cuda()`` of tensors and modules, ``.to(<GPU index>)``, ``device="cuda"`` in ``torch.tensor``,
  ``torch.cuda.set_device``, ``torch.cuda.Stream`` / ``stream`` / ``current_stream`` (upstream's
  ``DataLoaderX`` copies batches on a side stream): the CPU, or nothing;
- ``init_process_group("nccl", ...)``: gloo (upstream joins a 1-process group when run alone;
  an already joined group -- a test harness rank -- is kept); DDP without ``device_ids``;
- ``_LRScheduler(..., verbose=...)``: accepted (upstream's ``PolynomialLRWarmup`` passes it, a
  TypeError on torch >= 2.7); ``np.int`` / ``np.float`` / ``np.bool`` (removed in numpy 1.24);
  the ONNX export at the end of 2022's ``train.py`` skipped; DataLoader workers forked;
- ``mxnet`` (reading the .rec: ``recordio.MXIndexedRecordIO``, ``unpack``, ``image.imdecode``)
  through ``plugins/recordio.py`` and our JPEG decoder; ``torchvision`` (``transforms.Compose``,
  ``ToPILImage``, ``RandomHorizontalFlip``, ``ToTensor``, ``Normalize``; ``datasets.ImageFolder``)
  with the same arithmetic on numpy arrays; ``wandb`` as an empty module.

Used by tests/test_upstream_real.py (runs when ``KDFACE_UPSTREAM`` names a checkout).
"""
from __future__ import annotations

import contextlib
import sys
import types

import numpy as np
import torch
import torch.distributed as dist


def _cpu(device):
    """``device`` with every GPU reference mapped to the CPU."""
    if isinstance(device, int) or (isinstance(device, str) and device.startswith("cuda")) or \
            (isinstance(device, torch.device) and device.type == "cuda"):
        return torch.device("cpu")
    return device


def _torch_on_cpu() -> None:
    tensor_to, tensor_fn = torch.Tensor.to, torch.tensor

    def to(self, *args, **kwargs):
        if args and not isinstance(args[0], (torch.dtype, torch.Tensor)):
            args = (_cpu(args[0]),) + args[1:]
        if "device" in kwargs:
            kwargs["device"] = _cpu(kwargs["device"])
        return tensor_to(self, *args, **kwargs)

    def tensor(*args, **kwargs):
        if "device" in kwargs:
            kwargs["device"] = _cpu(kwargs["device"])
        return tensor_fn(*args, **kwargs)

    torch.Tensor.to, torch.tensor = to, tensor
    torch.Tensor.cuda = lambda self, *a, **k: self
    torch.nn.Module.cuda = lambda self, *a, **k: self
    torch.cuda.set_device = lambda *a, **k: None

    class Stream:
        def __init__(self, *args, **kwargs):
            pass

        def wait_stream(self, other):
            pass

    torch.cuda.Stream = Stream
    torch.cuda.stream = lambda *a, **k: contextlib.nullcontext()
    torch.cuda.current_stream = lambda *a, **k: Stream()

    init = dist.init_process_group

    def init_process_group(backend=None, *args, **kwargs):
        if dist.is_initialized():
            return None
        if kwargs.get("init_method", "").startswith("tcp://127.0.0.1:"):
            import tempfile
            kwargs["init_method"] = "file://" + tempfile.mktemp(prefix="upstream_pg_")
        return init("gloo", *args, **kwargs)

    dist.init_process_group = init_process_group
    ddp_init = torch.nn.parallel.DistributedDataParallel.__init__

    def ddp(self, module, *args, **kwargs):
        kwargs.pop("device_ids", None)
        kwargs.pop("output_device", None)
        ddp_init(self, module, *args, **kwargs)

    torch.nn.parallel.DistributedDataParallel.__init__ = ddp
    from torch.optim import lr_scheduler
    base_init = lr_scheduler.LRScheduler.__init__

    def scheduler_init(self, optimizer, last_epoch=-1, verbose=None, *args, **kwargs):
        base_init(self, optimizer, last_epoch)

    lr_scheduler.LRScheduler.__init__ = scheduler_init


def _mxnet() -> types.ModuleType:
    from data.image_codec import decode_rgb
    from plugins.recordio import RecordReader

    class MXIndexedRecordIO:
        def __init__(self, idx_path, rec_path, flag):
            self.reader = RecordReader(rec_path, idx_path)
            self.keys = list(self.reader.keys)

        def read_idx(self, key):
            return self.reader.read(int(key))

    class Decoded:
        def __init__(self, array):
            self.array = array

        def asnumpy(self):
            return self.array

    mx = types.ModuleType("mxnet")
    mx.recordio = types.SimpleNamespace(MXIndexedRecordIO=MXIndexedRecordIO,
                                        unpack=lambda record: record)
    mx.image = types.SimpleNamespace(imdecode=lambda body: Decoded(decode_rgb(body)))
    mx.ndarray = mx.nd = types.ModuleType("mxnet.ndarray")
    return mx


class Compose:
    """torchvision's transforms, on the numpy images upstream's MXFaceDataset decodes (also the
    stand-in fork's: tests/upstream_standin.py)."""

    def __init__(self, transforms):
        self.transforms = transforms

    def __call__(self, image):
        for step in self.transforms:
            image = step(image)
        return image


class ToPILImage:                     # keeps the [H, W, 3] uint8 array
    def __call__(self, image):
        return image


class RandomHorizontalFlip:
    def __init__(self, p=0.5):
        self.p = p

    def __call__(self, image):
        return np.ascontiguousarray(image[:, ::-1]) if torch.rand(1) < self.p else image


class ToTensor:
    def __call__(self, image):
        return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float() / 255


class Normalize:
    def __init__(self, mean, std):
        self.mean, self.std = mean, std

    def __call__(self, tensor):
        return (tensor - torch.tensor(self.mean).view(-1, 1, 1)) / \
            torch.tensor(self.std).view(-1, 1, 1)


def _torchvision() -> types.ModuleType:
    vision = types.ModuleType("torchvision")
    vision.transforms = types.ModuleType("torchvision.transforms")
    for cls in (Compose, ToPILImage, RandomHorizontalFlip, ToTensor, Normalize):
        setattr(vision.transforms, cls.__name__, cls)
    vision.datasets = types.ModuleType("torchvision.datasets")
    vision.datasets.ImageFolder = type("ImageFolder", (), {})
    return vision


def _no_export() -> types.ModuleType:
    """2022's train.py exports model.onnx after the last epoch with upstream's torch2onnx.py
    (``np.float``; torch's exporter now needs onnxscript): not part of training, skipped."""
    module = types.ModuleType("torch2onnx")
    module.convert_onnx = lambda *args, **kwargs: None
    return module


def install() -> None:
    """Apply everything above to this process (call once, before upstream's script runs)."""
    _torch_on_cpu()
    for name, value in (("int", int), ("float", float), ("bool", bool), ("object", object)):
        if name not in np.__dict__:   # removed in numpy 1.24 (upstream's eval code uses them)
            setattr(np, name, value)
    # DataLoader workers start as on Linux (a test harness child defaults to forkserver, which
    # would pickle the dataset)
    torch.multiprocessing.set_start_method("fork", force=True)
    mx, vision = _mxnet(), _torchvision()
    sys.modules.update({"mxnet": mx, "mxnet.ndarray": mx.ndarray, "torchvision": vision,
                        "torchvision.transforms": vision.transforms,
                        "torchvision.datasets": vision.datasets,
                        "wandb": types.ModuleType("wandb"), "torch2onnx": _no_export()})
