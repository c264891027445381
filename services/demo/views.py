"""How the demo shows the control plane, its agents and their work, in 80 columns.

The CLI's own tables (``services.cli.render``) show every field and, where
they do not fit, turn each row into a block of fields: right for an operator
reading one agent, long for a story told at 80 columns. These views show
what each step of the demo is about, one line per thing where it fits.
"""

from __future__ import annotations

from collections.abc import Iterable

from rich import box
from rich.console import Group
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from schemas import AgentRecord
from services.demo.agents import BINDINGS, Answer, LoanApplication, LoanDecision
from services.policy.cedar.decider import CedarDecider
from services.policy.service import PolicyService
from services.runner import Stack

__all__ = ["agents_view", "answer_panel", "decisions_view", "stack_view"]

_OUTCOME_STYLE = {"approved": "bold green", "referred": "bold yellow", "declined": "bold red"}
_EFFECT_STYLE = {"permit": "green", "forbid": "red", "approval": "yellow"}


def stack_view(stack: Stack) -> Group:
    """The running control plane, and the Cedar policies it evaluates (one line each,
    with what it says)."""
    info = Table.grid(padding=(0, 2))
    info.add_column(style="bold")
    info.add_column()
    info.add_row("NATS", f"{stack.settings.nats_url}  (embedded nats-server, JetStream)")
    info.add_row("data dir", str(stack.settings.data_dir))
    info.add_row("services", ", ".join(stack.services))
    panel = Panel(info, title="Control plane running", border_style="cyan")
    policy = stack.services.get("policy")
    decider = policy.decider if isinstance(policy, PolicyService) else None
    if not isinstance(decider, CedarDecider):
        return Group(panel)
    policies = decider.policies
    info.add_row("policies", f"{stack.settings.policy_dir}  (Cedar, version {policies.version})")
    rules = Table.grid(padding=(0, 1))
    rules.add_column(no_wrap=True)
    rules.add_column(no_wrap=True)
    rules.add_column()
    for p in policies.policies.values():
        # "approval": a forbid that an operator's approval lifts (@needs_approval).
        effect = "approval" if p.needs_approval else p.effect
        rules.add_row(
            Text(effect, style=_EFFECT_STYLE.get(effect, "")),
            Text(p.id, style="bold"),
            Text(p.description),
        )
    rules.add_row(
        "", Text("(none)", style="dim"),
        Text("customer-support: no permit names it, so it may call nothing", style="dim"),
    )  # fmt: skip
    heading = Text(
        "Cedar policies (deny by default: what no permit allows is denied)", style="bold"
    )
    return Group(panel, heading, rules)


def agents_view(records: Iterable[AgentRecord]) -> Table:
    """The registered agents (``signalbox agents list``): what each serves and the
    attributes its operator bound at enrollment."""
    rows = sorted(records, key=lambda r: r.manifest.name)
    versions = sorted({r.manifest.version for r in rows})
    health = sorted({r.health for r in rows})
    table = Table(
        title=f"Registered agents (version {', '.join(versions)}; {', '.join(health)})",
        title_justify="left", box=box.SIMPLE_HEAD, show_edge=False, header_style="bold",
    )  # fmt: skip
    for column in ("agent", "team", "owner", "serves", "bound by the operator"):
        table.add_column(column, no_wrap=column != "bound by the operator")
    for record in rows:
        m = record.manifest
        # Text, not markup: a data tag such as [pii] is printed, not read as a style.
        serves = Text(
            ", ".join(
                c.name + (f" [{', '.join(c.tags)}]" if c.tags else "") for c in m.capabilities
            )
            or "—"
        )
        bound = BINDINGS.get(m.name, {})
        extra = [f"namespace {bound['namespace']}"] if bound.get("namespace") else []
        extra += [f"tag {t}" for t in bound.get("tags", ())]
        table.add_row(m.name, m.team, m.owner, serves, ", ".join(extra))
    return table


def decisions_view(
    applications: Iterable[LoanApplication], decisions: Iterable[LoanDecision]
) -> Group:
    """loan-origination's decisions, and why each."""
    table = Table(
        header_style="bold", title="Loan decisions", title_justify="left",
        box=box.SIMPLE_HEAD, show_edge=False,
    )  # fmt: skip
    table.add_column("loan", no_wrap=True)
    table.add_column("applicant", no_wrap=True)
    table.add_column("amount", justify="right", no_wrap=True)
    table.add_column("score", justify="right", no_wrap=True)
    table.add_column("fraud", justify="right", no_wrap=True)
    table.add_column("decision", no_wrap=True)
    table.add_column("APR", justify="right", no_wrap=True)
    why = Table.grid(padding=(0, 1))
    why.add_column(no_wrap=True)
    why.add_column()
    for app, decision in zip(applications, decisions, strict=True):
        style = _OUTCOME_STYLE[decision.outcome]
        table.add_row(
            app.application_id,
            app.name,
            f"{app.amount:,.0f} · {app.term_months} mo",
            str(decision.credit_score),
            f"{decision.fraud_risk:.2f}",
            Text(decision.outcome, style=style),
            f"{decision.apr}%" if decision.apr is not None else "—",
        )
        why.add_row(
            Text.assemble(f"  {app.application_id} ", (decision.outcome, style), ":"),
            "; ".join(decision.reasons),
        )
    return Group(table, why)


def answer_panel(question: str, answer: Answer) -> Panel:
    """customer-support's answer to ``question``, and where it comes from."""
    source = f"source: {answer.source}" if answer.source else "no matching policy"
    return Panel(
        Text(answer.text),
        title=f"[bold]Q:[/] {escape(question)}",
        title_align="left",
        subtitle=f"[dim]{escape(source)}[/]",
        subtitle_align="right",
        border_style="green",
    )
