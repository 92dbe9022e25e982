import os
import textwrap

import pytest

from engine.config import get_config
from plugins.config_defaults import DISTILL_DEFAULTS, apply_distill_defaults
from plugins.heads import head_names

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JOBS = sorted(f[:-3] for f in os.listdir(os.path.join(REPO, "configs"))
              if f.endswith(".py") and f not in ("base.py", "__init__.py"))


@pytest.mark.parametrize("job", JOBS)
def test_every_job_config_loads_and_validates(job):
    cfg = get_config(f"configs/{job}", root=REPO)
    expected = job.replace("demo_", "demo/") if job.startswith("demo_") else job
    assert cfg.output == os.path.join("work_dirs", expected)
    assert cfg.distill in head_names()
    for key in DISTILL_DEFAULTS:
        assert key in cfg


def test_paper_recipes():
    ada = get_config("configs/ms1mv2_mbf_adadistill", root=REPO)
    assert (ada.network, ada.teacher_network, ada.alpha) == ("mobilefacenet", "r50", "weighted")
    assert tuple(ada.margin_list) == (1.0, 0.45, 0.0) and ada.lr == 0.1 and ada.num_epoch == 26
    assert tuple(ada.lr_steps) == (7, 13, 19, 24) and ada.batch_size == 128   # official m - 1 <= epoch
    gkd = get_config("configs/ms1mv2_mbf_gkd.py", root=REPO)
    assert (gkd.gkd_k, gkd.gkd_beta, gkd.gkd_lamda, gkd.gkd_temperature) == (10000, 8.0, 0.0, 4.0)
    assert tuple(gkd.margin_list) == (1.0, 0.0, 0.4) and gkd.lr_schedule == "cosine"


def _write_job(tmp_path, body):
    configs = tmp_path / "configs"
    configs.mkdir(exist_ok=True)
    (configs / "base.py").write_text(open(os.path.join(REPO, "configs", "base.py")).read())
    (configs / "job.py").write_text(textwrap.dedent(body))
    return str(tmp_path)


def test_typo_is_an_error_with_a_suggestion(tmp_path):
    root = _write_job(tmp_path, """
        from easydict import EasyDict as edict
        config = edict()
        config.sampel_rate = 0.3
    """)
    with pytest.raises(ValueError, match=r"job.py: unknown config key 'sampel_rate' -- did you mean 'sample_rate'"):
        get_config("configs/job", root=root)


def test_wrong_types_and_choices_are_rejected(tmp_path):
    root = _write_job(tmp_path, """
        from easydict import EasyDict as edict
        config = edict()
        config.batch_size = "128"
    """)
    with pytest.raises(ValueError, match=r"'batch_size' must be int, got '128'"):
        get_config("configs/job", root=root)
    root = _write_job(tmp_path, """
        from easydict import EasyDict as edict
        config = edict()
        config.distill = "adadistil"
    """)
    with pytest.raises(ValueError, match=r"'distill' must be one of .*'adadistill'.*got 'adadistil'"):
        get_config("configs/job", root=root)
    root = _write_job(tmp_path, """
        from easydict import EasyDict as edict
        config = edict()
        config.num_classes = True
    """)
    with pytest.raises(ValueError, match=r"'num_classes' must be int"):
        get_config("configs/job", root=root)


def test_argument_rules_and_output(tmp_path):
    with pytest.raises(ValueError, match="must be 'configs/<name>'"):
        get_config("ms1mv2_mbf_adadistill", root=REPO)
    with pytest.raises(FileNotFoundError, match="nope.py"):
        get_config("configs/nope", root=REPO)
    root = _write_job(tmp_path, """
        from easydict import EasyDict as edict
        config = edict()
        config.output = "elsewhere"
    """)
    assert get_config("configs/job.py", root=root).output == "elsewhere"


def test_distill_defaults_fill_a_fork_config_without_them():
    fork_cfg = {"network": "r50", "distill": "gkd"}
    apply_distill_defaults(fork_cfg)
    assert fork_cfg["distill"] == "gkd" and fork_cfg["gkd_k"] == 10000
    assert fork_cfg["teacher_cache"] is None
