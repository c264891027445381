"""The ``signalbox`` command (operators' CLI): :func:`main` is its entry point."""

from __future__ import annotations

import sys

__all__ = ["main"]


def main() -> None:
    """Run the CLI; without the ``server`` extra, say how to install it instead of a traceback."""
    try:
        from services.cli.main import app
    except ModuleNotFoundError as exc:  # an SDK-only install: typer, rich, ... are missing
        sys.stderr.write(
            f"signalbox: the command needs the control plane's packages ({exc.name} is missing).\n"
            "Install them with:  pip install 'signalbox[server]'\n"
            "(an agent's own environment needs only `pip install signalbox`, the SDK).\n"
        )
        raise SystemExit(2) from None
    app()
