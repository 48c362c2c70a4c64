"""The batch's command line and dashboard, without a cluster: inputs refused by name, events folded and shown."""

from __future__ import annotations

import io

from rich.console import Console

from twinstudio.batch import BatchEvent, expand_sessions, session_names
from twinstudio.cli import main
from twinstudio.cli_batch import BatchBoard, render_board


def test_bad_inputs_are_refused_before_ray_starts(tmp_path, capsys):
    assert main(["batch", str(tmp_path / "nothing-*")]) == 2
    assert "matches no session folder" in capsys.readouterr().err
    (tmp_path / "s1").mkdir()
    (tmp_path / "s1" / "session.json").write_text("{}")
    assert main(["batch", str(tmp_path / "s*"), "--stages", "reconstruct,paint"]) == 2
    assert "unknown stage(s) paint" in capsys.readouterr().err
    assert main(["batch", str(tmp_path / "s1"), "--train-device", "tpu"]) == 2
    assert "train device must be auto, gpu or cpu" in capsys.readouterr().err
    assert main(["batch", str(tmp_path / "s1"), "--recon-stages", "masks,paint"]) == 2
    assert "unknown reconstruction stage(s) paint" in capsys.readouterr().err


def test_sessions_from_paths_and_globs_each_once(tmp_path):
    for parent in ("day1", "day2"):
        for n in ("anna", "ben"):
            (tmp_path / parent / n).mkdir(parents=True)
            (tmp_path / parent / n / "session.json").write_text("{}")
    (tmp_path / "day1" / "notes").mkdir()  # not a session: a glob skips it
    got = expand_sessions([str(tmp_path / "day1" / "*"), str(tmp_path / "day1" / "anna")])
    assert got == [tmp_path / "day1" / "anna", tmp_path / "day1" / "ben"]
    both = expand_sessions([str(tmp_path / "day*" / "anna")])
    assert session_names(both) == [str(tmp_path / "day1" / "anna"), str(tmp_path / "day2" / "anna")]
    assert session_names(got) == ["anna", "ben"]


def test_the_dashboard_shows_every_session_and_stage_from_events():
    board = BatchBoard(("reconstruct", "train", "bundle"), ["anna", "ben", "cleo"])
    for ev in [BatchEvent("cleo", "reconstruct", "failed", "consent: revoked on 2026-12-01"),
               BatchEvent("cleo", "train", "blocked", "not run"), BatchEvent("anna", "reconstruct", "queued"),
               BatchEvent("anna", "reconstruct", "running", "pid 12", node="gpu-1", attempt=1),
               BatchEvent("anna", "reconstruct", "progress", "masks 12/24", node="gpu-1", attempt=1, seconds=3.0),
               BatchEvent("ben", "reconstruct", "running", "pid 13", node="gpu-2", attempt=1),
               BatchEvent("ben", "reconstruct", "retry", "attempt 1 died on gpu-2", node="gpu-2", attempt=1),
               BatchEvent("ben", "reconstruct", "running", "pid 14", node="gpu-1", attempt=2)]:
        board.fold(ev)
    assert board.cells["anna"]["reconstruct"]["detail"] == "masks 12/24"
    assert board.cells["ben"]["reconstruct"] == {"status": "running", "detail": "", "node": "gpu-1", "attempt": 2,
                                                  "seconds": 0.0}
    assert board.counts() == {"failed": 1, "blocked": 1, "running": 2}
    con = Console(file=io.StringIO(), width=160, color_system=None)
    con.print(render_board(board, "batch"))
    text = con.file.getvalue()
    assert list(board.cells) == ["anna", "ben", "cleo"]  # the order given, not the order of events
    assert "running on gpu-1 3 s" in text and "masks 12/24" in text and "(try 2)" in text
    assert "consent: revoked" in text and "blocked" in text
