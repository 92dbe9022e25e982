"""patches/install_into_fork.py: copying the toolkit into a fork-shaped arcface_torch folder.

The fork built here has what a real fork has and we must not touch: its own ``configs/base.py``
(without our distillation keys), ``configs/__init__.py``, ``utils/utils_config.py`` whose
``get_config`` imports ``configs.base`` then ``configs.<name>`` and merges them, ``backbones/``
whose ``get_model`` knows a custom network ``forknet`` and raises ValueError for other names, and
``eval/verification.py``.  After installing, our job configs load with the fork's loader and with
ours, and ``train_distill.py`` trains there with the fork's network as student.
"""
from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from patches import install_into_fork as installer

REPO = installer.REPO_ROOT
PYTHON = sys.executable

FORK_BASE = '''\
"""The fork's defaults (no distillation keys)."""
from easydict import EasyDict as edict

config = edict()
config.margin_list = (1.0, 0.5, 0.0)
config.network = "r50"
config.resume = False
config.save_all_states = False
config.output = None
config.embedding_size = 512
config.sample_rate = 1.0
config.interclass_filtering_threshold = 0
config.fp16 = False
config.batch_size = 128
config.optimizer = "sgd"
config.lr = 0.1
config.momentum = 0.9
config.weight_decay = 5e-4
config.verbose = 2000
config.frequent = 10
config.dali = False
config.gradient_acc = 1
config.seed = 2048
config.num_workers = 2
config.using_wandb = False
config.wandb_key = "none"
config.fork_specific_option = 7
'''

FORK_GET_CONFIG = '''\
"""The fork's config loader: base first, then the job module, merged; no validation."""
import importlib
import os.path


def get_config(config_file):
    if not config_file.startswith("configs/"):
        raise ValueError("config path must start with configs/")
    job = os.path.splitext(os.path.basename(config_file))[0]
    cfg = importlib.import_module("configs.base").config
    cfg.update(importlib.import_module("configs." + job).config)
    if cfg.output is None:
        cfg.output = os.path.join("work_dirs", job)
    return cfg
'''

FORK_BACKBONES = '''\
"""The fork's networks: one custom network of its own."""
import torch
from torch import nn


class ForkNet(nn.Module):
    """A small custom network: [B, 3, 112, 112] -> [B, num_features]."""

    def __init__(self, num_features=512):
        super().__init__()
        self.fork_body = nn.Sequential(
            nn.Conv2d(3, 8, 3, 4, 1, bias=False), nn.BatchNorm2d(8), nn.PReLU(8),
            nn.Conv2d(8, 16, 3, 4, 1, bias=False), nn.BatchNorm2d(16), nn.PReLU(16))
        self.fork_fc = nn.Linear(16 * 7 * 7, num_features)
        self.fork_features = nn.BatchNorm1d(num_features)

    def forward(self, x):
        return self.fork_features(self.fork_fc(torch.flatten(self.fork_body(x), 1)))


def get_model(name, **kwargs):
    if name == "forknet":
        return ForkNet(num_features=kwargs.get("num_features", 512))
__FALLBACK__
'''
_RAISE = '''\
    raise ValueError("fork backbones: unknown network " + repr(name))
'''
_DELEGATE = '''\
    from plugins.backbones import get_model as plugin_get_model  # the fork adopted the plugin's
    return plugin_get_model(name, **kwargs)
'''

FORK_VERIFICATION = '"""The fork\'s own verification code (must survive the install)."""\n'
FORK_INIT = '"""The fork\'s own configs package."""\n'


def write_fork(root: str, delegate_unknown_networks: bool = False) -> str:
    """A fork-shaped ``arcface_torch`` folder under ``root``; returns its path.

    ``delegate_unknown_networks``: the fork's ``get_model`` hands names it does not know to the
    plugin's registry instead of raising ValueError (a fork that adopted the plugin's networks).
    """
    fork = os.path.join(root, "arcface_torch")
    files = {
        "configs/__init__.py": FORK_INIT,
        "configs/base.py": FORK_BASE,
        "utils/utils_config.py": FORK_GET_CONFIG,
        "backbones/__init__.py": FORK_BACKBONES.replace(
            "__FALLBACK__\n", _DELEGATE if delegate_unknown_networks else _RAISE),
        "utils/__init__.py": "",
        "eval/__init__.py": "",
        "eval/verification.py": FORK_VERIFICATION,
    }
    for rel, text in files.items():
        os.makedirs(os.path.dirname(os.path.join(fork, rel)), exist_ok=True)
        with open(os.path.join(fork, rel), "w", encoding="utf-8") as handle:
            handle.write(text)
    return fork


