"""One readable line per audit record: what ``audit replay``, ``audit tail`` and ``trace`` show.

:func:`summarize` says what a record is about in a few words, from the
``data`` its service wrote (read the emitting code before changing a
summary): a decision says its effect, what was asked (``→ b.work``,
``use_model gpt-4o-mini @ eu-west-1 (openai)``) and what decided it (the
policy ids, or the breaker, or the budget with its figures); a breaker
change its key, states, reason and figures; a budget event the budget
(``team:risk day``) and its amounts; an auth record the outcome, the
credential and why; an admin record what was done to what (``set budget
team:risk day $5.00``); a rejection its code and the subject refused.
Anything else falls back to compact ``key=value`` pairs, never raw JSON.

The actor (and, in tables, the subject) is shown beside the summary, so it
is not repeated, but for a rejection, whose subject is the point. Amounts go
through :func:`broker.money.usd`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from datetime import datetime
from typing import Any

from rich.text import Text

from broker.money import usd
from schemas import AuditEvent

__all__ = ["budget_label", "summarize"]

_ALLOW = "bold green"
_DENY = "bold red"
_CODE = "yellow"
_DIM = "dim"

#: Reason codes of a budget guard's deny (services.policy.budget_check).
_BUDGET_CODES = frozenset(
    {"budget_exceeded", "estimate_required", "budget_unavailable", "budget_unreadable"}
)
#: Reason codes an effect already says (shown only when something else decided).
_IMPLIED_CODES = frozenset({"", "allowed", "needs_approval"})
#: Longest free text (a message, a reason) a summary shows before an ellipsis.
_TEXT_LIMIT = 100
#: Longest ``key=value`` fallback.
_PAIRS_LIMIT = 160


def summarize(event: AuditEvent) -> Text:
    """The one thing worth reading about ``event``, on one line, styled.

    Kept short: the actor and subject are shown next to it, so they are not
    repeated (a rejection names its subject: what was refused).
    """
    data = event.data if isinstance(event.data, dict) else {}
    summary = _SUMMARIES.get(event.kind)
    if summary is not None:
        return summary(event, data)
    return Text(_pairs(data))


# -- helpers ---------------------------------------------------------------------------


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _strings(value: Any) -> list[str]:
    if isinstance(value, list | tuple):
        return [str(v) for v in value]
    return [str(value)] if value else []


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _money(value: Any) -> str:
    amount = _number(value)
    return "?" if amount is None else usd(amount)


def _short(text: Any, limit: int = _TEXT_LIMIT) -> str:
    """Free text on one line, cut with an ellipsis past ``limit`` characters."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def _clock(t: Any) -> str:
    moment = _number(t)
    return "?" if moment is None else datetime.fromtimestamp(moment).strftime("%Y-%m-%d %H:%M:%S")


def _scalar(key: str, value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float) and key.endswith("_usd"):
        return usd(value)
    if isinstance(value, float):
        return f"{value:g}"
    text = " ".join(str(value).split())
    return f'"{text}"' if " " in text or not text else text


def _flat(data: Mapping[str, Any], prefix: str = "") -> Iterable[tuple[str, str]]:
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from _flat(value, f"{name}.")
        elif isinstance(value, list | tuple):
            yield name, ",".join(_scalar(name, v) for v in value) or "—"
        else:
            yield name, _scalar(name, value)


def _pairs(data: Mapping[str, Any], limit: int = _PAIRS_LIMIT) -> str:
    """``data`` as compact ``key=value`` pairs (nested keys dotted), never JSON."""
    return _short(" ".join(f"{k}={v}" for k, v in _flat(data)), limit) or "—"


def budget_label(key: str) -> str:
    """``team.risk.day`` as an operator types it: ``team:risk day``."""
    scope, _, rest = key.partition(".")
    name, _, window = rest.rpartition(".")
    if not (scope and name and window):
        return key
    return f"{scope}:{name} {window}"


def _budget_of(budget: Mapping[str, Any]) -> str:
    """A budget's label from a record's budget dict (a key, or scope, name and window)."""
    if budget.get("key"):
        return budget_label(str(budget["key"]))
    scope, name, window = (budget.get(k) for k in ("scope", "name", "window"))
    return f"{scope}:{name} {window}" if scope and name else "?"


def _standing(charge: Mapping[str, Any]) -> str:
    """``$4.10 spent + $0.20 reserved of $5.00`` from a budget charge's amounts."""
    return (
        f"{_money(charge.get('spent_usd'))} spent + {_money(charge.get('reserved_usd'))} "
        f"reserved of {_money(charge.get('limit_usd'))}"
    )


