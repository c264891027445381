"""A flood of failed connects is throttled per source and audited as summaries.

Raw nats-py clients hammer a server with identity on (auth callout to the
registry) with bad credentials from 127.0.0.1. The registry must answer
every attempt at once, stop reading its store for a source past the burst,
and audit each source's failures as its first one plus one summary per
window (emitted at stop too) carrying the total and the counts by reason,
while a valid credential from the same address still connects.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import nats
import nats.errors
import pytest

from broker.connection import is_auth_error
from broker.settings import Settings
from schemas import AuditEvent
from services.registry.authcallout import AuthCallout, source_key

if TYPE_CHECKING:
    from support import AuditTrail, StackFactory

from support import enroll

HOST = "127.0.0.1"


async def attempt(url: str, token: str) -> bool:
    """One raw connect with ``token``: True if it connected, False if refused (fast: no retry)."""

    async def quiet(exc: Exception) -> None:
        pass

    try:
        nc = await nats.connect(
            url,
            token=token,
            allow_reconnect=False,
            max_reconnect_attempts=0,
            connect_timeout=3,
            error_cb=quiet,
        )
    except nats.errors.Error as exc:
        assert is_auth_error(exc), exc
        return False
    await nc.close()
    return True


async def hammer(url: str, token: str, n: int, concurrency: int = 8) -> float:
    """``n`` refused connects with ``token``, ``concurrency`` at a time; returns the seconds."""
    started = time.monotonic()
    for i in range(0, n, concurrency):
        results = await asyncio.gather(
            *(attempt(url, token) for _ in range(min(concurrency, n - i)))
        )
        assert not any(results), "a bad credential connected"
    return time.monotonic() - started


def callout_of(stack: Any) -> AuthCallout:
    callout = stack.services["registry"].identity.callout
    assert callout is not None
    return callout  # type: ignore[no-any-return]


def count_verifies(callout: AuthCallout) -> list[str]:
    """Record every token the callout checks against its store."""
    seen: list[str] = []
    verify = callout.store.verify

    def counting(token: str, now: float | None = None) -> Any:
        seen.append(token)
        return verify(token, now)

    callout.store.verify = counting  # type: ignore[method-assign]
    return seen


def refusals(source: str) -> Callable[[AuditEvent], bool]:
    return lambda r: (
        r.kind == "auth" and r.data.get("outcome") == "refused" and r.data.get("source") == source
    )


async def test_a_flood_of_garbage_tokens_is_throttled_summarized_and_never_blocks_a_valid_one(
    make_stack: StackFactory, settings: Settings, audit_trail: AuditTrail
) -> None:
    assert settings.nats_url
    stack = await make_stack(services=["tracing", "registry"])
    callout = callout_of(stack)
    checked = count_verifies(callout)
    valid = enroll(settings, "bob")

    seconds = await hammer(settings.nats_url, "not-a-credential", 200)
    # Refusals are answered at once (the server's callout timeout is 2 s).
    assert seconds < 30, seconds
    assert callout.decisions["refused:throttled"] >= 200 - settings.auth_fail_burst - 8
    assert callout.backoff.blocked(HOST) > 0
    # Garbage from the address does not block a valid credential from it.
    assert await attempt(settings.nats_url, valid)
    assert callout.decisions["allowed"] == 1
    # Past the burst nothing reached the store (give or take the in-flight batch).
    garbage = [t for t in checked if t == "not-a-credential"]
    assert len(garbage) <= settings.auth_fail_burst + 8

    # The window is still open: only the source's first failure is on record.
    first = await audit_trail.wait_for(refusals(HOST))
    await asyncio.sleep(0.5)
    assert len([r for r in await audit_trail.settle() if refusals(HOST)(r)]) == 1
    assert first[0].data["reason"] == "malformed" and "summary" not in first[0].data
    assert first[0].data["client_host"] == HOST

    # Stopping the registry audits the open window's summary: no count is lost.
    await stack.services.pop("registry").stop()
    records = await audit_trail.wait_for(refusals(HOST), count=2)
    assert len(records) == 2
    summary = records[1].data
    assert summary["summary"] is True and summary["failures"] == 200
    assert summary["reason"] == "malformed"  # the first one's
    assert sum(summary["reasons"].values()) == 200
    assert summary["reasons"]["throttled"] == callout.decisions["refused:throttled"]
    assert summary["reasons"]["malformed"] == callout.decisions["refused:malformed"]
    auth = [r for r in await audit_trail.settle() if r.kind == "auth"]
    assert len(auth) == 3  # bob's connection, and the flood's first failure and summary


async def test_guessing_one_credentials_secret_blocks_that_credential_from_that_address_only(
    make_stack: StackFactory, settings: Settings, audit_trail: AuditTrail
) -> None:
    assert settings.nats_url
    stack = await make_stack(services=["tracing", "registry"], auth_fail_burst=5)
    callout = callout_of(stack)
    alice = enroll(settings, "alice")
    bob = enroll(settings, "bob")
    alice_id = alice.split(".")[1]
    forged = alice[:-4] + ("AAAA" if not alice.endswith("AAAA") else "BBBB")
    checked = count_verifies(callout)

    await hammer(settings.nats_url, forged, 60, concurrency=4)
    key = source_key(HOST, alice_id)
    assert callout.backoff.blocked(key) > 0
    assert callout.backoff.blocked(HOST) == 0  # the address itself is not blocked
    assert len(checked) <= 5 + 4
    # Random ids (well-formed, unknown) are charged to the address, not to new keys.
    for i in range(6):
        assert not await attempt(settings.nats_url, f"sbc1.{'x' * 15}{i}.secret")
    # (each still costs a primary-key read: the address's block cannot tell them from real
    # credentials without one, and must not stop those)
    assert callout.decisions["refused:unknown"] == 6
    assert callout.backoff.blocked(HOST) > 0
    assert len(callout.backoff) == 2  # the guessed credential's key and the address
    # Another credential from the same address connects.
    assert await attempt(settings.nats_url, bob)
    # The guessed credential is refused from this address until its block ends, even with
    # its secret: the refusal does no work, so it cannot tell (docs/identity.md).
    before = len(checked)
    assert not await attempt(settings.nats_url, alice)
    assert len(checked) == before
    records = await audit_trail.wait_for(refusals(key))
    assert records[0].data["reason"] == "wrong_secret"
    assert records[0].data["credential"] == alice_id and records[0].actor == "alice"


async def test_with_a_short_window_the_summary_comes_when_it_closes_and_the_block_lifts(
    make_stack: StackFactory, settings: Settings, audit_trail: AuditTrail
) -> None:
    assert settings.nats_url
    stack = await make_stack(
        services=["tracing", "registry"], auth_fail_burst=3, auth_fail_window=1.5
    )
    callout = callout_of(stack)
    alice = enroll(settings, "alice")
    alice_id = alice.split(".")[1]
    forged = alice[:-4] + ("AAAA" if not alice.endswith("AAAA") else "BBBB")
    key = source_key(HOST, alice_id)

    await hammer(settings.nats_url, forged, 12, concurrency=1)
    assert callout.backoff.blocked(key) > 0
    # The periodic flush audits the window once it has closed (the registry still runs).
    records = await audit_trail.wait_for(refusals(key), count=2, timeout=10)
    summary = records[1].data
    assert summary["summary"] is True
    assert summary["reasons"] == {"wrong_secret": 3, "throttled": summary["failures"] - 3}
    # The block lifts after a window: the real secret connects again, and its success
    # clears that credential's failures.
    await asyncio.sleep(max(0.0, callout.backoff.blocked(key)) + 0.1)
    assert await attempt(settings.nats_url, alice)
    assert callout.decisions["allowed"] == 1
    assert len(callout.backoff) == 0


@pytest.mark.parametrize("token", ["", "sbc1.short.x"])
def test_source_keys_charge_anonymous_failures_to_the_address(token: str) -> None:
    from services.registry.authcallout import _credential_id

    assert _credential_id(token) == ""
    assert source_key(HOST, _credential_id(token)) == HOST
    assert source_key(HOST, "abcdefghijklmnop") == f"{HOST}|abcdefghijklmnop"
