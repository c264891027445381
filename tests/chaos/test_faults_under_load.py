"""Faults under load, with real processes (issue 14, item 8: a chaos suite that stays).

Each test runs one scenario of ``bench/chaos.py`` CI-sized (``python bench/chaos.py``
runs the same ones longer and prints the table): a ``nats-server`` with identity on,
every service its own ``python -m services.<name>`` process (or ``signalbox up``
itself), an SDK caller making ~100 keyed calls per second to an SDK target that
records the call id of every call it executes, and the fault repeated under that
load. Afterwards, once everything is quiet and the audit intake drained, what F1-F7
promise:

* every call the target executed has an allowed ``decision`` record in the chained
  trail (write-ahead, F1);
* no idempotency key ran twice, although callers retried after ``OutcomeUnknown``
  (F2), and every call a caller saw succeed ran exactly once;
* ``signalbox audit verify --complete --json`` (run as a child process) reports as
  ``outcome_unknown`` every allowed decision that has no outcome record, nothing
  ``undecided``, an intact chain, and exits 1 exactly when it reports something;
* after every fault, calls issued after it are served again (a liveness bound,
  not a timing target: ``bench/chaos.py`` measures recovery);
* under kill -9 of the cost service: every usage report the SDK acknowledged is
  stored, the budget's spent amount is exactly the sum of the stored reports (none
  charged twice) and never exceeds its limit, although the load asks for more.

None asserts a duration or a rate.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import pytest

# The scenarios live with the bench that prints their table (bench/ is not a package;
# appended, so none of its scripts shadows anything).
sys.path.append(str(Path(__file__).resolve().parents[2] / "bench"))
import chaos

pytestmark = [
    pytest.mark.nats,
    pytest.mark.timeout(180),
    pytest.mark.skipif(sys.platform != "linux", reason="POSIX signals, prctl"),
]

#: Seconds within which calls must be served again after a fault (liveness only).
RECOVERY_BOUND = 30.0


def _check_calls(run: chaos.CallRun) -> None:
    audit = run.audit
    print(run.row())  # shown when a test fails
    assert run.executed, "the load never reached the target"
    assert audit.chain_ok, "audit verify found the hash chain broken"
    # F1, write-ahead: nothing ran without a durable decision.
    assert not run.lost, f"{len(run.lost)} calls executed with no decision: {sorted(run.lost)[:5]}"
    # F2: a keyed call retried (after OutcomeUnknown...) ran at most once, and every call
    # its caller saw succeed ran exactly once.
    assert not run.duplicated, f"keys executed more than once: {run.duplicated}"
    runs = Counter(key for _, key in run.executed)
    assert all(runs[op.key] == 1 for op in run.ops if op.final == "ok")
    # audit verify --complete names every allowed decision that has no outcome record, and
    # nothing else (not the calls refused unrun whose refusal was chained before their
    # decision: test_completeness_order.py).
    assert audit.unknown <= audit.cli_unknown, sorted(audit.unknown - audit.cli_unknown)[:5]
    assert not audit.misreported, sorted(audit.misreported)[:5]
    # Write-ahead: no outcome without its decision.
    assert not audit.cli_undecided, sorted(audit.cli_undecided)[:5]
    assert audit.cli_exit == (1 if audit.cli_unknown else 0)
    # Liveness: served again after every fault.
    for fault in run.faults:
        assert fault.recovery is not None, f"calls not served again after: {fault.what}"
        assert fault.recovery < RECOVERY_BOUND, fault


async def test_a_policy_replica_killed_under_load_leaves_no_call_undecided(
    tmp_path: Path,
) -> None:
    """Two policy replicas share the calls; one, then the other, is killed (-9) and
    restarted, three times. The calls it had forwarded may have run: their callers get
    OutcomeUnknown and retry with the same key, and audit verify reports them."""
    run = await chaos.policy_kill(tmp_path, kills=3, rate=100.0, log=print)
    _check_calls(run)


async def test_a_nats_server_restart_under_load_leaves_no_call_undecided(
    tmp_path: Path,
) -> None:
    """The nats-server stopped and started again on the same store and port, twice;
    services and agents reconnect by themselves."""
    run = await chaos.server_restart(tmp_path, kills=2, rate=100.0, log=print)
    _check_calls(run)


async def test_signalbox_up_server_killed_under_load_leaves_no_call_undecided(
    tmp_path: Path,
) -> None:
    """kill -9 of `signalbox up`'s embedded nats-server (fsync on, as up runs it), twice;
    its supervisor restarts it on the same store and port."""
    run = await chaos.up_server_kill(tmp_path, kills=2, rate=100.0, log=print)
    _check_calls(run)


async def test_a_cluster_node_killed_under_load_leaves_no_call_undecided(
    tmp_path: Path,
) -> None:
    """A 3-node JetStream cluster (streams and buckets with 3 replicas, two policy
    replicas): the node leading the audit intake is killed (-9) and restarted."""
    run = await chaos.cluster_node_kill(tmp_path, kills=1, rate=100.0, log=print)
    _check_calls(run)


async def test_the_budget_holds_and_no_usage_is_lost_when_the_cost_service_is_killed(
    tmp_path: Path,
) -> None:
    """Model calls reserve a $0.50 daily budget (far less than the load wants) and settle
    by usage report, another agent reports usage; the cost service is killed (-9) and
    restarted three times meanwhile."""
    run = await chaos.cost_kill(
        tmp_path, kills=3, rate=25.0, report_rate=50.0, limit_usd=0.5, log=print
    )
    print(run.row())
    outcomes = run.outcomes()
    assert outcomes["ok"] and run.reports, "the load never went through"
    # The budget was reached (the load asks for several times the limit), and held.
    assert outcomes["budget_exceeded"], outcomes
    assert run.windows_over == 0 and run.spent_nanos <= run.limit_nanos, run.row()
    # Every acknowledged report is stored...
    assert not run.lost, f"{len(run.lost)} acknowledged reports not stored"
    # ...and charged once: the spent amount is the sum of what was stored for the agent.
    assert run.double_charged_nanos == 0, run.row()
    for fault in run.faults:
        assert fault.recovery is not None, f"model calls not served again after: {fault.what}"
        assert fault.recovery < RECOVERY_BOUND, fault
