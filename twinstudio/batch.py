"""Batches of sessions on Ray: every session's stages as Ray tasks, each session on its own.

``run_batch(sessions, options)`` takes capture sessions through the stages
``reconstruct`` -> ``train`` -> ``bundle`` (or the ones asked for), on the
Ray this process is connected to (:func:`twinstudio.cluster.connect`: an
embedded local Ray, or a studio cluster). The stages themselves are the plain
folder -> folder functions of ``reconstruct/`` and ``train/``; a Ray task
calls them and knows nothing else.

What a pipeline engineer can count on:

* **Consent first.** Before anything is scheduled, every session is opened and
  its consent checked for every stage asked of it (``train`` for
  reconstruction and training, ``share`` for the bundle); a session that fails
  has none of its stages run, and the others go on.
* **Resources per task.** Reconstruction asks for CPUs; training for one GPU
  where the cluster has GPUs, else it is the CPU preview and asks for a node's
  CPUs; bundling for one CPU. Work that no alive node can take (a GPU on a
  cluster without one, more CPUs than any node has, a node that died with
  the only GPU) is reported ``unplaceable`` at once, with what the nodes have,
  never left pending: Ray would keep it queued forever.
* **Crashes are retried, bad input is not.** A worker process or node that
  dies mid-stage is retried by Ray (``max_retries``); an error of the stage
  itself (a corrupt file, a refused consent, a stage that produced nothing)
  fails that session with its reason, once.
* **Re-runs pick up where a batch stopped.** A stage that finishes writes a
  stamp (``<session>/batch/<stage>.json``) with a fingerprint of its inputs
  and options and the size and modification time of every output file; a
  stage whose stamp matches and whose outputs are all there is ``current``
  and not run again.
* **Events, not polling.** Tasks send their start (node, process, attempt) and
  progress to an event actor; the driver folds those and the tasks' results
  into :class:`BatchEvent` for the dashboard (``twinstudio/cli_batch.py``).
* **A report** (``report.json``, schema ``twinstudio.batch-report``): per
  session and stage its status, seconds, attempts, the node and process it
  ran on, and the reason of a failure.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import socket
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from reconstruct.pipeline import ReconstructOptions
from rigs.errors import EXIT_CONSENT, EXIT_INPUT, EXIT_STAGE_FAILED, TwinstudioError
from rigs.fileio import atomic_write_json
from train.runner import TrainOptions

STAGES = ("reconstruct", "train", "bundle")
#: the consent scope each stage needs
SCOPES = {"reconstruct": "train", "train": "train", "bundle": "share"}
REPORT_SCHEMA = "twinstudio.batch-report"
STAMP_SCHEMA = "twinstudio.batch-stage"
SCHEMA_VERSION = 1
#: how often (seconds) waiting tasks are checked against the alive nodes
PLACEMENT_CHECK_S = 1.0


class BatchError(TwinstudioError):
    """The batch cannot start: no sessions, a bad stage name, bad options (exit code 2)."""

    exit_code = EXIT_INPUT


class BatchFailed(TwinstudioError):
    """Some sessions failed (exit code 7; 4 when every failure was a consent refusal); the report says why."""

    exit_code = EXIT_STAGE_FAILED

    def __init__(self, failed: dict[str, str], report: Path, consent_only: bool) -> None:
        super().__init__(f"{len(failed)} session(s) failed: " + "; ".join(f"{s}: {why}" for s, why in failed.items())
                         + f" (report: {report})", report=str(report))
        if consent_only:
            self.exit_code = EXIT_CONSENT


@dataclass(frozen=True)
class BatchOptions:
    stages: tuple[str, ...] = STAGES
    reconstruct: ReconstructOptions = field(default_factory=ReconstructOptions)
    train: TrainOptions = field(default_factory=TrainOptions)
    train_device: str = "auto"
    """'auto': one GPU per training where the cluster has GPUs, else the CPU preview; 'gpu'; 'cpu'."""
    out: Path = Path("out/batch")
    """The batch's folder: report.json and bundles/."""
    key: Path | None = None
    """Studio signing key for bundles (default: the studio's, ~/.twinstudio/studio.key)."""
    recon_cpus: float = 1.0
    train_cpus: float | None = None
    """CPUs of a CPU-preview training (default: all of the largest node's)."""
    bundle_cpus: float = 1.0
    max_retries: int = 2
    """Times a stage is run again after its worker or node died."""
    force: bool = False
    """Run every stage even where its outputs are current."""

    def __post_init__(self) -> None:
        bad = [s for s in self.stages if s not in STAGES]
        if bad or not self.stages:
            raise BatchError(f"unknown stage(s) {', '.join(bad) or '(none)'}; use {', '.join(STAGES)}")
        if self.train_device not in ("auto", "gpu", "cpu"):
            raise BatchError(f"train device must be auto, gpu or cpu, not {self.train_device!r}")
        if self.max_retries < 0:
            raise BatchError(f"max retries must be >= 0, not {self.max_retries}")


