"""Every table the CLI prints, at 80 columns on a terminal and in a pipe (no TTY).

Ids, secrets, names, model names, seq numbers and dates must appear whole, on
one line (joining wrapped lines does not count); the words of a wrapping
column (a reason) must be intact, so it was never squeezed below its minimum;
no line may be wider than the screen. The renderers get realistic long values
(64-character agent names, 32-hex ids, a real-length token,
``gpt-4o-mini-2024-07-18``); a few commands run end to end against a real stack.
"""

from __future__ import annotations

import asyncio
import collections
import io
import re
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import msgspec
import pytest
from rich.cells import cell_len
from rich.console import Console, RenderableType
from typer.testing import CliRunner, Result

from broker.agent import Agent
from broker.settings import Settings
from schemas import (
    AgentBinding,
    AgentManifest,
    AgentRecord,
    ApprovalRequest,
    AuditEvent,
    Breaker,
    Budget,
    BudgetStatus,
    Capability,
    ConsumerHealth,
    CostReport,
    CostRow,
    CredentialInfo,
    Enrolled,
    OperatorAdded,
    OperatorInfo,
    OperatorList,
    PolicyDiff,
    PolicyHistory,
    PolicySetRecord,
    PolicyShown,
    PolicyVersionInfo,
    RolloutStatus,
    Route,
    RouteGuard,
    ServiceHealth,
    VersionFigures,
)
from services.cli.agents_cmds import print_enrolled
from services.cli.approvals_cmds import approvals_table
from services.cli.audit_cmds import open_calls_table, verify_fields
from services.cli.audit_report import tag_table
from services.cli.breakers_cmds import breakers_table
from services.cli.budgets_cmds import budget_table
from services.cli.cost_cmds import cost_table
from services.cli.main import app
from services.cli.operators_cmds import operators_table, print_operator_added
from services.cli.policy_tables import (
    changes_by_agent_table,
    changes_table,
    history_table,
    policy_fields,
    policy_ids_table,
)
from services.cli.render import (
    CliTable,
    Column,
    Fields,
    Fit,
    agent_fields,
    agents_table,
    audit_header,
    audit_line,
    audit_table,
    binding_fields,
    credentials_table,
)
from services.cli.rollout_cmds import rollout_view
from services.cli.status_cmds import health_table
from services.cli.trace_cmds import build_tree, trace_tree
from services.policy.whatif import Change, WhatIfReport
from services.tracing.complete import CompletenessReport, OpenCall
from services.tracing.report import TagUsage
from services.tracing.verify import VerifyReport

if TYPE_CHECKING:
    from support import StackFactory

WIDTH = 80
NAME = "fraud-detection-for-the-payments-team-in-eu-west-1-primary-agent"
OTHER = "credit-check-scoring-service-of-the-consumer-lending-desk-in-eu1"
MODEL = "gpt-4o-mini-2024-07-18"
HEX32 = "4bf92f3577b34da6a3ce929d0e0e4736"
HASH = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
CREDENTIAL_ID = "abcdefgh23456789"
# An agent token as the registry issues it: sbc1.<16 base32>.<token_urlsafe(32)>.
TOKEN = f"sbc1.{CREDENTIAL_ID}.Zk3q-9_xWQ2vL0mTbN7yR4sHc8uJd1eKf6gA5pXoIi0"
NOTE = "for the fraud team, ticket OPS-1234"
LABEL = "tighten pii access for eu agents (ticket OPS-1234)"
REASON = "error rate doubled after the 14:00 release; rolling back to 4.1 until it is fixed"
NOW = 1_795_000_000.0
STAMP = datetime.fromtimestamp(NOW).strftime("%Y-%m-%d %H:%M:%S")
LATER = datetime.fromtimestamp(NOW + 86_400).strftime("%Y-%m-%d %H:%M:%S")

assert len(NAME) == len(OTHER) == 64 and len(TOKEN) == 65


# -- rendering and checking ---------------------------------------------------------------


def _consoles() -> dict[str, Console]:
    return {
        # A terminal: colours and bold, 80 columns (checked on the recorded plain text).
        "terminal": Console(
            width=WIDTH, file=io.StringIO(), force_terminal=True, color_system="truecolor",
            record=True,
        ),
        # A pipe (CI logs, `| less`, `> file`): no TTY, 80 columns.
        "pipe": Console(width=WIDTH, file=io.StringIO(), force_terminal=False),
        # As `status` and the audit commands print: a soft-wrapping console.
        "soft-wrapping pipe": Console(
            width=WIDTH, file=io.StringIO(), force_terminal=False, soft_wrap=True
        ),
    }  # fmt: skip


