"""Authorization decisions, the request an agent sends before an LLM or tool call, the
policy lifecycle (``sb.admin.policy.<op>``: validate, apply, show, history, rollback, diff)
and human approvals (``sb.admin.approvals.<op>``: list, approve, deny)."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from schemas._base import Wire
from schemas.breakers import Breaker
from schemas.budgets import BudgetCharge

__all__ = [
    "ActivePolicy",
    "ApplyPolicies",
    "ApprovalList",
    "ApprovalRequest",
    "ApprovalStatus",
    "AuthzRequest",
    "DecideApproval",
    "Decision",
    "DiffPolicies",
    "Effect",
    "FileDiff",
    "ListApprovals",
    "PolicyApplied",
    "PolicyDiff",
    "PolicyFiles",
    "PolicyHistory",
    "PolicyHistoryRequest",
    "PolicySetRecord",
    "PolicyShown",
    "PolicyValidation",
    "PolicyVersionInfo",
    "RollbackPolicies",
    "ShadowPolicies",
    "ShadowStatus",
    "ShowPolicies",
    "ValidatePolicies",
]

Effect = Literal["allow", "deny", "needs_approval"]

_Token = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]{1,64}$(?!\n)")]
# Model and tool ids (``gpt-4o``, ``anthropic/claude-x@2025-01``): printable, no spaces.
_ResourceId = Annotated[str, msgspec.Meta(pattern=r"^[\x21-\x7e]{1,128}$(?!\n)")]
# No control characters. ``$(?!\n)``: Python's ``$`` also matches before a final newline.
_Text = Annotated[
    str, msgspec.Meta(min_length=1, max_length=256, pattern=r"^[^\x00-\x1f\x7f]*$(?!\n)")
]
_Short = Annotated[str, msgspec.Meta(max_length=128, pattern=r"^[^\x00-\x1f\x7f]*$(?!\n)")]


class Decision(Wire, frozen=True, tag="decision.v1"):
    """The outcome of authorizing one request.

    Attributes:
        effect: ``allow``, ``deny`` or ``needs_approval``.
        reasons: Why, in words an operator can act on.
        policy_ids: Ids (``@id``) of the policies that decided; ``default-deny``
            when no policy allowed the request; empty when a fail-closed guard
            denied it before any policy was evaluated, or a budget guard denied
            it after the policies allowed it (see ``reason_code`` and ``budget``;
            the audit record keeps the allowing permits as ``allowed_by``).
        policy_version: Version of the active policy set.
        eval_us: Evaluation time in microseconds.
        reason_code: Stable machine-readable reason: ``allowed``,
            ``needs_approval``, ``forbidden``, ``default_deny``, or a
            fail-closed guard: ``unknown_agent``, ``unknown_action``,
            ``missing_entity``, ``malformed_context``, ``evaluation_error``;
            or a budget guard after the policies allowed a model call:
            ``budget_exceeded``, ``estimate_required``, ``budget_unavailable``,
            ``budget_unreadable`` (a budget record the call would be charged
            to cannot be read; the reason names it and how to rewrite it).
        reservation_id: For an allowed model call some budget applies to: the
            reservation of its worst-case cost; report the call's usage with
            this ``reservation_id`` to settle it (``Agent.model_call`` does).
        reserved_usd: The amount reserved.
        budget: The budget that refused the call (``budget_exceeded``): its
            limit, spent and reserved amounts.
        breaker: The open circuit breaker that refused it (``breaker_open``).
        trace_id: The trace the decision is recorded in (32 hex; ``signalbox
            trace <id>`` shows it); set on answers to ``sb.authz``.
    """

    effect: Effect
    reasons: tuple[str, ...] = ()
    policy_ids: tuple[str, ...] = ()
    policy_version: str = ""
    eval_us: float = 0.0
    reason_code: str = ""
    reservation_id: str = ""
    reserved_usd: float = 0.0
    budget: BudgetCharge | None = None
    breaker: Breaker | None = None
    trace_id: str = ""


class AuthzRequest(Wire, frozen=True, tag="authz_request.v1", omit_defaults=True):
    """Asked on ``sb.authz.<agent>`` before an LLM or tool call; answered with a :class:`Decision`.

    The asking agent is the subject's last token (which the server's
    permissions bind to the agent's credentials), never a field of the body.

    The one value of a model or tool use, and where its fields are documented:
    the SDK's ``Agent.authorize`` and ``Agent.model_call`` take it (or its
    fields as keywords, built by ``broker.modelcall.authz_request``), and a
    ``ModelCall`` keeps the request it was authorized with and derives its
    usage report (model, provider, project, ``on_behalf_of``) from it.

    Attributes:
        action: ``use_model`` or ``use_tool``; any other action is denied
            (``unknown_action``).
        resource: Model or tool id (``gpt-4o``, ``web-search``).
        provider: Model or tool provider (``openai``, ``anthropic``...).
        region: Region of the endpoint that would serve the request
            (``eu-west-1``); empty means unknown (EU-residency rules treat it
            as outside the EU).
        price_per_1k_tokens: Model price, USD per 1,000 tokens.
        estimated_tokens: Tokens this single invocation is expected to use;
            None (absent on the wire): not given, which policies see as an
            unknown estimate (``context.estimated_tokens_known`` false, with
            ``SIGNALBOX_DEFAULT_TOKEN_ESTIMATE`` as ``context.estimated_tokens``),
            never as zero. Defaults are left out of the encoding, so a peer
            that predates this sees an absent estimate as before.
        data_tags: Classification tags of the data sent (``pii``, ``pci-dss``).
        on_behalf_of: Delegation chain (agents or users), outermost first.
        max_output_tokens: Most completion tokens the call may produce (the
            budget reservation prices ``estimated_tokens`` as input plus this
            as output; 0: every estimated token is priced as output).
        project: Project the call is charged to (budgets per project).
    """

    action: _Token
    resource: _ResourceId
    provider: _Short = ""
    region: _Short = ""
    price_per_1k_tokens: Annotated[float, msgspec.Meta(ge=0, le=1_000_000)] = 0.0
    estimated_tokens: Annotated[int, msgspec.Meta(ge=0, le=10**12)] | None = None
    data_tags: Annotated[tuple[_Text, ...], msgspec.Meta(max_length=64)] = ()
    on_behalf_of: Annotated[tuple[_Text, ...], msgspec.Meta(max_length=32)] = ()
    max_output_tokens: Annotated[int, msgspec.Meta(ge=0, le=10**12)] = 0
    project: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]{0,64}$(?!\n)")] = ""


# -- policy lifecycle ----------------------------------------------------------------------

# Largest policy-file or schema text accepted (a KV value must fit in one NATS message).
_PolicyText = Annotated[str, msgspec.Meta(max_length=256 * 1024)]
_FileName = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}\.cedar$(?!\n)")]
_Label = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9._-]{0,64}$(?!\n)")]
_Version = Annotated[int, msgspec.Meta(ge=1)]
_Files = Annotated[dict[_FileName, _PolicyText], msgspec.Meta(max_length=256)]


class PolicyFiles(Wire, frozen=True, tag="policy_files.v1"):
    """A candidate policy set, as read from a policy folder.

    Attributes:
        files: Policy file name (``*.cedar``) -> its text.
        schema: Text of ``schema.cedarschema``.
        label: The set's label (``label.txt``; "" if none).
    """

    files: _Files
    schema: _PolicyText
    label: _Label = ""


class ValidatePolicies(Wire, frozen=True, tag="validate_policies.v1"):
    """``sb.admin.policy.validate``: check a candidate set without storing it.

    Attributes:
        candidate: The set.
    """

    candidate: PolicyFiles


class PolicyValidation(Wire, frozen=True, tag="policy_validation.v1"):
    """Whether a candidate set is valid; Cedar's messages when it is not.

    Attributes:
        ok: Valid (it could be applied).
        errors: Cedar's messages (and Signalbox's checks), one per problem.
        digest: Content digest of the set (SHA-256 hex; "" when invalid).
        policy_ids: ``@id`` of every policy (empty when invalid).
    """

    ok: bool
    errors: tuple[str, ...] = ()
    digest: str = ""
    policy_ids: tuple[str, ...] = ()


class ApplyPolicies(Wire, frozen=True, tag="apply_policies.v1"):
    """``sb.admin.policy.apply``: validate, store as a new version, make it active.

    Attributes:
        candidate: The set.
        requested_by: Who asks (the operator's login; recorded and audited).
        expected_active: Apply only if this version is still the active one
            (0: whatever is active).
    """

    candidate: PolicyFiles
    requested_by: _Short = ""
    expected_active: Annotated[int, msgspec.Meta(ge=0)] = 0


class RollbackPolicies(Wire, frozen=True, tag="rollback_policies.v1"):
    """``sb.admin.policy.rollback``: make an earlier version active again.

    Attributes:
        to: The version; 0: the one active before the current one.
        requested_by: Who asks (recorded and audited).
    """

    to: Annotated[int, msgspec.Meta(ge=0)] = 0
    requested_by: _Short = ""


class ShowPolicies(Wire, frozen=True, tag="show_policies.v1"):
    """``sb.admin.policy.show``: one stored version (0: the active one)."""

    version: Annotated[int, msgspec.Meta(ge=0)] = 0


class PolicyHistoryRequest(Wire, frozen=True, tag="policy_history_request.v1"):
    """``sb.admin.policy.history``: the newest ``limit`` versions."""

    limit: Annotated[int, msgspec.Meta(ge=1, le=10_000)] = 100


class DiffPolicies(Wire, frozen=True, tag="diff_policies.v1"):
    """``sb.admin.policy.diff``: compare two stored versions, or a candidate with one.

    Attributes:
        from_version: The old side (0: the active version).
        to_version: The new side (0: ``candidate`` if given, else the active version).
        candidate: A set to compare with ``from_version``.
    """

    from_version: Annotated[int, msgspec.Meta(ge=0)] = 0
    to_version: Annotated[int, msgspec.Meta(ge=0)] = 0
    candidate: PolicyFiles | None = None


class PolicyVersionInfo(Wire, frozen=True, tag="policy_version_info.v1"):
    """What is known about one stored version, without its texts.

    Attributes:
        version: Its number (1, 2, ...).
        digest: Content digest (SHA-256 hex of schema and files).
        label: Its label.
        created_by: Who applied it (``operator:<login>``, ``service:policy``).
        created_at: Unix time it was stored.
        policy_ids: ``@id`` of every policy.
        active: Whether it is the active version.
    """

    version: _Version
    digest: str
    label: str = ""
    created_by: str = ""
    created_at: float = 0.0
    policy_ids: tuple[str, ...] = ()
    active: bool = False


class PolicySetRecord(Wire, frozen=True, tag="policy_set.v1"):
    """One stored version of the policy set (KV ``sb_policies``, key ``set.<version>``).

    Attributes:
        version: Its number.
        digest: Content digest; must match the texts.
        label: Its label.
        files: Policy file name -> text.
        schema: The Cedar schema text.
        created_by: Who applied it.
        created_at: Unix time it was stored.
        policy_ids: ``@id`` of every policy.
    """

    version: _Version
    digest: str
    files: dict[str, str]
    schema: str
    label: str = ""
    created_by: str = ""
    created_at: float = 0.0
    policy_ids: tuple[str, ...] = ()


class ActivePolicy(Wire, frozen=True, tag="policy_active.v1"):
    """The pointer to the active version (KV ``sb_policies``, key ``active``).

    Attributes:
        version: The active version.
        digest: Its digest (a replica checks the set it loads against it).
        changed_by: Who moved the pointer.
        changed_at: Unix time it moved.
        reason: ``seed``, ``apply`` or ``rollback``.
        previous: The version active before (0: none); where a rollback
            without a target goes.
    """

    version: _Version
    digest: str
    changed_by: str = ""
    changed_at: float = 0.0
    reason: str = ""
    previous: int = 0


class ShadowPolicies(Wire, frozen=True, tag="policy_shadow.v1"):
    """``sb.admin.policy.shadow``: evaluate a candidate beside the active set on live traffic.

    Attributes:
        candidate: The candidate set; None turns shadow mode off.
        requested_by: Who asks (kept in the audit record).
    """

    candidate: PolicyFiles | None = None
    requested_by: str = ""


class ShadowStatus(Wire, frozen=True, tag="policy_shadow_status.v1"):
    """Whether a shadow set runs, and which (stored as a version that is not active)."""

    enabled: bool
    version: int = 0
    digest: str = ""
    label: str = ""
    active_version: int = 0


class PolicyApplied(Wire, frozen=True, tag="policy_applied.v1"):
    """Reply of ``apply`` and ``rollback``: the pointer moved.

    Attributes:
        version: Now active.
        previous: Active before (0: none).
        digest: Digest of the active set.
        label: Its label.
        unchanged: The candidate equals the active set: nothing was stored.
    """

    version: _Version
    previous: int = 0
    digest: str = ""
    label: str = ""
    unchanged: bool = False


class PolicyShown(Wire, frozen=True, tag="policy_shown.v1"):
    """Reply of ``show``: one version with its texts.

    Attributes:
        record: The stored version (by default the active one; with an
            ``alarm``, the one the answering replica evaluates instead).
        active: Whether it is the active one (and in force).
        active_version: The active version (0: none, or the pointer is unreadable).
        alarm: Why the active set is not in force ("" when it is): the
            active-policy pointer, or the set it names, cannot be read or
            loaded; the replicas keep their last valid set meanwhile.
        evaluating: The policy-set version the answering replica evaluates.
    """

    record: PolicySetRecord
    active: bool
    active_version: int
    alarm: str = ""
    evaluating: str = ""


class PolicyHistory(Wire, frozen=True, tag="policy_history.v1"):
    """Reply of ``history``: versions, newest first.

    Attributes:
        versions: The versions (the active one has ``active=True``).
        active_version: The active version.
    """

    versions: tuple[PolicyVersionInfo, ...]
    active_version: int


class FileDiff(Wire, frozen=True, tag="file_diff.v1"):
    """One changed file of a diff.

    Attributes:
        name: File name (``schema.cedarschema`` or ``*.cedar``).
        change: ``added``, ``removed`` or ``modified``.
        diff: Unified diff of the file.
    """

    name: str
    change: Literal["added", "removed", "modified"]
    diff: str


class PolicyDiff(Wire, frozen=True, tag="policy_diff.v1"):
    """Reply of ``diff``.

    Attributes:
        from_name: The old side (``v3``).
        to_name: The new side (``v4`` or ``candidate``).
        files: Changed files, by name.
        added_ids: Policy ids only in the new side.
        removed_ids: Policy ids only in the old side.
    """

    from_name: str
    to_name: str
    files: tuple[FileDiff, ...] = ()
    added_ids: tuple[str, ...] = ()
    removed_ids: tuple[str, ...] = ()


# -- human approvals -----------------------------------------------------------------------

ApprovalStatus = Literal["pending", "approved", "denied", "expired", "used"]

_ApprovalId = Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{32}$(?!\n)")]
_Digest = Annotated[str, msgspec.Meta(pattern=r"^([0-9a-f]{64})?$(?!\n)")]
_Reason = Annotated[str, msgspec.Meta(max_length=512, pattern=r"^[^\x00-\x1f\x7f]*$(?!\n)")]


class ApprovalRequest(Wire, frozen=True, tag="approval_request.v1"):
    """A call parked until an operator decides (KV ``sb_approvals``, key ``<id>``).

    Published on ``sb.approvals.requested`` when the call is parked, returned
    by ``list``, ``approve`` and ``deny``. An approval lets through exactly
    one call: the parked one, whose ``binding`` it carries.

    Attributes:
        id: Approval id (32 hex digits).
        call_id: Id of the parked call (as in its audit records).
        caller: Calling agent.
        target: Target agent.
        capability: Target capability.
        binding: SHA-256 hex over caller, target, capability and the call's
            payload bytes (:func:`services.policy.approvals.binding_hash`).
        requested_at: Unix time the call was parked.
        expires_at: Unix time after which the call is refused
            (``approval_expired``): the caller's deadline, capped by
            ``SIGNALBOX_APPROVAL_TIMEOUT``.
        policy_ids: Ids of the policies that asked for approval.
        policy_version: Version of the policy set that decided.
        reasons: The decision's reasons.
        status: ``pending``, ``approved`` (not yet used), ``used`` (the call
            went through), ``denied`` or ``expired``.
        decided_by: Who approved or denied (``operator:<login>``).
        decided_at: Unix time of the decision (0: none yet).
        reason: Why the operator decided so (free text).
        used_at: Unix time the approved call was forwarded (0: not yet).
    """

    id: _ApprovalId
    call_id: str
    caller: str
    target: str
    capability: str
    binding: str
    requested_at: float
    expires_at: float
    policy_ids: tuple[str, ...] = ()
    policy_version: str = ""
    reasons: tuple[str, ...] = ()
    status: ApprovalStatus = "pending"
    decided_by: str = ""
    decided_at: float = 0.0
    reason: str = ""
    used_at: float = 0.0


class ListApprovals(Wire, frozen=True, tag="list_approvals.v1"):
    """``sb.admin.approvals.list``: approval requests, newest first.

    Attributes:
        all: Every stored request, decided and expired ones included
            (default: pending only).
        limit: At most this many.
    """

    all: bool = False
    limit: Annotated[int, msgspec.Meta(ge=1, le=10_000)] = 100


class ApprovalList(Wire, frozen=True, tag="approval_list.v1"):
    """Reply of ``list``.

    Attributes:
        approvals: The requests, newest first (an expired pending request is
            shown ``expired``).
    """

    approvals: tuple[ApprovalRequest, ...] = ()


class DecideApproval(Wire, frozen=True, tag="decide_approval.v1"):
    """``sb.admin.approvals.approve`` / ``deny``: decide one pending request.

    Attributes:
        id: The approval id.
        reason: Why (recorded and audited).
        requested_by: Who decides (the operator's login; recorded and audited).
        binding: Decide only if the request's binding hash is this one (""
            means any): guards against approving another call than the one
            looked at.
    """

    id: _ApprovalId
    reason: _Reason = ""
    requested_by: _Short = ""
    binding: _Digest = ""