@dataclass(frozen=True)
class BatchEvent:
    """A session's stage changed: queued, current, running, progress, retry, done, failed, unplaceable, blocked."""

    session: str
    stage: str
    status: str
    detail: str = ""
    node: str = ""
    attempt: int = 0
    seconds: float = 0.0


# ----------------------------------------------------------------------------- sessions and stamps

def expand_sessions(args: Iterable[str]) -> list[Path]:
    """Session folders from paths and glob patterns, in order, each once.

    A glob keeps the folders that hold a session.json; a plain path is kept as
    it is (a missing or broken one fails in the batch, naming itself)."""
    import glob

    out: list[Path] = []
    for a in args:
        if any(ch in a for ch in "*?["):
            hits = sorted(Path(p) for p in glob.glob(a) if (Path(p) / "session.json").is_file())
            if not hits:
                raise BatchError(f"{a}: matches no session folder (a folder with a session.json)", pattern=a)
            out += hits
        else:
            out.append(Path(a))
    seen, unique = set(), []
    for p in out:
        key = os.path.realpath(p)
        if key not in seen:
            seen.add(key)
            unique.append(p)
    if not unique:
        raise BatchError("no sessions given")
    return unique


def session_names(paths: list[Path]) -> list[str]:
    """Short unique names: the folder name, or the path where folder names repeat."""
    names = [p.name or str(p) for p in paths]
    return [n if names.count(n) == 1 else str(p) for n, p in zip(names, paths)]


def bundle_path(options: BatchOptions, name: str) -> Path:
    return options.out / "bundles" / f"{name}.tar"


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _file_digest(p: Path) -> str:
    try:
        return _sha(p.read_bytes())
    except FileNotFoundError:
        return "missing"


def _options_of(stage: str, options: BatchOptions, device: str) -> dict:
    """The options that decide a stage's result (not how many processes or threads it used)."""
    if stage == "reconstruct":
        return {**asdict(options.reconstruct), "workers": None}
    if stage == "train":
        return {**asdict(replace(options.train, device=device)), "cpu_threads": None}
    return {"key": str(options.key or "studio"), "out": str(bundle_path(options, "x").parent)}


def _inputs(session: Path, stage: str, options: BatchOptions) -> dict[str, str]:
    """The files a stage reads that decide its result, by content hash."""
    files = {"reconstruct": ["session.json", "consent.json"],
             "train": ["consent.json", "recon/cameras.json", "recon/report.json"],
             "bundle": ["session.json", "consent.json", f"train/{options.train.run}/metrics.json",
                        f"train/{options.train.run}/splat.ply"]}[stage]
    return {f: _file_digest(session / f) for f in files}


def _outputs(session: Path, stage: str, options: BatchOptions, name: str) -> list[Path]:
    if stage == "reconstruct":
        roots = [session / "recon"]
    elif stage == "train":
        roots = [session / "train" / options.train.run]
    else:
        return [bundle_path(options, name)]
    return sorted(p for r in roots if r.is_dir() for p in r.rglob("*") if p.is_file())


def fingerprint(session: Path, stage: str, options: BatchOptions, device: str) -> str:
    doc = {"stage": stage, "inputs": _inputs(session, stage, options), "options": _options_of(stage, options, device)}
    return _sha(json.dumps(doc, sort_keys=True, default=str).encode())