def _effect(effect: str) -> Text:
    return Text(effect, style=_ALLOW if effect in ("allow", "ok", "allowed") else _DENY)


# -- decisions -------------------------------------------------------------------------


def _asked(data: Mapping[str, Any]) -> str:
    """What a decision was about: ``→ b.work``, or ``use_model gpt-4o @ eu-west-1 (openai)``."""
    if "capability" in data or "target" in data:
        return f"→ {data.get('target', '?')}.{data.get('capability', '?')}"
    if "action" in data or "resource" in data:
        text = f"{data.get('action') or '?'} {data.get('resource') or '?'}"
        if data.get("region"):
            text += f" @ {data['region']}"
        if data.get("provider"):
            text += f" ({data['provider']})"
        return text
    return "model or tool use"  # a breaker's refusal, recorded before it named the use


def _breaker_why(breaker: Mapping[str, Any]) -> str:
    """``breaker agent.b open (error_rate)``; a manual one with its operator's words."""
    reason = str(breaker.get("reason") or "?")
    text = f"breaker {breaker.get('key', '?')} {breaker.get('state', 'open')} ({reason}"
    if reason == "manual" and breaker.get("text"):
        text += f': "{_short(breaker["text"], 60)}"'
    return text + ")"


def _budget_why(code: str, data: Mapping[str, Any], decision: Mapping[str, Any]) -> str:
    """What a budget guard's deny says: which budget, where it stands, what was needed."""
    budget = _dict(data.get("budget")) or _dict(decision.get("budget"))
    if code == "budget_exceeded" and budget:
        needed = budget.get("needed_usd")
        text = f"{_budget_of(budget)} budget, {_standing(budget)}"
        return text + (f", needs {_money(needed)}" if needed is not None else "")
    if code == "budget_unreadable" and budget:
        return f"{_budget_of(budget)} budget record unreadable"
    budgets = [budget_label(k) for k in _strings(data.get("budgets"))]
    if code == "budget_unavailable":
        return "no cost service answered" + (f" ({', '.join(budgets)})" if budgets else "")
    return f"budgets {', '.join(budgets)}" if budgets else ""


def _decision(event: AuditEvent, data: dict[str, Any]) -> Text:
    decision = _dict(data.get("decision"))
    effect = str(decision.get("effect", "?"))
    code = str(decision.get("reason_code") or "")
    ids = ", ".join(_strings(decision.get("policy_ids")))
    text = Text.assemble(_effect(effect), f" {_asked(data)}")
    breaker = _dict(data.get("breaker")) or _dict(decision.get("breaker"))
    if breaker or code == "breaker_open":
        text.append(": ")
        text.append(_breaker_why(breaker) if breaker else code, style=_CODE)
        return text
    if code in _BUDGET_CODES:  # the budget decided, not the permit that allowed the use
        why = _budget_why(code, data, decision)
        text.append(f" {code}", style=_CODE)
        return text.append(f": {why}" if why else "")
    if code == "approved":
        return text.append(f" approved by {data.get('approved_by') or 'an operator'}")
    if code not in _IMPLIED_CODES and not (code == "default_deny" and "default-deny" in ids):
        text.append(f" {code}", style=_CODE)
    if ids:
        text.append(f" [{ids}]", style=_DIM)
    if data.get("approval_id") and effect == "needs_approval":
        text.append(f" approval {data['approval_id']}", style=_DIM)
    reserved = _number(decision.get("reserved_usd"))
    if reserved:
        budgets = ", ".join(budget_label(k) for k in _strings(data.get("budgets")))
        text.append(f" reserved {usd(reserved)}" + (f" on {budgets}" if budgets else ""), _DIM)
    return text


def _shadow(event: AuditEvent, data: dict[str, Any]) -> Text:
    active, shadow = _dict(data.get("active")), _dict(data.get("shadow"))
    asked = dict(data)
    if data.get("action") == "call":
        asked.pop("action")
    version = f" v{shadow['version']}" if shadow.get("version") else ""
    ids = ", ".join(_strings(shadow.get("policy_ids")))
    return Text.assemble(
        f"shadow{version} would ", _effect(str(shadow.get("effect", "?"))),
        " (active ", _effect(str(active.get("effect", "?"))), f") {_asked(asked)}",
        (f" [{ids}]" if ids else "", _DIM),
    )  # fmt: skip


