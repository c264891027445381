"""``signalbox demo``: the whole control plane and four real agents, in one scripted story.

Steps (each printed under its own heading):

1. start the embedded nats-server and the four services with the shipped Cedar
   policies (``policies/``: deny by default, permits for this lending desk);
2. the agents register (the registry lists them; discovery finds the pii-tagged ones);
3. allowed calls: loan-origination scores and screens applications, then decides;
4. a customer question, answered by customer-support from policy documents;
5. a denied call: customer-support asks credit-check for a credit score;
6. an unknown target: loan-origination asks an agent that does not exist;
7. the audit trail, once the tracing service has chained every event;
8. an audit replay summary of the run, and the trace tree of one call (from the trail alone).
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

import nats
from nats.aio.client import Client
from rich.console import Console, Group
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from broker.connection import connect
from broker.errors import CallDenied, SignalboxError, UnknownTarget
from broker.runtime.identity import operator_connect_options
from broker.runtime.jetstream import AUDIT_STREAM
from broker.settings import Settings
from broker.subjects import Subjects, inbox_prefix
from schemas import (
    ApprovalList,
    ApprovalRequest,
    AuditEvent,
    DecideApproval,
    Enrolled,
    ListApprovals,
)
from services.cli.client import admin_request, list_agents
from services.cli.render import KIND_STYLES, agents_table, audit_table
from services.cli.trace_cmds import build_tree, trace_tree
from services.demo.agents import (
    AGENT_NAMES,
    Answer,
    CreditRequest,
    DemoAgents,
    FraudReport,
    FraudRequest,
    LoanApplication,
    LoanDecision,
    Question,
    build_agents,
    enrollment,
)
from services.demo.fleet_ops import (
    PORTAL,
    RECOMMENDER,
    Screener,
    build_recommenders,
    show_canary,
    show_runaway,
)
from services.policy.cedar import CedarDecider, shipped_policy_dir
from services.policy.decider import H_ESTIMATED_TOKENS
from services.policy.service import PolicyService
from services.runner import Stack
from services.tracing.chain import GENESIS, record_hash
from services.tracing.reader import audit_filter, read

__all__ = ["APPLICATIONS", "QUESTIONS", "run_demo"]

APPLICATIONS: tuple[LoanApplication, ...] = (
    LoanApplication(
        application_id="LN-1001",
        applicant_id="A-1815",
        name="Ada Lovelace",
        amount=18_000,
        term_months=48,
        annual_income=96_000,
        monthly_debt=650,
        email="ada@example.org",
        country="GB",
        ip_country="GB",
    ),
    LoanApplication(
        application_id="LN-1002",
        applicant_id="A-1906",
        name="Grace Hopper",
        amount=12_000,
        term_months=36,
        annual_income=52_000,
        monthly_debt=1_500,
        email="grace@example.com",
        country="US",
        ip_country="US",
    ),
    LoanApplication(
        application_id="LN-1003",
        applicant_id="A-2047",
        name="Sam Doe",
        amount=45_000,
        term_months=24,
        annual_income=38_000,
        monthly_debt=1_400,
        email="sam.doe@mailinator.com",
        country="US",
        ip_country="RO",
    ),
)

QUESTIONS: tuple[str, ...] = (
    "Is there a fee if I repay my loan early?",
    "How long do you keep my credit report?",
)

_OUTCOME_STYLE = {"approved": "bold green", "referred": "bold yellow", "declined": "bold red"}


async def run_demo(console: Console, data_dir: Path | None = None) -> int:
    """Run the demo, printing to ``console``; returns the exit code (0: every step as expected).

    Args:
        console: Where the story is printed.
        data_dir: Keep the demo's data (JetStream store) here;
            default: a temporary folder removed afterwards.

    Raises:
        SignalboxError: the stack could not start, or a step failed unexpectedly.
    """
    if data_dir is not None:
        await asyncio.to_thread(data_dir.mkdir, parents=True, exist_ok=True)
        return await _run(console, data_dir)
    with tempfile.TemporaryDirectory(prefix="signalbox-demo-") as tmp:
        return await _run(console, Path(tmp))


def _step(console: Console, number: int, title: str, note: str = "") -> None:
    console.print()
    console.rule(f"[bold]Step {number}[/bold] · {title}", align="left", style="cyan")
    if note:
        console.print(Text(note, style="dim"))


async def _run(console: Console, data_dir: Path) -> int:
    started = time.perf_counter()
    console.rule("[bold cyan]Signalbox demo[/] · a lending desk run by four AI agents")
    # The shipped policies: policies/lending-demo.cedar permits this desk's calls.
    settings = Settings(
        nats_url=None,
        data_dir=data_dir,
        nats_port=0,
        policy_dir=shipped_policy_dir(),
        # Seconds instead of minutes, so the demo's runaway agent and failing canary
        # are caught while you watch (the defaults: 10 s window, 10 min baseline).
        breaker_rate_window=1.0,
        breaker_rate_baseline=4.0,
        # 5x, not 10x: a busy 2-core machine slows the runaway's fan-out, and the
        # demo must show the trip every time (tests/services/demo).
        breaker_rate_factor=5.0,
        breaker_rate_min_history=2.0,
        breaker_cooldown=60.0,
        rollout_guard_interval=0.2,
        rollout_stats_slot=1.0,
    )
    async with contextlib.AsyncExitStack() as resources:
        _step(console, 1, "Start the control plane")
        stack = Stack(settings)
        await stack.start()
        resources.push_async_callback(stack.stop)
        url = stack.settings.nats_url
        assert url is not None
        subjects = Subjects(stack.settings.subject_prefix)
        # The demo acts as an operator (credentials from the data dir's secrets).
        nc = await connect(
            url,
            name="signalbox-demo",
            connect_timeout=5,
            **operator_connect_options(stack.settings),
        )
        resources.push_async_callback(nc.close)
        js = nc.jetstream()
        baseline_seq = (await js.stream_info(AUDIT_STREAM)).state.last_seq
        emitted_before = _emitted(stack)
        console.print(_stack_panel(stack))

        _step(
            console,
            2,
            "Four agents are enrolled, connect and register",
            "Each gets a credential of its own and the attributes policies and budgets read "
            "(team, owner, namespace, tags, project), bound by the operator, not declared by "
            "the agent; the NATS server checks the credential through the registry's auth "
            "callout and lets the agent publish and subscribe only on its own subjects. Each "
            "registers its manifest; policy sees them within ms.",
        )
        # Enrolled with the attributes policies and budgets read (team, owner,
        # namespace, tags, project): bound by the operator, not declared by the agents.
        credentials = {
            name: (await admin_request(nc, subjects, "enroll", enrollment(name), Enrolled)).token
            for name in AGENT_NAMES
        }
        screener = Screener()
        agents = build_agents(
            url, credentials, stack.settings.subject_prefix, screen=screener.screen
        )
        for agent in agents.all:
            await resources.enter_async_context(agent)
        await _until_policy_knows(stack, [a.name for a in agents.all])
        console.print(agents_table(await list_agents(nc, subjects)))
        # Capability discovery, as an agent would ask it (sb.registry.discover.<agent>).
        pii = await agents.loans.discover(tag="pii", health="healthy")
        console.print(
            "Discovery · healthy agents offering a [bold]pii[/]-tagged capability: "
            + (", ".join(f"{r.manifest.name} {r.manifest.version}" for r in pii.agents) or "none")
        )

        _step(
            console,
            3,
            "Allowed calls: loan-origination decides three applications",
            "For each one it calls credit-check.score and fraud-detection.check through "
            "policy (sb.out.loan-origination.<target>.<capability>); rules allow both.",
        )
        decisions = [await agents.process(app) for app in APPLICATIONS]
        console.print(_decisions_view(APPLICATIONS, decisions))

        _step(
            console,
            4,
            "A customer question, answered from the policy documents",
            "loan-origination forwards customers' questions to customer-support.answer "
            "(allowed by rule loan-may-ask-support); the answer quotes a policy paragraph.",
        )
        for question in QUESTIONS:
            answer = await agents.loans.call(
                "customer-support", "answer", Question(text=question), returns=Answer
            )
            console.print(_answer_panel(question, answer))

        _step(
            console,
            5,
            "A denied call: customer-support asks credit-check for a credit score",
            "Credit files are tagged pii; no policy lets customer-support call credit-check.",
        )
        denied_ok = await _show_denied(console, agents)

        _step(
            console,
            6,
            "The shipped policy examples at work",
            "fraud-detection (namespace finance) may only call pci-dss capabilities; "
            "customer-support (EU data residency) may only use EU model endpoints; an "
            "invocation estimated over 10,000 tokens waits for a human's approval.",
        )
        examples_ok = await _show_policy_examples(console, agents, nc, subjects)

        _step(
            console,
            7,
            "Impostors are stopped by the NATS server itself",
            "A plain nats-py client holding customer-support's credential tries to call as "
            "loan-origination and to read credit-check's calls; no Signalbox code is asked.",
        )
        impostor_ok = await _show_impostor(console, url, credentials["customer-support"])

        _step(
            console,
            8,
            "An unknown target: loan-origination asks mortgage-pricing for a quote",
        )
        unknown_ok = await _show_unknown(console, agents)
        desk_records = _emitted(stack) - emitted_before

        _step(
            console,
            9,
            "A runaway agent is stopped: fraud-detection's prompt regression",
            "Each screening asks the model once; after a bad prompt change it retries 15 "
            "times. Team risk has a budget (reserved before every model call), and the "
            "policy service's rate detector trips fraud-detection's circuit breaker "
            "(fleet-wide, in sb_breakers). Then: the cost report by team.",
        )
        runaway_ok = await show_runaway(
            console, nc, subjects, agents.loans, screener,
            lambda i: agents.loans.call(
                "fraud-detection", "check", _screening(i), returns=FraudReport, timeout=5.0
            ),
        )  # fmt: skip

        _step(
            console,
            10,
            "A canary rollout goes wrong and rolls itself back",
            "web-portal asks recommender which product to show; 2.0.0 gets 20% of the calls "
            "(sticky per customer) with a guard: an "
            "error rate over 5% after 15 calls sends its share back to 1.0.0. Its new "
            "feature-store lookup times out on every third call.",
        )
        fleet_credentials = {
            name: (await admin_request(nc, subjects, "enroll", enrollment(name), Enrolled)).token
            for name in (PORTAL, RECOMMENDER)
        }
        portal, *recommenders = build_recommenders(
            url, fleet_credentials, stack.settings.subject_prefix
        )
        for agent in (*recommenders, portal):
            await resources.enter_async_context(agent)
        await _until_policy_knows(stack, [RECOMMENDER, PORTAL])
        canary_ok = await show_canary(console, nc, subjects, portal)

        _step(
            console,
            11,
            "The audit trail",
            "Every decision, call outcome, registration and rejection, hash-chained by the "
            f"tracing service into the {AUDIT_STREAM} stream.",
        )
        for service in stack.services.values():
            await service.audit.flush()
        expected = _emitted(stack) - emitted_before
        events = await read(
            js, audit_filter(subjects), start_seq=baseline_seq + 1, count=expected, timeout=10
        )
        console.print(
            audit_table(
                events[:desk_records],
                title=f"{AUDIT_STREAM}: {desk_records} records of the lending desk's run "
                f"(steps 2-8; {len(events)} in all)",
                subject=console.width >= 150,
            )
        )
        trail_ok = _show_chain(console, events, expected)

        _step(
            console,
            12,
            "Replay and trace: the run in the audit trail, and one call's causal tree",
            "Every record carries its trace and span ids; `signalbox trace <id>` rebuilds a "
            "call's tree from them (here: the call that waited for a human).",
        )
        traced_ok = _show_replay_and_trace(console, events)

    ok = (
        denied_ok
        and examples_ok
        and impostor_ok
        and unknown_ok
        and runaway_ok
        and canary_ok
        and trail_ok
        and traced_ok
        and len(decisions) == len(APPLICATIONS)
    )
    console.print()
    if ok:
        console.rule(
            f"[bold green]Demo complete[/] in {time.perf_counter() - started:.1f}s · "
            "server stopped, nothing left running",
            style="green",
        )
        console.print(
            "Next: [bold]signalbox up[/] runs the control plane until Ctrl-C; "
            "[bold]signalbox agents list[/] and [bold]signalbox audit tail[/] inspect it."
        )
        return 0
    console.rule("[bold red]Demo finished with unexpected results (see above)", style="red")
    return 1


def _screening(i: int) -> FraudRequest:
    """The ``i``-th application of the stream fraud-detection screens in step 9."""
    return FraudRequest(
        application_id=f"LN-{2001 + i}", email=f"applicant{i}@example.com", country="DE",
        ip_country="DE", amount=5_000 + 250 * (i % 20), annual_income=60_000,
    )  # fmt: skip


def _emitted(stack: Stack) -> int:
    """Audit events the stack's services have emitted so far (each becomes one record)."""
    return sum(service.audit.stats.emitted for service in stack.services.values())


