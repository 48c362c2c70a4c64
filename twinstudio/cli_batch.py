"""``twinstudio batch`` and ``twinstudio cluster``: many sessions on Ray, and the cluster they run on.

The dashboard folds :class:`twinstudio.batch.BatchEvent` (what the stage tasks
report: started on which node, progress, retried, done, failed) into a table
of every session and stage; ``--plain`` prints one line per change instead.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

from twinstudio.batch import STAGES, BatchEvent
from twinstudio.cli import _console, console

cluster_app = typer.Typer(help="The Ray cluster that batches and multi-host rigs run on.", no_args_is_help=True)

#: how a stage's status looks in the dashboard and the summary
STYLE = {"waiting": "dim", "queued": "cyan", "running": "bold yellow", "retry": "bold magenta", "done": "green",
         "current": "green", "failed": "bold red", "unplaceable": "bold red", "blocked": "dim red"}


class BatchBoard:
    """Plain state of a running batch, folded from events (no rich, no I/O)."""

    def __init__(self, stages: tuple[str, ...], sessions: list[str] = ()) -> None:
        self.stages = stages
        self.cells: dict[str, dict[str, dict]] = {name: {} for name in sessions}
        self.t0 = time.perf_counter()

    def fold(self, ev: BatchEvent) -> None:
        row = self.cells.setdefault(ev.session, {})
        cell = row.setdefault(ev.stage, {"status": "waiting", "detail": "", "node": "", "attempt": 0, "seconds": 0.0})
        if ev.status == "progress":
            cell["detail"], cell["seconds"] = ev.detail, ev.seconds
            return
        cell.update(status="running" if ev.status == "retry" else ev.status, node=ev.node or cell["node"],
                    attempt=ev.attempt, detail=ev.detail if ev.status not in ("running", "queued") else "",
                    seconds=ev.seconds)
        if ev.status == "retry":
            cell["detail"] = ev.detail

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for row in self.cells.values():
            for cell in row.values():
                out[cell["status"]] = out.get(cell["status"], 0) + 1
        return out


def status_text(status: str, node: str | None, attempts: int, took: str) -> str:
    """A stage's cell: its status in colour, where it ran, the try, how long it took (rich markup)."""
    text = f"[{STYLE.get(status, '')}]{status}[/]"
    if node:
        text += f" on {escape(node)}"
    if attempts > 1:
        text += f" (try {attempts})"
    return text + (f" {took}" if took else "")


def render_board(board: BatchBoard, title: str) -> Table:
    table = Table(title=title, caption=", ".join(f"{n} {s}" for s, n in sorted(board.counts().items()))
                  + f" — {time.perf_counter() - board.t0:.0f} s", expand=False)
    table.add_column("session", no_wrap=True)
    for stage in board.stages:
        table.add_column(stage)
    for name, row in board.cells.items():
        cells = []
        for stage in board.stages:
            c = row.get(stage, {"status": "waiting", "detail": "", "node": "", "attempt": 0, "seconds": 0.0})
            text = status_text(c["status"], c["node"], c["attempt"], f"{c['seconds']:.0f} s" if c["seconds"] else "")
            if c["detail"] and c["status"] in ("running", "failed", "unplaceable", "retry"):
                text += f"\n[dim]{escape(c['detail'][:90])}[/]"
            cells.append(text)
        table.add_row(escape(name), *cells)
    return table


class BatchDashboard:
    """on_event consumer of a batch: a live table, or one log line per status change (``--plain``)."""

    def __init__(self, plain: bool, stages: tuple[str, ...], title: str, sessions: list[str] = ()) -> None:
        self.con = _console()
        self.plain = plain or not self.con.is_terminal
        self.board = BatchBoard(stages, sessions)
        self.title = title

    def __enter__(self):
        if not self.plain:
            from rich.live import Live

            self.live = Live(render_board(self.board, self.title), console=self.con, refresh_per_second=4)
            self.live.start()
        return self.on_event

    def on_event(self, ev: BatchEvent) -> None:
        self.board.fold(ev)
        if self.plain:
            if ev.status != "progress":
                where = f" on {ev.node}" if ev.node and ev.status in ("running", "done", "retry") else ""
                took = f" in {ev.seconds:.1f} s" if ev.status == "done" and ev.seconds else ""
                why = f": {ev.detail}" if ev.detail and ev.status not in ("running", "queued") else ""
                self.con.print(f"{ev.session} {ev.stage}: {ev.status}{where}{took}{why}", markup=False,
                               highlight=False)
        else:
            self.live.update(render_board(self.board, self.title))

    def __exit__(self, *exc) -> None:
        if not self.plain:
            self.live.stop()


