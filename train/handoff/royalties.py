"""Royalties: for one month, the images each licence made of each model, times its rate.

:func:`royalties` reads the studio's usage ledger once, verifying it as it
goes (:func:`train.handoff.ledger.verify_ledger`); a ledger that fails
verification (or whose last line is torn) gives no statement. The images
counted are the entries whose UTC time falls in the month (``2026-12``: from
2026-12-01T00:00Z, inclusive, to 2027-01-01T00:00Z, exclusive), grouped per
model (the pseudonymous subject id) and per licence (and rate). A licence's
amount is ``images x rate``, exact (:class:`decimal.Decimal`, never rounded:
rounding to a payable sum is the invoice's); totals are per currency, and
amounts in different currencies are never added together. Licences the
studio holds (``$TWINSTUDIO_HOME/licences``) that were in force during the
month but made no image are listed with 0 images, so an agency sees every
licence of its model.

Written to the output folder (default ``$TWINSTUDIO_HOME/royalties/<period>``):

- ``royalties-<period>.csv``: one row per model and licence (and rate);
- ``statement-<period>-<subject>.html``: one page per model for its agency:
  self-contained (inline CSS, no scripts, images or links to fetch),
  printable on one A4 page, naming the period, the model and agency, each
  licence (licensee, purposes, markets, images x rate = amount), the totals per
  currency, and the ledger's verification (entries, chain head seq and sha256,
  the signing key), which ``twinstudio ledger verify --expect-head`` checks later.
The files hold no wall-clock time: the same ledger gives the same bytes.
"""

from __future__ import annotations

import calendar
import collections
import csv
import datetime as dt
import html
import io
import re
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

from rigs.errors import EXIT_INPUT, EXIT_TAMPERED, TwinstudioError
from rigs.fileio import atomic_write_bytes
from train.handoff.ledger import SAMPLE_EVERY, LedgerReport, default_ledger_path, verify_ledger
from train.handoff.licence import Rate, SignedLicence, held_licences, parse_rate, store_dir

CSV_COLUMNS = ("period", "subject", "agency", "licence", "licensee", "purposes", "markets", "licence_valid_from",
               "licence_valid_until", "images", "rate_per_image", "currency", "amount")


class RoyaltyError(TwinstudioError):
    """Royalties cannot be computed from this input (exit code 2): a bad period, no ledger."""

    exit_code = EXIT_INPUT


class LedgerNotVerified(RoyaltyError):
    """The ledger fails verification: no statement is made from it (exit code 3)."""

    exit_code = EXIT_TAMPERED


@dataclass(frozen=True)
class Period:
    """A calendar month in UTC."""

    year: int
    month: int

    @classmethod
    def parse(cls, text: str) -> Period:
        m = re.fullmatch(r"(\d{4})-(0[1-9]|1[0-2])", text or "")
        if m is None:
            raise RoyaltyError(f"period {text!r} is not a month YYYY-MM (e.g. 2026-12)", period=text)
        return cls(int(m[1]), int(m[2]))

    def __str__(self) -> str:
        return f"{self.year:04d}-{self.month:02d}"

    @property
    def first_day(self) -> dt.date:
        return dt.date(self.year, self.month, 1)

    @property
    def last_day(self) -> dt.date:
        return dt.date(self.year, self.month, calendar.monthrange(self.year, self.month)[1])

    @property
    def end(self) -> dt.datetime:
        """The first instant after the month (UTC)."""
        nxt = self.last_day + dt.timedelta(days=1)
        return dt.datetime(nxt.year, nxt.month, nxt.day, tzinfo=dt.timezone.utc)

    @property
    def name(self) -> str:
        return f"{calendar.month_name[self.month]} {self.year}"


