"""Spend is charged back to a caller only from a chain the policy service signed.

An agent holding its own credential (a raw nats-py client, no SDK) reports
usage claiming it was made while serving another agent's call, to push its
spend onto that caller and its team in ``cost report --by caller``: with a
made-up ``Sb-Chain`` (no signature, a bad one), a genuine signature for
another target, an expired one, or the caller named in the body's
``on_behalf_of``. None of those rows has a caller (they report as
``(direct)``). Only a chain signed with the services' key for this agent,
as the policy service forwards it, names the caller.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from support import RawAgent, cost_of, enroll, eventually

from broker.codec import encode
from broker.replies import H_CHAIN, H_CHAIN_SIG, H_MSG_ID
from broker.runtime.identity import CHAIN_GRACE, chain_key, sign_chain
from broker.settings import Settings
from schemas import UsageReport
from schemas.cost import DIRECT_CALLER
from services.cost.store import UsageRow

if TYPE_CHECKING:
    from support import AgentFactory, StackFactory

    from services.runner import Stack


def _rows(stack: Stack) -> dict[str, dict[str, Any]]:
    table = UsageRow.__table__  # type: ignore[attr-defined]
    with cost_of(stack).store._engine.connect() as conn:
        return {r.id: dict(r._mapping) for r in conn.execute(select(table))}


async def test_a_forged_chain_never_charges_spend_back_to_a_caller(
    make_stack: StackFactory, make_agent: AgentFactory, settings: Settings
) -> None:
    stack = await make_stack(services=["tracing", "registry", "cost"])
    boss = make_agent("boss", team="finance")  # the caller the worker would bill
    await boss.start()
    worker = make_agent("worker", team="ops")
    await worker.start()
    cost = cost_of(stack)
    await eventually(
        lambda: cost._team("worker") == "ops" and cost._team("boss") == "finance",
        "the cost service to know both teams",
    )
    key = chain_key(settings)
    assert key is not None
    later = time.time() + 600
    reports: list[tuple[str, dict[str, str], tuple[str, ...]]] = [
        ("unsigned", {H_CHAIN: "boss"}, ()),
        ("bad-signature", {H_CHAIN: "boss", H_CHAIN_SIG: f"{later:.3f}.{'0' * 32}"}, ()),
        # Genuine, but signed for another target: it does not verify for the worker.
        ("other-target", {H_CHAIN: "boss", H_CHAIN_SIG: sign_chain(key, "boss", "boss", later, "")},
         ()),
        # Genuine for the worker, but expired before the report reached the stream.
        ("expired", {H_CHAIN: "boss", H_CHAIN_SIG: sign_chain(
            key, "worker", "boss", time.time() - CHAIN_GRACE, "")}, ()),
        # Only the body's word.
        ("named", {}, ("boss",)),
        # Control: the chain as the policy service signs it for the worker names the caller.
        ("signed", {H_CHAIN: "boss", H_CHAIN_SIG: sign_chain(key, "worker", "boss", later, "")},
         ()),
    ]  # fmt: skip
    raw = RawAgent()
    assert settings.nats_url
    nc = await raw.connect(settings.nats_url, "worker", enroll(settings, "worker"))
    try:
        js = nc.jetstream()
        for report_id, headers, on_behalf_of in reports:
            report = UsageReport(
                id=report_id, agent="worker", time=time.time(), model="gpt-4o",
                output_tokens=10_000, on_behalf_of=on_behalf_of,
            )  # fmt: skip
            await js.publish(
                "sb.usage.worker", encode(report), headers={H_MSG_ID: report_id, **headers}
            )
    finally:
        await nc.close()
    await eventually(lambda: len(_rows(stack)) == len(reports), "every report metered")

    rows = _rows(stack)
    forged = [r for r in rows if r != "signed"]
    for report_id in forged:
        assert (rows[report_id]["caller"], rows[report_id]["caller_team"]) == (None, None), (
            report_id
        )
    assert (rows["signed"]["caller"], rows["signed"]["caller_team"]) == ("boss", "finance")
    by_caller = {r.key: r.reports for r in cost.store.report("caller", None, None).rows}
    assert by_caller == {DIRECT_CALLER: len(forged), "boss": 1}
    by_team = {r.key: r.reports for r in cost.store.report("caller_team", None, None).rows}
    assert by_team == {DIRECT_CALLER: len(forged), "finance": 1}