def snapshot(folder: str) -> dict:
    """``{relative path: bytes}`` of every file below ``folder``."""
    found = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as handle:
                found[os.path.relpath(path, folder)] = handle.read()
    return found


def run_install(fork: str, *flags: str) -> tuple:
    out = io.StringIO()
    installer.check_target(fork)
    code = installer.install(fork, dry_run="--dry-run" in flags, out=out,
                             plugins_only="--plugins-only" in flags)
    return code, out.getvalue()


def summary(report: str) -> tuple:
    """``(copied, already installed, refused)`` from the report's count line."""
    match = re.search(r"^(\d+) (?:copied|would copy), (\d+) already installed, (\d+) refused$",
                      report, re.MULTILINE)
    assert match, report
    return tuple(int(g) for g in match.groups())


def test_install_copies_everything_and_keeps_the_forks_files(tmp_path):
    fork = write_fork(str(tmp_path))
    os.makedirs(os.path.join(fork, "patches"))
    with open(os.path.join(fork, "patches", "README.md"), "w") as handle:
        handle.write("the fork's own notes\n")
    before = snapshot(fork)
    code, report = run_install(fork)
    assert code == 0, report
    after = snapshot(fork)
    for rel, data in before.items():  # nothing of the fork was overwritten
        assert after[rel] == data, rel
    expected = installer._tree_files("plugins") + installer._tree_files("engine") + \
        installer._tree_files("data") + ["train_distill.py"] + installer._job_configs()
    assert "plugins/backbones/__init__.py" in expected and "engine/config.py" in expected
    assert "configs/ms1mv2_mbf_adadistill.py" in expected
    for rel in expected:
        with open(os.path.join(REPO, rel), "rb") as handle:
            assert after[rel] == handle.read(), rel
        assert f"copied     {rel}" in report
    assert "refused    patches/README.md: the fork has its own file" in report
    assert "kept       configs/__init__.py" in report
    assert "copied     configs/base.py" not in report  # the fork's own base stays
    # what train_distill.py reads and the fork's base lacks: a file of ours, listed
    assert "copied     configs/kdface_base.py (base keys of ours the fork's configs/base.py " \
        "lacks: dali_aug, suffix_run_name, wandb_entity, wandb_project, wandb_log_all, " \
        "save_artifacts, wandb_resume, notes; train_distill.py merges them" in report
    assert before["configs/base.py"] == after["configs/base.py"]
    assert "fork: no train_v2.py / train.py recognised; train with train_distill.py" in report
    if os.path.isfile(os.path.join(REPO, "eval", "verification.py")):
        assert "refused    eval/verification.py" in report
    copied, same, refused = summary(report)
    assert copied >= len(expected) and refused >= 1  # same: e.g. both eval/__init__.py empty
    # installing again changes nothing and reports every copied file as already installed
    code, again = run_install(fork)
    assert code == 0 and snapshot(fork) == after
    assert summary(again) == (0, copied + same, refused)


def test_dry_run_writes_nothing(tmp_path, capsys):
    fork = write_fork(str(tmp_path))
    with open(os.path.join(fork, "patches"), "w") as handle:  # a file where our folder goes
        handle.write("the fork's notes on its patches\n")
    before = snapshot(fork)
    code = installer.main([fork, "--dry-run"])
    report = capsys.readouterr().out
    assert code == 0 and snapshot(fork) == before
    assert "would copy engine/config.py" in " ".join(report.split())
    assert "(dry run)" in report
    assert "refused    patches/patch_train_v2.py: the fork has a file patches" in report
    copied, _, refused = summary(report)
    ours_too = os.path.isfile(os.path.join(REPO, "eval", "verification.py"))  # vs the fork's
    assert copied > 40 and refused == len(installer._tree_files("patches")) + ours_too


def test_essential_collision_refuses_and_writes_nothing(tmp_path):
    fork = write_fork(str(tmp_path))
    os.makedirs(os.path.join(fork, "engine"))
    with open(os.path.join(fork, "engine", "config.py"), "w") as handle:
        handle.write("# the fork's own engine package\n")
    with open(os.path.join(fork, "plugins.py"), "w") as handle:
        handle.write("# a fork module named like our package\n")
    before = snapshot(fork)
    code, report = run_install(fork)
    assert code == 1
    assert snapshot(fork) == before  # all or nothing: plugins/ was not copied either
    assert "REFUSED    engine/config.py: the fork has its own file" in report
    assert "REFUSED    plugins.py: the fork's module plugins.py has the name of our package" \
        in report
    assert "error: 2 essential file(s) refused (plugins.py, engine/config.py)" in report
    assert "Nothing was written" in report and "rename them in the fork" in report