def stamp_path(session: Path, stage: str) -> Path:
    return session / "batch" / f"{stage}.json"


def write_stamp(session: Path, stage: str, options: BatchOptions, device: str, name: str, run: dict) -> Path:
    outs = {}
    for p in _outputs(session, stage, options, name):
        st = p.stat()
        outs[str(p)] = [st.st_size, st.st_mtime_ns]
    doc = {"schema": {"name": STAMP_SCHEMA, "version": SCHEMA_VERSION}, "stage": stage,
           "fingerprint": fingerprint(session, stage, options, device), "outputs": outs,
           "finished": dt.datetime.now().astimezone().isoformat(timespec="seconds"), "run": run}
    path = stamp_path(session, stage)
    path.parent.mkdir(exist_ok=True)
    atomic_write_json(path, doc)
    return path


def is_current(session: Path, stage: str, options: BatchOptions, device: str) -> bool:
    """The stage's stamp matches its inputs and options, and every output it recorded is there unchanged."""
    try:
        doc = json.loads(stamp_path(session, stage).read_text())
        if doc["fingerprint"] != fingerprint(session, stage, options, device) or not doc["outputs"]:
            return False
        for p, (size, mtime) in doc["outputs"].items():
            st = Path(p).stat()
            if st.st_size != size or st.st_mtime_ns != mtime:
                return False
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return True


# ----------------------------------------------------------------------------- the task

def _where() -> dict:
    """The node and process running this stage (no node where it runs outside Ray, as in a benchmark's baseline)."""
    import ray

    if not ray.is_initialized():
        return {"node_id": "", "host": socket.gethostname(), "ip": "", "pid": os.getpid()}
    ctx = ray.get_runtime_context()
    return {"node_id": ctx.get_node_id(), "host": socket.gethostname(),
            "ip": ray.util.get_node_ip_address(), "pid": os.getpid()}


def run_stage(session: str, name: str, stage: str, options: BatchOptions, device: str, sink=None) -> dict:
    """One stage of one session, as a Ray task runs it; -> where it ran and how long it took.

    Raises the stage's own error (not retried); a dead worker is Ray's to retry.
    """
    root = Path(session)
    where = _where()
    last = [0.0]

    def send(status: str, detail: str = "", force: bool = False, **extra) -> None:
        if sink is None:
            return
        now = time.monotonic()
        if not force and now - last[0] < 0.5:
            return
        last[0] = now
        sink.put.remote({"session": name, "stage": stage, "status": status, "detail": detail, **where, **extra})

    send("running", "", force=True)
    t0 = time.perf_counter()
    if stage == "reconstruct":
        from reconstruct.pipeline import StageEvent, StageFailed, run_reconstruct

        current = ["cameras"]

        def recon_event(ev) -> None:
            if isinstance(ev, StageEvent):
                current[0] = ev.stage
                send("progress", f"{ev.stage} {ev.status}", force=True)
            else:  # a stage's progress (masks, mesh, motion, calibration, SfM): done of total
                step = getattr(ev, "stage", "")
                send("progress", f"{current[0]}{' ' + step if step else ''} {ev.done}/{ev.total}")

        opts = options.reconstruct
        if opts.workers is None:
            opts = replace(opts, workers=max(1, int(options.recon_cpus)))
        rep = run_reconstruct(root, opts, on_event=recon_event)
        if rep.failed:
            raise StageFailed(rep.failed, rep.path)
    elif stage == "train":
        from train.runner import run_training

        def train_event(ev: dict) -> None:
            if ev.get("event") == "train":
                send("progress", f"step {ev.get('step')}/{ev.get('total')}", step=ev.get("step"))
            elif ev.get("event") == "stage":
                start = ev.get("start_step")
                send("progress", str(ev.get("stage")) + (f" from step {start}" if start is not None else ""),
                     force=True)

        opts = replace(options.train, device=device)
        if device == "cpu" and opts.cpu_threads is None:
            opts = replace(opts, cpu_threads=max(1, int(os.environ.get("OMP_NUM_THREADS") or 1)))
        run_training(root, opts, on_event=train_event)
    else:
        from train.handoff.bundle import BundleOptions, build_bundle

        target = bundle_path(options, name)
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():  # a bundle is never overwritten: the stale one is kept beside the new one
            aside = target.with_name(f"{target.stem}.{time.strftime('%Y%m%d-%H%M%S')}{target.suffix}")
            target.rename(aside)
            send("progress", f"earlier bundle kept as {aside.name}", force=True)
        kw = {"key": options.key} if options.key is not None else {}
        build_bundle(root, target, BundleOptions(run=options.train.run, **kw),
                     on_event=lambda ev: send("progress", str(ev.get("stage", "")), force=ev.get("event") == "stage"))
    seconds = time.perf_counter() - t0
    run = {**where, "seconds": round(seconds, 3)}
    write_stamp(root, stage, options, device, name, run)
    return run


