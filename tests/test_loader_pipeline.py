"""The training input pipeline: pixel normalisation by table, uint8 batches normalised on the
device, the collate, DeviceBatches (prefetch, CUDA stream hand-over, loader-wait report) and the
worker count "auto"."""
from __future__ import annotations

import contextlib
import logging
import os

import numpy as np
import pytest
import torch

import data.device_batches as device_batches
from data.dataset import FaceRecordDataset, ResumableDistributedSampler, make_loader
from data.device_batches import DeviceBatches, LoaderWaitMeter, host_pixels
from data.pixels import NORMALISE_TABLE, normalise_batch, normalise_image
from engine import runtime
from engine.runtime import resolve_num_workers
from tests.training_helpers import job_config

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "recordio")
INSIGHTFACE = os.path.join(FIXTURES, "insightface_style")


def _bits(x):
    return np.ascontiguousarray(np.asarray(x, dtype=np.float32)).view(np.uint32)


def _arcface_normalise(rgb, flip):
    """arcface_torch's arithmetic, written out: channels first, mirror, (x / 255 - 0.5) / 0.5."""
    chw = rgb.transpose(2, 0, 1)
    if flip:
        chw = chw[:, :, ::-1]
    x = chw.astype(np.float32)
    x /= 255.0
    x -= 0.5
    x /= 0.5
    return x


def test_the_table_and_its_users_give_the_arithmetic_bit_for_bit():
    values = np.arange(256, dtype=np.float32)
    np.testing.assert_array_equal(_bits(NORMALISE_TABLE), _bits((values / 255.0 - 0.5) / 0.5))
    torch_values = ((torch.arange(256).float() / 255.0) - 0.5) / 0.5
    np.testing.assert_array_equal(_bits(NORMALISE_TABLE), _bits(torch_values.numpy()))
    rgb = np.random.default_rng(0).integers(0, 256, (112, 112, 3), dtype=np.uint8)
    for flip in (False, True):
        got = normalise_image(rgb, flip)
        assert got.shape == (3, 112, 112) and got.flags.c_contiguous
        np.testing.assert_array_equal(_bits(got), _bits(_arcface_normalise(rgb, flip)))
    batch = torch.from_numpy(np.stack([rgb, rgb[:, ::-1]]))
    out = normalise_batch(batch)
    assert out.shape == (2, 3, 112, 112) and out.is_contiguous()
    np.testing.assert_array_equal(_bits(out[1].numpy()), _bits(_arcface_normalise(rgb, True)))
    with pytest.raises(ValueError, match=r"\[B, S, S, 3\] uint8"):
        normalise_batch(batch.float())


def _loader(pixels, workers, seed=4):
    ds = FaceRecordDataset(INSIGHTFACE, flip=True, seed=seed, pixels=pixels)
    sampler = ResumableDistributedSampler(len(ds), batch_size=4, num_replicas=1, rank=0, seed=1)
    ds.set_epoch(1)
    sampler.set_epoch(1)
    return ds, make_loader(ds, sampler, batch_size=4, num_workers=workers, seed=0)


def test_uint8_batches_normalised_like_float_items_from_workers_and_main_process():
    """Both flips occur; float items (workers and main process), and uint8 batches normalised by
    the table on the 'device', are the same bits; the images are C-order."""
    reference = None
    for pixels, workers in (("float", 0), ("float", 1), ("uint8", 0), ("uint8", 1)):
        ds, loader = _loader(pixels, workers)
        batches = list(loader)
        if pixels == "uint8":
            assert batches[0][0].dtype == torch.uint8 and batches[0][0].shape == (4, 112, 112, 3)
            batches = [(normalise_batch(b[0]),) + tuple(b[1:]) for b in batches]
        images = torch.cat([b[0] for b in batches])
        assert images.dtype == torch.float32 and images.is_contiguous()
        flipped = torch.cat([b[3] for b in batches])
        rest = [torch.cat([b[i] for b in batches]) for i in (1, 2)] + [flipped]
        if reference is None:
            reference = (images, rest)
            assert flipped.any() and not flipped.all()
            # the float items are arcface_torch's arithmetic of the decoded image
            index = int(batches[0][2][0])
            want = _arcface_normalise(ds.decode(index), bool(batches[0][3][0]))
            np.testing.assert_array_equal(_bits(images[0].numpy()), _bits(want))
        else:
            assert torch.equal(images.view(torch.int32), reference[0].view(torch.int32)), \
                (pixels, workers)
            assert all(torch.equal(a, b) for a, b in zip(rest, reference[1]))


def test_dataset_rejects_an_unknown_pixel_format():
    with pytest.raises(ValueError, match="pixels must be one of"):
        FaceRecordDataset(INSIGHTFACE, pixels="half")


# ------------------------------------------------------------------ DeviceBatches

