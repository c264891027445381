"""Run the registry service alone: ``python -m services.registry --nats-url nats://host:4222``."""

from __future__ import annotations

from services.runner import run_one

if __name__ == "__main__":
    run_one("registry")
