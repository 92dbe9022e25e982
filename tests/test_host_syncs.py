"""At most ONE host-device synchronisation per optimizer step (issue 24): the trainer's step reads
all its flags at once after the backward is queued (engine/step_guard), and the loss and head
statistics stay on the device until a progress line is printed.  Counted on the CPU by patching
the sync entry points (tests/sync_counter.py) over 20 steps of every head registered in
plugins/heads, through engine.trainer.train.  The teacher source and the precision are the
trainer's, not the head's: each head runs one of (online teacher, float16 autocast + GradScaler
on the CPU) and (teacher cache, fp32), alternating along the registry, AdaDistill and GKD both;
plus gradient_acc = 2, Partial FC sampling and two real ranks (gloo).

Not covered (a host read each, by design; docs/ARCHITECTURE.md "One host read per step"): GKD's
adaptive k (gkd_tau: the chosen k sizes a top-k) and Partial FC sampling whose kept-class count
depends on the labels (int(sample_rate x C / W) < global batch)."""
import warnings

import pytest
import torch

import data.dataset as host_data
import engine.trainer as trainer
from plugins.heads import head_names, head_spec
from tests.sync_counter import SyncCounter, counting
from tests.training_helpers import job_config

STEPS, FREQUENT = 20, 10
BUILT_IN = [name for name in head_names()
            if head_spec(name).cls.__module__.startswith("plugins.heads.")]
FLOAT16 = dict(fp16=True, amp_dtype="float16")
# every path: AdaDistill and GKD online under float16 + GradScaler and cached in fp32; the other
# heads alternate online fp32 / cached fp32 (their float16 step is the same scaler flag, and
# float16 autocast on a CPU is the slowest part of the suite)
CASES = {name: ([("online", FLOAT16), ("cached", {})] if name in ("adadistill", "gkd") else
                [("online", {}) if i % 2 == 0 else ("cached", {})])
         for i, name in enumerate(BUILT_IN)}


@pytest.fixture(scope="module")
def cache_dir(workdir):
    from engine.teacher_cache_build import build_from_config
    path = str(workdir / "teacher_cache_syncs")
    build_from_config(job_config(workdir, "cache_syncs", distill="adadistill",
                                 teacher_cache=path), dtype="float32")
    return path


def watch_training(counter: SyncCounter, trainer_module, data_module) -> None:
    """Count in the optimizer step and after it ("step"), in the progress lines' read ("line");
    not in checkpoint saves or the data loader (host work)."""
    counter.watch(trainer_module, "train_step", "step")
    counter.watch(trainer_module, "_after_step", "step")
    counter.watch(trainer_module.ProgressMeter, "flush", "line")
    counter.watch(trainer_module, "_save_checkpoint", None)
    counter.watch_loader(data_module, "make_loader")


def _counted_run(cfg):
    with counting() as counter, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        watch_training(counter, trainer, host_data)
        summary = trainer.train(cfg)
    return summary, counter