def shown(*renderables: RenderableType, soft_wrap: bool | None = None) -> dict[str, str]:
    """What ``renderables`` print at 80 columns, on a terminal and in pipes."""
    out: dict[str, str] = {}
    for kind, console in _consoles().items():
        for renderable in renderables:
            console.print(renderable, soft_wrap=soft_wrap)
        if kind == "terminal":
            out[kind] = console.export_text(styles=False)
        else:
            file = console.file
            assert isinstance(file, io.StringIO)
            assert "\x1b[" not in file.getvalue()  # a pipe gets no escape codes
            out[kind] = file.getvalue()
    return out


def check(
    outputs: dict[str, str],
    whole: Iterable[str],
    words: Iterable[str] = (),
    *,
    width: int | None = WIDTH,
) -> None:
    """Each of ``whole`` on one line, each of ``words`` intact, no line wider than ``width``."""
    whole, words = list(whole), list(words)
    for kind, text in outputs.items():
        lines = text.splitlines()
        if width is not None:
            wide = [line for line in lines if cell_len(line) > width]
            assert not wide, f"{kind}: lines wider than {width}: {wide}\n{text}"
        for value in whole:
            assert any(value in line for line in lines), (
                f"{kind}: {value!r} is not whole on one line:\n{text}"
            )
        tokens = {token for line in lines for token in line.split()}
        for word in words:
            assert word in tokens, f"{kind}: {word!r} was cut or squeezed:\n{text}"


# -- the table engine ----------------------------------------------------------------------


def _mixed_table() -> CliTable:
    table = CliTable(
        Column("id"), Column("agent"), Column("when"), Column("reason", Fit.WRAP, min_width=20),
        title="Mixed",
    )  # fmt: skip
    table.add_row(HEX32, NAME, STAMP, REASON)
    table.add_row(HEX32[::-1], "b", LATER, "short")
    return table


@pytest.mark.parametrize("width", range(66, 161, 3))
def test_whole_values_stay_whole_and_words_intact_at_every_width(width: int) -> None:
    for renderable, whole in (
        (_mixed_table(), [HEX32, HEX32[::-1], NAME, STAMP, LATER]),
        (agent_fields(_agent(NAME)), [NAME, MODEL, STAMP, "score-transaction"]),
    ):
        console = Console(width=width, file=io.StringIO(), force_terminal=False)
        console.print(renderable)
        file = console.file
        assert isinstance(file, io.StringIO)
        check({"pipe": file.getvalue()}, whole, REASON.split(), width=width)


def test_a_table_that_fits_stays_a_table_and_its_wrapping_column_keeps_its_minimum() -> None:
    table = CliTable(Column("id"), Column("reason", Fit.WRAP, min_width=20))
    table.add_row(HEX32 + HEX32[:16], REASON)  # 48 + 2 + 20 <= 80: a table
    for text in shown(table).values():
        lines = text.splitlines()
        assert lines[0].split() == ["id", "reason"]
        # The reason got the 30 columns left, not one: its first line holds its first words.
        assert "error rate doubled after" in lines[2]
        assert lines[2].split()[0] == HEX32 + HEX32[:16]
    narrow = CliTable(Column("id"), Column("reason", Fit.WRAP, min_width=40))
    narrow.add_row(HEX32 + HEX32[:16], REASON)  # 48 + 2 + 40 > 80: a block of fields
    outputs = shown(narrow)
    for text in outputs.values():
        assert text.splitlines()[0].split() == ["id", HEX32 + HEX32[:16]]
        assert text.splitlines()[1].startswith("reason  error rate doubled")
    check(outputs, [HEX32 + HEX32[:16]], REASON.split())


def test_an_optional_column_is_left_out_and_said_so_before_rows_become_blocks() -> None:
    events = [_event(seq=1_234_567, actor="fraud-detection", kind="usage")]
    outputs = shown(audit_table(events, title="Audit replay"))
    for text in outputs.values():
        assert text.splitlines()[1].split() == ["seq", "time", "kind", "actor", "what", "hash"]
        assert "not shown at this width: subject" in text
    check(outputs, ["1234567", "fraud-detection", MODEL, HASH[:8]])
    wide = Console(width=200, file=io.StringIO(), force_terminal=False)
    wide.print(audit_table(events))
    file = wide.file
    assert isinstance(file, io.StringIO)
    assert "subject" in file.getvalue().splitlines()[1]
    assert "not shown" not in file.getvalue()


