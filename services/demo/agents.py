"""The demo's four agents: a small lending desk built on the agent SDK.

* ``credit-check``     serves ``score`` (tagged ``pii``: it reads credit files).
* ``fraud-detection``  serves ``check``.
* ``customer-support`` serves ``answer``, from the documents in :mod:`services.demo.docs`.
* ``loan-origination`` serves ``apply``: it calls credit-check and
  fraud-detection through the control plane and decides.

Everything is deterministic (no model, no network) so the demo prints the
same story every run.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Literal

import msgspec

from broker.agent import Agent
from schemas import AgentManifest, EnrollAgent
from services.demo.docs import retrieve

__all__ = [
    "AGENT_NAMES",
    "BINDINGS",
    "PROJECT",
    "Answer",
    "CreditReport",
    "CreditRequest",
    "DemoAgents",
    "FraudReport",
    "FraudRequest",
    "LoanApplication",
    "LoanDecision",
    "Question",
    "build_agents",
    "decide_loan",
    "demo_manifest",
    "enrollment",
    "fraud_report",
    "score_credit",
]

# -- wire types of the demo's capabilities ------------------------------------------------


class CreditRequest(msgspec.Struct, frozen=True, kw_only=True):
    """Input of ``credit-check.score``."""

    applicant_id: str
    annual_income: float
    monthly_debt: float
    years_at_address: int = 0


class CreditReport(msgspec.Struct, frozen=True, kw_only=True):
    """Output of ``credit-check.score``."""

    applicant_id: str
    score: int
    band: Literal["excellent", "good", "fair", "poor"]
    debt_to_income: float
    factors: tuple[str, ...] = ()


class FraudRequest(msgspec.Struct, frozen=True, kw_only=True):
    """Input of ``fraud-detection.check``."""

    application_id: str
    email: str
    country: str
    ip_country: str
    amount: float
    annual_income: float


class FraudReport(msgspec.Struct, frozen=True, kw_only=True):
    """Output of ``fraud-detection.check``."""

    application_id: str
    risk: float
    flagged: bool
    signals: tuple[str, ...] = ()


class Question(msgspec.Struct, frozen=True, kw_only=True):
    """Input of ``customer-support.answer``."""

    text: str


class Answer(msgspec.Struct, frozen=True, kw_only=True):
    """Output of ``customer-support.answer``: a quoted paragraph and where it comes from."""

    text: str
    source: str = ""
    confidence: float = 0.0


class LoanApplication(msgspec.Struct, frozen=True, kw_only=True):
    """Input of ``loan-origination.apply``."""

    application_id: str
    applicant_id: str
    name: str
    amount: float
    term_months: int
    annual_income: float
    monthly_debt: float
    email: str
    country: str
    ip_country: str


class LoanDecision(msgspec.Struct, frozen=True, kw_only=True):
    """Output of ``loan-origination.apply``."""

    application_id: str
    outcome: Literal["approved", "referred", "declined"]
    credit_score: int
    fraud_risk: float
    apr: float | None = None
    reasons: tuple[str, ...] = ()


# -- the domain logic, pure so it can be tested without a server -----------------------------

_DISPOSABLE = frozenset({"mailinator.com", "tempmail.dev", "throwaway.email"})
_APR = {"excellent": 6.9, "good": 8.4, "fair": 11.9}


def score_credit(req: CreditRequest) -> CreditReport:
    """A toy but monotonic credit score: lower debt-to-income and stability score higher."""
    dti = (req.monthly_debt * 12) / req.annual_income if req.annual_income > 0 else 1.0
    score = 820 - int(dti * 450) + min(req.years_at_address, 10) * 3
    score = max(300, min(850, score))
    band: Literal["excellent", "good", "fair", "poor"]
    if score >= 760:
        band = "excellent"
    elif score >= 680:
        band = "good"
    elif score >= 600:
        band = "fair"
    else:
        band = "poor"
    factors = [f"debt-to-income {dti:.0%}"]
    if req.years_at_address >= 5:
        factors.append(f"{req.years_at_address} years at address")
    return CreditReport(
        applicant_id=req.applicant_id,
        score=score,
        band=band,
        debt_to_income=round(dti, 3),
        factors=tuple(factors),
    )


def fraud_report(req: FraudRequest) -> FraudReport:
    """Rule-based fraud screening: each signal adds to the risk; 0.5 or more flags."""
    signals: list[tuple[str, float]] = []
    domain = req.email.rsplit("@", 1)[-1].lower()
    if domain in _DISPOSABLE:
        signals.append((f"disposable e-mail domain {domain}", 0.35))
    if req.ip_country.upper() != req.country.upper():
        signals.append((f"applied from {req.ip_country} but lives in {req.country}", 0.3))
    if req.annual_income > 0 and req.amount > req.annual_income:
        signals.append(("loan larger than a year's income", 0.2))
    risk = round(min(1.0, 0.02 + sum(weight for _, weight in signals)), 2)
    return FraudReport(
        application_id=req.application_id,
        risk=risk,
        flagged=risk >= 0.5,
        signals=tuple(text for text, _ in signals),
    )


def decide_loan(app: LoanApplication, credit: CreditReport, fraud: FraudReport) -> LoanDecision:
    """The lending policy of ``loan-policy`` in code."""
    monthly = app.amount / max(app.term_months, 1)
    dti_after = (app.monthly_debt + monthly) * 12 / app.annual_income if app.annual_income else 1
    reasons: list[str] = []
    outcome: Literal["approved", "referred", "declined"]
    if fraud.flagged:
        reasons.append("fraud detection flagged the application: " + "; ".join(fraud.signals))
    if credit.score < 600:
        reasons.append(f"credit score {credit.score} is under 600")
    if dti_after > 0.5:
        reasons.append(f"debt-to-income would reach {dti_after:.0%} (limit 50%)")
    if reasons:
        outcome = "declined"
    elif credit.score < 680 or dti_after > 0.4:
        outcome = "referred"
        reasons.append(f"score {credit.score}, debt-to-income {dti_after:.0%}: underwriter review")
    else:
        outcome = "approved"
        reasons.append(f"score {credit.score} ({credit.band}), debt-to-income {dti_after:.0%}")
    return LoanDecision(
        application_id=app.application_id,
        outcome=outcome,
        credit_score=credit.score,
        fraud_risk=fraud.risk,
        apr=_APR.get(credit.band) if outcome == "approved" else None,
        reasons=tuple(reasons),
    )


# -- the agents ---------------------------------------------------------------------------


@dataclass(slots=True)
class DemoAgents:
    """The four demo agents, built but not started."""

    credit: Agent
    fraud: Agent
    support: Agent
    loans: Agent

    @property
    def all(self) -> tuple[Agent, ...]:
        """Every agent, in start order (the ones called first)."""
        return (self.credit, self.fraud, self.support, self.loans)

    async def process(self, app: LoanApplication, *, timeout: float = 5.0) -> LoanDecision:
        """What loan-origination does with an application: score and screen it, then decide.

        Both calls go through the control plane (policy decides and audits each)
        and run concurrently.
        """
        credit, fraud = await asyncio.gather(
            self.loans.call(
                "credit-check",
                "score",
                CreditRequest(
                    applicant_id=app.applicant_id,
                    annual_income=app.annual_income,
                    monthly_debt=app.monthly_debt,
                ),
                returns=CreditReport,
                timeout=timeout,
            ),
            self.loans.call(
                "fraud-detection",
                "check",
                FraudRequest(
                    application_id=app.application_id,
                    email=app.email,
                    country=app.country,
                    ip_country=app.ip_country,
                    amount=app.amount,
                    annual_income=app.annual_income,
                ),
                returns=FraudReport,
                timeout=timeout,
            ),
        )
        return decide_loan(app, credit, fraud)


#: What the operator binds to each demo agent at enrollment, as
#: ``signalbox agents enroll NAME --team T --owner O [--namespace N] [--tag K] --project P``
#: would: the registry stores these in the agents' manifests whatever they declare, and
#: the Cedar policies read them (``principal.namespace``, ``principal.tags``: fraud-detection
#: is in the finance namespace, customer-support has EU data residency), as do budgets.
BINDINGS: dict[str, dict[str, str | tuple[str, ...]]] = {
    "credit-check": {"team": "risk", "owner": "risk-eng"},
    "fraud-detection": {"team": "risk", "owner": "fraud-ops", "namespace": "finance"},
    "customer-support": {"team": "service", "owner": "cx-team", "tags": ("data-residency:eu",)},
    "loan-origination": {"team": "lending", "owner": "lending-eng"},
    "web-portal": {"team": "web", "owner": "web-eng"},
    "recommender": {"team": "growth", "owner": "growth-eng"},
}
#: The project every demo agent's usage is charged to.
PROJECT = "lending-demo"


def enrollment(name: str) -> EnrollAgent:
    """The operator's enrollment of demo agent ``name``, with its bound attributes."""
    bound = BINDINGS[name]
    return EnrollAgent(
        name=name,
        ttl=3600,
        note="demo",
        team=str(bound["team"]),
        owner=str(bound["owner"]),
        namespace=str(bound.get("namespace", "")),
        projects=(PROJECT,),
        tags=tuple(bound.get("tags", ())),
    )