def test_target_must_look_like_arcface_torch(tmp_path, capsys):
    assert installer.main([str(tmp_path)]) == 2
    assert "does not look like arcface_torch: it has neither train_v2.py / train.py nor " \
           "backbones/ with configs/ (or config.py)" in capsys.readouterr().err
    assert installer.main([str(tmp_path / "missing")]) == 2
    assert "not a folder" in capsys.readouterr().err
    assert installer.main([REPO]) == 2
    assert "is this toolkit itself" in capsys.readouterr().err
    (tmp_path / "train_v2.py").write_text("# a fork with only its script\n")
    installer.check_target(str(tmp_path))  # accepted: train_v2.py alone is enough
    os.remove(tmp_path / "train_v2.py")
    (tmp_path / "backbones").mkdir()
    (tmp_path / "config.py").write_text("# 2021-03 .. 2021-06: config.py at the root\n")
    installer.check_target(str(tmp_path))  # accepted: the old layout


# ---------------------------------------------------------------- the fork workflow, end to end

TINY_JOB = '''\
from easydict import EasyDict as edict

config = edict()
config.distill = "adadistill"
config.network = "forknet"            # the fork's own network as the student
config.teacher_network = "tiny_t"     # unknown to the fork: built by the plugin's registry
config.teacher_checkpoint = {teacher!r}
config.embedding_size = 64
config.teacher_embedding_size = 64
config.margin_list = (1.0, 0.45, 0.0)
config.rec = {rec!r}
config.num_classes = 4
config.num_image = 16
config.num_epoch = 1
config.warmup_epoch = 0              # a job key in arcface_torch (its base lacks it)
config.batch_size = 4
config.max_steps = 2
config.num_workers = 0
config.val_targets = []
config.frequent = 1
config.output = {output!r}
'''

CONFIG_CHECK = '''\
import json, sys
import torch
from easydict import EasyDict
from utils.utils_config import get_config as fork_get_config
from engine.config import get_config
from plugins.builders import build_teacher_source
from plugins.config_defaults import DISTILL_DEFAULTS, apply_distill_defaults
import backbones

result = {"jobs": {}}
for job in sys.argv[1].split(","):
    sys.modules.pop("configs.base", None)  # the fork's loader updates its base config in place
    forks = fork_get_config("configs/" + job)
    job_keys = set(vars(sys.modules["configs." + job])["config"])
    apply_distill_defaults(forks)
    ours = get_config("configs/" + job)
    result["jobs"][job] = {
        "missing_job_keys": sorted(job_keys - set(forks)),
        "fork_option": ours.get("fork_specific_option"),
        "differ": sorted(k for k in forks if forks[k] != ours[k]),
        "only_ours": sorted(set(ours) - set(forks) - {"config_name"}),
        "distill_keys": sorted(set(DISTILL_DEFAULTS) - set(forks)),
    }
# the fork's network as the teacher
torch.manual_seed(0)
net = backbones.get_model("forknet", num_features=64)
torch.save(net.state_dict(), sys.argv[2])
cfg = EasyDict(distill="gkd", teacher_cache=None, teacher_network="forknet",
               teacher_checkpoint=sys.argv[2], teacher_embedding_size=64, teacher_fp16=False)
teacher = build_teacher_source(cfg)
images = torch.randn(3, 3, 112, 112)
expected = net.eval()(images)
got = teacher.teacher_embeddings(images, None, None)
result["teacher_type"] = type(teacher.model).__name__
result["teacher_max_diff"] = float((got - expected).abs().max())
print(json.dumps(result))
'''


def fork_env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT",
                        "PYTHONPATH")}
    env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def tiny_training_setup(root: str) -> dict:
    """Synthetic RecordIO data (4 ids x 4 images) and a tiny_t teacher checkpoint [D = 64]."""
    from tools.synthetic import write_train_set
    from plugins.backbones import get_model
    write_train_set(os.path.join(root, "data"), num_ids=4, images_per_id=4, seed=0)
    torch.manual_seed(0)
    torch.save(get_model("tiny_t", num_features=64).state_dict(), os.path.join(root, "teacher.pt"))
    return {"rec": os.path.join(root, "data"), "teacher": os.path.join(root, "teacher.pt")}