async def _until_policy_knows(stack: Stack, names: Iterable[str], timeout: float = 5.0) -> None:
    """Wait until the policy service's registry cache holds every agent in ``names``.

    Registration returns once the registry stored the agent; policy learns of
    it through a KV watch a moment later. Calling before that would be
    answered ``unknown_target``, which is right, but not this demo's story.
    """
    policy = stack.services.get("policy")
    if not isinstance(policy, PolicyService):
        return
    wanted = set(names)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if policy.agents is not None and all(n in policy.agents for n in wanted):
            return
        await asyncio.sleep(0.01)


def _stack_panel(stack: Stack) -> Group:
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
    rules = Table(
        title="Cedar policies (deny by default: what no permit allows is denied)",
        title_justify="left",
        header_style="bold",
    )
    rules.add_column("policy id")
    rules.add_column("effect")
    rules.add_column("file")
    rules.add_column("what it says")
    for p in policies.policies.values():
        effect = "forbid unless approved" if p.needs_approval else p.effect
        rules.add_row(p.id, effect, p.source, p.description)
    rules.add_row(
        Text("(none)", style="dim"),
        "",
        "",
        Text("customer-support: no permit names it, so it may call nothing", style="dim"),
    )
    return Group(panel, rules)


def _decisions_view(
    applications: Iterable[LoanApplication], decisions: Iterable[LoanDecision]
) -> Group:
    table = Table(header_style="bold", title="Loan decisions", title_justify="left")
    table.add_column("application", no_wrap=True)
    table.add_column("applicant")
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


