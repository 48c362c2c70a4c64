"""Royalty statements (issue 17, item 5): images per licence x rate, per model, from a verified ledger.

The arithmetic is checked with Decimals against figures worked out by hand:
two models, licences in two currencies (one with a sub-cent rate), images on
both sides of the month's boundaries, a licence held but unused, one whose
file is not held. The CSV and the HTML statement carry those figures; a
ledger that fails verification gives no statement.
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
from decimal import Decimal

import pytest

from tests.handoff.test_ledger import flat, keys, licence, twinstudio, write  # noqa: F401 - keys is a fixture
from train.handoff.integrity import load_private_key
from train.handoff.ledger import Ledger
from train.handoff.licence import sign_licence, store_licence
from train.handoff.royalties import (CSV_COLUMNS, LedgerNotVerified, Period, RoyaltyError, csv_text, royalties)

UTC = dt.timezone.utc


@pytest.fixture
def studio(tmp_path, keys):
    """A ledger with uses in November, December and January 2026/27, and the licences the studio holds."""
    key = keys[0]
    lic = {
        "A": licence(key, licensee="Brand X", rate="2.50 EUR/image"),
        "B": licence(key, licensee="Brand Y", rate="0.0125 USD/image"),  # not held: its file is not in the store
        "C": licence(key, licensee="Brand <Z> & Co", rate="3.10 EUR/image", subject="subj-042"),
        "D": licence(key, licensee="Brand W", rate="0.10 EUR/image", subject="subj-042"),
        "E": licence(key, licensee="Brand V", rate="9.99 GBP/image"),  # held, in force, made nothing
        "F": licence(key, licensee="Old Brand", rate="1 EUR/image", until=dt.date(2026, 11, 30)),  # ended before
    }
    private = load_private_key(key)
    for name in "ACDEF":
        store_licence(sign_licence(lic[name], private))
    path = tmp_path / "ledger" / "usage.jsonl"
    led = Ledger(path, key=key)
    n = 0

    def use(name, when, count):
        nonlocal n
        for _ in range(count):
            n += 1
            led.record(lic[name], image=f"IMG-{n:05d}", image_sha256=hashlib.sha256(b"%d" % n).hexdigest(), now=when)

    use("F", dt.datetime(2026, 11, 20, tzinfo=UTC), 4)
    use("A", dt.datetime(2026, 11, 30, 23, 59, 59, 999999, tzinfo=UTC), 3)  # November's last instant
    use("A", dt.datetime(2026, 12, 1, tzinfo=UTC), 2)  # December's first instant
    use("B", dt.datetime(2026, 12, 9, 10, tzinfo=UTC), 5)
    use("C", dt.datetime(2026, 12, 14, tzinfo=UTC), 4)
    use("A", dt.datetime(2026, 12, 24, tzinfo=UTC), 5)
    use("D", dt.datetime(2026, 12, 31, 23, 59, 59, 999999, tzinfo=UTC), 3)  # December's last instant
    use("A", dt.datetime(2027, 1, 1, tzinfo=UTC), 2)  # January's first instant
    return path, lic, keys[1]


def test_december_per_model_and_licence_in_each_currency(studio, tmp_path):
    path, lic, pub = studio
    r = royalties(path, "2026-12", keys=pub, out=tmp_path / "out", now=dt.datetime(2027, 1, 2, tzinfo=UTC))
    assert not r.provisional and r.ledger.ok and r.ledger.entries == 28
    by = {(s.subject, ln.licence): ln for s in r.statements for ln in s.lines}
    a, b, c, d, e = (by[(lic[x].subject_id, lic[x].id)] for x in "ABCDE")
    assert (a.images, a.amount, a.currency) == (7, Decimal("17.50"), "EUR")  # 2 + 5; not November's 3, January's 2
    assert (b.images, b.amount, b.currency) == (5, Decimal("0.0625"), "USD")  # exact: never rounded to 0.06
    assert (c.images, c.amount) == (4, Decimal("12.40"))
    assert (d.images, d.amount) == (3, Decimal("0.30"))  # 0.1 * 3 in floats is 0.30000000000000004
    assert (e.images, e.amount, e.currency) == (0, Decimal("0.00"), "GBP")  # in force, unused: still listed
    assert lic["F"].id not in {ln.licence for s in r.statements for ln in s.lines}  # ended in November
    s007, s042 = r.statements
    assert (s007.subject, s007.agency, s007.images) == ("subj-007", "Nova Models", 12)
    assert s007.totals == {"EUR": Decimal("17.50"), "GBP": Decimal("0.00"), "USD": Decimal("0.0625")}
    assert (s042.subject, s042.totals, s042.images) == ("subj-042", {"EUR": Decimal("12.70")}, 7)
    assert r.totals == {"EUR": Decimal("30.20"), "GBP": Decimal("0.00"), "USD": Decimal("0.0625")}
    assert (b.held, b.agency, b.purposes, b.markets) == (False, None, ("campaign",), ("EU",))  # from the uses
    assert (a.held, a.valid_from, a.valid_until) == (True, dt.date(2026, 1, 1), dt.date(2027, 12, 31))

    nov = royalties(path, "2026-11", keys=pub, write=False)
    assert {(ln.licensee, ln.images, ln.amount) for s in nov.statements for ln in s.lines} >= {
        ("Brand X", 3, Decimal("7.50")), ("Old Brand", 4, Decimal("4"))}
    jan = royalties(path, "2027-01", keys=pub, write=False, now=dt.datetime(2027, 1, 5, tzinfo=UTC))
    assert jan.provisional and [(ln.licensee, ln.images) for ln in jan.statements[0].lines if ln.images] == [
        ("Brand X", 2)]


def test_the_csv(studio, tmp_path):
    path, lic, pub = studio
    r = royalties(path, "2026-12", keys=pub, out=tmp_path / "out")
    assert r.csv == tmp_path / "out" / "royalties-2026-12.csv"
    with open(r.csv, newline="") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == CSV_COLUMNS
    assert len(rows) == 5 and {row["period"] for row in rows} == {"2026-12"}
    x = next(row for row in rows if row["licence"] == lic["A"].id)
    assert x == {"period": "2026-12", "subject": "subj-007", "agency": "Nova Models", "licence": lic["A"].id,
                 "licensee": "Brand X", "purposes": "campaign", "markets": "EU", "licence_valid_from": "2026-01-01",
                 "licence_valid_until": "2027-12-31", "images": "7", "rate_per_image": "2.50", "currency": "EUR",
                 "amount": "17.50"}
    for row in rows:  # every amount is images x rate, exactly, from the file alone
        assert Decimal(row["amount"]) == int(row["images"]) * Decimal(row["rate_per_image"])
    eur = sum(Decimal(row["amount"]) for row in rows if row["currency"] == "EUR")
    assert eur == r.totals["EUR"] == Decimal("30.20")
    assert csv_text(r) == r.csv.read_text()


def test_the_html_statement(studio, tmp_path):
    path, lic, pub = studio
    r = royalties(path, "2026-12", keys=pub, out=tmp_path / "out", now=dt.datetime(2027, 2, 1, tzinfo=UTC))
    s007, s042 = r.statements
    assert s007.html == tmp_path / "out" / "statement-2026-12-subj-007.html"
    page = s007.html.read_text()
    text = flat(page)
    for words in ("Royalty statement: December 2026", "subj-007 (pseudonymous id)", "Nova Models",
                  "2026-12-01 00:00 UTC to 2026-12-31 24:00 UTC", lic["A"].id, "Brand X", "Brand Y", "campaign",
                  "<td class=num>7</td><td class=num>&times;</td><td class=num>2.50 EUR</td><td class=num>=</td>"
                  "<td class=num>17.50 EUR</td>",
                  "0.0125 USD", "0.0625 USD", "Total EUR", "17.50 EUR", "Total USD", "licence file not held",
                  "never added together", f"seq {r.ledger.head_seq}", r.ledger.head, "verified, 28 entries",
                  f"--expect-head {r.ledger.head_seq}:{r.ledger.head}"):
        assert words in text, words
    assert "Provisional" not in page
    for external in ("http:", "https:", "<script", "src=", "<link", "@import", "url("):  # self-contained
        assert external not in page
    page42 = s042.html.read_text()
    assert "Brand &lt;Z&gt; &amp; Co" in page42 and "Brand <Z>" not in page42 and "12.70 EUR" in page42
    assert "Brand X" not in page42  # one model per statement
    again = royalties(path, "2026-12", keys=pub, out=tmp_path / "again", now=dt.datetime(2027, 2, 1, tzinfo=UTC))
    assert again.statements[0].html.read_bytes() == s007.html.read_bytes()  # no wall-clock time in the files
    live = royalties(path, "2026-12", keys=pub, out=tmp_path / "live", now=dt.datetime(2026, 12, 20, tzinfo=UTC))
    assert "Provisional: the period had not ended" in live.statements[0].html.read_text()


def test_a_ledger_that_fails_verification_gives_no_statement(studio, tmp_path):
    path, lic, pub = studio
    lines = path.read_bytes().split(b"\n")[:-1]
    x = list(lines)
    x[7] = x[7].replace(b'"licensee":"Brand X"', b'"licensee":"Brand Q"')
    write(path, x)
    out = tmp_path / "out"
    with pytest.raises(LedgerNotVerified) as e:
        royalties(path, "2026-12", keys=pub, out=out)
    assert e.value.exit_code == 3 and "line 8 (seq 8)" in str(e.value) and not out.exists()
    write(path, lines[:-1] + [lines[-1][:30]], tail=b"")
    with pytest.raises(LedgerNotVerified, match="incomplete"):
        royalties(path, "2026-12", keys=pub, out=out)
    write(path, lines)
    from train.handoff.integrity import init_keys, load_public_key

    other = load_public_key(init_keys(tmp_path / "other")[1])
    with pytest.raises(LedgerNotVerified, match="not a trusted key"):
        royalties(path, "2026-12", keys=other, out=out)
    head = royalties(path, "2026-12", keys=pub, write=False).ledger
    write(path, lines[:-1])
    with pytest.raises(LedgerNotVerified, match="head recorded earlier"):
        royalties(path, "2026-12", keys=pub, out=out, expect_head=(head.head_seq, head.head))


@pytest.mark.parametrize("period", ["2026-13", "2026-1", "Dec 2026", "2026-12-01", ""])
def test_a_period_is_a_month(period, tmp_path):
    with pytest.raises(RoyaltyError) as e:
        royalties(tmp_path / "none.jsonl", period)
    assert e.value.exit_code == 2 and repr(period) in str(e.value)


def test_period_bounds():
    p = Period.parse("2028-02")
    assert (p.first_day, p.last_day, p.end) == (dt.date(2028, 2, 1), dt.date(2028, 2, 29),
                                                dt.datetime(2028, 3, 1, tzinfo=UTC))
    assert Period.parse("2026-12").end == dt.datetime(2027, 1, 1, tzinfo=UTC)


def test_cli_royalties(studio, tmp_path):
    path, lic, pub = studio
    pubfile = tmp_path / "keys" / "studio.pub"
    out = tmp_path / "out"
    r = twinstudio("royalties", "--period", "2026-12", "--ledger", path, "--pubkey", pubfile, "--out", out)
    text = flat(r.stdout)
    assert r.returncode == 0, r.stdout + r.stderr
    for words in ("December 2026: model subj-007 (agency Nova Models)", "total EUR", "17.50 EUR", "0.0625 USD",
                  "12.70 EUR", "ledger verified: 28 entries", f"wrote {out / 'royalties-2026-12.csv'}",
                  f"wrote {out / 'statement-2026-12-subj-042.html'}"):
        assert words in text, words
    write(path, path.read_bytes().split(b"\n")[:-1][:-1] + [b"{}"])
    r = twinstudio("royalties", "--period", "2026-12", "--ledger", path, "--pubkey", pubfile, "--out", out)
    assert r.returncode == 3 and "fails verification" in flat(r.stderr)
    r = twinstudio("royalties", "--period", "12/2026", "--ledger", path, "--pubkey", pubfile)
    assert r.returncode == 2 and "is not a month YYYY-MM" in flat(r.stderr)