class _CountingLoader:
    """A loader over fixed host batches that records how many were taken."""

    def __init__(self, batches):
        self.batches, self.taken = batches, 0

    def __iter__(self):
        for batch in self.batches:
            self.taken += 1
            yield batch


def _host_batches(n, dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    out = []
    for k in range(n):
        images = (torch.randint(0, 256, (2, 8, 8, 3), generator=gen, dtype=torch.uint8)
                  if dtype == torch.uint8 else torch.randn(2, 3, 8, 8, generator=gen))
        out.append((images, torch.tensor([k, k + 1]), torch.tensor([2 * k, 2 * k + 1]),
                    torch.tensor([False, True])))
    return out


def test_cpu_batches_pass_through_one_ahead_in_the_memory_format():
    host = _host_batches(3)
    loader = _CountingLoader(host)
    channels_last = lambda x: x.contiguous(memory_format=torch.channels_last)  # noqa: E731
    seen = []
    for got, want in zip(DeviceBatches(loader, torch.device("cpu"), channels_last), host):
        seen.append(loader.taken)
        assert got[0].is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        assert got[2] is want[2] and got[3] is want[3]          # index, flipped: on the host
    assert seen == [2, 3, 3]      # batch k + 1 taken before batch k is handed out
    uint8 = _host_batches(2, torch.uint8)
    for got, want in zip(DeviceBatches(uint8, torch.device("cpu")), uint8):
        assert torch.equal(got[0], normalise_batch(want[0]))
    assert host_pixels(torch.device("cpu")) == "float"
    assert host_pixels(torch.device("cuda", 0)) == "uint8"


class _FakeTensor:
    def __init__(self, name, log):
        self.name, self.log = name, log

    def record_stream(self, stream):
        self.log.append(("record_stream", self.name, stream.name))


class _FakeStream:
    def __init__(self, name, log):
        self.name, self.log = name, log

    def wait_stream(self, other):
        self.log.append(("wait_stream", self.name, other.name))


def test_cuda_hand_over_order_with_stand_in_streams(monkeypatch):
    """The CUDA branch, run with stand-in streams: batch k + 1's copy is queued on the side
    stream before batch k is handed out, and before a batch is handed out the step's stream
    waits for the side stream and both device tensors are recorded on the step's stream."""
    log, state = [], {"stream": "main"}
    main, side = _FakeStream("main", log), _FakeStream("side", log)
    monkeypatch.setattr(torch.cuda, "Stream", lambda device: side)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device: main)

    @contextlib.contextmanager
    def on(stream):
        state["stream"] = stream.name
        yield
        state["stream"] = "main"
    monkeypatch.setattr(torch.cuda, "stream", on)
    monkeypatch.setattr(device_batches, "device_table", lambda device: None)

    def fake_copy(batch, device, memory_format):
        k = int(batch[1][0])
        log.append(("copy", k, state["stream"]))
        return (_FakeTensor(f"images{k}", log), _FakeTensor(f"labels{k}", log), batch[2], batch[3])
    monkeypatch.setattr(device_batches, "to_device", fake_copy)

    for batch in DeviceBatches(_host_batches(3), torch.device("cuda", 0)):
        log.append(("step", batch[0].name))
    assert log == [
        ("wait_stream", "side", "main"),
        ("copy", 0, "side"),
        ("wait_stream", "main", "side"), ("record_stream", "images0", "main"),
        ("record_stream", "labels0", "main"),
        ("copy", 1, "side"), ("step", "images0"),
        ("wait_stream", "main", "side"), ("record_stream", "images1", "main"),
        ("record_stream", "labels1", "main"),
        ("copy", 2, "side"), ("step", "images1"),
        ("wait_stream", "main", "side"), ("record_stream", "images2", "main"),
        ("record_stream", "labels2", "main"),
        ("step", "images2")]


class _Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class _SlowLoader:
    """Each batch costs ``wait`` seconds of the stand-in clock."""

    def __init__(self, clock, n, wait):
        self.clock, self.n, self.wait = clock, n, wait

    def __iter__(self):
        for batch in _host_batches(self.n):
            self.clock.now += self.wait
            yield batch