def _answer_panel(question: str, answer: Answer) -> Panel:
    body = Text(answer.text)
    source = f"source: {answer.source}" if answer.source else "no matching policy"
    return Panel(
        body,
        title=f"[bold]Q:[/] {escape(question)}",
        title_align="left",
        subtitle=f"[dim]{escape(source)}[/]",
        subtitle_align="right",
        border_style="green",
    )


async def _show_denied(console: Console, agents: DemoAgents) -> bool:
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


async def _show_policy_examples(
    console: Console, agents: DemoAgents, nc: Client, subjects: Subjects
) -> bool:
    """The three example policies of ``policies/``, one outcome each, in one table."""
    table = Table(title="Policy examples (policies/*.cedar)")
    for column in ("who", "asks", "outcome", "policy ids"):
        table.add_column(column, overflow="fold")
    ok = True

    # 1. finance namespace: only pci-dss capabilities (credit-check.score is tagged pii).
    try:
        await agents.fraud.call("credit-check", "score", CreditRequest(
            applicant_id="A-1815", annual_income=96_000, monthly_debt=650))  # fmt: skip
        table.add_row("fraud-detection", "credit-check.score", "[bold red]allowed?![/]", "")
        ok = False
    except CallDenied as err:
        table.add_row(
            "fraud-detection (finance)", "call credit-check.score (pii)", "[red]denied[/]",
            ", ".join(err.details.get("policy_ids") or ()),
        )  # fmt: skip

    # 2. EU data residency: model endpoints in the EU only.
    for region in ("us-east-1", "eu-west-1"):
        decision = await agents.support.authorize(
            "use_model", "gpt-4o", provider="openai", region=region, estimated_tokens=800
        )
        expected = "deny" if region.startswith("us") else "allow"
        ok = ok and decision.effect == expected
        style = "green" if decision.effect == "allow" else "red"
        table.add_row(
            "customer-support (EU)", f"use gpt-4o in {region}",
            f"[{style}]{decision.effect}[/]", ", ".join(decision.policy_ids),
        )  # fmt: skip

    # 3. Over 10,000 estimated tokens: parked until an operator approves.
    app = APPLICATIONS[0]
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
    if not pending:
        parked.cancel()
        table.add_row("loan-origination", "fraud-detection.check, 24,000 tokens",
                      "[bold red]not parked?![/]", "")  # fmt: skip
        console.print(table)
        return False
    request = pending[0]
    table.add_row(
        "loan-origination", "call fraud-detection.check, ~24,000 tokens",
        f"[yellow]needs approval[/] (request {request.id[:8]}…)",
        ", ".join(request.policy_ids),
    )  # fmt: skip
    await admin_request(
        nc, subjects, "approve",
        DecideApproval(id=request.id, reason="demo: checked by a human", requested_by="demo"),
        ApprovalRequest, service="approvals",
    )  # fmt: skip
    report = await parked
    table.add_row(
        "operator (demo)", f"approve {request.id[:8]}…",
        f"[green]approved[/]: the call went through (fraud risk {report.risk:.2f})", "",
    )  # fmt: skip
    console.print(table)
    return ok


