"""Progress bars: a bar in a terminal, nearly silent in logs."""

from __future__ import annotations

import io
import time

import pytest

from rima_core import progress


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_mode_follows_the_terminal_and_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(progress.ENV, raising=False)
    monkeypatch.setattr("sys.stderr", io.StringIO())
    assert progress.mode() == "log"
    monkeypatch.setattr("sys.stderr", _Tty())
    assert progress.mode() == "on"
    monkeypatch.setenv(progress.ENV, "off")
    assert progress.mode() == "off"
    monkeypatch.setenv(progress.ENV, "on")
    monkeypatch.setattr("sys.stderr", io.StringIO())
    assert progress.mode() == "on"


def test_short_loops_print_nothing_outside_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(progress.ENV, raising=False)
    out = io.StringIO()
    monkeypatch.setattr("sys.stderr", out)
    bar = progress.progress(range(200), desc="epoch 1/2", leave=False, file=out)
    for i in bar:
        bar.set_postfix(loss=f"{i:.3f}")  # the training loop's per-batch update
        bar.set_description(f"epoch {i}")
    with progress.progress(total=10, desc="prepare", file=out) as bar:
        bar.update(10)
    assert out.getvalue() == ""


def test_long_loops_print_a_line_per_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(progress.ENV, raising=False)
    monkeypatch.setattr(progress, "LOG_INTERVAL_S", 0.05)
    out = io.StringIO()
    monkeypatch.setattr("sys.stderr", out)
    for _ in progress.progress(range(40), desc="long", file=out):
        time.sleep(0.01)  # 0.4 s: a few intervals, 40 iterations
    updates = [u for u in out.getvalue().replace("\r", "\n").split("\n") if u.strip()]
    assert 1 <= len(updates) < 20, updates


def test_a_terminal_gets_a_bar_and_disable_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(progress.ENV, "on")
    out = io.StringIO()
    for _ in progress.progress(range(3), desc="bar", file=out):
        pass
    assert "bar" in out.getvalue()
    out = io.StringIO()
    for _ in progress.progress(range(3), desc="bar", file=out, disable=True):
        pass
    assert out.getvalue() == ""
