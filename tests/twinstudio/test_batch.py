"""``twinstudio batch`` on a real two-node Ray cluster (loopback only): sessions fail on their own,
crashes are retried and bad input is not, current stages are not run again, nothing waits forever."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from dataclasses import replace
from pathlib import Path

import pytest

from reconstruct.pipeline import ReconstructOptions
from tests.handoff.sessions import captured_session
from tests.raycluster import two_node_cluster
from train.runner import TrainOptions
from twinstudio.batch import BatchOptions, is_current, run_batch

# small and quick: the virtual studio's stills at 1/10 scale; its cameras are the existing calibration and
# its mesh seeds the training (the mesh stage would take ~12 s a session here)
RECON = ReconstructOptions(cameras_from="existing", stages=("cameras", "masks"))
TRAIN = TrainOptions(device="cpu", iterations=20, turntable_frames=4)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with two_node_cluster(tmp_path_factory.mktemp("ray-home")) as c:
        yield c


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """One captured session (consent for every scope), copied for each test that needs sessions."""
    from reconstruct.inputs import GroundTruth

    root = tmp_path_factory.mktemp("template") / "session"
    take = captured_session(root, ("capture", "train", "generate", "share"))
    mesh = root / "recon" / "mesh" / take / "mesh.ply"
    mesh.parent.mkdir(parents=True)
    shutil.copy(GroundTruth.find(root).mesh_path(take, 0), mesh)
    return root


@pytest.fixture(scope="module")
def key(tmp_path_factory) -> Path:
    from train.handoff.integrity import init_keys

    keys = tmp_path_factory.mktemp("keys")
    init_keys(keys)
    return keys / "studio.key"


def sessions(template: Path, where: Path, names: list[str]) -> list[Path]:
    out = []
    for n in names:
        shutil.copytree(template, where / n, symlinks=True)
        out.append(where / n)
    return out


def test_three_sessions_one_corrupt_the_others_complete(cluster, template, key, tmp_path):
    s1, s2, s3 = sessions(template, tmp_path, ["anna", "ben", "cleo"])
    (s3 / "recon" / "cameras.json").write_text('{"schema": {"name": "twinstudio.cameras"')  # truncated
    events = []
    opts = BatchOptions(reconstruct=RECON, train=TRAIN, key=key, out=tmp_path / "batch")
    result = run_batch([s1, s2, s3], opts, on_event=events.append)

    report = json.loads(result.report.read_text())
    assert report["schema"] == {"name": "twinstudio.batch-report", "version": 1}
    by = {s["name"]: s for s in report["sessions"]}
    for name in ("anna", "ben"):
        assert by[name]["status"] == "done", by[name]
        for stage in ("reconstruct", "train", "bundle"):
            st = by[name]["stages"][stage]
            assert st["status"] == "done" and st["attempts"] == 1 and st["seconds"] > 0 and st["node"], st
        assert Path(by[name]["bundle"]).is_file()
        assert (tmp_path / name / "train" / "twin" / "metrics.json").is_file()
    bad = by["cleo"]
    assert bad["status"] == "failed"
    assert "cameras.json" in bad["reason"] and bad["reason"].startswith("reconstruct:")
    assert bad["stages"]["reconstruct"]["attempts"] == 1  # a bad input is not retried
    assert bad["stages"]["train"]["status"] == "blocked" and bad["stages"]["bundle"]["status"] == "blocked"
    assert not (tmp_path / "cleo" / "train").exists()
    assert report["totals"] == {"done": 2, "failed": 1}
    # both nodes took work (each has one CPU, three reconstructions were ready at once)
    ran_on = {r["node_id"] for s in by.values() for st in s["stages"].values() for r in st["runs"]}
    assert len(ran_on) == 2
    # the dashboard's events came from the tasks: each stage that ran was seen running, then done
    seen = {(e.session, e.stage, e.status) for e in events}
    for name in ("anna", "ben"):
        for stage in ("reconstruct", "train", "bundle"):
            assert {(name, stage, "running"), (name, stage, "done")} <= seen
    assert ("cleo", "reconstruct", "failed") in seen and ("cleo", "train", "blocked") in seen

    # run again: every stage that finished is current and not run; a deleted bundle is made again
    Path(by["ben"]["bundle"]).unlink()
    again = run_batch([s1, s2], opts)
    rep2 = {s["name"]: s for s in json.loads(again.report.read_text())["sessions"]}
    assert {k: v["status"] for k, v in rep2["anna"]["stages"].items()} == dict.fromkeys(opts.stages, "current")
    assert {k: v["status"] for k, v in rep2["ben"]["stages"].items()} == {
        "reconstruct": "current", "train": "current", "bundle": "done"}
    # a bundle made again (stale, or --force) never overwrites the earlier one: that is kept beside it
    forced = run_batch([s1], replace(opts, stages=("bundle",), force=True))
    assert forced.sessions[0].stages["bundle"].status == "done"
    kept = sorted(p.name for p in (tmp_path / "batch" / "bundles").glob("anna.*.tar"))
    assert len(kept) == 1 and (tmp_path / "batch" / "bundles" / "anna.tar").is_file()
    # an input that changed makes its stage (and only what depends on it) stale
    assert is_current(s1, "train", opts, "cpu")
    more_cpus = BatchOptions(reconstruct=replace(RECON, workers=2), train=replace(TRAIN, cpu_threads=2), key=key,
                             out=tmp_path / "batch", recon_cpus=2, train_cpus=2)
    assert is_current(s1, "reconstruct", more_cpus, "cpu") and is_current(s1, "train", more_cpus, "cpu")
    assert not is_current(s1, "train", BatchOptions(reconstruct=RECON, train=TrainOptions(iterations=21)), "cpu")


def test_consent_is_checked_for_every_session_before_anything_runs(cluster, template, key, tmp_path):
    from capture.consent import revoke_consent

    ok, revoked = sessions(template, tmp_path, ["ok", "revoked"])
    revoke_consent(revoked, "the model withdrew")
    events = []
    result = run_batch([ok, revoked], BatchOptions(stages=("reconstruct",), reconstruct=RECON, key=key,
                                                   out=tmp_path / "batch"), on_event=events.append)
    by = {s.name: s for s in result.sessions}
    assert by["ok"].status == "done"
    assert by["revoked"].status == "failed" and by["revoked"].consent_refused
    assert "consent" in by["revoked"].reason and "revoked" in by["revoked"].reason
    assert not (revoked / "recon" / "report.json").exists() and not (revoked / "batch").exists()
    assert not any(e.session == "revoked" and e.status == "running" for e in events)
    assert events[0].session == "revoked"  # refused before the first task was queued


def test_training_that_needs_a_gpu_is_reported_unplaceable_at_once(cluster, template, key, tmp_path):
    (s,) = sessions(template, tmp_path, ["gpuless"])
    t0 = time.perf_counter()
    result = run_batch([s], BatchOptions(stages=("train", "bundle"), train=TRAIN, train_device="gpu", key=key,
                                         out=tmp_path / "batch"))
    assert time.perf_counter() - t0 < 10
    st = result.sessions[0].stages
    assert st["train"].status == "unplaceable" and st["bundle"].status == "blocked"
    assert "needs 1 CPU, 1 GPU on one node" in st["train"].reason and "0 GPU" in st["train"].reason
    assert not (s / "train" / "twin").exists()


def test_a_worker_killed_mid_training_is_retried_and_resumes(cluster, template, key, tmp_path):
    (s,) = sessions(template, tmp_path, ["dora"])
    opts = BatchOptions(stages=("reconstruct", "train"), reconstruct=RECON, key=key, out=tmp_path / "batch",
                        train=TrainOptions(device="cpu", iterations=400, save_every=50, evaluate=False,
                                           exports=False))
    killed = []

    def kill_once(ev) -> None:
        # SIGKILL the training's worker once it is past its first checkpoint
        if ev.stage == "train" and ev.status == "progress" and not killed and ev.detail.startswith("step"):
            step = int(ev.detail.split()[1].split("/")[0])
            if step >= 120:
                pid = result_pid[0]
                killed.append((pid, step))
                os.kill(pid, signal.SIGKILL)
        if ev.stage == "train" and ev.status == "running":
            result_pid[0] = int(ev.detail.split()[1])
        events.append(ev)

    result_pid, events = [0], []
    result = run_batch([s], opts, on_event=kill_once)
    assert killed, "the training ended before it could be killed"
    st = result.sessions[0].stages
    assert st["train"].status == "done" and st["train"].attempts == 2, st["train"]
    assert st["reconstruct"].attempts == 1  # what had finished is not run again
    assert any(e.status == "retry" and e.stage == "train" for e in events)
    pids = [r["pid"] for r in st["train"].runs]
    assert pids[0] == killed[0][0] and pids[1] != pids[0]
    metrics = json.loads((s / "train" / "twin" / "metrics.json").read_text())
    assert metrics["iterations"] == 400
    # the second attempt resumed from a checkpoint instead of starting over
    starts = [int(e.detail.rsplit(" ", 1)[1]) for e in events
              if e.stage == "train" and e.status == "progress" and e.detail.startswith("train from step")]
    # (progress events reach the driver a little late: the worker may have passed the step it was killed at,
    # and written the next checkpoint, before the signal landed; it resumes from a checkpoint either way)
    assert starts[0] == 0 and 50 < starts[1] < 400 and (starts[1] - 1) % 50 == 0, (starts, killed)


def test_errors_cross_process_boundaries_whole():
    # a stage's error reaches the driver pickled: its class, message, facts and exit code survive
    import pickle

    from reconstruct.pipeline import StageFailed
    from rigs.errors import RigError

    e = pickle.loads(pickle.dumps(StageFailed({"cameras": "no board"}, Path("/s/recon/report.json"))))
    assert type(e) is StageFailed and e.exit_code == 7 and e.failed == {"cameras": "no board"}
    assert str(e) == "1 stage(s) failed: cameras: no board (report: /s/recon/report.json)"
    r = pickle.loads(pickle.dumps(RigError("bad focal", path="r.toml", key="cameras.focal", line=3)))
    assert str(r) == "r.toml:3 [cameras.focal]: bad focal" and r.facts["line"] == 3


def test_the_cli_joins_the_cluster_by_address(cluster, template, key, tmp_path):
    # the real command in its own process (inside the test's loopback-only namespace) joins the cluster,
    # prints the summary and exits 4 when the only failure is a consent refusal
    from capture.consent import revoke_consent
    from tests.faults.cli import flat, run

    ok, revoked = sessions(template, tmp_path, ["ok", "revoked"])
    revoke_consent(revoked, "the model withdrew")
    r = run("batch", ok, revoked, "--address", cluster.address, "--stages", "reconstruct", "--cameras-from",
            "existing", "--recon-stages", "cameras,masks", "--out", tmp_path / "batch", "--key", key, "--plain",
            timeout=300)
    out = flat(r.stdout)
    assert r.returncode == 4, r.stdout + r.stderr
    assert "ok reconstruct: done on" in out and "revoked reconstruct: blocked: not run: consent:" in out
    assert f"report: {tmp_path / 'batch' / 'report.json'}" in out
    assert "session(s) failed: revoked: consent:" in flat(r.stderr)
    report = json.loads((tmp_path / "batch" / "report.json").read_text())
    assert report["ray"]["address"] == cluster.address and not report["ray"]["embedded"]
    assert len(report["ray"]["nodes"]) == 2