async def _show_impostor(console: Console, url: str, credential: str) -> bool:
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
    table = Table(title="customer-support's credential, used by a plain nats-py client")
    table.add_column("attempt")
    table.add_column("the NATS server says", style="red")
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


async def _show_unknown(console: Console, agents: DemoAgents) -> bool:
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


def _show_chain(console: Console, events: list[AuditEvent], expected: int) -> bool:
    """Check the records link up (each hash recomputes and names its predecessor)."""
    ok = len(events) == expected
    prev = None
    for event in events:
        if record_hash(event) != event.hash:
            ok = False
            console.print(f"[bold red]record {event.seq}: hash does not match its content")
        if prev is not None and event.prev_hash != prev.hash:
            ok = False
            console.print(f"[bold red]record {event.seq}: not linked to record {prev.seq}")
        prev = event
    if len(events) < expected:
        console.print(
            f"[bold red]only {len(events)} of {expected} audit events were chained in time"
        )
    elif ok and events:
        first = events[0]
        origin = "genesis" if first.prev_hash == GENESIS else f"record {first.seq - 1}"
        console.print(
            f"[green]✔[/] {len(events)} records, each hash recomputed and linked to the one "
            f"before it (from {origin}); head {events[-1].hash[:16]}…"
        )
    return ok


