"""Start-up seconds: what importing each heavy dependency costs, and what a `rima` command costs.

The library imports at the top of its modules, except a dependency whose import costs a command
that does not need it a noticeable start-up (tests/contracts/test_lazy_imports.py holds the list,
:data:`HEAVY`; a lazy import of anything else fails that test). This measures the cost that
justifies the list: each package imported alone in a fresh interpreter, and the commands a user
types most (`rima --help`, `rima params show`) with the library as it is.

    python benchmarks/startup.py [--repeats 5]

Writes benchmarks/results/startup.json and startup.md (median wall seconds of ``--repeats``
fresh processes; the machine's Python start-up, ``python -c pass``, is reported beside them).
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT))

from tests.contracts.test_lazy_imports import HEAVY  # noqa: E402

log = logging.getLogger("benchmarks.startup")

# The module of a package the library imports where importing the package alone is not what a
# caller pays (``import dvc`` is cheap; the library imports ``dvc.repo``).
AS_IMPORTED = {
    "dvc": "dvc.repo",
    "matplotlib": "matplotlib.pyplot",
    "pyarrow": "pyarrow.parquet",
    "scipy": "scipy.stats",
    "sklearn": "sklearn.linear_model",
}


def _seconds(cmd: list[str], repeats: int) -> float:
    """Median wall seconds of ``cmd`` run ``repeats`` times, each in a fresh process."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(repeats: int) -> dict[str, object]:
    py = sys.executable
    rima = str(Path(py).parent / "rima")
    baseline = _seconds([py, "-c", "pass"], repeats)
    imports = {
        AS_IMPORTED.get(name, name): round(
            _seconds([py, "-c", f"import {AS_IMPORTED.get(name, name)}"], repeats) - baseline, 3
        )
        for name in sorted(HEAVY)
    }
    commands = {
        "rima --help": round(_seconds([rima, "--help"], repeats), 3),
        "rima params show": round(_seconds([rima, "params", "show"], repeats), 3),
        "import rima_core.pipeline.cli": round(
            _seconds([py, "-c", "import rima_core.pipeline.cli"], repeats), 3
        ),
    }
    return {
        "python_startup_s": round(baseline, 3),
        "import_s_beyond_python_startup": imports,
        "command_s": commands,
        "repeats": repeats,
        "python": platform.python_version(),
        "machine": platform.processor() or platform.machine(),
    }


def render(result: dict[str, object]) -> str:
    lines = [
        "# Start-up seconds",
        "",
        f"Median of {result['repeats']} fresh processes; Python {result['python']}, "
        f"`python -c pass` {result['python_startup_s']} s (subtracted from the imports).",
        "",
        "| imported alone | seconds |",
        "|---|---|",
    ]
    imports = result["import_s_beyond_python_startup"]
    assert isinstance(imports, dict)
    lines += [f"| `{k}` | {v} |" for k, v in sorted(imports.items(), key=lambda kv: -kv[1])]
    lines += ["", "| command | seconds |", "|---|---|"]
    commands = result["command_s"]
    assert isinstance(commands, dict)
    lines += [f"| `{k}` | {v} |" for k, v in commands.items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    result = measure(args.repeats)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "startup.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "startup.md").write_text(render(result))
    log.info("%s", render(result))


if __name__ == "__main__":
    main()
