"""A checkpoint written before host/ was split by role (tests/fixtures/pre_move_checkpoint, see
its README) resumes with the current code and continues the run exactly as the old code did."""
import json
import os
import shutil

import pytest

from engine.config import get_config
from engine.trainer import train

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures",
                       "pre_move_checkpoint")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_pre_move_checkpoint_resumes_and_continues_identically(tmp_path):
    expected = json.load(open(os.path.join(FIXTURE, "expected.json")))
    shutil.copytree(os.path.join(FIXTURE, "data"), tmp_path / "data")
    output = tmp_path / "runs" / "pre_move"
    shutil.copytree(os.path.join(FIXTURE, "checkpoints"), output / "checkpoints")
    (tmp_path / "configs").mkdir()
    shutil.copy(os.path.join(REPO, "configs", "base.py"), tmp_path / "configs" / "base.py")
    values = dict(expected["values"], rec=str(tmp_path / "data"), output=str(output),
                  resume=True, max_steps=4)
    values["margin_list"], values["lr_steps"] = tuple(values["margin_list"]), ()
    lines = ["from easydict import EasyDict as edict", "config = edict()"]
    lines += [f"config.{key} = {value!r}" for key, value in values.items()]
    (tmp_path / "configs" / "pre_move.py").write_text("\n".join(lines) + "\n")
    summary = train(get_config("configs/pre_move", root=str(tmp_path)))
    assert summary["steps"] == 4 and summary["skipped_steps"] == 0
    assert summary["losses"] == pytest.approx(expected["losses_steps_1_to_4"][2:], rel=1e-5)
    log = (output / "training.log").read_text()
    assert "resumed from" in log and "(epoch 0, step 2," in log
    assert os.path.isdir(output / "checkpoints" / "step_000000004")
