"""The training dashboard: a live panel from training events, or log lines every tenth of the run."""

from __future__ import annotations

import io

from rich.console import Console

from twinstudio import cli_train


def _events(total: int = 20):
    for step in range(1, total + 1):
        yield {"event": "train", "step": step, "total": total, "loss": 0.1 / step, "psnr": 20.0 + step / 2,
               "gaussians": 30000 - step, "it_s": 12.5, "eta_s": (total - step) / 12.5}


def _console(monkeypatch, terminal: bool) -> io.StringIO:
    buf = io.StringIO()
    con = Console(file=buf, width=100, force_terminal=terminal, color_system=None)
    monkeypatch.setattr(cli_train, "_console", lambda: con)
    return buf


def test_panel_shows_step_loss_psnr_gaussians_speed_and_eta(monkeypatch):
    _console(monkeypatch, terminal=True)
    dash = cli_train.TrainDashboard(plain=False, title="training the twin")
    dash.live = type("NoLive", (), {"update": lambda self, r: None, "stop": lambda self: None})()
    for ev in list(_events())[:10]:
        dash.on_event(ev)
    dash.on_event({"event": "progress", "stage": "evaluate", "done": 3, "total": 32})
    out = io.StringIO()
    Console(file=out, width=100, force_terminal=True, color_system=None).print(dash._panel())
    text = out.getvalue()
    for want in ("training the twin", "10/20", "0.0100", "25.00 dB", "29,990", "12.50 it/s", "0:00", "evaluate",
                 "3/32"):
        assert want in text, (want, text)


def test_plain_mode_logs_a_line_per_tenth_and_each_stage_once(monkeypatch):
    buf = _console(monkeypatch, terminal=False)
    with cli_train.TrainDashboard(plain=True) as on_event:
        on_event({"event": "stage", "stage": "train", "status": "running", "device": "cpu"})
        for ev in _events(50):
            on_event(ev)
        for done in (10, 32, 32):
            on_event({"event": "progress", "stage": "evaluate", "done": done, "total": 32})
    lines = buf.getvalue().splitlines()
    steps = [x for x in lines if x.strip().startswith("step ")]
    assert len(steps) == 10 and "step 50/50" in steps[-1] and "ETA 0:00" in steps[-1]
    assert sum("evaluate: 32 done" in x for x in lines) == 1
    assert any("train on cpu" in x for x in lines)


def test_duration_format():
    assert cli_train._duration(65) == "1:05" and cli_train._duration(3725) == "1:02:05"