@dataclass(frozen=True)
class RoyaltyLine:
    """One licence of one model in the period: images x rate = amount."""

    subject: str
    licence: str
    licensee: str
    rate: Rate
    images: int
    amount: Decimal  #: images x rate.amount, exact
    agency: str | None = None  #: from the licence file (None when it is not held)
    purposes: tuple[str, ...] = ()  #: the licence's (or, when it is not held, those the uses named)
    markets: tuple[str, ...] = ()
    valid_from: dt.date | None = None
    valid_until: dt.date | None = None
    held: bool = False  #: the studio holds the signed licence file

    @property
    def currency(self) -> str:
        return self.rate.currency


@dataclass
class ModelStatement:
    """What one model's licences made in the period."""

    subject: str
    agency: str | None
    lines: list[RoyaltyLine]
    totals: dict[str, Decimal]  #: per currency, never summed across currencies
    images: int
    html: Path | None = None


@dataclass
class RoyaltyReport:
    """What :func:`royalties` computed and wrote."""

    period: Period
    statements: list[ModelStatement]
    totals: dict[str, Decimal]  #: per currency, every model together
    images: int
    ledger: LedgerReport
    provisional: bool  #: the month had not ended when the statement was made
    csv: Path | None = None
    files: list[Path] = field(default_factory=list)


def _totals(lines: list[RoyaltyLine]) -> dict[str, Decimal]:
    out: dict[str, Decimal] = {}
    for ln in lines:
        out[ln.currency] = out.get(ln.currency, Decimal(0)) + ln.amount
    return dict(sorted(out.items()))


def royalties(ledger: Path | str | None = None, period: str = "", *, keys: object = None,
              store: Path | None = None, out: Path | str | None = None, now: dt.datetime | None = None,
              expect_head: tuple[int, str] | None = None, write: bool = True) -> RoyaltyReport:
    """Royalties of ``period`` (``YYYY-MM``, UTC) from the studio's ledger, per model and licence; writes the CSV
    and one HTML statement per model to ``out`` (default ``$TWINSTUDIO_HOME/royalties/<period>``) unless
    ``write`` is false. ``keys`` verify the ledger (default: the pinned trusted keys); ``store`` holds the
    licence files (default ``$TWINSTUDIO_HOME/licences``). Raises LedgerNotVerified (exit 3) when the ledger
    fails verification, RoyaltyError (exit 2) for a bad period or no ledger."""
    from train.handoff.ledger import LedgerError

    p = Period.parse(period)
    path = Path(ledger) if ledger is not None else default_ledger_path()
    prefix = f"{p}-"
    counts: collections.Counter[tuple[str, str, str, str]] = collections.Counter()
    used: dict[str, set[tuple[str, str]]] = collections.defaultdict(set)

    def on_entry(d: dict[str, Any]) -> None:
        t = d.get("time")
        if isinstance(t, str) and t.startswith(prefix):
            counts[(d["subject"], d["licence"], d["licensee"], d["rate"])] += 1
            used[d["licence"]].add((d["purpose"], d["market"]))

    try:
        rep = verify_ledger(path, keys, on_entry=on_entry, expect_head=expect_head)
    except LedgerError as e:
        raise RoyaltyError(f"no royalties for {p}: {e}", path=str(path)) from None
    if not rep.ok:
        shown = "; ".join(str(x) for x in rep.problems[:5])
        more = f" (and {rep.problem_count - 5} more)" if rep.problem_count > 5 else ""
        raise LedgerNotVerified(f"{path}: the ledger fails verification, so no statement is made for {p}: "
                                f"{shown}{more}; see 'twinstudio ledger verify'", path=str(path))

    licences = {s.licence.id: s for s in held_licences(store or store_dir())}
    lines: list[RoyaltyLine] = []
    for (subject, lid, licensee, rate_text), n in counts.items():
        lines.append(_line(subject, lid, licensee, parse_rate(rate_text), n, licences.get(lid), used[lid]))
    counted = {ln.licence for ln in lines}
    for lid, s in licences.items():  # licences in force in the month that made nothing: listed with 0 images
        lic = s.licence
        if lid not in counted and lic.valid_from <= p.last_day and lic.valid_until >= p.first_day:
            lines.append(_line(lic.subject_id, lid, lic.licensee, lic.rate, 0, s, set()))
    lines.sort(key=lambda ln: (ln.subject, ln.currency, ln.licensee, ln.licence, ln.rate.amount))

    statements = []
    for subject in sorted({ln.subject for ln in lines}):
        mine = [ln for ln in lines if ln.subject == subject]
        agencies = sorted({ln.agency for ln in mine if ln.agency})
        statements.append(ModelStatement(subject, ", ".join(agencies) or None, mine, _totals(mine),
                                         sum(ln.images for ln in mine)))
    now = now or dt.datetime.now(dt.timezone.utc)
    report = RoyaltyReport(p, statements, _totals(lines), sum(ln.images for ln in lines), rep,
                           provisional=now < p.end)
    if write:
        _write(report, Path(out) if out is not None else _default_out(p))
    return report


