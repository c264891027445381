"""Demo steps of what the control plane refuses: a denied call, the shipped policy
examples, impostors stopped by the NATS server, an unknown target.

Called by :mod:`services.demo.scenario` with the lending desk's agents (and an
operator connection, for the approval). Each step returns whether what the
demo claims actually happened (the demo exits 1 otherwise).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

import nats
from nats.aio.client import Client
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from broker.errors import CallDenied, SignalboxError, UnknownTarget
from broker.subjects import Subjects, inbox_prefix
from schemas import ApprovalList, ApprovalRequest, DecideApproval, ListApprovals
from services.cli.client import admin_request
from services.demo.agents import (
    CreditRequest,
    DemoAgents,
    FraudReport,
    FraudRequest,
    LoanApplication,
)
from services.policy.decider import H_ESTIMATED_TOKENS

__all__ = ["show_denied", "show_impostor", "show_policy_examples", "show_unknown"]


async def show_denied(console: Console, agents: DemoAgents) -> bool:
    """customer-support asks credit-check for a credit score: denied, and why."""
    try:
        await agents.support.call(
            "credit-check",
            "score",
            CreditRequest(applicant_id="A-1815", annual_income=96_000, monthly_debt=650),
        )
    except CallDenied as err:
        grid = Table.grid(padding=(0, 2))
        grid.add_column(style="bold")
        grid.add_column()
        grid.add_row("error", f"{type(err).__name__} (code {err.code!r})")
        grid.add_row("message", escape(err.message))
        grid.add_row("policy ids", ", ".join(err.details.get("policy_ids") or ()))
        grid.add_row("policy version", str(err.details.get("policy_version", "")))
        console.print(Panel(grid, title="[bold red]Denied[/]", border_style="red"))
        return True
    console.print("[bold red]unexpected:[/] the call was allowed; the policies were not applied")
    return False


async def show_policy_examples(
    console: Console,
    agents: DemoAgents,
    nc: Client,
    subjects: Subjects,
    application: LoanApplication,
) -> bool:
    """The three example policies of ``policies/``, one outcome each, one row each
    (``application`` is the one screened in the call that needs approval)."""
    # Each example: its outcome, then who asked what and the policies that decided.
    table = Table.grid(padding=(0, 2))
    table.add_column(no_wrap=True)
    table.add_column()
    ok = True

    def add(outcome: str, style: str, asked: str, policy_ids: Iterable[str] = ()) -> None:
        ids = ", ".join(policy_ids)
        table.add_row(
            Text(outcome, style), Text.assemble(asked, (f"  {ids}" if ids else "", "dim"))
        )

    # 1. finance namespace: only pci-dss capabilities (credit-check.score is tagged pii).
    asked = "fraud-detection (finance) → credit-check.score [pii]"
    try:
        await agents.fraud.call("credit-check", "score", CreditRequest(
            applicant_id="A-1815", annual_income=96_000, monthly_debt=650))  # fmt: skip
        add("allowed?!", "bold red", asked)
        ok = False
    except CallDenied as err:
        add("denied", "red", asked, err.details.get("policy_ids") or ())

    # 2. EU data residency: model endpoints in the EU only.
    for region in ("us-east-1", "eu-west-1"):
        decision = await agents.support.authorize(
            "use_model", "gpt-4o", provider="openai", region=region, estimated_tokens=800
        )
        expected = "deny" if region.startswith("us") else "allow"
        ok = ok and decision.effect == expected
        style = "green" if decision.effect == "allow" else "red"
        add(
            decision.effect, style, f"customer-support (EU) → gpt-4o in {region}",
            decision.policy_ids,
        )  # fmt: skip

    # 3. Over 10,000 estimated tokens: parked until an operator approves.
    app = application
    parked = asyncio.ensure_future(
        agents.loans.call(
            "fraud-detection",
            "check",
            FraudRequest(
                application_id=app.application_id, email=app.email, country=app.country,
                ip_country=app.ip_country, amount=app.amount, annual_income=app.annual_income,
            ),
            returns=FraudReport,
            timeout=10.0,
            headers={H_ESTIMATED_TOKENS: "24000"},
        )
    )  # fmt: skip
    pending: tuple[ApprovalRequest, ...] = ()
    for _ in range(200):
        listed = await admin_request(
            nc, subjects, "list", ListApprovals(), ApprovalList, service="approvals"
        )
        pending = tuple(a for a in listed.approvals if a.caller == "loan-origination")
        if pending or parked.done():
            break
        await asyncio.sleep(0.02)
    asked = "loan-origination → fraud-detection.check, ~24,000 tokens"
    if not pending:
        parked.cancel()
        add("not parked?!", "bold red", asked)
        console.print(table)
        return False
    request = pending[0]
    add("needs approval", "yellow", f"{asked} (request {request.id[:8]}…)", request.policy_ids)
    await admin_request(
        nc, subjects, "approve",
        DecideApproval(id=request.id, reason="demo: checked by a human", requested_by="demo"),
        ApprovalRequest, service="approvals",
    )  # fmt: skip
    report = await parked
    add(
        "approved", "green",
        f"the operator (demo) approves {request.id[:8]}…: the call goes through (fraud risk "
        f"{report.risk:.2f})",
    )  # fmt: skip
    console.print(table)
    return ok


async def show_impostor(console: Console, url: str, credential: str) -> bool:
    """Try what customer-support's credential must not allow; show the server's refusals."""
    refusals: list[str] = []
    got_one = asyncio.Event()

    async def on_error(exc: Exception) -> None:
        if "permissions violation" in str(exc).lower():
            refusals.append(str(exc).removeprefix("nats: "))
            got_one.set()

    nc = await nats.connect(
        url,
        token=credential,
        inbox_prefix=inbox_prefix("customer-support"),
        error_cb=on_error,
        allow_reconnect=False,
    )
    attempts = [
        ("call credit-check.score as loan-origination",
         nc.publish("sb.out.loan-origination.credit-check.score", b"{}")),
        ("read credit-check's incoming calls", nc.subscribe("sb.in.credit-check.>")),
        ("read the audit stream", nc.subscribe("sb.audit.>")),
        ("enroll a new agent", nc.publish("sb.admin.registry.enroll", b"{}")),
    ]  # fmt: skip
    table = Table(
        title="customer-support's credential, used by a plain nats-py client",
        title_justify="left", box=box.SIMPLE_HEAD, show_edge=False, header_style="bold",
    )  # fmt: skip
    table.add_column("attempt", ratio=2)
    table.add_column("the NATS server says", style="red", ratio=3, overflow="fold")
    refused = 0
    try:
        for what, attempt in attempts:
            got_one.clear()
            before = len(refusals)
            await attempt
            try:
                await asyncio.wait_for(got_one.wait(), 2.0)
            except TimeoutError:
                table.add_row(what, "[bold]allowed?![/]")
                continue
            refused += 1
            table.add_row(what, escape(refusals[before]))
    finally:
        await nc.close()
    console.print(table)
    return refused == len(attempts)


async def show_unknown(console: Console, agents: DemoAgents) -> bool:
    """loan-origination asks an agent that does not exist: ``unknown_target``."""
    try:
        await agents.loans.call("mortgage-pricing", "quote", {"amount": 250_000})
    except UnknownTarget as err:
        grid = Table.grid(padding=(0, 2))
        grid.add_column(style="bold")
        grid.add_column()
        grid.add_row("error", f"{type(err).__name__} (code {err.code!r})")
        grid.add_row("message", escape(err.message))
        console.print(Panel(grid, title="[bold yellow]Unknown target[/]", border_style="yellow"))
        return True
    except SignalboxError as err:
        console.print(f"[bold red]unexpected error:[/] {escape(err.message)}")
        return False
    console.print("[bold red]unexpected:[/] a call to an unregistered agent succeeded")
    return False
