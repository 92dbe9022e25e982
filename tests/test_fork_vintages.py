"""Forks of every age in upstream arcface_torch's history train a shipped AdaDistill job by a
documented way: install, patch (or the refusal that names the vintage and the way that works),
and two training steps.

One stand-in per shape of upstream's history (tests/upstream_standin.py ``VINTAGES``, written by
us): ``train.py`` with ``config.py`` at the root (2021-03 .. 2021-06) and with ``configs/``
(2021-07 .. 2021-09), both PartialFC v1 ``forward_backward`` loops: not patchable, they train
with train_distill.py after the install supplies what their base lacks; ``train.py`` with
``PartialFC(emb, labels, opt)`` (2022-01 .. 2022-05) and each ``train_v2.py`` (2022-07, the
``using_wandb`` NameError of 2023-01, 2023-02, 2023-04 ..): patched, and run.  All routes run at
once, each in its own process forked from the preloaded pool.
"""
from __future__ import annotations

import io
import os
import runpy
import shutil
import sys

import pytest
import torch

from patches import install_into_fork as installer
from patches import patch_train_v2 as patcher
from tests.fork_runs import run_fork_script, run_in_children, write_shrunk_job
from tests.upstream_standin import VINTAGES, write_vintage

JOB = "ms1mv2_mbf_adadistill"
SHRUNK = dict(num_classes=4, num_image=8, num_epoch=1, batch_size=4, num_workers=0,
              network="tiny_s", embedding_size=64, teacher_network="tiny_t",
              teacher_embedding_size=64, teacher_cache=None, frequent=1, val_targets=[])


def _train_distill(fork: str, config: str) -> str:
    """``python train_distill.py <config>`` in ``fork``; returns its training.log."""
    from engine.config import get_config
    os.chdir(fork)
    sys.path.insert(0, fork)
    sys.argv = ["train_distill.py", config]
    runpy.run_path("train_distill.py", run_name="__main__")
    with open(os.path.join(get_config(config).output, "training.log")) as handle:
        return handle.read()


def _patched_and_original(fork: str, script: str, config: str, original: bool) -> dict:
    """The patched script's run, and with ``original`` the unpatched one's (upstream's bug)."""
    out = {}
    for name in (script, "original_" + script)[:1 + original]:
        try:
            out[name] = run_fork_script(fork, name, config)
        except Exception as error:     # upstream's own NameError
            out[name] = f"{type(error).__name__}: {error}"
    return out


@pytest.fixture(scope="module")
def vintage_runs(tmp_path_factory):
    """{vintage: {"fork", "patch" (the patcher's result or refusal), "install" (report),
    "runs" (what each route's training did)}}."""
    from tools.synthetic import write_train_set
    from plugins.backbones import get_model
    root = str(tmp_path_factory.mktemp("vintages"))
    write_train_set(os.path.join(root, "data"), num_ids=4, images_per_id=2, seed=8)
    torch.manual_seed(1)
    torch.save(get_model("tiny_t", num_features=64).state_dict(), os.path.join(root, "t.pt"))
    found, calls, owners = {}, [], []
    for name, vintage in VINTAGES.items():
        fork = write_vintage(os.path.join(root, name), name)
        script = os.path.join(fork, vintage.script)
        shutil.copy(script, os.path.join(fork, "original_" + vintage.script))
        try:
            patcher.patch_file(script)
            patch = "patched"
        except ValueError as error:
            patch = str(error)
        way1 = not vintage.patchable or not vintage.runs_unpatched
        report = io.StringIO()
        code = installer.install(fork, out=report, plugins_only=not way1)
        assert code == 0, report.getvalue()
        os.makedirs(os.path.join(fork, "configs"), exist_ok=True)
        config = write_shrunk_job(fork, JOB, "shrunk", rec=os.path.join(root, "data"),
                                  teacher_checkpoint=os.path.join(root, "t.pt"),
                                  output=os.path.join(root, name, "out"), **SHRUNK)
        found[name] = {"fork": fork, "patch": patch, "install": report.getvalue(), "runs": {}}
        if vintage.patchable:
            calls.append((_patched_and_original, fork, vintage.script, config,
                          not vintage.runs_unpatched))
            owners.append((name, "patched"))
        if way1:
            calls.append((_train_distill, fork, config))
            owners.append((name, "train_distill"))
    for (name, route), result in zip(owners, run_in_children(calls)):
        found[name]["runs"][route] = result
    return found


