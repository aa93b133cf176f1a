"""`make setup`: build the project venv from requirements.lock with any Python 3 that the machine has.

Run as a plain script (`python3 edgerlhf/bootstrap.py`), before the package or its dependencies exist, so it
uses the standard library only. The steps, each on a progress line with its time:

1. uv, the installer: `uv` on PATH, else uv==UV_VERSION from PyPI in a small bootstrap venv (.cache/bootstrap)
   made with the Python running this script. Without it, installs go through pip (said in the log).
2. The interpreter, by this rule: PYTHON if given; else `python3.11` on PATH; else `python3` on PATH when it is
   3.11; else a 3.11 that uv finds (e.g. one it manages); else a CPython 3.11 that uv downloads. The lock is
   compiled for 3.11 (the version in its header).
3. The venv (`python -m venv`; an existing venv of that Python is reused), then torch==TORCH_VERSION first
   (with its deps), then exactly requirements.lock with --no-deps, then the project (editable, --no-deps), then a
   dependency check.

The machine's pip settings (index, extra indexes, find-links, constraints, certificate; from pip's config files
and PIP_* variables) are passed on to uv, so an offline mirror or a local CPU torch wheel keeps working. On any
failure one line names the cause and the fix; a venv this run created is removed, a reused one is left
without make's stamp (incomplete), so the next run installs again.
"""

from __future__ import annotations

import argparse
import ast
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

UV_VERSION = "0.13.8"  # the uv of the Docker image (Dockerfile ARG UV_VERSION); tests/test_container.py checks
ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements.lock"
BOOTSTRAP = ROOT / ".cache" / "bootstrap"
STEPS = 6


class SetupError(Exception):
    """A failed step: the message is the one line the user sees."""


def say(step: int, text: str) -> None:
    print(f"[setup {step}/{STEPS}] {text}", flush=True)


def lock_python() -> str:
    """The Python version requirements.lock was compiled with ("3.11")."""
    match = re.search(r"with Python (\d+\.\d+)", LOCK.read_text())
    if not match:
        raise SetupError(f"{LOCK.name} has no 'with Python X.Y' header line: regenerate it with `make lock`")
    return match.group(1)


