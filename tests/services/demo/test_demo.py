"""``signalbox demo``: the scripted scenario end to end, and its agents' domain logic."""

from __future__ import annotations

import io
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
from services.demo.scenario import APPLICATIONS, run_demo


def _port_closed(url: str) -> bool:
    host, port = url.removeprefix("nats://").rsplit(":", 1)
    with socket.socket() as sock:
        return sock.connect_ex((host, int(port))) != 0


async def test_run_demo_end_to_end(tmp_path: Path) -> None:
    out = io.StringIO()
    console = Console(file=out, width=160, color_system=None, force_terminal=False)

    code = await run_demo(console, tmp_path / "demo")

    text = out.getvalue()
    assert code == 0, text
    # (a) allowed calls and their results
    assert re.search(r"LN-1001 .*approved", text)
    assert re.search(r"LN-1003 .*declined", text)
    # (b) a customer question answered from the fee schedule
    assert "no fee for paying off your loan early" in text
    assert "source: Fee Schedule" in text
    # Step 2: capability discovery finds the only pii-tagged agent.
    assert re.search(r"pii-tagged\s+capability:\s+credit-check\s+1\.0\.0", text)
    # (c) the denial and its reason
    assert "CallDenied" in text
    assert "no rule allows customer-support to call credit-check.score" in text
    assert re.search(r"policy ids\s+default-deny", text)
    # (d) an unknown target
    assert "mortgage-pricing is not a registered agent" in text
    # (e) the audit trail: every event chained and shown
    match = re.search(r"SB_AUDIT: (\d+) records", text)
    # 22 from the scenario, plus an enrollment (admin) and a connection (auth) per
    # agent, plus the impostor's connection (auth), plus the policy examples: the
    # finance denial, two EU model decisions, and the approval (needs_approval,
    # the operator's approve, the approved decision, the call's outcome).
    assert match is not None and int(match.group(1)) == 38
    # (g) the three shipped policy examples
    for policy_id in ("finance-calls-on", "eu-residency-mod", "large-invocation"):
        assert policy_id in text
    assert "needs approval" in text and "approved" in text
    # (f) the server refuses the impostor, four times
    assert text.count("permissions violation") >= 4
    assert "allowed?!" not in text
    assert re.search(r"decision\s+customer-support\s+.*deny → credit-check\.score", text)
    assert re.search(r"call\s+loan-origination\s+.*ok fraud-detection\.check", text)
    assert re.search(r"rejected\s+loan-origination\s+.*unknown_target", text)
    assert "linked to the one before it" in text
    # (h) step 10: the replay summary and the approved call's trace tree, from the trail
    # (reading only: no record added).
    assert re.search(r"Audit replay of this\s+run: \d+ records", text)
    # (i) step 9: the runaway agent stopped by its breaker, and the cost report by team
    assert re.search(r"agent\.fraud-detection is open \(rate_anomaly\)", text)
    assert re.search(r"its callers now fail fast \(\d+ refused at once", text)
    assert "Cost by team" in text and re.search(r"\n\s*risk\s+\d+", text)
    # (j) step 10: the canary rolled back on its own, status before and after
    assert "recommender: 1.0.0=80%, 2.0.0=20%" in text
    assert "recommender: 1.0.0=100%" in text
    assert re.search(r"auto-rollback of 2\.0\.0: error rate [\d.]+%", text)
    assert re.search(r"\d+ traces; decisions: allow \d+, deny \d+, needs_approval 1", text)
    tree = text[text.index("Step 12") :]
    assert re.search(
        r"└── decision loan-origination needs_approval → fraud-detection\.check", tree
    )
    assert "approved by bootstrap:demo" in tree
    assert re.search(r"└── delivery ok fraud-detection\.check \d+\.\d ms", tree)
    assert "Demo complete" in text
    # The embedded server is gone with the demo.
    [url] = set(re.findall(r"nats://127\.0\.0\.1:\d+", text))
    assert _port_closed(url)
    # The shipped Cedar policies decided, and the demo showed them.
    assert re.search(r"loan-may-score\W+permit\W+lending-demo\.cedar", text)


def test_signalbox_demo_command() -> None:
    exe = Path(sysconfig.get_path("scripts")) / "signalbox"
    cmd = (
        [str(exe), "demo"]
        if exe.exists()
        else [sys.executable, "-c", "from services.cli.main import app; app()", "demo"]
    )
    result = subprocess.run(
        cmd, capture_output=True, text=True, timeout=60, env={**os.environ, "COLUMNS": "120"}
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Demo complete" in result.stdout
    assert "Traceback" not in result.stderr
    [url] = set(re.findall(r"nats://127\.0\.0\.1:\d+", result.stdout))
    assert _port_closed(url)


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