def _show_replay_and_trace(console: Console, events: list[AuditEvent]) -> bool:
    """A replay summary of the run's records, then the trace tree of the approved call."""
    by_kind: dict[str, int] = {}
    effects: dict[str, int] = {}
    for event in events:
        by_kind[event.kind] = by_kind.get(event.kind, 0) + 1
        decided = event.data.get("decision") if event.kind == "decision" else None
        effect = decided.get("effect") if isinstance(decided, dict) else None
        if isinstance(effect, str):
            effects[effect] = effects.get(effect, 0) + 1
    traces = {e.trace_id for e in events if e.trace_id}
    summary = Table(title=f"Audit replay of this run: {len(events)} records", title_justify="left")
    summary.add_column("kind")
    summary.add_column("records", justify="right")
    for kind, count in sorted(by_kind.items(), key=lambda kv: -kv[1]):
        summary.add_row(Text(kind, style=KIND_STYLES.get(kind, "")), str(count))
    console.print(summary)
    console.print(
        f"{len(traces)} traces; decisions: "
        + ", ".join(f"{k} {v}" for k, v in sorted(effects.items()))
        + (f"; {_hms(events[0].time)} to {_hms(events[-1].time)}" if events else "")
    )
    parked = [
        e for e in events
        if e.kind == "decision" and (e.data.get("decision") or {}).get("effect") == "needs_approval"
    ]  # fmt: skip
    if not parked or not parked[0].trace_id:
        console.print("[bold red]no traced call needing approval in the trail")
        return False
    trace_id = parked[0].trace_id
    roots = build_tree(e for e in events if e.trace_id == trace_id)
    console.print(trace_tree(trace_id, roots))
    console.print(f"[dim]signalbox trace {trace_id} prints the same from a running system[/]")
    return len(roots) == 1 and bool(roots[0].children)


def _hms(t: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(t)) + f".{int(t * 1000) % 1000:03d}"
