"""``signalbox rollout set | status | promote | deprecate`` and ``signalbox rollback``.

::

    signalbox rollout set recommender 2.0.0=5% [--stable 1.0.0] [--sticky]
                          [--max-error-rate 5%] [--max-p99-ratio 2] [--max-cost-ratio 1.5]
                          [--min-calls 50] [--guard-window 5m] [--no-guard]
    signalbox rollout status recommender [--window 5m] [--json]
    signalbox rollout promote recommender 2.0.0
    signalbox rollout deprecate recommender 1.0.0 [--archive]
    signalbox rollback recommender [--reason TEXT]

Routes live in the KV bucket ``sb_routes``; the policy service serves these
on ``sb.admin.rollout.<op>`` (operators only), validates them against the
registry, and rolls a guarded canary back on its own when it breaches a
guard. See :mod:`services.policy.routes`.

:mod:`services.cli.main` registers :data:`rollout_app` as ``signalbox rollout``
and :func:`rollback` as ``signalbox rollback``.
"""

from __future__ import annotations

import re
from typing import Annotated

import typer
from rich.console import Console, Group
from rich.text import Text

from schemas import (
    DeprecateVersion,
    PromoteRollout,
    RollbackRollout,
    RolloutStatus,
    RolloutStatusRequest,
    RouteGuard,
    SetRollout,
)
from services.cli.common import (
    JsonOption,
    NatsUrlOption,
    admin_call,
    clock,
    fail,
    parse_duration,
    who,
)
from services.cli.render import CliTable, Column, Fit, to_json

__all__ = ["rollback", "rollout_app", "rollout_view"]

rollout_app = typer.Typer(
    help="Canary rollouts: split an agent's calls across its versions, compare, roll back.",
    no_args_is_help=True,
)

TargetArg = Annotated[str, typer.Argument(help="The agent name.")]
_WEIGHT = re.compile(r"^([0-9A-Za-z.+-]{1,64})=(\d{1,3})%?$")


def _percent(text: str, option: str) -> float:
    raw = text.strip()
    try:
        value = float(raw[:-1]) / 100 if raw.endswith("%") else float(raw)
    except ValueError:
        fail(f"{option} {text!r} is not a share: use e.g. 5% or 0.05")
    if not 0 <= value <= 1:
        fail(f"{option} {text!r} must be between 0 and 100%")
    return value


def _duration(text: str, option: str) -> float:
    try:
        return parse_duration(text)
    except typer.BadParameter as exc:
        fail(f"{option}: {exc.message}")


def rollout_view(status: RolloutStatus) -> Group:
    """The route and a table of per-version figures."""
    route = status.route
    if route is None:
        head = Text(f"{status.target} has no route: calls go to any registered version.")
    else:
        split = ", ".join(f"{v}={w}%" for v, w in sorted(route.weights.items()) if w)
        guard = route.guard
        # The time comes first on its line: wrapped between words, it is never split.
        head = Text.assemble(
            (status.target, "bold"),
            f": {split} (stable {route.stable}"
            + (f", canary {route.canary}" if route.canary else "")
            + (", sticky" if route.sticky else "")
            + ")\n"
            + f"last change at {clock(route.changed_at)} by {route.changed_by or '?'}: "
            + (route.reason or "set")
            + (
                f"\nguard: error rate > {guard.max_error_rate:.0%} (or {guard.max_error_ratio:g}x "
                f"stable), p99 > {guard.max_p99_ratio:g}x, cost/call > "
                f"{guard.max_cost_ratio:g}x, after {guard.min_calls} calls"
                if guard
                else ""
            ),
            no_wrap=False,  # wrapped between words, even on a soft-wrapping console
            overflow="fold",
        )
    table = CliTable(
        Column("version", Fit.WRAP, min_width=5),
        Column("weight", justify="right"),
        Column("health"),
        *(
            Column(name, justify="right")
            for name in ("calls", "errors", "p50 ms", "p99 ms", "$/call")
        ),
        title=f"last {status.window:g}s, every policy replica",
    )
    for v in status.versions:
        table.add_row(
            v.version + (" (deprecated)" if v.deprecated else ""),
            "" if v.weight is None else f"{v.weight}%",
            v.health,
            f"{v.calls:,}",
            f"{v.error_rate:.1%}" if v.calls else "",
            f"{v.p50_ms:,.1f}" if v.calls else "",
            f"{v.p99_ms:,.1f}" if v.calls else "",
            f"{v.cost_per_call_usd:.5f}" if v.cost_usd else "",
            style="red" if v.calls and v.error_rate > 0.05 else "",
        )
    return Group(head, table)