def demo_manifest(name: str, description: str, version: str = "1.0.0") -> AgentManifest:
    """Demo agent ``name``'s manifest: it declares its team and owner (as bound); its
    namespace and tags it does not declare at all: the registry fills them in."""
    bound = BINDINGS[name]
    return AgentManifest(
        name=name,
        version=version,
        owner=str(bound["owner"]),
        team=str(bound["team"]),
        description=description,
        project=PROJECT,
    )


#: The demo's agents, by name (each is enrolled with a credential of its own).
AGENT_NAMES = ("credit-check", "fraud-detection", "customer-support", "loan-origination")


def build_agents(
    nats_url: str,
    credentials: Mapping[str, str],
    subject_prefix: str = "sb",
    *,
    screen: Callable[[Agent], Awaitable[None]] | None = None,
) -> DemoAgents:
    """Build the four demo agents against ``nats_url`` (start them with ``async with``).

    ``credentials`` maps each of :data:`AGENT_NAMES` to its enrolled credential;
    ``screen`` is fraud-detection's model use per screening (authorize, reserve,
    settle: see :class:`services.demo.fleet_ops.Screener`).
    """
    credit = Agent(
        demo_manifest("credit-check", "Scores applicants from their credit file"),
        nats_url=nats_url,
        subject_prefix=subject_prefix,
        credential=credentials["credit-check"],
    )
    fraud = Agent(
        demo_manifest("fraud-detection", "Screens applications for fraud"),
        nats_url=nats_url,
        subject_prefix=subject_prefix,
        credential=credentials["fraud-detection"],
    )
    support = Agent(
        demo_manifest("customer-support", "Answers customers from policy documents"),
        nats_url=nats_url,
        subject_prefix=subject_prefix,
        credential=credentials["customer-support"],
    )
    loans = Agent(
        demo_manifest("loan-origination", "Decides personal loans"),
        nats_url=nats_url,
        subject_prefix=subject_prefix,
        credential=credentials["loan-origination"],
    )
    agents = DemoAgents(credit=credit, fraud=fraud, support=support, loans=loans)

    @credit.capability("score", tags=("pii",))
    async def score(req: CreditRequest) -> CreditReport:
        """Credit score and band of an applicant."""
        return score_credit(req)

    @fraud.capability("check")
    async def check(req: FraudRequest) -> FraudReport:
        """Fraud risk of an application."""
        if screen is not None:
            await screen(fraud)
        return fraud_report(req)

    @support.capability("answer")
    async def answer(q: Question) -> Answer:
        """Answer a customer question from the bank's policy documents."""
        passage = retrieve(q.text)
        if passage is None:
            return Answer(
                text="I could not find that in our policies; a colleague will get back to you.",
            )
        return Answer(
            text=passage.text,
            source=passage.document.title,
            confidence=passage.score,
        )

    @loans.capability("apply")
    async def apply(app: LoanApplication) -> LoanDecision:
        """Decide a personal-loan application."""
        return await agents.process(app)

    return agents
