"""Static checks of the components' image (no Docker engine here to build it).

The Dockerfile is parsed into instructions and checked for what a cluster relies on: a pinned
CUDA runtime base and a CPU variant, this package installed with its pinned dependencies, a
non-root numeric user, and no credentials baked in.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from rima_core.tracking import mlflow_runs as tracking

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "components" / "Dockerfile"
CONSTRAINTS = ROOT / "components" / "constraints.txt"
IGNORE = ROOT / "components" / "Dockerfile.dockerignore"

SECRET_WORDS = re.compile(r"(SECRET|PASSWORD|PASSWD|TOKEN|ACCESS_KEY|CREDENTIAL|API_KEY)", re.I)


def parse(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs: comments dropped, continuation lines joined."""
    out: list[tuple[str, str]] = []
    buf = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            buf += line[:-1].rstrip() + " "
            continue
        full = (buf + line).strip()
        buf = ""
        if full:
            op, _, args = full.partition(" ")
            out.append((op.upper(), args.strip()))
    assert not buf, "the Dockerfile ends inside a continued line"
    return out


@pytest.fixture(scope="module")
def instructions() -> list[tuple[str, str]]:
    return parse(DOCKERFILE.read_text())


def _args(instructions: list[tuple[str, str]], op: str) -> list[str]:
    return [a for o, a in instructions if o == op]


def test_parser_joins_continuations() -> None:
    got = parse("# c\nFROM a:1 AS b\nRUN x \\\n  # inner\n  && y\nUSER 1\n")
    assert got == [("FROM", "a:1 AS b"), ("RUN", "x && y"), ("USER", "1")]


def test_bases_are_pinned_cuda_runtime_and_cpu_variant(
    instructions: list[tuple[str, str]],
) -> None:
    global_args = {}
    for op, args in instructions:
        if op == "FROM":
            break
        if op == "ARG" and "=" in args:
            key, value = args.split("=", 1)
            global_args[key] = value
    stages: dict[str, str] = {}
    final = None
    for args in _args(instructions, "FROM"):
        parts = args.split()
        image = parts[0]
        name = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else None
        if image.startswith("base-"):  # the variant switch refers to a stage, not an image
            final = image
            continue
        assert "@sha256:" in image or re.search(r":[\w][\w.-]*$", image), f"{image} is not pinned"
        assert not image.endswith(":latest"), image
        if name:
            stages[name] = image
    assert final == "base-${VARIANT}", "the last stage picks the base by build arg"
    assert global_args["VARIANT"] == "cuda"
    assert set(stages) == {"base-cuda", "base-cpu"}
    assert re.fullmatch(
        r"nvidia/cuda:\d+\.\d+\.\d+-(cudnn-)?runtime-ubuntu\d+\.\d+", stages["base-cuda"]
    )
    assert re.fullmatch(r"python:3\.11\.\d+-slim-\w+", stages["base-cpu"])


def test_installs_this_package_with_its_pins(instructions: list[tuple[str, str]]) -> None:
    copies = " ".join(_args(instructions, "COPY"))
    assert "pyproject.toml" in copies and re.search(r"\brima_core\b", copies)
    assert "components/constraints.txt" in copies
    runs = _args(instructions, "RUN")
    install = [r for r in runs if "pip install" in r and "--constraint constraints.txt" in r]
    assert install and '"/opt/rima[postgres]"' in install[0], "the copied package + PG driver"
    torch = [r for r in runs if "pip install" in r and "torch==" in r]
    assert torch, "torch is installed at the project's pin"
    for run in runs:  # nothing installed unpinned
        if "pip install" in run:
            assert "--constraint" in run or "torch==" in run, run


def test_constraints_hold_every_pin_of_pyproject() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = {}
    for dep in [*project["dependencies"], *project["optional-dependencies"]["postgres"]]:
        name, sep, version = dep.partition("==")
        assert sep, f"{dep} is not pinned in pyproject.toml"
        pins[name.strip().lower().replace("_", "-")] = version.strip()
    locked = {}
    for line in CONSTRAINTS.read_text().splitlines():
        if line and not line.startswith("#"):
            name, sep, version = line.partition("==")
            assert sep, f"constraints line {line!r} is not an exact pin"
            locked[name.lower().replace("_", "-")] = version
    for name, version in pins.items():
        assert locked.get(name) == version, (
            f"{name}=={version} in pyproject.toml but {locked.get(name)} in constraints.txt"
        )
    assert not any("+cpu" in v for v in locked.values()), "the CPU local label is stripped"
    assert "rima-core" not in locked


def test_runs_as_a_numeric_non_root_user(instructions: list[tuple[str, str]]) -> None:
    users = _args(instructions, "USER")
    assert users, "no USER: the image would run as root"
    final = users[-1]
    uid = final.split(":")[0]
    assert uid.isdigit() and int(uid) != 0, f"USER {final} must be a numeric non-root uid"
    last_user_at = max(i for i, (op, _) in enumerate(instructions) if op == "USER")
    assert all(op != "RUN" for op, _ in instructions[last_user_at:]), "RUN after USER"


def test_no_secrets_baked_in(instructions: list[tuple[str, str]]) -> None:
    for op, args in instructions:
        if op in ("ENV", "ARG"):
            names = re.findall(r"(\w+)=", args) or [args.split()[0]]
            for name in names:
                assert not SECRET_WORDS.search(name), f"{op} {name} looks like a secret"
        if op in ("COPY", "ADD"):
            assert not re.search(r"\.env\b|credentials|\.aws|\.netrc|id_rsa|\.pem", args), args


def test_commit_env_is_what_tracking_reads(instructions: list[tuple[str, str]]) -> None:
    env = " ".join(_args(instructions, "ENV"))
    assert "RIMA_GIT_COMMIT=${GIT_COMMIT}" in env
    assert "RIMA_GIT_COMMIT" in Path(tracking.__file__).read_text()


def test_build_context_sends_what_the_copies_need(instructions: list[tuple[str, str]]) -> None:
    lines = [x.strip() for x in IGNORE.read_text().splitlines() if x.strip()]
    assert "*" in lines, "ignore everything by default (.venv, data, mlruns stay out)"
    allowed = {x[1:].rstrip("/") for x in lines if x.startswith("!")}
    for args in _args(instructions, "COPY"):
        *sources, _dest = args.split()
        for src in sources:
            if src.startswith("--"):
                continue
            assert src.rstrip("/") in allowed, f"COPY {src} is excluded by the .dockerignore"
            assert (ROOT / src).exists(), f"COPY {src}: no such path in the repository"
