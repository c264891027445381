"""``signalbox demo``: the scripted scenario end to end, and its agents' domain logic."""

from __future__ import annotations

import io
import logging
import os
import re
import socket
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from rich.console import Console

from services.demo.agents import CreditRequest as CR
from services.demo.agents import (
    FraudRequest,
    LoanApplication,
    decide_loan,
    fraud_report,
    score_credit,
)
from services.demo.docs import retrieve
from services.demo.logs import capture_logs
from services.demo.scenario import APPLICATIONS, run_demo


def _port_closed(url: str) -> bool:
    host, port = url.removeprefix("nats://").rsplit(":", 1)
    with socket.socket() as sock:
        return sock.connect_ex((host, int(port))) != 0


#: A line as Python's logging formats it (a timestamp, then a level), or a traceback:
#: none may land in the demo's output.
_LOG_LINE = re.compile(
    r"^\s*(\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d[,.]\d+\s+)?(DEBUG|INFO|WARNING|ERROR|CRITICAL)\b"
    r"|^Traceback \(most recent call last\)",
    re.MULTILINE,
)
#: The demo's promise on a terminal: the whole story at 80 columns, in fewer lines.
_MAX_LINES = 250


def _flat(text: str) -> str:
    """``text`` without panel borders and line breaks: prose wrapped at 80 columns reads whole."""
    return " ".join(re.sub(r"[│╭╮╰╯]", " ", text).split())


def _before_rows(text: str) -> dict[str, int]:
    """The calls of each version in the rollout's "before" table."""
    before = text[text.index("Before · ") : text.index("web-portal asked for")]
    rows = re.findall(r"^(\d+\.\d+\.\d+)\s+\d+%\s+\S+\s+([\d,]+)", before, re.MULTILINE)
    return {version: int(calls.replace(",", "")) for version, calls in rows}


async def test_run_demo_end_to_end(tmp_path: Path) -> None:
    out = io.StringIO()
    console = Console(file=out, width=80, color_system=None, force_terminal=False)

    code = await run_demo(console, tmp_path / "demo")

    text = out.getvalue()
    flat = _flat(text)
    assert code == 0, text
    # At 80 columns the story fits in fewer than 250 lines, no log line among them.
    assert len(text.splitlines()) < _MAX_LINES, text
    assert _LOG_LINE.search(text) is None, text
    # (a) allowed calls and their results
    assert re.search(r"LN-1001 .*approved", text)
    assert re.search(r"LN-1003 .*declined", text)
    # (b) a customer question answered from the fee schedule
    assert "no fee for paying off your loan early" in flat
    assert "source: Fee Schedule" in text
    # Step 2: capability discovery finds the only pii-tagged agent.
    assert re.search(r"pii-tagged\s+capability:\s+credit-check\s+1\.0\.0", text)
    assert re.search(r"credit-check\s+risk\s+risk-eng\s+score \[pii\]", text)
    # (c) the denial and its reason
    assert "CallDenied" in text
    assert "no rule allows customer-support to call credit-check.score" in flat
    assert re.search(r"policy ids\s+default-deny", text)
    # (d) an unknown target
    assert "mortgage-pricing is not a registered agent" in flat
    # (e) the audit trail: every event chained, the desk's refusals shown one per line
    match = re.search(r"SB_AUDIT: (\d+) records", text)
    # 22 from the scenario, plus an enrollment (admin) and a connection (auth) per
    # agent, plus the impostor's connection (auth), plus the policy examples: the
    # finance denial, two EU model decisions, and the approval (needs_approval,
    # the operator's approve, the approved decision, the call's outcome).
    assert match is not None and int(match.group(1)) == 38
    assert re.search(r"records 1-28 \(steps 2-4\): .*8 decision, 8 call", text)
    # (g) the three shipped policy examples
    for policy_id in (
        "finance-calls-only-pci-dss",
        "eu-residency-models-stay-in-eu",
        "large-invocation-needs-approval",
    ):
        assert policy_id in text
    assert "needs approval" in text and "approved" in text
    # (f) the server refuses the impostor, four times
    assert text.count("permissions violation") >= 4
    assert "allowed?!" not in text
    assert re.search(r"decision\s+customer-support\s+.*deny → credit-check\.score", text)
    assert re.search(r"call\s+loan-origination\s+.*ok fraud-detection\.check", text)
    assert re.search(r"rejected\s+loan-origination\s+.*unknown_target", text)
    assert "linked to the one before it" in flat
    # (h) step 12: the replay summary and the approved call's trace tree, from the trail
    # (reading only: no record added).
    assert re.search(r"Audit replay of this run: \d+ records", flat)
    # (i) step 9: the runaway reaches its team's budget (the refusal names it), then
    # its breaker trips on the rate of its refused retries; the cost report by team.
    assert "then the budget refused the rest (BudgetExceeded)" in flat
    assert "budget team.risk.day would be exceeded: limit $0.0075" in flat
    assert re.search(r"agent\.fraud-detection open \(rate_anomaly\)", text)
    assert re.search(r"Its callers now fail fast \(\d+ refused at once", flat)
    assert re.search(r"Cost by team .*: risk \$[\d.]+ for \d+ model calls", flat)
    # (j) step 10: the canary rolled back on its own, status before (with figures:
    # both versions had calls, fewer than 15 on 2.0.0) and after
    assert "recommender: 1.0.0=80%, 2.0.0=20%" in text
    before = _before_rows(text)
    assert set(before) == {"1.0.0", "2.0.0"} and all(before.values()), before
    assert before["2.0.0"] < 15
    assert "recommender: 1.0.0=100%" in text
    assert re.search(r"auto-rollback of 2\.0\.0: error rate [\d.]+%", flat)
    assert re.search(r"\d+ traces; decisions: allow \d+, deny \d+, needs_approval 1", flat)
    tree = text[text.index("Step 12") :]
    assert re.search(r"└── decision loan-origination needs_approval → fraud-detection\.check", tree)
    assert "approved by bootstrap:demo" in _flat(tree)
    assert re.search(r"└── delivery ok fraud-detection\.check \d+\.\d ms", tree)
    # The deliberate failures' log records went to the data dir's log, not the output.
    log = (tmp_path / "demo" / "demo.log").read_text()
    assert "rolled recommender 2.0.0 back" in log
    assert "rolled recommender" not in text
    assert re.search(r"\d+ warnings of the demo's deliberate failures \(.*canary roll-back 1", flat)
    assert "Demo complete" in text
    # The embedded server is gone with the demo.
    [url] = set(re.findall(r"nats://127\.0\.0\.1:\d+", text))
    assert _port_closed(url)
    # The shipped Cedar policies decided, and the demo showed them.
    assert re.search(r"permit\s+loan-may-score\s+loan-origination may ask credit-check", text)