def _assert_one_per_step(summary, counter, steps=STEPS):
    assert summary["steps"] == steps and summary["skipped_steps"] == 0
    assert counter.calls["step"] > 0
    assert counter.counts["step"] <= steps, counter.report()
    lines = -(-steps // FREQUENT)
    assert counter.counts["line"] <= lines, counter.report()


@pytest.mark.parametrize("name", BUILT_IN)
def test_every_head_syncs_once_per_step(workdir, cache_dir, name):
    margin = (1.0, 0.5, 0.0) if name == "arcdistill" else (1.0, 0.0, 0.35)
    for teacher, precision in CASES[name]:
        extra = dict(teacher_cache=cache_dir) if teacher == "cached" and \
            head_spec(name).needs_teacher else {}
        cfg = job_config(workdir, f"syncs_{name}_{teacher}", distill=name, margin_list=margin,
                         max_steps=STEPS, num_epoch=100, frequent=FREQUENT, save_every=1000,
                         batch_size=4, **precision, **extra)
        summary, counter = _counted_run(cfg)
        _assert_one_per_step(summary, counter)


def test_gradient_accumulation_still_syncs_once_per_step(workdir):
    cfg = job_config(workdir, "syncs_acc", distill="adadistill", gradient_acc=2, max_steps=6,
                     num_epoch=100, frequent=FREQUENT, save_every=1000, batch_size=4, **FLOAT16)
    summary, counter = _counted_run(cfg)
    _assert_one_per_step(summary, counter, steps=6)


@pytest.mark.parametrize("name", ["none", "gkd"])
def test_partial_fc_sampling_syncs_once_per_step(workdir, name):
    """sample_rate < 1 whose kept-class count does not depend on the labels (int(0.5 x 16) = 8
    classes >= a batch of 8): positives marked without counting them, GKD's kept total from the
    host (plugins.margin.static_sample_count)."""
    cfg = job_config(workdir, f"syncs_pfc_{name}", distill=name, sample_rate=0.5, max_steps=6,
                     num_epoch=100, frequent=FREQUENT, save_every=1000)
    summary, counter = _counted_run(cfg)
    _assert_one_per_step(summary, counter, steps=6)


def test_an_extra_read_in_the_step_is_counted(workdir, monkeypatch):
    """The control: a head loss read with .item() (what the trainer did before) makes it 2."""
    real = trainer.head_loss

    def reading(*args, **kwargs):
        loss = real(*args, **kwargs)
        loss.item()
        return loss
    monkeypatch.setattr(trainer, "head_loss", reading)
    cfg = job_config(workdir, "syncs_control", distill="none", max_steps=3, num_epoch=100,
                     frequent=FREQUENT, save_every=1000)
    summary, counter = _counted_run(cfg)
    assert summary["steps"] == 3 and counter.counts["step"] == 2 * 3, counter.report()
    assert "(reading) item" in counter.report()


def _two_rank_counts(rank, world, cfg):
    import data.dataset as data_module
    import engine.trainer as trainer_module
    with counting() as counter:
        watch_training(counter, trainer_module, data_module)
        summary = trainer_module.train(cfg)
    return summary["steps"], summary["skipped_steps"], dict(counter.counts), counter.report()


@pytest.mark.parametrize("name", ["adadistill", "gkd"])
def test_two_ranks_sync_once_per_step(workdir, name):
    """World 2: the flags' all-reduce and read, the host-label gather (AdaDistill's rounds; EKD's
    pair count uses the same gather) and GKD's top-k bisection over class shards add no sync."""
    from tests.distributed_harness import run_distributed
    cfg = job_config(workdir, f"syncs_w2_{name}", distill=name, max_steps=8, num_epoch=100,
                     frequent=4, save_every=1000, batch_size=4, gkd_k=6, **FLOAT16)
    for steps, skipped, counts, report in run_distributed(_two_rank_counts, 2, args=(cfg,)):
        assert steps == 8 and skipped == 0
        assert counts.get("step", 0) <= steps, report
        assert counts.get("line", 0) <= 2, report


def test_the_counter_sees_each_kind_of_sync_and_not_host_tensors():
    """A test that cannot fail is a defect: every counted entry point, once."""
    x = torch.arange(6.0)

    def syncs():
        x.sum().item()
        bool(x.any())
        float(x[0])
        int(x[1])
        x.tolist()
        x.cpu()
        torch.nonzero(x)
        x.nonzero()
        x[x > 2]
        torch.where(x > 2)
        torch.tensor([1.0], device=x.device)
        x.repeat_interleave(torch.tensor([1, 1, 1, 1, 1, 2]))
        x.unique()
        x.masked_select(x > 1)

    class Owner:
        work = staticmethod(syncs)

    with counting() as counter:
        counter.watch(Owner, "work", "work")
        Owner.work()
        assert counter.counts["work"] == 14, counter.report()
        x.tolist()                          # outside any watched call: not counted
        assert counter.counts["work"] == 14
        counter.host(x)                     # x stays on the host: calls on it (and its views)
        Owner.work()                        # are exempt, new tensors made from it are not
        assert counter.counts["work"] == 14 + 4, counter.report()
    assert "test_host_syncs.py" in counter.report()


def test_progress_meter_keeps_early_read_losses_and_no_lines_off_the_logging_rank():
    """Steps read early (``max_pending``) still reach the next flush's losses, in order; a rank
    that never prints a line (``keep_lines=False``) keeps nothing between flushes."""
    for keep in (True, False):
        meter = trainer.ProgressMeter(100, 8, 0, max_pending=2, keep_lines=keep)
        for i in range(5):
            meter.add(torch.tensor(float(i)), {"mean_alpha": torch.tensor(0.5)})
        losses, scale = meter.flush(torch.tensor(4.0))
        assert losses == [0.0, 1.0, 2.0, 3.0, 4.0] and scale == 4.0
        assert meter.flush()[0] == []
        assert len(meter.read) == (5 if keep else 0)
        if keep:
            _, _, means = meter.line(5, 0, 0.1, None)
            assert means == {"loss": 2.0, "mean_alpha": 0.5} and meter.read == []


def test_journal_of_a_head_owning_no_rows_keeps_nothing():
    """A rank that owns no classes (num_classes < world size) has a [0, D] centre table: its
    journal records nothing (row 0 does not exist) and the rollback is a no-op."""
    from plugins.heads.base import DistillHead

    class Owning(DistillHead):
        journaled_keys = ("centers",)

        def __init__(self, rows):
            super().__init__()
            self.register_buffer("centers", torch.ones(rows, 4))

    for rows in (0, 3):
        head = Owning(rows)
        head.begin_journal()
        head.journal_rows("centers", torch.zeros(2, dtype=torch.long))
        assert len(head.journaled_rows()) == (1 if rows else 0)
        if rows:
            head.centers[0] = 5.0
        head.rollback_journal()
        assert torch.equal(head.centers, torch.ones(rows, 4))