def _default_out(p: Period) -> Path:
    from capture.consent import studio_home

    return studio_home() / "royalties" / str(p)


def _line(subject: str, lid: str, licensee: str, rate: Rate, n: int, held: SignedLicence | None,
          uses: set[tuple[str, str]]) -> RoyaltyLine:
    if held is not None:
        lic = held.licence
        return RoyaltyLine(subject, lid, licensee, rate, n, rate.times(n), lic.agency, lic.purposes, lic.markets,
                           lic.valid_from, lic.valid_until, True)
    return RoyaltyLine(subject, lid, licensee, rate, n, rate.times(n),
                       purposes=tuple(sorted({u[0] for u in uses})), markets=tuple(sorted({u[1] for u in uses})))


# ----------------------------------------------------------------------------- files


def csv_text(report: RoyaltyReport) -> str:
    """The CSV: a header (:data:`CSV_COLUMNS`), then one row per model and licence; amounts as exact decimals."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    for st in report.statements:
        for ln in st.lines:
            w.writerow([str(report.period), ln.subject, ln.agency or "", ln.licence, ln.licensee,
                        ";".join(ln.purposes), ";".join(ln.markets), ln.valid_from or "", ln.valid_until or "",
                        ln.images, format(ln.rate.amount, "f"), ln.currency, format(ln.amount, "f")])
    return buf.getvalue()


def _write(report: RoyaltyReport, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    p = report.period
    report.csv = out / f"royalties-{p}.csv"
    atomic_write_bytes(report.csv, csv_text(report).encode("utf-8"))
    report.files = [report.csv]
    for st in report.statements:
        st.html = out / f"statement-{p}-{st.subject}.html"
        atomic_write_bytes(st.html, statement_html(report, st).encode("utf-8"))
        report.files.append(st.html)


def _money(amount: Decimal, currency: str) -> str:
    return f"{format(amount, 'f')} {currency}"


_CSS = """
@page { size: A4; margin: 16mm; }
* { box-sizing: border-box; }
body { font: 10pt/1.4 -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; color: #111; margin: 0 auto;
       max-width: 178mm; padding: 8mm 0; }