# -- calls, usage, rejections ------------------------------------------------------------


def _call(event: AuditEvent, data: dict[str, Any]) -> Text:
    target = f"{data.get('target', '?')}.{data.get('capability', '?')}"
    latency = f"{_number(data.get('latency_ms')) or 0.0:.1f} ms"
    version = (f" (version {data['version']})", _DIM) if data.get("version") else ""
    if data.get("ok"):
        return Text.assemble(("ok", _ALLOW), f" {target} {latency}", version)
    code = data.get("error_code") or "?"
    return Text.assemble(("error", _DENY), f" {code} {target} {latency}", version)


def _usage(event: AuditEvent, data: dict[str, Any]) -> Text:
    what = data.get("model") or data.get("provider") or "usage"
    tokens_in = int(_number(data.get("input_tokens")) or 0)
    tokens_out = int(_number(data.get("output_tokens")) or 0)
    text = Text(f"{what} {tokens_in:,} in / {tokens_out:,} out")
    cost = _number(data.get("cost_nanos"))
    if cost is not None:
        text.append(f" {usd(cost / 1e9)}")
    if data.get("unreserved"):
        text.append(" unreserved", style=_CODE)
    over = [budget_label(k) for k in _strings(data.get("overspent"))]
    if over:
        text.append(f" over budget {', '.join(over)}", style=_DENY)
    return text


def _rejected(event: AuditEvent, data: dict[str, Any]) -> Text:
    details = _dict(data.get("details"))
    text = Text(str(data.get("code", "?")), style="bold yellow")
    if event.subject:
        text.append(f" on {event.subject}")
    if "target" in details:
        text.append(f" ({details['target']}.{details.get('capability', '?')})")
    elif "reply" in details and "fault" in details:
        text.append(f" (reply {details['reply'] or 'none'})")
    elif "path" in details:
        text.append(f" at {details['path']}")
    elif data.get("message"):
        text.append(f": {_short(data['message'])}")
    summary = _dict(data.get("summary"))
    if summary.get("count"):
        window = _number(summary.get("window_s")) or 0.0
        text.append(f" ({summary['count']} times in {window:g}s)", style=_DIM)
    return text


# -- registry and auth ---------------------------------------------------------------------


def _registry(event: AuditEvent, data: dict[str, Any]) -> Text:
    op = str(data.get("op", "?"))
    name = data.get("name", "?")
    who = "" if name == event.actor else f" {name}"
    if op == "deregister":
        versions = ", ".join(_strings(data.get("versions"))) or "every version"
        return Text(f"deregister{who} {versions} by {data.get('by', '?')}")
    if op == "leave":
        return Text(f"leave{who} {data.get('version', '?')} instance {data.get('instance', '?')}")
    if op != "register":
        return Text(f"{op}{who} {_pairs({k: v for k, v in data.items() if k != 'op'})}")
    caps = ", ".join(_strings(data.get("capabilities")))
    text = Text(f"register{who} {data.get('version', '')}".rstrip())
    if caps:
        text.append(f" [{caps}]")
    if data.get("created"):
        text.append(" new", style=_DIM)
    changed = ", ".join(_dict(data.get("capability_tags_changed")))
    if changed:
        text.append(f" data tags changed: {changed}", style=_CODE)
    return text


def _auth(event: AuditEvent, data: dict[str, Any]) -> Text:
    outcome = str(data.get("outcome", "?"))
    text = _effect(outcome)
    if data.get("summary"):  # a source's failures over a window, counted by reason
        reasons = ", ".join(f"{k} {v}" for k, v in _dict(data.get("reasons")).items())
        window = _number(data.get("window")) or 0.0
        text.append(f" {data.get('failures', '?')} times from {data.get('source', '?')}")
        text.append(f" in {window:g}s" + (f" ({reasons})" if reasons else ""), style=_DIM)
    else:
        if outcome != "allowed" and data.get("reason"):
            text.append(f" {data['reason']}", style=_CODE)
        if data.get("credential"):
            text.append(f" credential {data['credential']}")
        if data.get("client_host"):
            text.append(f" from {data['client_host']}")
        if data.get("session_expires"):
            text.append(f" until {_clock(data['session_expires'])}", style=_DIM)
    if data.get("other_sources"):
        text.append(" (and other sources)", style=_DIM)
    return text


# -- admin -------------------------------------------------------------------------------