@pytest.mark.parametrize("name", VINTAGES)
def test_each_vintage_trains_a_shipped_job_by_its_documented_way(vintage_runs, name):
    vintage, found = VINTAGES[name], vintage_runs[name]
    detected = installer.detect_vintage(found["fork"])
    expected = "2022-07 .. today" if vintage.script == "train_v2.py" else vintage.period
    assert (detected.period, detected.patchable) == (expected, vintage.patchable)
    assert f"fork: {detected.shape} (arcface_torch {detected.period}); trains with " \
        f"train_distill.py (way 1" in found["install"]
    if vintage.patchable:
        assert found["patch"] == "patched"
        assert "or its own " + vintage.script + " patched (way 2" in found["install"]
        runs = found["runs"]["patched"]
        assert isinstance(runs, dict) and "error" not in runs, runs
        patched = runs[vintage.script]
        if vintage.runs_unpatched:      # two steps of the distillation head, at the recipe's lr
            assert isinstance(patched, dict), patched
            assert len(patched["losses"]) == 2 and all(0 < v < 1e3 for v in patched["losses"])
            assert patched["lrs"] == [[0.1 * 4 / 512] * 2] * 2 and patched["clips"] == [5.0] * 2
        else:                           # upstream's own bug, patched or not: way 1 trains
            assert patched == runs["original_" + vintage.script] == \
                "NameError: name 'using_wandb' is not defined"
        with open(os.path.join(found["fork"], vintage.script)) as handle:
            bugs = patcher.upstream_bugs(handle.read())   # the patcher's CLI prints them
        assert bool(bugs) == (not vintage.runs_unpatched), bugs
        assert all("Fix it as upstream did on 2023-02-08 (`if cfg.using_wandb:`)" in bug
                   for bug in bugs)
    else:
        assert found["patch"].startswith(f"{os.path.join(found['fork'], vintage.script)}: "
                                         f"cannot patch: this is the arcface_torch train.py of "
                                         f"{vintage.period}")
        assert "Train with train_distill.py instead" in found["patch"]
        assert "is not patchable (PartialFC v1 loop" in found["install"]
    if "train_distill" in found["runs"]:
        log = found["runs"]["train_distill"]
        assert isinstance(log, str), log
        assert "finished: 2 steps" in log and "uses lr 0.00078125 = 0.1 x 4 / 512" in log


def test_the_install_supplies_what_an_old_base_lacks(vintage_runs):
    # 2021-07: the fork's configs/base.py is kept; our keys it lacks go to configs/kdface_base.py
    fork = vintage_runs["2021-07"]["fork"]
    assert "copied     configs/kdface_base.py (base keys of ours the fork's configs/base.py " \
        "lacks: margin_list, save_all_states," in vintage_runs["2021-07"]["install"]
    with open(os.path.join(fork, "configs", "base.py")) as handle:
        assert "config.loss = \"arcface\"" in handle.read()      # the fork's, untouched
    supplement = installer.base_keys(os.path.join(fork, "configs", "kdface_base.py"))
    assert {"margin_list", "optimizer", "seed", "num_workers", "gradient_acc"} <= set(supplement)
    assert not {"rec", "num_classes", "lr", "loss", "network"} & set(supplement)
    # 2021-03: no configs/ at all (config.py at the root): ours is installed as configs/base.py
    fork = vintage_runs["2021-03"]["fork"]
    assert "copied     configs/base.py" in vintage_runs["2021-03"]["install"]
    assert os.path.isfile(os.path.join(fork, "config.py"))
    # 2022-01 (patched, --plugins-only): nothing for train_distill.py's loader
    assert "kdface_base" not in vintage_runs["2022-01"]["install"]


def test_an_old_base_without_the_supplement_names_the_install(tmp_path):
    from engine.config import get_config
    fork = write_vintage(str(tmp_path), "2021-07")
    write_shrunk_job(fork, JOB, "shrunk", rec="r", teacher_checkpoint="t", output="o", **SHRUNK)
    with pytest.raises(ValueError, match=r"unknown config key 'margin_list' .* \(this fork's "
                                         r"configs/base.py predates the key; `python "
                                         r"patches/install_into_fork.py"):
        get_config("configs/shrunk", root=fork)
    (tmp_path / "arcface_torch" / "configs" / "job_without_margin.py").write_text(
        "from easydict import EasyDict as edict\nconfig = edict()\nconfig.rec = 'r'\n")
    with pytest.raises(ValueError, match=r"base.py: lacks the base key\(s\) \['margin_list', "
                                         r"'interclass_filtering_threshold', 'optimizer', "
                                         r"'verbose', 'frequent', 'gradient_acc', 'seed', "
                                         r"'num_workers'\] that train_distill.py reads"):
        get_config("configs/job_without_margin", root=fork)