def test_a_shortened_column_is_cut_with_an_ellipsis_and_nothing_else_is() -> None:
    table = CliTable(Column("id"), Column("note", Fit.SHORTEN, min_width=10))
    table.add_row(HEX32 + HEX32, "a free-text note far too long to be shown in full here")
    outputs = shown(table)
    for text in outputs.values():
        assert "…" in text.splitlines()[2]
    check(outputs, [HEX32 + HEX32, "a free-text"])


def test_fields_put_a_value_too_wide_for_its_key_on_a_line_of_its_own() -> None:
    fields = Fields("Title")
    fields.add("a key this long", NAME)
    fields.add("reason", REASON, Fit.WRAP)
    outputs = shown(fields)
    for text in outputs.values():
        lines = text.splitlines()
        assert lines[1] == "a key this long" and lines[2] == f"  {NAME}"
    check(outputs, [NAME], REASON.split())


# -- agents --------------------------------------------------------------------------------


def _agent(name: str, **manifest: Any) -> AgentRecord:
    caps = (
        Capability(name="score-transaction", tags=("pii", "pci-dss"),
                   description="Scores a card transaction for fraud risk, with reasons"),
        Capability(name="explain-decision"),
    )  # fmt: skip
    return AgentRecord(
        manifest=AgentManifest(
            name=name, version="12.4.0-rc.1.build.2031",
            owner="payments-risk-engineering@example.com", team="payments-risk",
            region="eu-west-1", project="chargeback-2026",
            capabilities=caps, models=(MODEL, "claude-3-5-sonnet-20241022"), tools=("lookup",),
            description=REASON, metadata={"ticket": "OPS-1234"}, **manifest,
        ),
        registered_at=NOW, last_heartbeat=NOW, health="healthy", instances=3,
    )  # fmt: skip


def test_agents_list_and_show() -> None:
    records = [_agent(NAME), _agent("triage")]
    check(
        shown(agents_table(records)),
        [NAME, "triage", "12.4.0-rc.1.build.2031", "payments-risk-engineering@example.com",
         "score-transaction", "explain-decision", "pci-dss"],
    )  # fmt: skip
    check(
        shown(agent_fields(records[0])),
        [NAME, "12.4.0-rc.1.build.2031", MODEL, "claude-3-5-sonnet-20241022", STAMP,
         "payments-risk-engineering@example.com", "chargeback-2026", "score-transaction",
         "OPS-1234"],
        REASON.split(),
    )  # fmt: skip


def test_bound_attributes_old_and_new() -> None:
    before = AgentBinding(agent=NAME, team="payments-risk", tags=("data-residency:eu",))
    after = AgentBinding(
        agent=NAME, team="payments-risk-and-fraud-operations", owner=OTHER,
        projects=("chargeback-2026", "disputes"), tags=("data-residency:eu", "tier:critical"),
        bound_at=NOW, bound_by="operator:alice-the-platform-engineer",
    )  # fmt: skip
    check(
        shown(binding_fields(after, previous=before, title=f"{NAME}: bound")),
        [OTHER, "payments-risk-and-fraud-operations", "chargeback-2026", "tier:critical",
         STAMP, "operator:alice-the-platform-engineer"],
    )  # fmt: skip


def test_enroll_prints_the_token_alone_on_its_own_line() -> None:
    enrolled = Enrolled(
        credential=CredentialInfo(
            id=CREDENTIAL_ID, agent=NAME, created_at=NOW, expires_at=NOW + 86_400
        ),
        token=TOKEN,
        binding=AgentBinding(agent=NAME, team="payments-risk", owner=OTHER),
    )
    for width in (WIDTH, 40):  # even narrower than the token: never cut
        for kind, console in _consoles().items():
            console.width = width
            print_enrolled(console, enrolled)
            file = console.file
            assert isinstance(file, io.StringIO)
            text = console.export_text(styles=False) if kind == "terminal" else file.getvalue()
            lines = text.splitlines()
            assert TOKEN in lines, f"{kind} at {width}: the token is not alone on a line:\n{text}"
            assert "shown once" in text and "SIGNALBOX_AGENT_CREDENTIAL" in text
            if width == WIDTH:
                check({kind: text}, [NAME, OTHER, CREDENTIAL_ID, LATER])


