"""requirements-lock.txt: the environment of `make demo`, `make test` and CI (tools/lock.py).

The drift test compares the running interpreter's packages with the lock.  It is enforced where
the lock is in force -- `make test` and CI set KDFACE_REQUIRE_LOCK=1 -- and skipped (with the
reason) elsewhere: a GPU user's environment comes from the open requirements.txt and differs
from the lock by design (another torch build at least), which must not fail their `pytest`.
"""
import os
import re
import shutil
import stat
import subprocess

import pytest

from tools import lock

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOCK_PATH = os.path.join(REPO, lock.LOCK_FILE)


@pytest.mark.skipif(os.environ.get("KDFACE_REQUIRE_LOCK") != "1",
                    reason="the lock is enforced by `make test` / CI (KDFACE_REQUIRE_LOCK=1); "
                           "this environment may come from requirements.txt (GPU users)")
def test_installed_packages_match_the_lock():
    drift = lock.drift_report(LOCK_PATH)
    assert not drift, (f"{len(drift)} difference(s) between the installed packages and "
                       f"{lock.LOCK_FILE}:\n  " + "\n  ".join(drift) + f"\nfix: {lock.FIX}")


def test_differences_lists_each_kind_with_normalized_names():
    locked = {"numpy": "2.4.6", "jinja2": "3.1.6", "typing-extensions": "4.16.0",
              "torch": "2.13.0+cpu", "gone": "1.0"}
    installed = {lock.normalize("Jinja2"): "3.1.6", lock.normalize("typing_extensions"): "4.16.0",
                 "numpy": "2.3.5", "torch": "2.13.0", "extra": "0.1"}
    meta = {"python": "3.11", "platform": "linux x86_64"}
    assert lock.differences(locked, installed, meta, ("3.12", "darwin arm64")) == [
        "Python 3.12: the lock was resolved for Python 3.11",
        "platform darwin arm64: the lock was resolved on linux x86_64",
        "extra==0.1: installed, not in the lock",
        "gone==1.0: locked, not installed",
        "numpy: installed 2.3.5, locked 2.4.6",
        "torch: installed 2.13.0, locked 2.13.0+cpu"]
    same = dict(locked)
    assert lock.differences(locked, same, meta, ("3.11", "linux x86_64")) == []


@pytest.mark.parametrize("line, message", [
    ("numpy>=1.24", "line 3: 'numpy>=1.24' is not 'name==version'"),
    ("torch @ file:///opt/wheels/torch.whl", "line 3: 'torch @ file:///opt/wheels/torch.whl'"),
    ("-e git+https://example.org/x.git#egg=x", "line 3: '-e git+"),
    ("Numpy==2.4.6", "line 3: Numpy is locked twice"),
])
def test_parse_lock_names_the_bad_line(line, message):
    text = f"# python: 3.11\nnumpy==2.4.6\n{line}\n# platform: linux x86_64\n"
    with pytest.raises(ValueError, match=re.escape(message)):
        lock.parse_lock(text, "lock.txt")


def test_parse_lock_needs_its_header():
    with pytest.raises(ValueError, match=r"lock.txt: no '# platform: \.\.\.' header"):
        lock.parse_lock("# python: 3.11\nnumpy==2.4.6\n", "lock.txt")


def test_checked_in_lock_is_exact_and_covers_every_requirement():
    """Every package requirements.txt / requirements-test.txt name is locked, at a version that
    satisfies it, torch at constraints.txt's version (the CPU build), pip and setuptools too --
    so editing a requirement without `make lock` fails here."""
    requirements = pytest.importorskip("packaging.requirements")
    locked, meta = lock.read_lock(LOCK_PATH)
    assert meta == {"python": "3.11", "platform": "linux x86_64"}
    wanted = []
    for name in ("requirements.txt", "requirements-test.txt", "constraints.txt"):
        with open(os.path.join(REPO, name)) as handle:
            wanted += [line.split("#")[0].strip() for line in handle]
    for text in filter(None, wanted):
        req = requirements.Requirement(text)
        version = locked.get(lock.normalize(req.name))
        assert version is not None, f"{req.name} is required but not in {lock.LOCK_FILE}"
        assert req.specifier.contains(version, prereleases=True), \
            f"{lock.LOCK_FILE} has {req.name}=={version}, outside {text!r}: run make lock"
    assert locked["torch"].endswith("+cpu")
    assert {"pip", "setuptools"} <= set(locked)


