"""``signalbox cost report`` against a real stack: table, CSV and JSON, and failure modes."""

from __future__ import annotations

import asyncio
import csv
import io
import json
from typing import TYPE_CHECKING

import pytest
from support import ainvoke, eventually

from broker.settings import Settings
from services.cost.service import CostService

if TYPE_CHECKING:
    from support import AgentFactory, StackFactory

pytestmark = pytest.mark.usefixtures("cli_operator")


async def test_cost_report_by_team_as_table_csv_and_json(
    settings: Settings, make_stack: StackFactory, make_agent: AgentFactory
) -> None:
    url = settings.nats_url or ""
    await make_stack(services=["tracing", "registry"])
    down = await ainvoke(["cost", "report", "--nats-url", url])
    assert down.exit_code == 1 and "no cost service answers" in down.output
    assert "Traceback" not in down.output

    # Reports name projects bound at enrollment (any other would not be charged).
    loan = make_agent("loan", team="lending", projects=("alpha",))
    fraud = make_agent("fraud", team="risk", projects=("beta",))
    await loan.start()
    await fraud.start()
    stack = await make_stack(services=["cost"])
    cost = stack.services["cost"]
    assert isinstance(cost, CostService)
    await eventually(
        lambda: cost._team("loan") and cost._team("fraud"),
        "the cost service to know both teams",
    )
    for _ in range(3):
        await loan.report_usage(model="gpt-4o", input_tokens=1_000_000, project="alpha")
    await fraud.report_usage(model="unknown-llm", output_tokens=1_000, project="beta")

    async def stored() -> bool:
        report = await asyncio.to_thread(cost.store.report, "team", None, None)
        return report.total.reports >= 4

    await eventually(stored, "four stored reports")

    as_json = await ainvoke(
        ["cost", "report", "--by", "team", "--format", "json", "--nats-url", url]
    )
    assert as_json.exit_code == 0, as_json.output
    data = json.loads(as_json.output)
    assert [(r["key"], r["reports"]) for r in data["rows"]] == [("lending", 3), ("risk", 1)]
    assert data["rows"][0]["cost_usd"] == pytest.approx(7.5)
    assert data["total"]["reports"] == 4
    assert data["total"]["fallback_priced"] == 1

    as_csv = await ainvoke(
        ["cost", "report", "--by", "project", "--format", "csv", "--since", "1h", "--nats-url", url]
    )
    assert as_csv.exit_code == 0, as_csv.output
    rows = list(csv.reader(io.StringIO(as_csv.output)))
    assert rows[0][:3] == ["project", "reports", "input_tokens"]
    assert [r[0] for r in rows[1:]] == ["alpha", "beta", "total"]
    assert rows[-1][1] == "4"

    table = await ainvoke(["cost", "report", "--by", "agent", "--nats-url", url])
    assert table.exit_code == 0, table.output
    assert "Cost by agent" in table.output
    for needle in ("loan", "fraud", "total", "$7.5"):
        assert needle in table.output

    # A window in the past holds nothing.
    empty = await ainvoke(
        [
            "cost",
            "report",
            "--since",
            "2000-01-01T00:00",
            "--until",
            "2000-01-02T00:00",
            "--format",
            "json",
            "--nats-url",
            url,
        ]
    )
    assert empty.exit_code == 0, empty.output
    assert json.loads(empty.output)["rows"] == []


async def test_bad_options_fail_cleanly() -> None:
    bad_since = await ainvoke(["cost", "report", "--since", "yesterday-ish"])
    assert bad_since.exit_code == 1 and "neither a duration" in bad_since.output
    backwards = await ainvoke(["cost", "report", "--since", "1h", "--until", "2h"])
    assert backwards.exit_code == 1 and "must be after" in backwards.output
    bad_by = await ainvoke(["cost", "report", "--by", "galaxy"])
    assert bad_by.exit_code != 0 and "galaxy" in bad_by.output