def test_credentials_table() -> None:
    items = [
        CredentialInfo(id=CREDENTIAL_ID, agent=NAME, created_at=NOW, expires_at=NOW + 86_400,
                       note=NOTE),
        CredentialInfo(id="zyxwvuts98765432", agent="b", created_at=NOW, expires_at=NOW - 1),
    ]  # fmt: skip
    check(
        shown(credentials_table(items, now=NOW)),
        [NAME, CREDENTIAL_ID, "zyxwvuts98765432", STAMP, LATER, "expired"],
        NOTE.split(),
    )


# -- operators -----------------------------------------------------------------------------


def test_operators_list_and_the_added_credential() -> None:
    operator = OperatorInfo(
        id=CREDENTIAL_ID, name=NAME, role="admin", created_at=NOW, expires_at=NOW + 86_400,
        created_by="bootstrap:root",
    )  # fmt: skip
    listed = OperatorList(operators=(operator,))
    check(shown(operators_table(listed, NOW)), [NAME, CREDENTIAL_ID, LATER, "bootstrap:root"])
    token = f"sbo1.{NAME}.{CREDENTIAL_ID}.Zk3q-9_xWQ2vL0mTbN7yR4sHc8uJd1eKf6gA5pXoIi0"
    for kind, console in _consoles().items():
        console.soft_wrap = True  # as `operators add` prints
        print_operator_added(console, OperatorAdded(operator=operator, token=token))
        file = console.file
        assert isinstance(file, io.StringIO)
        text = console.export_text(styles=False) if kind == "terminal" else file.getvalue()
        assert token in text.splitlines(), text  # 140 characters, alone on its line
        check({kind: text}, [NAME, CREDENTIAL_ID, LATER], width=None)


# -- approvals, breakers, budgets, cost, rollouts, status ----------------------------------


def test_approvals_table() -> None:
    pending = ApprovalRequest(
        id=HEX32, call_id="c-1", caller=NAME, target=OTHER, capability="score",
        binding=HASH, requested_at=NOW, expires_at=NOW + 120,
        policy_ids=("large-payments-need-approval", "pii-needs-a-human"),
    )  # fmt: skip
    decided = ApprovalRequest(
        id=HEX32[::-1], call_id="c-2", caller="a", target="b", capability="echo", binding=HASH,
        requested_at=NOW, expires_at=NOW + 120, status="denied", decided_by="operator:alice",
        decided_at=NOW, reason=REASON,
    )  # fmt: skip
    check(
        shown(approvals_table((pending, decided), NOW)),
        [HEX32, HEX32[::-1], NAME, f"{OTHER}.score", "large-payments-need-approval",
         "pii-needs-a-human", STAMP, "operator:alice:"],
        REASON.split(),
    )  # fmt: skip


def test_breakers_table() -> None:
    manual = Breaker(
        key=f"agent.{NAME}", scope="agent", name=NAME, state="open", reason="manual",
        text=REASON, since=NOW, until=NOW + 600, cooldown=600, tripped_by="operator:alice",
        trips=3, figures={"rate": 12.5, "baseline": 3.0},
    )  # fmt: skip
    team = Breaker(
        key="team.payments-risk", scope="team", name="payments-risk", state="half_open",
        reason="error_rate", text="62% of 50 calls failed", since=NOW, until=NOW,
        tripped_by="service:policy", trips=1,
    )  # fmt: skip
    check(
        shown(breakers_table((manual, team), NOW)),
        [f"agent.{NAME}", "team.payments-risk", STAMP, "operator:alice", "service:policy",
         "half-open", "rate=12.5,"],
        ["manual:", *REASON.split()],
    )  # fmt: skip


def test_budget_table() -> None:
    budget = Budget(scope="agent", name=NAME, window="month", limit_usd=250.0)
    small = Budget(scope="team", name="payments-risk", window="day", limit_usd=0.0005)
    statuses = (
        BudgetStatus(budget=budget, spent_usd=251.25, reserved_usd=0.5, remaining_usd=0.0,
                     window_start=NOW),
        BudgetStatus(budget=small, spent_usd=0.0003, remaining_usd=0.0002, window_start=NOW,
                     soft_alerted=True),
    )  # fmt: skip
    month = datetime.fromtimestamp(NOW).strftime("%Y-%m")
    check(
        shown(budget_table(statuses, f"Budgets of agent {NAME}")),
        [f"agent:{NAME}", "team:payments-risk", month, "$250.00", "$251.25", "$0.0005",
         "$0.0003", "exhausted"],
    )  # fmt: skip