def print_batch_summary(report: dict, path: Path) -> None:
    table = Table(title=f"Batch: {len(report['sessions'])} session(s) in {report['seconds']:.0f} s on "
                        f"{'an embedded Ray' if report['ray']['embedded'] else report['ray']['address']} "
                        f"({len(report['ray']['nodes'])} node(s)), training on {report['train_device']}")
    table.add_column("session", no_wrap=True)
    table.add_column("subject")
    table.add_column("status")
    for stage in report["stages"]:
        table.add_column(stage)
    table.add_column("reason")
    for s in report["sessions"]:
        cells = []
        for stage in report["stages"]:
            st = s["stages"][stage]
            took = f"{st['seconds']:.1f} s" if st["seconds"] is not None and st["status"] == "done" else ""
            cells.append(status_text(st["status"], st["node"], st["attempts"], took))
        table.add_row(escape(s["name"]), escape(s["subject"] or "-"),
                      f"[{STYLE.get(s['status'], '')}]{s['status']}[/]", *cells, escape(s["reason"] or ""))
    console.print(table)
    console.print(f"report: {path}", markup=False)


def batch_cmd(
    sessions: Annotated[list[str], typer.Argument(help="Session folders, or glob patterns in quotes ('sessions/*').")],
    address: Annotated[Optional[str], typer.Option(help="Ray cluster address (HOST:PORT); default: an embedded "
                                                        "Ray on this machine.")] = None,
    stages: Annotated[str, typer.Option(help="Comma-separated stages, in order: reconstruct, train, bundle.")]
    = ",".join(STAGES),
    out: Annotated[Path, typer.Option("--out", help="Folder for report.json and bundles/.")] = Path("out/batch"),
    key: Annotated[Optional[Path], typer.Option(help="Studio signing key for the bundles (default: the studio's).")]
    = None,
    train_device: Annotated[str, typer.Option(help="auto (a GPU per training where the cluster has GPUs, else the "
                                                   "CPU preview), gpu or cpu.")] = "auto",
    iterations: Annotated[Optional[int], typer.Option(help="Training steps (default: the runner's: 30000 on a GPU, "
                                                          "2000 on the CPU).")] = None,
    cameras_from: Annotated[str, typer.Option(help="Reconstruction's cameras: auto, calibration, sfm or existing.")]
    = "auto",
    recon_stages: Annotated[str, typer.Option(help="Comma-separated stages of the reconstruction: cameras, masks, "
                                                   "mesh, motion.")] = "cameras,masks,mesh,motion",
    recon_cpus: Annotated[float, typer.Option(help="CPUs each reconstruction asks for.")] = 1.0,
    train_cpus: Annotated[Optional[float], typer.Option(help="CPUs a CPU-preview training asks for (default: all "
                                                             "of the largest node's).")] = None,
    max_retries: Annotated[int, typer.Option(help="Times a stage is run again after its worker or node died.")] = 2,
    force: Annotated[bool, typer.Option("--force", help="Run every stage, even where its outputs are current.")]
    = False,
    plain: Annotated[bool, typer.Option("--plain", help="Log lines instead of the live dashboard.")] = False,
) -> None:
    """Reconstruct, train and bundle many sessions on Ray, each session on its own.

    Consent is checked for every session before anything runs. Each stage is a
    Ray task asking for what it needs (reconstruction: CPUs; training: a GPU
    where the cluster has one, else the CPU preview; bundling: a CPU); work no
    node can take is reported at once. A stage whose worker or node dies is
    retried; a stage that fails on its input is not. Stages whose outputs are
    complete and current are not run again, so a batch re-run after a crash
    picks up where it stopped. Writes OUT/report.json and OUT/bundles/<session>.tar.
    Exit codes: 0 all done, 7 some session failed (4 if every failure was consent).
    """
    import json

    from reconstruct.pipeline import ReconstructOptions
    from train.runner import TrainOptions
    from twinstudio.batch import BatchFailed, BatchOptions, expand_sessions, run_batch, session_names

    paths = expand_sessions(sessions)
    names = tuple(s.strip() for s in stages.split(",") if s.strip())
    from reconstruct.pipeline import STAGES as RECON_STAGES

    recon = tuple(s.strip() for s in recon_stages.split(",") if s.strip())
    bad = [s for s in recon if s not in RECON_STAGES]
    if bad or not recon:
        raise typer.BadParameter(f"unknown reconstruction stage(s) {', '.join(bad) or '(none)'}; use "
                                 f"{', '.join(RECON_STAGES)}", param_hint="--recon-stages")
    options = BatchOptions(stages=names, reconstruct=ReconstructOptions(stages=recon, cameras_from=cameras_from),
                           train=TrainOptions(iterations=iterations), train_device=train_device, out=out, key=key,
                           recon_cpus=recon_cpus, train_cpus=train_cpus, max_retries=max_retries, force=force)
    title = f"batch of {len(paths)} session(s): {', '.join(options.stages)}"
    with BatchDashboard(plain, options.stages, title, session_names(paths)) as on_event:
        result = run_batch(paths, options, on_event=on_event, address=address)
    report = json.loads(result.report.read_text())
    print_batch_summary(report, result.report)
    failed = result.failed
    if failed:
        raise BatchFailed(failed, result.report,
                          consent_only=all(s.consent_refused for s in result.sessions if s.status == "failed"))