class EventSink:
    """A Ray actor that keeps the events tasks send until the driver takes them."""

    def __init__(self) -> None:
        self.events: list[dict] = []

    def put(self, ev: dict) -> None:
        self.events.append(ev)

    def take(self) -> list[dict]:
        out, self.events = self.events, []
        return out


# ----------------------------------------------------------------------------- the driver

@dataclass
class StageState:
    status: str = "waiting"  # waiting | current | queued | running | done | failed | unplaceable | blocked
    reason: str = ""
    attempts: int = 0
    seconds: float | None = None
    node: str = ""
    ip: str = ""
    pid: int | None = None
    started: float | None = None
    runs: list[dict] = field(default_factory=list)


@dataclass
class SessionState:
    path: Path
    name: str
    subject: str = ""
    stages: dict[str, StageState] = field(default_factory=dict)
    status: str = "waiting"
    reason: str = ""
    consent_refused: bool = False


@dataclass
class BatchResult:
    report: Path
    sessions: list[SessionState]
    seconds: float
    nodes: list

    @property
    def failed(self) -> dict[str, str]:
        return {s.name: s.reason for s in self.sessions if s.status == "failed"}


def _precheck(s: SessionState, stages: tuple[str, ...], options: BatchOptions) -> str | None:
    """Why the session cannot start (unreadable, consent, no key for its bundle), or None."""
    from capture.consent import ConsentError, require_session_consent
    from capture.session import read_manifest

    try:
        if not s.path.is_dir():
            raise BatchError(f"{s.path}: no such session folder", path=str(s.path))
        s.subject = read_manifest(s.path).subject_id
        for scope in dict.fromkeys(SCOPES[st] for st in stages):
            require_session_consent(s.path, scope)
        if "bundle" in stages:
            from train.handoff.bundle import default_key_path

            key = options.key or default_key_path()
            if not Path(key).is_file():
                raise BatchError(f"{key}: no studio signing key for the bundle; 'twinstudio keys init' makes one, "
                                 "or pass --key", path=str(key))
    except ConsentError as e:
        s.consent_refused = True
        return f"consent: {e}"
    except TwinstudioError as e:
        return str(e)
    return None


def _fail_session(s: SessionState, reason: str, stage: str | None = None) -> None:
    s.status, s.reason = "failed", (f"{stage}: {reason}" if stage else reason)
    for name, st in s.stages.items():
        if name == stage:
            st.status, st.reason = "failed", reason
        elif st.status in ("waiting", "queued"):
            st.status, st.reason = "blocked", (f"{stage} failed" if stage else "not run: " + reason)


def _crash_reason(e: BaseException) -> tuple[str, bool]:
    """(reason, consent refused) of a task that failed: its own error, or a worker that died on every try."""
    import ray.exceptions as rex

    from capture.consent import ConsentError

    if isinstance(e, rex.RayTaskError):
        cause = getattr(e, "cause", None)
        if isinstance(cause, TwinstudioError):
            return str(cause), isinstance(cause, ConsentError)
        if cause is not None:
            return "unexpected error (a bug): " + "".join(traceback.format_exception_only(type(cause), cause)).strip(), False
        return str(e).strip().splitlines()[-1], False
    if isinstance(e, rex.TaskCancelledError):
        return "cancelled", False
    if not isinstance(e, (rex.WorkerCrashedError, rex.NodeDiedError, rex.ObjectLostError, rex.RaySystemError)):
        return f"{type(e).__name__}: {e}", False
    return f"{type(e).__name__}: its worker or node died on every try", False