def _show(status: RolloutStatus, as_json: bool) -> None:
    if as_json:
        typer.echo(to_json(status))
    else:
        Console().print(rollout_view(status))


@rollout_app.command("set")
def rollout_set(
    target: TargetArg,
    weight: Annotated[str, typer.Argument(help="Canary version and its share: 2.0.0=5%.")],
    stable: Annotated[
        str, typer.Option("--stable", help="Stable version (default: the current one).")
    ] = "",
    sticky: Annotated[
        bool, typer.Option("--sticky", help="Keep a route key's calls on one version.")
    ] = False,
    max_error_rate: Annotated[str, typer.Option("--max-error-rate")] = "5%",
    max_p99_ratio: Annotated[float, typer.Option("--max-p99-ratio", min=1.0)] = 2.0,
    max_cost_ratio: Annotated[float, typer.Option("--max-cost-ratio", min=1.0)] = 1.5,
    min_calls: Annotated[int, typer.Option("--min-calls", min=1)] = 50,
    guard_window: Annotated[str, typer.Option("--guard-window")] = "5m",
    no_guard: Annotated[bool, typer.Option("--no-guard", help="No automatic rollback.")] = False,
    as_json: JsonOption = False,
    nats_url: NatsUrlOption = None,
) -> None:
    """Send a share of TARGET's calls to a canary version, the rest to the stable one."""
    match = _WEIGHT.match(weight.strip())
    if match is None or int(match.group(2)) > 100:
        fail(f"{weight!r} is not VERSION=PERCENT (e.g. 2.0.0=5%)")
    guard = None
    if not no_guard:
        guard = RouteGuard(
            max_error_rate=_percent(max_error_rate, "--max-error-rate"),
            max_p99_ratio=max_p99_ratio, max_cost_ratio=max_cost_ratio, min_calls=min_calls,
            window=_duration(guard_window, "--guard-window"),
        )  # fmt: skip
    request = SetRollout(
        target=target, weights={match.group(1): int(match.group(2))}, stable=stable,
        sticky=sticky, guard=guard, requested_by=who(),
    )  # fmt: skip
    _show(admin_call(nats_url, "rollout", "set", request, RolloutStatus), as_json)


@rollout_app.command("status")
def rollout_status(
    target: TargetArg,
    window: Annotated[str, typer.Option("--window", help="Figures over this window.")] = "5m",
    as_json: JsonOption = False,
    nats_url: NatsUrlOption = None,
) -> None:
    """TARGET's route and, per version: calls, error rate, p50/p99 latency, cost per call."""
    request = RolloutStatusRequest(target=target, window=_duration(window, "--window"))
    _show(admin_call(nats_url, "rollout", "status", request, RolloutStatus), as_json)


@rollout_app.command("promote")
def rollout_promote(
    target: TargetArg,
    version: Annotated[str, typer.Argument(help="The version that gets all traffic.")],
    as_json: JsonOption = False,
    nats_url: NatsUrlOption = None,
) -> None:
    """Send all of TARGET's calls to VERSION, which becomes the stable version."""
    request = PromoteRollout(target=target, version=version, requested_by=who())
    _show(admin_call(nats_url, "rollout", "promote", request, RolloutStatus), as_json)


@rollout_app.command("deprecate")
def rollout_deprecate(
    target: TargetArg,
    version: Annotated[str, typer.Argument(help="The version that gets no new calls.")],
    archive: Annotated[
        bool, typer.Option("--archive", help="Also deregister it (its audit history stays).")
    ] = False,
    as_json: JsonOption = False,
    nats_url: NatsUrlOption = None,
) -> None:
    """Stop new calls to VERSION of TARGET (calls in flight still finish)."""
    request = DeprecateVersion(target=target, version=version, archive=archive, requested_by=who())
    _show(admin_call(nats_url, "rollout", "deprecate", request, RolloutStatus), as_json)


def rollback(
    target: TargetArg,
    reason: Annotated[str, typer.Option("--reason", help="Why (kept in the audit record).")] = "",
    as_json: JsonOption = False,
    nats_url: NatsUrlOption = None,
) -> None:
    """Send all of TARGET's calls back to its last stable version, at once."""
    request = RollbackRollout(target=target, reason=reason, requested_by=who())
    _show(admin_call(nats_url, "rollout", "rollback", request, RolloutStatus), as_json)