def test_cost_report() -> None:
    def row(key: str, n: int) -> CostRow:
        return CostRow(
            key=key, reports=n, input_tokens=n * 1_000_003, output_tokens=n * 20_001,
            cached_tokens=n * 7, tool_calls=n, cost_usd=n * 12.3456, fallback_priced=n,
            attribution_dropped=1,
        )  # fmt: skip

    report = CostReport(
        by="model", since=NOW - 86_400, until=NOW, rows=(row(MODEL, 3), row("o1-2024-12-17", 1)),
        total=row("", 4), prices_as_of="2026-11-01",
    )  # fmt: skip
    check(
        shown(cost_table(report)),
        [MODEL, "o1-2024-12-17", "3,000,009", "4,000,012", "$37.04", "$49.38", "total",
         "2026-11-01"],
    )  # fmt: skip
    hours = CostReport(by="hour", since=None, until=None, rows=(row(str(int(NOW)), 2),),
                       total=row("", 2))  # fmt: skip
    hour = datetime.fromtimestamp(NOW, tz=UTC).strftime("%Y-%m-%d %H:00Z")
    check(shown(cost_table(hours)), [hour, "2,000,006"])


def test_rollout_status() -> None:
    guard = RouteGuard()
    route = Route(
        target=NAME, weights={"12.4.0-rc.1.build.2031": 5, "12.3.9": 95}, stable="12.3.9",
        canary="12.4.0-rc.1.build.2031", sticky=True, guard=guard,
        changed_by="operator:alice-the-platform-engineer", changed_at=NOW, reason=REASON,
    )  # fmt: skip
    versions = (
        VersionFigures(version="12.3.9", weight=95, health="healthy", calls=123_456,
                       errors=12, error_rate=0.0001, p50_ms=12.3, p99_ms=1234.5,
                       cost_usd=1.0, cost_per_call_usd=0.00081),
        VersionFigures(version="12.4.0-rc.1.build.2031", weight=5, health="healthy",
                       deprecated=True, calls=6_543, errors=900, error_rate=0.1375,
                       p50_ms=15.0, p99_ms=2400.0),
    )  # fmt: skip
    check(
        shown(rollout_view(RolloutStatus(target=NAME, route=route, versions=versions))),
        [NAME, "12.4.0-rc.1.build.2031=5%", "12.3.9=95%,", STAMP, "123,456", "1,234.5",
         "0.00081", "13.8%", "operator:alice-the-platform-engineer"],
        REASON.split(),
    )  # fmt: skip


def test_status_table() -> None:
    host = "ip-10-0-12-34.eu-west-1.compute.internal"
    reports = [
        ServiceHealth(
            service=service,
            instance=f"{service[:2]}0123456789a",
            host=host,
            pid=1,
            started_at=NOW - 93_784,
            time=NOW,
            connected=True,
            ready=service != "cost",
            audit_pending=1_234,
            audit_last_ack=NOW - 1.5,
            consumers=(
                ConsumerHealth(stream="SB_USAGE", durable="usage", pending=12_345, ack_pending=3),
            ),
        )
        for service in ("registry", "policy", "cost", "tracing")
    ]
    check(
        shown(health_table(reports)),
        [f"re0123456789a@{host}", f"co0123456789a@{host}", "NOT READY", "1d02h", "12,348"],
        ["1,234", "waiting,", "last", "stored", "1.5s", "ago"],
    )


# -- audit: replay, tail, verify, report; trace --------------------------------------------


def _event(*, seq: int, actor: str = NAME, kind: str = "usage", **data: Any) -> AuditEvent:
    bodies: dict[str, dict[str, Any]] = {
        "usage": {"model": MODEL, "input_tokens": 1_200, "output_tokens": 345},
        "decision": {"decision": {"effect": "deny", "policy_ids": ["pii-stays-in-the-eu"]},
                     "target": OTHER, "capability": "score"},
        "admin": {"op": "trip", "note": REASON},
    }  # fmt: skip
    body = bodies[kind]
    return AuditEvent(
        id=f"e{seq}", time=NOW, kind=kind, actor=actor,  # type: ignore[arg-type]
        subject=f"sb.usage.{actor}", trace_id=HEX32, seq=seq, hash=HASH,
        data={**body, **data},
    )  # fmt: skip