def _with_reason(text: str, data: Mapping[str, Any]) -> str:
    return f"{text}: {_short(data['reason'], 60)}" if data.get("reason") else text


def _budget_admin(op: str, data: Mapping[str, Any]) -> str:
    budget, previous = _dict(data.get("budget")), _dict(data.get("previous"))
    limit = _money(budget.get("limit_usd"))
    if op == "budget_removed":
        return f"removed budget {_budget_of(budget)} ({limit})"
    text = f"set budget {_budget_of(budget)} {limit}"
    if previous and previous.get("limit_usd") != budget.get("limit_usd"):
        text += f" (was {_money(previous.get('limit_usd'))})"
    elif not previous:
        text += " (new)"
    ratio = _number(budget.get("soft_ratio"))
    if ratio is not None and "soft_ratio" in _strings(data.get("given")):
        text += f", alert at {ratio:.0%}"
    return text


def _binding_changes(data: Mapping[str, Any]) -> str:
    before, after = _dict(data.get("before")), _dict(data.get("after") or data.get("binding"))
    parts = []
    for field in _strings(data.get("changed")):
        old, new = (", ".join(_strings(v)) or "—" for v in (before.get(field), after.get(field)))
        parts.append(f"{field} {old} → {new}" if before else f"{field} {new}")
    return "; ".join(parts)


def _identity_admin(op: str, data: Mapping[str, Any]) -> str:
    agent = data.get("agent", "?")
    if op == "enroll":
        text = f"enroll {agent} credential {data.get('credential', '?')}"
        text += f" until {_clock(data.get('expires_at'))}"
        changes = _binding_changes(data)
        return text + (f"; bound {changes}" if changes else "")
    if op == "bind":
        changes = _binding_changes(data) or "nothing changed"
        return _with_reason(f"bind {agent}: {changes}", data)
    credentials = ", ".join(_strings(data.get("credentials"))) or "no credential"
    closed = data.get("disconnected") or 0
    text = f"revoke {agent} {credentials}" + (f" ({closed} connections closed)" if closed else "")
    return _with_reason(text, data)


def _operators_admin(op: str, data: Mapping[str, Any]) -> str:
    name = data.get("name", "?")
    if op == "operators.add":
        return (
            f"add operator {name} ({data.get('role', '?')}) credential "
            f"{data.get('credential', '?')} until {_clock(data.get('expires_at'))}"
        )
    credentials = ", ".join(_strings(data.get("credentials"))) or "no credential"
    return _with_reason(f"revoke operator {name} {credentials}", data)


def _weights(value: Any) -> str:
    return ", ".join(f"{v} {w:g}%" if isinstance(w, int | float) else f"{v} {w}"
                     for v, w in _dict(value).items()) or "—"  # fmt: skip


def _rollout_admin(op: str, data: Mapping[str, Any]) -> str:
    target = data.get("target", "?")
    if op == "auto_rollback":
        text = f"auto-rollback {target} {data.get('canary', '?')} → {data.get('stable', '?')}"
        return text + (f": {_short(data['text'])}" if data.get("text") else "")
    if op == "rollout_archive":
        return f"archive {target} {data.get('version', '?')}"
    text = f"rollout {op.removeprefix('rollout_')} {target}: {_weights(data.get('weights'))}"
    if data.get("weights_before") is not None:
        text += f" (was {_weights(data.get('weights_before'))})"
    return text


def _policy_admin(op: str, data: Mapping[str, Any]) -> str:
    if op == "shadow_off":
        return "shadow policy set off"
    label = f' "{_short(data["label"], 60)}"' if data.get("label") else ""
    if op == "shadow_on":
        return f"shadow policy set v{data.get('version', '?')}{label}"
    verb = op.removeprefix("policy.")
    return f"policy {verb} v{data.get('version', '?')}{label} (was v{data.get('previous', '?')})"


def _approval_admin(op: str, data: Mapping[str, Any]) -> str:
    verb = "approve" if op.endswith("approve") else "deny"
    text = (
        f"{verb} approval {data.get('approval_id', '?')}: {data.get('caller', '?')} "
        f"→ {data.get('target', '?')}.{data.get('capability', '?')}"
    )
    return _with_reason(text, data)


_ADMIN: dict[str, Callable[[str, Mapping[str, Any]], str]] = {
    "budget_set": _budget_admin, "budget_removed": _budget_admin,
    "enroll": _identity_admin, "bind": _identity_admin, "revoke": _identity_admin,
    "operators.add": _operators_admin, "operators.revoke": _operators_admin,
    "auto_rollback": _rollout_admin, "rollout_archive": _rollout_admin,
    "shadow_on": _policy_admin, "shadow_off": _policy_admin,
    "approvals.approve": _approval_admin, "approvals.deny": _approval_admin,
}  # fmt: skip