def test_signalbox_demo_command() -> None:
    exe = Path(sysconfig.get_path("scripts")) / "signalbox"
    cmd = (
        [str(exe), "demo"]
        if exe.exists()
        else [sys.executable, "-c", "from services.cli.main import app; app()", "demo"]
    )
    result = subprocess.run(
        cmd, capture_output=True, text=True, timeout=60, env={**os.environ, "COLUMNS": "80"}
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Demo complete" in result.stdout
    # In a pipe at 80 columns: fewer than 250 lines, and no log line on either stream.
    assert len((result.stdout + result.stderr).splitlines()) < _MAX_LINES, result.stdout
    assert _LOG_LINE.search(result.stdout) is None, result.stdout
    assert _LOG_LINE.search(result.stderr) is None, result.stderr
    assert "Traceback" not in result.stderr
    [url] = set(re.findall(r"nats://127\.0\.0\.1:\d+", result.stdout))
    assert _port_closed(url)
    # The expected warnings are counted, and their file is named (and kept).
    logged = re.search(r"were logged to (\S+\.log)", _flat(result.stdout))
    assert logged is not None, result.stdout
    log = Path(logged.group(1))
    assert "rolled recommender 2.0.0 back" in log.read_text()
    log.unlink()


def test_demo_log_counts_expected_and_unexpected_records(tmp_path: Path) -> None:
    path = tmp_path / "demo.log"
    with capture_logs(path) as logged:
        assert logged.summary() is None and not path.exists()  # no record, no file
        logging.getLogger("services.policy.routes").warning(
            "policy: rolled %s %s back: error rate high", "recommender", "2.0.0"
        )
        logging.getLogger("services.cost.budget_desk").info("below WARNING: not kept")
        logging.getLogger("services.registry").error("registry: something nobody expected")
    logging.getLogger("services.registry").error("after the block: not captured")

    assert logged.expected == {"canary roll-back": 1}
    assert logged.unexpected == ["services.registry: registry: something nobody expected"]
    kept = path.read_text().splitlines()
    assert len(kept) == 2 and "WARNING" in kept[0] and "ERROR" in kept[1]
    summary = logged.summary()
    assert summary is not None
    assert "1 unexpected warning logged to" in summary.plain
    assert "registry: something nobody expected" in summary.plain
    assert "canary roll-back 1" in summary.plain


# -- the agents' logic, without a server -------------------------------------------------------


def test_support_answers_from_the_right_document() -> None:
    fee = retrieve("Is there a fee if I repay my loan early?")
    assert fee is not None and fee.document.id == "fee-schedule"
    privacy = retrieve("How long do you keep my credit report?")
    assert privacy is not None and privacy.document.id == "data-privacy"
    assert retrieve("xyzzy plugh") is None


@pytest.mark.parametrize(
    ("app", "outcome"),
    list(zip(APPLICATIONS, ["approved", "referred", "declined"], strict=True)),
)
def test_lending_policy(app: LoanApplication, outcome: str) -> None:
    credit = score_credit(
        CR(applicant_id=app.applicant_id, annual_income=app.annual_income,
           monthly_debt=app.monthly_debt)
    )  # fmt: skip
    fraud = fraud_report(
        FraudRequest(
            application_id=app.application_id,
            email=app.email,
            country=app.country,
            ip_country=app.ip_country,
            amount=app.amount,
            annual_income=app.annual_income,
        )
    )
    decision = decide_loan(app, credit, fraud)
    assert decision.outcome == outcome
    assert (decision.apr is not None) == (outcome == "approved")
    assert decision.reasons


def test_credit_score_falls_as_debt_rises() -> None:
    scores = [
        score_credit(CR(applicant_id="a", annual_income=60_000, monthly_debt=debt)).score
        for debt in (0, 500, 1_500, 3_000, 10_000)
    ]
    assert scores == sorted(scores, reverse=True)
    assert all(300 <= s <= 850 for s in scores)
