"""`make setup` on a fresh copy of the repository with the Python a machine happens to have (edgerlhf/bootstrap.py).

Each test runs make with a PATH on which `python3.11` is absent: only a `python3` of the test's choosing (and
the system tools) is there. Extra: each builds a venv (seconds with uv's cache warm, minutes cold)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = [pytest.mark.extra, pytest.mark.slow]

SYSTEM_DIRS = ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin")
HIDDEN = re.compile(r"^(python|pip|uv|pydoc|idle|2to3)")


def fresh_copy(dest: Path) -> Path:
    """The files a clone of the working tree holds (tracked, and new ones git does not ignore): no venv, no cache."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                           capture_output=True).stdout.split(b"\0")
    for name in filter(None, files):
        src, dst = ROOT / os.fsdecode(name), dest / os.fsdecode(name)
        if src.is_file():
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(src.read_bytes())
    return dest


def path_with_python3(bin_dir: Path, python3: str) -> str:
    """A PATH of the system tools without any Python, pip or uv, plus `python3` -> the given interpreter."""
    bin_dir.mkdir()
    for folder in SYSTEM_DIRS:
        if not Path(folder).is_dir():
            continue
        for entry in Path(folder).iterdir():
            link = bin_dir / entry.name
            if not HIDDEN.match(entry.name) and not link.exists():
                link.symlink_to(entry)
    (bin_dir / "python3").symlink_to(python3)
    return str(bin_dir)


def other_python(exclude: str) -> str | None:
    """An interpreter of another minor version than `exclude` on this machine (pyenv's or the system's)."""
    candidates = sorted(Path.home().glob(".pyenv/versions/3.*/bin/python3")) + [Path(p) for p in SYSTEM_DIRS]
    for path in candidates:
        path = path / "python3" if path.is_dir() else path
        if path.is_file():
            version = subprocess.run([str(path), "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                                     capture_output=True, text=True).stdout.strip()
            if version and version != exclude and tuple(map(int, version.split("."))) >= (3, 8):
                return str(path)
    return None


def make(repo: Path, path: str, *targets: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHON", "UV_"))}
    env.update(PATH=path, HOME=os.environ.get("HOME", "/root"))
    return subprocess.run(["make", *targets], cwd=repo, env=env, capture_output=True, text=True, timeout=1800)


def test_python3_of_the_lock_version_is_used_when_python311_is_absent(tmp_path):
    """python3 is 3.11 but no `python3.11` is on PATH: setup uses it (the documented rule), prints its steps and
    the total time, and `make test` then imports the package from that venv."""
    real = os.path.realpath(sys.executable)  # the venv's python resolves to a real 3.11 interpreter
    repo = fresh_copy(tmp_path / "repo")
    path = path_with_python3(tmp_path / "bin", real)
    out = make(repo, path, "setup")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "python3 on PATH is 3.11" in out.stdout
    assert [int(n) for n in re.findall(r"\[setup (\d)/6\]", out.stdout)] == [1, 2, 3, 4, 5, 6]
    assert re.search(r"\[setup\] done in [\d.]+ s: \.venv with Python 3\.11\.", out.stdout)
    assert (repo / ".venv/.installed").exists()
    again = make(repo, path, "setup")  # up to date: nothing to do
    assert again.returncode == 0 and "[setup" not in again.stdout
    (repo / "requirements.lock").touch()  # e.g. a pull changed the lock: the venv is brought to it, not rebuilt
    again = make(repo, path, "setup")
    assert again.returncode == 0 and "reusing it" in again.stdout, again.stdout[-2000:] + again.stderr[-2000:]
    tested = make(repo, path, "test", "TESTS=tests/test_config.py")
    assert tested.returncode == 0, tested.stdout[-3000:]
    assert re.search(r"\d+ passed", tested.stdout)


def test_no_python311_anywhere_provisions_one_or_fails_in_one_line(tmp_path):
    """python3 is another version and no 3.11 is on PATH: uv (from PyPI) downloads a managed CPython 3.11 where the
    network allows; where it cannot (as in CI here), one line says what to install, and no venv is left."""
    other = other_python("3.11")
    if other is None:
        pytest.skip("no Python other than 3.11 on this machine")
    repo = fresh_copy(tmp_path / "repo")
    out = make(repo, path_with_python3(tmp_path / "bin", other), "setup")
    if out.returncode == 0:
        assert "downloaded by uv" in out.stdout or "found by uv" in out.stdout
        assert (repo / ".venv/.installed").exists()
        return
    lines = [line for line in out.stderr.splitlines() if line.startswith("make setup:")]
    assert len(lines) == 1, out.stderr
    assert "no Python 3.11" in lines[0] and "install Python 3.11" in lines[0] and "PYTHON=" in lines[0]
    assert not (repo / ".venv").exists()
