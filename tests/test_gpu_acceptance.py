"""bench/gpu_acceptance.py keeps working: its CPU quick mode end to end, and its failure rules."""
import importlib.util
import os
import sys

import pytest

from tests.training_helpers import REPO

SCRIPT = os.path.join(REPO, "bench", "gpu_acceptance.py")
STAGES = ("data", "teacher", "adadistill", "adadistill-resume", "gkd", "gkd-resume",
          "cache-build", "cached", "ijbc", "onnx")


def _run_script(argv, cwd, stdout, stderr):
    """``python bench/gpu_acceptance.py <argv>`` in ``cwd``, in a started process: its output
    (file descriptors 1 and 2) to the files ``stdout`` / ``stderr``; exits with main's code."""
    for fd, path in ((1, stdout), (2, stderr)):
        handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(handle, fd)
        os.close(handle)
    os.chdir(cwd)
    sys.argv = [SCRIPT, *argv]
    spec = importlib.util.spec_from_file_location("__main__", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)       # as `python SCRIPT`: its `if __name__` line runs main


def test_cpu_quick_mode_passes_every_stage(tmp_path):
    """The script as run from a shell, in a process forked from the test harness's forkserver
    (torch already imported there) instead of a new interpreter.  Its runs span several epochs
    (16 images, batches of 8, 6 steps), so the trainer's epoch-end checkpoints and its keeping
    only the two newest are part of what passes."""
    from tests.distributed_harness import start_process
    work = tmp_path / "acceptance"
    stdout, stderr = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    proc = start_process(_run_script, (["--device", "cpu", "--quick", "--workdir", str(work)],
                                       str(tmp_path), str(stdout), str(stderr)))
    proc.join(timeout=600)
    out = stdout.read_text()
    assert proc.exitcode == 0, out[-4000:] + stderr.read_text()[-4000:]
    lines = [line for line in out.splitlines() if line.startswith("[PASS]")]
    assert [line.split()[1] for line in lines] == list(STAGES)
    assert "10 passed, 0 failed" in out
    assert "resumed from the checkpoint" in out and "cached/online step time:" in out
    assert "peak host RSS" in out
    # the GPU recipe's lines ran: float16 autocast + GradScaler("cpu"), channels_last, and the
    # resumed runs continued from the checkpoint in the middle
    for run in ("adadistill", "gkd"):
        log = (work / "runs" / run / "training.log").read_text()
        assert "student trunk float16 + GradScaler('cpu'), channels_last True" in log
        assert "Fp16 Grad Scale" in log and "step_000000003 (epoch 1, step 3" in log
        assert "Epoch: 2   Global Step: 6" in log              # the third epoch reached
    checkpoints = sorted(os.listdir(work / "runs" / "cached" / "checkpoints"))
    assert checkpoints == ["step_000000004", "step_000000006"]    # step 3 (the half) is gone
    assert (work / "teacher_cache" / "meta.json").is_file()
    assert (work / "results" / "acceptance" / "ijbc.json").is_file()
    assert (work / "student.onnx").is_file()


def _args(tmp_path):
    spec = importlib.util.spec_from_file_location("gpu_acceptance", SCRIPT)
    gpu_acceptance = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_acceptance)
    args = gpu_acceptance.build_parser().parse_args(
        ["--device", "cpu", "--quick", "--launch", "inprocess", "--workdir",
         str(tmp_path / "w")])
    return gpu_acceptance, args


def test_a_failed_stage_fails_its_dependants_and_the_exit_code(tmp_path, monkeypatch, capsys):
    module, args = _args(tmp_path)

    def broken(self):
        raise OSError("disk full")
    monkeypatch.setattr(module.Acceptance, "make_data", broken)
    assert module.Acceptance(args).run() == 1
    out = capsys.readouterr().out
    assert "[FAIL] data" in out and "OSError: disk full" in out
    assert "[FAIL] adadistill" in out and "skipped: needs data" in out
    assert "0 passed, 10 failed" in out


def test_refuses_a_folder_it_did_not_make_and_a_missing_gpu(tmp_path):
    module, args = _args(tmp_path)
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "precious.txt").write_text("x")
    with pytest.raises(SystemExit, match="not made by this script"):
        module.Acceptance(args).run()
    assert (tmp_path / "w" / "precious.txt").is_file()
    with pytest.raises(SystemExit, match="--device cpu --quick"):
        module.main(["--workdir", str(tmp_path / "x")])
    with pytest.raises(SystemExit, match="--nproc 1"):
        module.main(["--device", "cpu", "--launch", "inprocess", "--nproc", "2"])