def test_audit_replay_table() -> None:
    events = [
        _event(seq=1_234_567), _event(seq=1_234_568, kind="decision"),
        _event(seq=1_234_569, actor="service:tracing", kind="admin"),
    ]  # fmt: skip
    clock = datetime.fromtimestamp(NOW).strftime("%H:%M:%S")
    check(
        shown(audit_table(events, title="Audit replay")),
        ["1234567", "1234568", "1234569", NAME, f"sb.usage.{NAME}", MODEL,
         f"{OTHER}.score", "[pii-stays-in-the-eu]", HASH[:8], clock],
        ["deny", "op=trip", *REASON.split()[1:-1]],
    )  # fmt: skip


def test_audit_tail_lines_keep_each_record_on_one_line() -> None:
    events = [_event(seq=1_234_567), _event(seq=1_234_568, kind="decision")]
    outputs = shown(audit_header(), *(audit_line(e) for e in events), soft_wrap=True)
    for text in outputs.values():
        lines = text.splitlines()
        assert lines[0].split()[:5] == ["seq", "time", "kind", "actor", "hash"]
        assert all(v in lines[1] for v in ("1234567", STAMP, NAME, HASH[:8], MODEL))
        assert all(v in lines[2] for v in ("1234568", NAME, f"{OTHER}.score"))


def test_audit_verify_fields_and_open_calls() -> None:
    report = VerifyReport(
        checked=1_234_567, first_seq=1, last_seq=1_234_567, first_time=NOW, last_time=NOW,
        anchor=HASH, head_hash=HASH[::-1],
    )  # fmt: skip
    open_call = OpenCall(call_id=HEX32, caller=NAME, target=OTHER, capability="score",
                         time=NOW, trace_id=HEX32)  # fmt: skip
    calls = CompletenessReport(decided=10, completed=9, outcome_unknown=[open_call])
    iso = datetime.fromtimestamp(NOW).astimezone().isoformat(timespec="milliseconds")
    check(
        shown(verify_fields(report, calls, since=NOW), open_calls_table([open_call])),
        [HASH, HASH[::-1], "1,234,567", iso, HEX32, NAME, f"{OTHER}.score"],
        ["1", "outcome", "unknown"],
    )


def test_audit_report_table() -> None:
    rows = [
        TagUsage(caller=NAME, target=OTHER, capability="score-transaction", attempts=1_234,
                 effects={"allow": 1_000, "deny": 200, "needs_approval": 34},
                 first_time=NOW, last_time=NOW),
    ]  # fmt: skip
    check(
        shown(tag_table(rows, title="Calls to capabilities tagged 'pii' from 2026-11-24T09:00")),
        [NAME, f"{OTHER}.score", "1234", STAMP],
        ["allow", "1000,", "needs_approval", "34"],
    )


def test_trace_tree_keeps_models_names_and_ids_whole() -> None:
    # NAME's call to OTHER was decided; OTHER, serving it, used a model (its usage hangs
    # under the delivery it happened under).
    decision = msgspec.structs.replace(
        _event(seq=10, kind="decision", call_id="c1"),
        span_id="a1b2c3d4e5f60718",
        parent_span_id="0102030405060708",
    )
    usage = msgspec.structs.replace(
        _event(seq=11, actor=OTHER, latency_ms=812.5, cost_nanos=1_234_000),
        span_id="1112131415161718",
        via_span_id="a1b2c3d4e5f60718",
        parent_span_id="ffffffffffffffff",
    )
    roots = build_tree([decision, usage])
    assert roots[0].children[0].linked_via
    outputs = shown(trace_tree(HEX32, roots))
    check(outputs, [HEX32, NAME, OTHER, MODEL, "0102030405060708", "[pii-stays-in-the-eu]"])


# -- policy --------------------------------------------------------------------------------