def _fake_python(folder, freeze_lines):
    """An executable answering ``-m pip freeze --all`` and the platform probe of freeze_text."""
    path = os.path.join(folder, "python")
    with open(path, "w") as handle:
        handle.write("#!/bin/sh\nif [ \"$2\" = pip ]; then\ncat <<'EOF'\n"
                     + "\n".join(freeze_lines) + "\nEOF\nelse\nprintf '3.11\\nlinux x86_64\\n'"
                     "\nfi\n")
    os.chmod(path, os.stat(path).st_mode | stat.S_IEXEC)
    return path


def test_write_sorts_the_freeze_under_the_header_atomically(tmp_path, capsys):
    python = _fake_python(str(tmp_path), ["torch==2.13.0+cpu", "Jinja2==3.1.6", "absl-py==2.5.1",
                                          "pip==26.3"])
    out = tmp_path / "lock.txt"
    out.write_text("old\n")
    assert lock.main(["write", "--python", python, "--output", str(out)]) == 0
    text = out.read_text()
    assert text.startswith(lock.HEADER)
    assert text[len(lock.HEADER):] == ("# python: 3.11\n# platform: linux x86_64\n"
                                       "absl-py==2.5.1\nJinja2==3.1.6\npip==26.3\n"
                                       "torch==2.13.0+cpu\n")
    assert "4 packages" in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path)) == ["lock.txt", "python"]     # no temporary left


def test_write_refuses_an_unlockable_freeze_and_keeps_the_old_lock(tmp_path):
    python = _fake_python(str(tmp_path), ["numpy==2.4.6", "-e git+https://example.org/k.git#egg=k"])
    out = tmp_path / "lock.txt"
    out.write_text("old\n")
    with pytest.raises(ValueError, match=r"pip freeze of .*python line \d+: '-e git\+"):
        lock.main(["write", "--python", python, "--output", str(out)])
    assert out.read_text() == "old\n"


def test_check_exits_1_listing_the_differences_and_the_fix(tmp_path, capsys):
    locked = dict(lock.installed_packages())
    name = next(iter(sorted(locked)))
    locked[name] = locked[name] + ".post999"
    python, plat = lock.this_platform()
    path = tmp_path / "lock.txt"
    path.write_text(f"# python: {python}\n# platform: {plat}\n"
                    + "".join(f"{n}=={v}\n" for n, v in sorted(locked.items()))
                    + "not-installed-pkg==1.0\n")
    assert lock.main(["check", "--lock", str(path)]) == 1
    out = capsys.readouterr().out
    assert f"[lock] 2 difference(s) from {path}:" in out
    assert f"{name}: installed {lock.installed_packages()[name]}, locked {locked[name]}" in out
    assert "not-installed-pkg==1.0: locked, not installed" in out
    assert f"fix: {lock.FIX}" in out
    path.write_text(f"# python: {python}\n# platform: {plat}\n"
                    + "".join(f"{n}=={v}\n" for n, v in sorted(lock.installed_packages().items())))
    assert lock.main(["check", "--lock", str(path)]) == 0


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_installs_the_lock_and_test_enforces_it(tmp_path):
    """The plumbing: `make venv` installs requirements-lock.txt (pip first) and checks it;
    `make test` -- what .ci/run runs -- sets KDFACE_REQUIRE_LOCK=1 (a dry run, nothing runs)."""
    venv = str(tmp_path / "venv")
    dry = subprocess.run(["make", "-n", "-B", "test", f"VENV={venv}"], cwd=REPO, check=True,
                         capture_output=True, text=True).stdout
    assert f"{venv}/bin/python -m pip install --quiet $(grep -E '^pip==' requirements-lock.txt)" \
        in dry
    assert f"{venv}/bin/python -m pip install --quiet -r requirements-lock.txt" in dry
    assert f"{venv}/bin/python -m tools.lock check --lock requirements-lock.txt" in dry
    assert f"KDFACE_REQUIRE_LOCK=1 {venv}/bin/python -m pytest -q tests" in dry
    assert "requirements.txt" not in dry.replace("requirements-lock.txt", "")
    with open(os.path.join(REPO, ".ci", "run")) as handle:
        assert handle.read().rstrip().splitlines()[-1] == "make test"