def node_labels(nodes) -> dict[str, str]:
    """node id -> a short name for people: the host name, with the node id where hosts run several nodes."""
    names = [n.hostname or n.ip for n in nodes]
    return {n.node_id: (name if names.count(name) == 1 else f"{name}#{n.node_id[:6]}")
            for n, name in zip(nodes, names)}


def run_batch(sessions: list[Path], options: BatchOptions = BatchOptions(), *,
              on_event: Callable[[BatchEvent], None] | None = None, address: str | None = None) -> BatchResult:
    """Run the batch on Ray (connected, or started for the call: see :func:`twinstudio.cluster.connect`)."""
    from twinstudio.cluster import connect

    with connect(address) as conn:
        return _run(sessions, options, on_event or (lambda ev: None), conn)


def _run(paths: list[Path], options: BatchOptions, emit: Callable[[BatchEvent], None], conn) -> BatchResult:
    import ray

    from twinstudio.cluster import cluster_nodes, placeable, why_unplaceable

    t0 = time.perf_counter()
    started = dt.datetime.now().astimezone()
    nodes = conn.nodes
    labels = node_labels(nodes)
    gpu = options.train_device == "gpu" or (options.train_device == "auto"
                                             and any(n.resources.get("GPU", 0) >= 1 for n in nodes))
    device = "cuda" if gpu else "cpu"
    train_cpus = options.train_cpus or max([n.resources.get("CPU", 0) for n in nodes] + [1])
    demands = {"reconstruct": {"CPU": options.recon_cpus},
               "train": {"GPU": 1, "CPU": 1} if gpu else {"CPU": train_cpus},
               "bundle": {"CPU": options.bundle_cpus}}
    if not gpu and options.train.cpu_threads is None:  # the preview uses the CPUs it was given, no more
        options = replace(options, train=replace(options.train, cpu_threads=max(1, int(train_cpus))))
    if options.reconstruct.workers is None:
        options = replace(options, reconstruct=replace(options.reconstruct, workers=max(1, int(options.recon_cpus))))
    states = [SessionState(p, n, stages={st: StageState() for st in options.stages})
              for p, n in zip(paths, session_names(paths))]
    by_name = {s.name: s for s in states}

    def tell(s: SessionState, stage: str, status: str | None = None, detail: str = "", seconds: float = 0.0) -> None:
        st = s.stages[stage]
        emit(BatchEvent(s.name, stage, status or st.status, detail or st.reason, st.node, st.attempts, seconds))

    def fail(s: SessionState, reason: str, stage: str | None = None, status: str = "failed") -> None:
        before = {k: v.status for k, v in s.stages.items()}
        _fail_session(s, reason, stage)
        if stage is not None:
            s.stages[stage].status = status
        for k, v in s.stages.items():
            if v.status != before[k]:
                tell(s, k)

    # consent and inputs first: nothing is scheduled for a session that fails here
    for s in states:
        reason = _precheck(s, options.stages, options)
        if reason:
            fail(s, reason)
    task = ray.remote(run_stage)
    sink = ray.remote(num_cpus=0)(EventSink).remote()
    running: dict = {}  # ObjectRef -> (session, stage)

    def submit_next(s: SessionState) -> None:
        for stage in options.stages:
            st = s.stages[stage]
            if st.status != "waiting":
                continue
            if not options.force and is_current(s.path, stage, options, device):
                st.status, st.reason = "current", "outputs complete and current"
                tell(s, stage)
                continue
            d = demands[stage]
            if not placeable(d, nodes):
                fail(s, why_unplaceable(d, nodes), stage, status="unplaceable")
                return
            ref = task.options(num_cpus=d.get("CPU", 0), num_gpus=d.get("GPU", 0), max_retries=options.max_retries,
                               retry_exceptions=False, name=f"{stage}:{s.name}").remote(
                str(s.path.resolve()), s.name, stage, options, device if stage == "train" else "cpu", sink)
            st.status = "queued"
            running[ref] = (s, stage)
            tell(s, stage)
            return
        if s.status == "waiting":
            s.status = "done"

    def on_task_event(ev: dict) -> None:
        s = by_name[ev["session"]]
        st = s.stages[ev["stage"]]
        if ev["status"] == "running":
            if st.status == "running":  # a second start: the worker (or node) of the first one died
                tell(s, ev["stage"], status="retry", detail=f"attempt {st.attempts} died on {st.node}")
            st.status, st.attempts, st.started = "running", st.attempts + 1, time.perf_counter()
            st.node, st.ip, st.pid = labels.get(ev["node_id"], ev["host"]), ev["ip"], ev["pid"]
            st.runs.append({k: ev[k] for k in ("node_id", "host", "ip", "pid")})
            tell(s, ev["stage"], detail=f"pid {ev['pid']}")
        elif st.status == "running":
            tell(s, ev["stage"], status="progress", detail=ev["detail"],
                 seconds=time.perf_counter() - (st.started or time.perf_counter()))

    for s in states:
        if s.status == "waiting":
            submit_next(s)
    last_check = time.monotonic()
    while running:
        done, _ = ray.wait(list(running), num_returns=1, timeout=0.2)
        for ev in ray.get(sink.take.remote()):
            on_task_event(ev)
        for ref in done:
            s, stage = running.pop(ref)
            st = s.stages[stage]
            try:
                run = ray.get(ref)
            except Exception as e:  # the stage's own error, or its worker died max_retries + 1 times
                reason, refused = _crash_reason(e)
                s.consent_refused |= refused
                fail(s, reason, stage)
                continue
            st.status, st.seconds, st.reason = "done", run["seconds"], ""
            st.node, st.ip, st.pid = labels.get(run["node_id"], run["host"]), run["ip"], run["pid"]
            st.attempts = max(st.attempts, 1)
            tell(s, stage, seconds=st.seconds)
            submit_next(s)
        if running and time.monotonic() - last_check > PLACEMENT_CHECK_S:
            last_check = time.monotonic()
            nodes = cluster_nodes()  # a node may have died: work that no node left can take is reported now
            labels.update(node_labels(nodes))
            for ref, (s, stage) in list(running.items()):
                if s.stages[stage].status == "queued" and not placeable(demands[stage], nodes):
                    ray.cancel(ref, force=False)
                    running.pop(ref)
                    fail(s, why_unplaceable(demands[stage], nodes), stage, status="unplaceable")
    seconds = time.perf_counter() - t0
    report = write_report(options, states, conn, started, seconds, device, demands)
    return BatchResult(report, states, seconds, cluster_nodes())


