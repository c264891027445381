"""Run the policy service alone: ``python -m services.policy --nats-url nats://host:4222``."""

from __future__ import annotations

from services.runner import run_one

if __name__ == "__main__":
    run_one("policy")