def version_of(python: str) -> str | None:
    """'3.11.7' of an interpreter, or None when it does not run."""
    try:
        out = subprocess.run([python, "-c", "import platform; print(platform.python_version())"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def run(cmd: list[str], what: str, fix: str, env: dict[str, str] | None = None) -> None:
    """Run a step's command with its output shown; a failure becomes one SetupError line."""
    try:
        code = subprocess.run(cmd, env=env).returncode
    except OSError as exc:
        raise SetupError(f"{what} failed: cannot run {cmd[0]} ({exc.strerror}): {fix}") from None
    if code != 0:
        raise SetupError(f"{what} failed (`{shlex.join(cmd[:4])} ...`, output above): {fix}")


# pip's own precedence: environment over the [install] section over [global]; other sections do not apply
PIP_SECTIONS = (":env:", "install", "global")
LIST_OPTIONS = ("extra-index-url", "find-links", "constraint")


def pip_settings(python: str) -> tuple[list[str], dict[str, str]]:
    """The machine's pip index settings as uv arguments (and environment), from `pip config list`, which covers
    pip's config files and PIP_* variables."""
    out = subprocess.run([python, "-m", "pip", "config", "list"], capture_output=True, text=True)
    found: dict[str, dict[str, str]] = {}
    for line in out.stdout.splitlines() if out.returncode == 0 else []:
        key, sep, raw = line.partition("=")
        section, _, name = key.rpartition(".")
        if not sep or section not in PIP_SECTIONS:
            continue
        try:
            value = ast.literal_eval(raw.strip())  # pip prints each value with repr()
        except (ValueError, SyntaxError):
            value = raw.strip()
        found.setdefault(name, {})[section] = str(value)
    values = {name: next(by[s] for s in PIP_SECTIONS if s in by) for name, by in found.items()}
    args: list[str] = []
    if values.get("index-url", "").strip():
        args += ["--index-url", values["index-url"].strip()]
    for flag in LIST_OPTIONS:  # pip splits these on whitespace (one per line in a config file)
        for item in values.get(flag, "").split():
            args += [f"--{flag}", item]
    if values.get("no-index", "").strip().lower() in ("1", "true", "yes", "on"):
        args.append("--no-index")
    if "--extra-index-url" in args or "--find-links" in args:
        # pip takes the best version across all its indexes; uv by default only the first index that has it
        args += ["--index-strategy", "unsafe-best-match"]
    env = {"SSL_CERT_FILE": values["cert"].strip()} if values.get("cert", "").strip() else {}
    return args, env


def find_uv(step: int) -> str | None:
    """uv on PATH, or uv==UV_VERSION in the bootstrap venv (installed from PyPI if missing); None if neither."""
    on_path = shutil.which("uv")
    if on_path:
        say(step, f"installer: uv on PATH ({on_path})")
        return on_path
    uv = BOOTSTRAP / "bin" / "uv"
    if not uv.exists():
        for cmd in ([sys.executable, "-m", "venv", str(BOOTSTRAP)],
                    [str(BOOTSTRAP / "bin" / "python"), "-m", "pip", "install", "-q", f"uv=={UV_VERSION}"]):
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode != 0:
                reason = (out.stderr.strip().splitlines() or ["no output"])[-1]
                shutil.rmtree(BOOTSTRAP, ignore_errors=True)
                say(step, f"installer: pip (uv=={UV_VERSION} could not be installed from PyPI: {reason})")
                return None
    say(step, f"installer: uv {UV_VERSION} ({uv.relative_to(ROOT)}, from PyPI with {sys.executable})")
    return str(uv)


def find_python(step: int, wanted: str, override: str | None, uv: str | None) -> str:
    """The interpreter for the venv, by the rule in this module's docstring; SetupError when there is none."""
    if override:
        found = shutil.which(override) or override
        version = version_of(found)
        if version is None:
            raise SetupError(f"PYTHON={override} does not run: give the path of a Python {wanted} interpreter")
        note = "" if version.startswith(wanted + ".") else f"; the lock is compiled for {wanted}, pins may not install"
        say(step, f"interpreter: {found} (Python {version}, from PYTHON{note})")
        return found
    for name, origin in ((f"python{wanted}", f"python{wanted} on PATH"), ("python3", f"python3 on PATH is {wanted}")):
        found = shutil.which(name)
        version = version_of(found) if found else None
        if version and version.startswith(wanted + "."):
            say(step, f"interpreter: {found} (Python {version}, {origin})")
            return found
    other = version_of("python3") if shutil.which("python3") else None
    have = f"python3 is {other}" if other else "no python3"
    missing = f"no Python {wanted} here (python{wanted} is not on PATH, {have})"
    fix = (f"install Python {wanted} (e.g. `sudo apt install python{wanted} python{wanted}-venv`) or pass "
           f"PYTHON=/path/to/python{wanted}")
    if uv is None:
        raise SetupError(f"{missing} and no uv to fetch one: {fix}")
    found, origin = uv_find(uv, wanted), "found by uv"
    if not found:
        say(step, f"interpreter: {missing}; uv downloads a managed CPython {wanted}")
        fetched = subprocess.run([uv, "python", "install", wanted], capture_output=True, text=True)
        if fetched.returncode != 0:
            reason = (fetched.stderr.strip().splitlines() or ["no output"])[-1].strip()
            raise SetupError(f"{missing} and uv could not download one ({reason}): {fix}")
        found, origin = uv_find(uv, wanted), "downloaded by uv"
    if not found:
        raise SetupError(f"uv installed Python {wanted} but cannot find it: run `uv python find {wanted}` to see why")
    say(step, f"interpreter: {found} (Python {version_of(found)}, {origin})")
    return found


def uv_find(uv: str, wanted: str) -> str | None:
    """The Python `wanted` that uv finds, never one of a virtual environment (such as the venv being rebuilt)."""
    out = subprocess.run([uv, "python", "find", "--system", wanted], capture_output=True, text=True)
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else None


def prepare_venv(venv: Path, python: str) -> bool:
    """Step 3: reuse `venv` when it is a venv of the chosen interpreter's version (the installs then bring it to
    the lock, as pip did before), else create it; returns whether this run created it. A folder that is not a
    venv is never touched."""
    if venv.exists():
        if not (venv / "pyvenv.cfg").is_file():
            raise SetupError(f"{venv} exists and is not a virtual environment: remove it or set VENV to another path")
        current = version_of(str(venv / "bin" / "python"))
        if current is not None and current == version_of(python):
            say(3, f"venv {venv}: reusing it (Python {current}); the installs bring it to the lock ...")
            return False
        shutil.rmtree(venv)  # a venv of another (or a broken) interpreter: rebuilt
    say(3, f"venv {venv} ...")
    run([python, "-m", "venv", str(venv)], f"creating {venv}",
        "install the venv module of that Python (Debian/Ubuntu: the python3.X-venv package)")
    return True


def install(venv: Path, uv: str | None, torch_version: str) -> None:
    """Steps 4-6: torch, the lock, the project, the check."""
    vpy = str(venv / "bin" / "python")
    if uv is not None:
        index_args, index_env = pip_settings(vpy)  # the venv's pip reads the machine's pip config
        env = {**os.environ, **index_env, "VIRTUAL_ENV": str(venv)}
        # --compile-bytecode: pip writes .pyc files at install time, uv does not by default. Without them every
        # stage process recompiles torch/transformers where Python cannot write .pyc (PYTHONDONTWRITEBYTECODE,
        # read-only installs): measured 2x slower stage starts and `make test` 7:30 instead of 4:41.
        base = [uv, "pip", "install", "--compile-bytecode", "--python", vpy, *index_args]
        check = [uv, "pip", "check", "--python", vpy]
    else:
        env, base, check = None, [vpy, "-m", "pip", "install", "-q"], [vpy, "-m", "pip", "check"]
    fix = "check the network or the pip index settings (pip config list), then rerun make setup"
    say(4, f"torch=={torch_version} (first, pinned; which build comes from your index settings) ...")
    run([*base, f"torch=={torch_version}"], f"installing torch=={torch_version}", fix, env)
    say(5, f"{LOCK.name} (exact pins, --no-deps) ...")
    run([*base, "--no-deps", "-r", str(LOCK)], f"installing {LOCK.name}", fix, env)
    say(6, "edgerlhf (editable, --no-deps) and a dependency check ...")
    run([*base, "--no-deps", "-e", str(ROOT)], "installing the project", fix, env)
    run(check, "the dependency check", "the lock is inconsistent: regenerate it with `make lock`", env)


def cleanup(venv: Path, created: bool) -> str:
    """After a failure: remove the venv this run created; a reused one stays, without its stamp (incomplete)."""
    if created:
        shutil.rmtree(venv, ignore_errors=True)
        return "; the half-built venv was removed"
    return f"; {venv} is marked incomplete until make setup succeeds" if venv.exists() else ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--venv", default=".venv")
    parser.add_argument("--torch", required=True, help="the torch version to pin")
    parser.add_argument("--python", default=os.environ.get("PYTHON") or None,
                        help="the interpreter (default: the rule in this module's docstring)")
    parser.add_argument("--stamp", help="file to touch on success (make's marker of a complete venv)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    venv = Path(args.venv).absolute()
    # look for interpreters on the user's PATH, never in the venv being (re)built
    venv_bin = str((venv / "bin").resolve())
    os.environ["PATH"] = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep)
                                         if p and str(Path(p).resolve()) != venv_bin)
    created = False
    try:
        wanted = lock_python()
        uv = find_uv(1)
        python = find_python(2, wanted, args.python, uv)
        try:
            Path(os.path.realpath(python)).relative_to(venv.resolve())
            raise SetupError(f"the interpreter {python} lies inside {venv}, the venv being built: give a base "
                             "Python with PYTHON=")
        except ValueError:
            pass  # outside the venv, as it must be
        if args.stamp and os.path.exists(args.stamp):
            os.remove(args.stamp)  # until the installs below succeed, the venv is incomplete
        created = prepare_venv(venv, python)
        install(venv, uv, args.torch)
    except SetupError as exc:
        print(f"make setup: {exc}{cleanup(venv, created)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"make setup: interrupted{cleanup(venv, created)}", file=sys.stderr)
        return 130
    except Exception as exc:  # whatever it is, the user gets one line, not a traceback
        print(f"make setup: unexpected {type(exc).__name__}: {exc}{cleanup(venv, created)}", file=sys.stderr)
        return 1
    if args.stamp:
        Path(args.stamp).touch()
    version = version_of(str(venv / "bin" / "python"))
    print(f"[setup] done in {time.perf_counter() - started:.1f} s: {args.venv} with Python {version}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
