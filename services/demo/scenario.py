"""``signalbox demo``: the whole control plane and four real agents, in one scripted story.

Steps (each printed under its own heading, the whole in under 250 lines at 80
columns; log records go to a file, :mod:`services.demo.logs`):

1. start the embedded nats-server and the four services with the default Cedar
   set and the lending example (``policies/examples/lending``: deny by default,
   permits for this lending desk);
2. the agents are enrolled and register (the registry lists them; discovery
   finds the pii-tagged ones);
3. allowed calls: loan-origination scores and screens applications, then decides;
4. a customer question, answered by customer-support from policy documents;
5. a denied call: customer-support asks credit-check for a credit score;
6. the shipped policy examples (finance namespace, EU residency, approval);
7. impostors refused by the NATS server itself;
8. an unknown target: loan-origination asks an agent that does not exist;
9. a runaway agent: its team's budget refuses its model calls, its breaker trips;
10. a canary rollout rolled back by its guard;
11. the audit trail, once the tracing service has chained every event;
12. an audit replay summary of the run, and the trace tree of one call (from the trail alone).
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

from rich.console import Console
from rich.text import Text

from broker.connection import connect
from broker.runtime.identity import operator_connect_options
from broker.runtime.jetstream import AUDIT_STREAM
from broker.settings import Settings
from broker.subjects import Subjects
from schemas import Enrolled
from services.cli.client import admin_request, list_agents
from services.demo.agents import (
    AGENT_NAMES,
    Answer,
    FraudReport,
    FraudRequest,
    LoanApplication,
    Question,
    build_agents,
    enrollment,
)
from services.demo.fleet_ops import PORTAL, RECOMMENDER, build_recommenders, show_canary
from services.demo.guardrails import (
    show_denied,
    show_impostor,
    show_policy_examples,
    show_unknown,
)
from services.demo.logs import DemoLog, capture_logs
from services.demo.runaway import Screener, show_runaway
from services.demo.trail import show_chain, show_replay_and_trace, show_trail
from services.demo.views import agents_view, answer_panel, decisions_view, stack_view
from services.policy.cedar.policy_set import compose_example
from services.policy.service import PolicyService
from services.runner import Stack
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


async def run_demo(console: Console, data_dir: Path | None = None) -> int:
    """Run the demo, printing to ``console``; returns the exit code (0: every step as expected).

    Args:
        console: Where the story is printed.
        data_dir: Keep the demo's data (JetStream store) and its log (``demo.log``)
            here; default: a temporary folder removed afterwards, and a log file in
            the temporary folder if anything was logged.

    Raises:
        SignalboxError: the stack could not start, or a step failed unexpectedly.
    """
    if data_dir is not None:
        await asyncio.to_thread(data_dir.mkdir, parents=True, exist_ok=True)
        return await _logged_run(console, data_dir, data_dir / "demo.log")
    with tempfile.TemporaryDirectory(prefix="signalbox-demo-") as tmp:
        # The log file (if anything is logged) outlives the temporary data folder.
        return await _logged_run(console, Path(tmp), None)


async def _logged_run(console: Console, data_dir: Path, log: Path | None) -> int:
    """The demo, its log records in ``log`` (None: a temporary file); the count of them
    is printed at the end, also when a step fails unexpectedly (the records may say why)."""
    with capture_logs(log) as logged:
        try:
            return await _run(console, data_dir, logged)
        except BaseException:
            summary = logged.summary()
            if summary is not None:
                console.print(summary)
            raise


def _step(console: Console, number: int, title: str, note: str = "") -> None:
    console.print()
    console.rule(f"[bold]Step {number}[/bold] · {title}", align="left", style="cyan")
    if note:
        console.print(Text(note, style="dim"))


async def _run(console: Console, data_dir: Path, logged: DemoLog) -> int:
    started = time.perf_counter()
    console.rule("[bold cyan]Signalbox demo[/] · a lending desk run by four AI agents")
    # The lending example on the default set (policies/examples/lending permits this
    # desk's calls); a fresh `signalbox up` activates the default set alone.
    settings = Settings(
        nats_url=None,
        data_dir=data_dir,
        nats_port=0,
        policy_dir=compose_example(data_dir / "policies", "lending"),
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
        console.print(stack_view(stack))

        _step(
            console,
            2,
            "Four agents are enrolled, connect and register",
            "The operator binds each one's team, owner, namespace and tags to a credential of "
            "its own; the NATS server checks it (the registry's auth callout) and lets the "
            "agent use only its own subjects.",
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
        console.print(agents_view(await list_agents(nc, subjects)))
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
        console.print(decisions_view(APPLICATIONS, decisions))

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
            console.print(answer_panel(question, answer))

        allowed_records = await _chained_since(stack, emitted_before)  # steps 2-4
        _step(
            console,
            5,
            "A denied call: customer-support asks credit-check for a credit score",
            "Credit files are tagged pii; no policy lets customer-support call credit-check.",
        )
        denied_ok = await show_denied(console, agents)

        _step(
            console,
            6,
            "The shipped policy examples at work",
            "fraud-detection (namespace finance) may only call pci-dss capabilities; "
            "customer-support (EU data residency) may only use EU model endpoints; an "
            "invocation estimated over 10,000 tokens waits for a human's approval.",
        )
        examples_ok = await show_policy_examples(console, agents, nc, subjects, APPLICATIONS[0])

        _step(
            console,
            7,
            "Impostors are stopped by the NATS server itself",
            "A plain nats-py client holding customer-support's credential tries to call as "
            "loan-origination and to read credit-check's calls; no Signalbox code is asked.",
        )
        impostor_ok = await show_impostor(console, url, credentials["customer-support"])

        _step(
            console,
            8,
            "An unknown target: loan-origination asks mortgage-pricing for a quote",
        )
        unknown_ok = await show_unknown(console, agents)
        desk_records = await _chained_since(stack, emitted_before)  # steps 2-8

        _step(
            console,
            9,
            "A runaway agent: fraud-detection's prompt regression",
            "Each screening asks the model once; after a bad prompt change, 15 times at "
            "once. Two guards: team risk's budget (every model call reserves its worst-case "
            "cost first) and the policy service's rate detector (a fleet-wide breaker).",
        )
        runaway_ok = await show_runaway(
            console, nc, subjects, screener,
            lambda i: agents.loans.call(
                "fraud-detection", "check", _screening(i), returns=FraudReport, timeout=5.0
            ),
        )  # fmt: skip

        _step(
            console,
            10,
            "A canary rollout goes wrong and rolls itself back",
            "web-portal asks recommender which product to show; 2.0.0 gets 20% of the calls "
            "(sticky per customer), guarded: an error rate over 5% after 15 calls sends its "
            "share back to 1.0.0. Its new feature-store lookup fails every third call.",
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
        show_trail(console, events, desk=desk_records, allowed=allowed_records)
        trail_ok = show_chain(console, events, expected)

        _step(
            console,
            12,
            "Replay and trace: the run, and one call's causal tree",
            "Every record carries its trace and span ids; `signalbox trace <id>` rebuilds a "
            "call's tree from them (here: the call that waited for a human).",
        )
        traced_ok = show_replay_and_trace(console, events)

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
    logs = logged.summary()
    if logs is not None:
        console.print(logs)
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


async def _chained_since(stack: Stack, emitted_before: int) -> int:
    """Audit events emitted since ``emitted_before``, every one of them sent to be chained.

    Flushed first, so the events of one step precede the next step's in the
    trail (a service's emitter may hold a few back for a moment), and a count
    of them marks where the step ends.
    """
    for service in stack.services.values():
        await service.audit.flush()
    return _emitted(stack) - emitted_before


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