h1 { font-size: 16pt; margin: 0 0 2mm; }
.sub { color: #444; margin: 0 0 6mm; }
dl { display: grid; grid-template-columns: 38mm 1fr; gap: 1mm 4mm; margin: 0 0 6mm; }
dt { font-weight: 600; } dd { margin: 0; }
table { width: 100%; border-collapse: collapse; margin: 0 0 5mm; font-size: 9pt; }
th, td { border-bottom: 0.3mm solid #bbb; padding: 1.5mm 1.5mm; text-align: left; vertical-align: top; }
th { background: #eee; } td.num, th.num { text-align: right; white-space: nowrap; }
tfoot td { font-weight: 700; border-bottom: none; }
.mono { font-family: "DejaVu Sans Mono", Menlo, Consolas, monospace; font-size: 8pt; word-break: break-all; }
.note { font-size: 8.5pt; color: #333; margin: 2mm 0; }
.flag { border: 0.4mm solid #b60; padding: 2mm; margin: 0 0 5mm; }
@media print { body { padding: 0; } }
"""


def statement_html(report: RoyaltyReport, st: ModelStatement) -> str:
    """One model's statement for its agency: a self-contained, printable one-page HTML document."""
    e = html.escape
    p, led = report.period, report.ledger
    rows = []
    for ln in st.lines:
        term = f"{ln.valid_from} to {ln.valid_until}" if ln.valid_from else "licence file not held"
        rows.append(
            "<tr>"
            f"<td class=mono>{e(ln.licence)}</td><td>{e(ln.licensee)}</td>"
            f"<td>{e(', '.join(ln.purposes) or '-')}</td><td>{e(', '.join(ln.markets) or '-')}</td>"
            f"<td>{e(term)}</td>"
            f"<td class=num>{ln.images}</td><td class=num>&times;</td>"
            f"<td class=num>{e(_money(ln.rate.amount, ln.currency))}</td><td class=num>=</td>"
            f"<td class=num>{e(_money(ln.amount, ln.currency))}</td>"
            "</tr>")
    totals = "".join(
        f"<tr><td colspan=5>Total {e(cur)}</td>"
        f"<td class=num>{sum(ln.images for ln in st.lines if ln.currency == cur)}</td><td colspan=3></td>"
        f"<td class=num>{e(_money(amount, cur))}</td></tr>" for cur, amount in st.totals.items())
    signers = ", ".join(sorted(led.signers)) or "-"
    checked = "every entry's signature" if led.full else (f"the signatures of the last entry and of every "
                                                          f"{SAMPLE_EVERY}th")
    provisional = ("<p class=flag>Provisional: the period had not ended when this statement was made; images "
                   "recorded later in the month are not included.</p>" if report.provisional else "")
    several = ("<p class=note>Amounts in different currencies are listed and totalled separately; they are never "
               "added together.</p>" if len(st.totals) > 1 else "")
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Royalty statement {e(str(p))} - {e(st.subject)}</title>
<style>{_CSS}</style>
</head>
<body>
<h1>Royalty statement: {e(p.name)}</h1>
<p class=sub>Images of the model's digital twin made under licence, and what they earn.</p>
{provisional}<dl>
<dt>Model</dt><dd>{e(st.subject)} (pseudonymous id)</dd>
<dt>Agency</dt><dd>{e(st.agency or "not named (no licence file held)")}</dd>
<dt>Period</dt><dd>{p.first_day} 00:00 UTC to {p.last_day} 24:00 UTC</dd>
<dt>Images</dt><dd>{st.images}</dd>
</dl>
<table>
<thead><tr><th>Licence</th><th>Licensee</th><th>Purposes</th><th>Markets</th><th>Licence term</th>
<th class=num>Images</th><th></th><th class=num>Rate per image</th><th></th><th class=num>Amount</th></tr></thead>
<tbody>
{chr(10).join(rows)}
</tbody>
<tfoot>
{totals}
</tfoot>
</table>
{several}<p class=note>Each amount is images &times; rate, exactly; rounding to a payable sum is the invoice's.
An image is counted in the month of the UTC time it was recorded in the studio's usage ledger.</p>
<p class=note><b>Ledger:</b> verified, {led.entries} entries in {e(led.path.name)}: every entry chained to the one
before (sha256), {checked} checked, signed by studio key {e(signers)}.
Chain head: seq {led.head_seq}, sha256 <span class=mono>{e(led.head)}</span>.
To check later that these entries are still in the ledger:
<span class=mono>twinstudio ledger verify --expect-head {led.head_seq}:{e(led.head)}</span></p>
</body>
</html>
"""


__all__ = ["CSV_COLUMNS", "LedgerNotVerified", "ModelStatement", "Period", "RoyaltyError", "RoyaltyLine",
           "RoyaltyReport", "csv_text", "royalties", "statement_html"]