def test_policy_show_history_diff_and_what_if_tables() -> None:
    record = PolicySetRecord(
        version=12, digest=HASH, label=LABEL,
        schema="", files={}, policy_ids=("pii-stays-in-the-eu", "large-payments-need-approval"),
        created_at=NOW, created_by="operator:alice-the-platform-engineer",
    )  # fmt: skip
    check(
        shown(policy_fields(PolicyShown(record=record, active=True, active_version=12))),
        [HASH, STAMP, "operator:alice-the-platform-engineer", "large-payments-need-approval"],
        LABEL.split(),
    )
    info = PolicyVersionInfo(
        version=12, digest=HASH, label=record.label, policy_ids=record.policy_ids,
        created_at=NOW, created_by=record.created_by, active=True,
    )  # fmt: skip
    check(
        shown(history_table(PolicyHistory(versions=(info,), active_version=12))),
        [HASH[:12], STAMP, "operator:alice-the-platform-engineer"],
        LABEL.split(),
    )
    diff = PolicyDiff(
        from_name="v11",
        to_name="candidate",
        added_ids=("pii-stays-in-the-eu", "large-payments-need-approval"),
    )
    check(shown(policy_ids_table(diff)), ["pii-stays-in-the-eu", "large-payments-need-approval"])
    resource_id = 'Signalbox::Capability::"credit-check/score-transaction"'
    change = Change(
        seq=1_234_567, time=NOW, agent=NAME, action='Signalbox::Action::"call"',
        resource=resource_id,
        before="allow", after="deny",
        policy_ids=("pii-stays-in-the-eu",), reason=REASON,
    )  # fmt: skip
    report = WhatIfReport(
        candidate_version="candidate", changes=[change],
        by_agent=collections.Counter({(NAME, "allow", "deny"): 1_234}),
    )  # fmt: skip
    check(
        shown(changes_by_agent_table(report), changes_table(report, 20)),
        ["1234567", STAMP, NAME, 'Signalbox::Action::"call"', resource_id, "1,234"],
        REASON.split(),
    )


# -- end to end: commands at 80 columns, in a pipe -----------------------------------------


async def _cli(*args: str) -> Result:
    """A command with its output in a pipe (CliRunner is no TTY), 80 columns wide."""
    return await asyncio.to_thread(CliRunner().invoke, app, list(args), terminal_width=WIDTH)


def _lines(result: Result) -> list[str]:
    assert result.exit_code == 0, result.output
    return result.stdout.splitlines()


async def test_commands_keep_ids_secrets_names_and_dates_whole_at_80_columns(
    make_stack: StackFactory, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", str(WIDTH))
    await make_stack()
    assert settings.nats_url is not None
    url = ["--nats-url", settings.nats_url]

    enrolled = _lines(await _cli("agents", "enroll", NAME, "--team", "payments-risk",
                                 "--owner", "risk-eng", "--note", REASON, *url))  # fmt: skip
    [token] = [line for line in enrolled if re.fullmatch(r"sbc1\.[a-z2-7]{16}\.\S{43}", line)]
    credential_id = token.split(".")[1]
    assert any(NAME in line for line in enrolled)

    agent = Agent(
        AgentManifest(name=NAME, version="12.4.0-rc.1.build.2031", owner="risk-eng",
                      team="payments-risk", models=(MODEL,)),
        nats_url=settings.nats_url, credential=token, heartbeat_interval=0,
    )  # fmt: skip
    agent.capability("score-transaction")(_echo)
    async with agent:
        listed = _lines(await _cli("agents", "list", *url))
        shown_agent = _lines(await _cli("agents", "show", NAME, *url))
    credentials = _lines(await _cli("agents", "credentials", NAME, *url))
    tripped = _lines(await _cli("breakers", "trip", NAME, "--reason", REASON, *url))
    breakers = _lines(await _cli("breakers", "list", *url))
    replayed = _lines(await _cli("audit", "replay", "--since", "1h", "--agent", NAME, *url))

    for lines in (listed, shown_agent, credentials, tripped, breakers, replayed):
        assert all(cell_len(line) <= WIDTH for line in lines), "\n".join(lines)
        assert any(NAME in line for line in lines), "\n".join(lines)
    assert any("12.4.0-rc.1.build.2031" in line for line in listed)
    assert any(MODEL in line for line in shown_agent)
    assert any(credential_id in line for line in credentials)
    assert token not in "\n".join(credentials)
    dates = re.compile(r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}")
    assert len([line for line in credentials if dates.search(line)]) == 2  # created, expires
    tokens = {word for line in breakers for word in line.split()}
    assert set(REASON.split()) <= tokens, "\n".join(breakers)
    assert any(f"agent.{NAME}" in line for line in breakers)


async def _echo(req: dict[str, Any]) -> dict[str, Any]:
    return req