@pytest.mark.parametrize("wait,step,limits", [(0.002, 0.049, False), (0.06, 0.02, True)])
def test_loader_wait_is_reported_once_after_the_window(caplog, wait, step, limits):
    clock = _Clock()
    meter = LoaderWaitMeter(num_workers=3, batch_size=2, skip=2, window=4)
    batches = DeviceBatches(_SlowLoader(clock, 4, wait), torch.device("cpu"), meter=meter,
                            clock=clock)
    with caplog.at_level(logging.INFO, logger="data.device_batches"):
        # 4 batches an epoch, 3 timed (the first follows the epoch's start): the window of
        # batches 3-6 ends in epoch 1, and the 100 s between epochs is not in it
        for epoch in range(3):
            for count, _ in enumerate(batches):
                clock.now += step
                assert meter.done == (epoch == 2 or (epoch == 1 and count == 3))
            clock.now += 100.0
    records = [r for r in caplog.records if r.name == "data.device_batches"]
    assert len(records) == 1
    text = records[0].getMessage()
    assert records[0].levelno == (logging.WARNING if limits else logging.INFO)
    # timed batches 3-6 = epoch 0's 3rd, epoch 1's 1st-3rd; the 3rd of an epoch is handed out
    # after the loader's end, not after a wait: two waits in four batches
    waited, between = wait / 2, step + wait / 2
    assert (f"waited {1e3 * waited:.1f} ms for data per batch, {100 * waited / between:.0f}% "
            f"of the {1e3 * between:.1f} ms between batches (batches 3-6, "
            f"{2 / between:.0f} images/s, 3 workers)") in text
    assert ("the loader limits this run" in text) == limits
    assert ("the training step sets the pace" in text) == (not limits)


def test_other_ranks_measure_without_logging(caplog):
    clock = _Clock()
    meter = LoaderWaitMeter(num_workers=0, batch_size=2, skip=0, window=2, log=False)
    with caplog.at_level(logging.INFO, logger="data.device_batches"):
        for _ in DeviceBatches(_SlowLoader(clock, 4, 1.0), torch.device("cpu"), meter=meter,
                               clock=clock):
            pass
    assert meter.done and "the loader limits this run" in meter.report
    assert not [r for r in caplog.records if r.name == "data.device_batches"]


# ------------------------------------------------------------------ num_workers

@pytest.mark.parametrize("cpus,local_world,device,want", [
    (16, 1, "cuda", 8), (16, 8, "cuda", 1), (96, 8, "cuda", 8), (40, 4, "cuda", 8),
    (24, 4, "cuda", 5), (2, 1, "cuda", 1), (1, 1, "cuda", 0), (7, 8, "cuda", 0),
    (2, 1, "cpu", 1), (16, 1, "cpu", 1), (1, 1, "cpu", 0), (4, 4, "cpu", 0)])
def test_auto_workers_follow_the_cpus_per_process(monkeypatch, cpus, local_world, device, want):
    monkeypatch.setattr(runtime, "available_cpus", lambda: cpus)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local_world))
    assert resolve_num_workers("auto", device) == want
    assert resolve_num_workers(3, device) == 3 and resolve_num_workers(0, device) == 0


def test_auto_workers_leave_the_cpu_threads_their_share(monkeypatch):
    monkeypatch.setattr(runtime, "available_cpus", lambda: 6)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    try:
        assert runtime.configure_cpu_threads(resolve_num_workers("auto", "cpu")) == 5
    finally:
        torch.set_num_threads(before)


def test_num_workers_config_values(workdir):
    assert job_config(workdir, "auto_workers", num_workers="auto").num_workers == "auto"
    for bad, match in (("four", r"'num_workers' must be an int >= 0 or 'auto', got 'four'"),
                       (2.5, r"'num_workers' must be int or str, got 2.5"),
                       (True, r"'num_workers' must be int or str, got True")):
        with pytest.raises(ValueError, match=match):
            job_config(workdir, "bad_workers", num_workers=bad)
    for bad in ("four", -1, 1.0):
        with pytest.raises(ValueError, match="must be an int >= 0 or 'auto'"):
            resolve_num_workers(bad, "cuda")
    with pytest.raises(ValueError, match="num_workers must be an int >= 0"):
        make_loader(FaceRecordDataset(INSIGHTFACE), None, 4, "auto")


# ------------------------------------------------------------------ in training

def test_training_on_uint8_batches_gives_the_float_runs_weights(workdir, monkeypatch):
    """The GPU input path (uint8 batches, normalised after the copy) run on the CPU trains the
    same bits as the CPU path (float batches from the workers); rank 0 logs the loader line."""
    from engine.trainer import train

    class ShortWindow(LoaderWaitMeter):
        def __init__(self, num_workers, batch_size, log):
            super().__init__(num_workers, batch_size, skip=1, window=3, log=log)
    monkeypatch.setattr(device_batches, "LoaderWaitMeter", ShortWindow)
    weights = {}
    for pixels, workers in (("float", 1), ("uint8", 0)):
        monkeypatch.setattr(device_batches, "host_pixels", lambda device, p=pixels: p)
        cfg = job_config(workdir, f"pixels_{pixels}", distill="adadistill", max_steps=6,
                         num_workers=workers)
        train(cfg)
        weights[pixels] = torch.load(os.path.join(cfg.output, "model.pt"), weights_only=True)
        log = open(os.path.join(cfg.output, "training.log")).read()
        worker_s = "1 worker)" if workers == 1 else f"{workers} workers)"
        assert "between batches (batches 2-4, " in log and worker_s in log
    assert weights["float"].keys() == weights["uint8"].keys()
    for key, value in weights["float"].items():
        assert torch.equal(value, weights["uint8"][key]), key