def write_report(options: BatchOptions, states: list[SessionState], conn, started: dt.datetime, seconds: float,
                 device: str, demands: dict) -> Path:
    doc = {
        "schema": {"name": REPORT_SCHEMA, "version": SCHEMA_VERSION},
        "started": started.isoformat(timespec="seconds"), "seconds": round(seconds, 3),
        "ray": {"address": conn.address, "embedded": conn.embedded,
                "nodes": [{"node_id": n.node_id, "host": n.hostname, "ip": n.ip, "head": n.head,
                           "resources": n.resources} for n in conn.nodes]},
        "stages": list(options.stages), "train_device": device, "resources": demands,
        "sessions": [{
            "session": str(s.path), "name": s.name, "subject": s.subject or None, "status": s.status,
            "reason": s.reason or None,
            "stages": {name: {"status": st.status, "seconds": st.seconds, "attempts": st.attempts,
                              "node": st.node or None, "ip": st.ip or None, "pid": st.pid,
                              "reason": st.reason or None, "runs": st.runs}
                       for name, st in s.stages.items()},
            **({"bundle": str(bundle_path(options, s.name))} if "bundle" in s.stages
               and s.stages["bundle"].status in ("done", "current") else {}),
        } for s in states],
        "totals": {status: sum(1 for s in states if s.status == status) for status in ("done", "failed")},
    }
    path = options.out / "report.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, doc)
    return path


__all__ = ["BatchError", "BatchEvent", "BatchFailed", "BatchOptions", "BatchResult", "STAGES", "expand_sessions",
           "is_current", "run_batch", "run_stage"]