@pytest.fixture(scope="module")
def installed_fork(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("fork_workflow"))
    fork = write_fork(root)
    code = subprocess.run([PYTHON, os.path.join(REPO, "patches", "install_into_fork.py"), fork],
                          capture_output=True, text=True, timeout=60)
    assert code.returncode == 0, code.stdout + code.stderr
    setup = tiny_training_setup(root)
    with open(os.path.join(fork, "configs", "fork_tiny_adadistill.py"), "w") as handle:
        handle.write(TINY_JOB.format(output=os.path.join(root, "out"), **setup))
    return fork, root


def test_job_configs_load_with_the_forks_loader_and_ours(installed_fork):
    fork, root = installed_fork
    jobs = [os.path.basename(rel)[:-3] for rel in installer._job_configs()]
    jobs.append("fork_tiny_adadistill")
    with open(os.path.join(fork, "check_configs.py"), "w") as handle:
        handle.write(CONFIG_CHECK)
    proc = subprocess.run([PYTHON, "check_configs.py", ",".join(jobs),
                           os.path.join(root, "forknet_teacher.pt")],
                          cwd=fork, env=fork_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert sorted(result["jobs"]) == sorted(jobs)
    supplement = installer.base_keys(os.path.join(fork, "configs", "kdface_base.py"))
    for job, found in result["jobs"].items():
        # ours has only what configs/kdface_base.py adds under the fork's base
        assert set(found.pop("only_ours")) <= set(supplement), job
        assert found == {"missing_job_keys": [], "fork_option": 7, "differ": [],
                         "distill_keys": []}, job
    # the fork's network as the teacher gives the fork model's own eval-mode output
    assert result["teacher_type"] == "ForkNet"
    assert result["teacher_max_diff"] <= 1e-6


def test_train_distill_runs_in_the_fork_with_its_network(installed_fork):
    fork, root = installed_fork
    proc = subprocess.run([PYTHON, "train_distill.py", "configs/fork_tiny_adadistill"],
                          cwd=fork, env=fork_env(), capture_output=True, text=True, timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log
    assert "finished: 2 steps" in log
    state = torch.load(os.path.join(root, "out", "model.pt"), weights_only=True)
    assert "fork_fc.weight" in state and tuple(state["fork_fc.weight"].shape) == (64, 784)
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_plugins_only_install_copies_the_plugin_and_configs(tmp_path):
    fork = write_fork(str(tmp_path))
    code, report = run_install(fork, "--plugins-only")
    assert code == 0, report
    copied = {line.split()[1] for line in report.splitlines() if line.strip().startswith("copied")}
    assert set(installer._tree_files("plugins")) <= copied
    assert set(installer._job_configs()) <= copied
    assert "patches/patch_train_v2.py" in copied
    assert not [rel for rel in copied if rel.split("/")[0] in ("engine", "data", "eval", "tools")
                or rel == "train_distill.py"]
    os.makedirs(os.path.join(fork, "engine"))     # the fork's own engine/ is no clash here
    with open(os.path.join(fork, "plugins", "teacher.py"), "w") as handle:
        handle.write("# a fork's own plugins/teacher.py\n")
    code, report = run_install(fork, "--plugins-only")
    assert code == 1 and "REFUSED    plugins/teacher.py" in report
    assert f"rm -r {os.path.join(fork, 'plugins')})" in report


PLUGIN_IMPORTS = '''\
import importlib, json, pkgutil, sys
import plugins
names = ["plugins"] + [m.name for m in pkgutil.walk_packages(plugins.__path__, "plugins.")]
for name in names:
    importlib.import_module(name)
ours = sorted({m.split(".")[0] for m in sys.modules} & {"engine", "data", "eval", "tools",
                                                         "easydict", "cv2", "host"})
print(json.dumps({"modules": len(names), "foreign": ours}))
'''


def test_plugins_alone_import_without_the_rest_of_the_toolkit(tmp_path):
    """Every module of plugins/ imports from a folder holding plugins/ only, and pulls in none of
    engine/, data/, eval/, tools/ (nor easydict / cv2)."""
    import json
    shutil.copytree(os.path.join(REPO, "plugins"), tmp_path / "plugins",
                    ignore=shutil.ignore_patterns("__pycache__"))
    proc = subprocess.run([PYTHON, "-c", PLUGIN_IMPORTS], cwd=str(tmp_path), env=fork_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["modules"] > 30 and result["foreign"] == []