def _admin(event: AuditEvent, data: dict[str, Any]) -> Text:
    op = str(data.get("op", ""))
    render = _ADMIN.get(op)
    if render is None and op.startswith("rollout_"):
        render = _rollout_admin
    elif render is None and op.startswith("policy."):
        render = _policy_admin
    if render is None:
        return Text(_pairs(data))
    return Text(render(op, data))


# -- breakers, budgets, alerts -----------------------------------------------------------


def _figures(figures: Mapping[str, Any]) -> str:
    return " ".join(f"{k}={_scalar(k, v)}" for k, v in figures.items())


def _breaker(event: AuditEvent, data: dict[str, Any]) -> Text:
    breaker = _dict(data.get("breaker"))
    op = str(data.get("op", "?"))
    key = data.get("key") or breaker.get("key", "?")
    reason = str(breaker.get("reason") or "?")
    moved = f"{data.get('from', '?')} → {data.get('to', breaker.get('state', '?'))}"
    text = Text.assemble((op, _CODE), f" {key} {moved}")
    if op in ("trip", "reopen"):
        text.append(f" ({reason})")
        figures = _figures(_dict(breaker.get("figures")))
        if figures:
            text.append(f" {figures}", style=_DIM)
        cooldown = _number(breaker.get("cooldown"))
        if cooldown and breaker.get("until") is not None:
            text.append(f" for {cooldown:g}s", style=_DIM)
        elif breaker.get("until") is None:
            text.append(" until reset", style=_DIM)
    if (op == "reset" or (op == "trip" and reason == "manual")) and breaker.get("text"):
        text.append(f': "{_short(breaker["text"], 60)}"')
    return text


def _budget(event: AuditEvent, data: dict[str, Any]) -> Text:
    what = str(data.get("event", "?"))
    if what in ("exhausted", "soft_threshold"):
        budget, charge = _dict(data.get("budget")), _dict(data.get("charge"))
        ratio = _number(data.get("soft_ratio"))
        label = "exhausted" if what == "exhausted" else "soft alert"
        at = f" at {ratio:.0%}" if what == "soft_threshold" and ratio is not None else ""
        return Text.assemble(
            (label, _DENY if what == "exhausted" else _CODE),
            f" {_budget_of(budget)}{at}: {_standing(charge)}",
        )
    if what == "refused":
        budget = _dict(data.get("budget"))
        text = Text.assemble(
            ("refused", _DENY),
            f" {data.get('model', '?')} {_money(data.get('amount_usd'))}: "
            f"{_budget_of(budget)} {_standing(budget)}",
        )
        return text.append(" (exhausted)", style=_DIM) if data.get("exhausted") else text
    if what == "unreserved":
        expired = " (its reservation had expired)" if data.get("reservation_expired") else ""
        return Text.assemble(
            ("unreserved", _CODE),
            f" usage of {data.get('model', '?')} {_money(data.get('cost_usd'))}{expired}",
        )
    return Text(_pairs(data))


def _alert(event: AuditEvent, data: dict[str, Any]) -> Text:
    what = str(data.get("event", "?"))
    if what == "overspend":
        label = _budget_of(data | {"key": data.get("budget")})
        return Text.assemble(
            ("overspend", _DENY),
            f" {label} by {_money(data.get('over_usd'))}: {_standing(data)} "
            f"({data.get('model', '?')}); breaker agent.{data.get('agent', '?')} tripped",
        )
    if what in ("unreadable_record", "unusable_record"):
        label = what.removesuffix("_record")
        return Text.assemble(
            (label, _DENY),
            f" {data.get('bucket', '?')} {data.get('key', '?')}: {_short(data.get('reason', ''))}",
            (f"; fix: {data['fix']}" if data.get("fix") else "", _DIM),
        )
    return Text(_pairs(data))


_SUMMARIES: dict[str, Callable[[AuditEvent, dict[str, Any]], Text]] = {
    "decision": _decision, "shadow": _shadow, "call": _call, "usage": _usage,
    "rejected": _rejected, "registry": _registry, "auth": _auth, "admin": _admin,
    "breaker": _breaker, "budget": _budget, "alert": _alert,
}  # fmt: skip