@cluster_app.command("status")
def cluster_status(
    address: Annotated[Optional[str], typer.Option(help="Ray cluster address (HOST:PORT); default: an embedded "
                                                        "Ray on this machine.")] = None,
) -> None:
    """Show the cluster's alive nodes: CPUs, GPUs and the capture hosts each stands for."""
    from twinstudio.cluster import connect

    with connect(address) as conn:
        table = Table(title=f"Ray at {conn.address}: {len(conn.nodes)} node(s)")
        for col in ("node", "ip", "CPU", "GPU", "capture hosts", "head"):
            table.add_column(col)
        for n in conn.nodes:
            table.add_row(escape(n.hostname), n.ip, f"{n.resources.get('CPU', 0):g}", f"{n.resources.get('GPU', 0):g}",
                          ", ".join(n.hosts) or "-", "yes" if n.head else "")
        console.print(table)


@cluster_app.command("node-command")
def cluster_node_command(
    head: Annotated[bool, typer.Option("--head", help="The command for the head node.")] = False,
    address: Annotated[Optional[str], typer.Option(help="The head's address (HOST:6379), for other nodes.")] = None,
    host: Annotated[Optional[str], typer.Option(help="Capture host this node stands for (the rig's [[hosts]] "
                                                     "name).")] = None,
    ip: Annotated[Optional[str], typer.Option(help="This node's address on the studio network.")] = None,
    cpus: Annotated[Optional[int], typer.Option(help="CPUs to offer (default: all).")] = None,
    gpus: Annotated[Optional[int], typer.Option(help="GPUs to offer (default: all).")] = None,
) -> None:
    """Print the 'ray start' line for one node, with the settings that keep Ray from calling out."""
    from twinstudio.cluster import node_command

    if not head and not address:
        raise typer.BadParameter("give --head, or --address of the head for another node", param_hint="--address")
    console.print(node_command(head=head, address=address, host=host, cpus=cpus, gpus=gpus, ip=ip), markup=False,
                  highlight=False, soft_wrap=True)
