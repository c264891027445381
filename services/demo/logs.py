"""The demo's log records go to a file, not between the lines of its story.

The demo makes things fail on purpose (a canary that times out, a budget
alert, a rolled-back route), and the SDK and the services log those at
WARNING or above, as they should on a real system. Printed on the terminal,
each would land in the middle of a table. :func:`capture_logs` sends every
record of WARNING and above to a log file instead (created at the first
record: no record, no file), counts the ones the demo caused on purpose
(:data:`EXPECTED`) and, at the end, :meth:`DemoLog.summary` says how many
were logged where, naming the unexpected ones: they stay visible, out of
the way.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from rich.text import Text

__all__ = ["EXPECTED", "DemoLog", "Expected", "capture_logs"]


@dataclass(frozen=True, slots=True)
class Expected:
    """A log record the demo causes on purpose: its logger (or a parent of it), a
    part of its message, and what the demo did to cause it."""

    logger: str
    contains: str
    cause: str

    def matches(self, record: logging.LogRecord) -> bool:
        """Whether ``record`` is this one."""
        name = record.name
        from_logger = name == self.logger or name.startswith(self.logger + ".")
        return from_logger and self.contains in record.getMessage()


#: What the demo's deliberate failures log (steps 9 and 10).
EXPECTED: tuple[Expected, ...] = (
    Expected("services.cost", "budget team.risk.day soft threshold", "budget alert"),
    Expected("broker.serving", "recommender: capability suggest failed", "canary failures"),
    Expected("services.policy.routes", "rolled recommender 2.0.0 back", "canary roll-back"),
)

_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


class DemoLog(logging.Handler):
    """Writes log records to ``path`` (opened at the first record) and counts them.

    Args:
        path: The log file (``None``: a new file in the temporary folder, named
            at the first record).
        expected: The records the demo causes on purpose.
    """

    def __init__(self, path: Path | None, expected: tuple[Expected, ...] = EXPECTED) -> None:
        super().__init__(logging.WARNING)
        self.setFormatter(logging.Formatter(_FORMAT))
        self.path = path
        self._expected = expected
        #: Records the demo caused on purpose, by cause.
        self.expected: dict[str, int] = {}
        #: Records nothing in the demo explains, as "logger: first line of the message".
        self.unexpected: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        """Append ``record`` to the file; count it as expected or not."""
        try:
            line = self.format(record)
            if self.path is None:
                fd, name = tempfile.mkstemp(prefix="signalbox-demo-", suffix=".log")
                os.close(fd)
                self.path = Path(name)
            with self.path.open("a", encoding="utf-8") as out:
                out.write(line + "\n")
        except Exception:  # a log file that cannot be written must not stop the demo
            self.handleError(record)
        cause = next((e.cause for e in self._expected if e.matches(record)), None)
        if cause is not None:
            self.expected[cause] = self.expected.get(cause, 0) + 1
        else:
            first = record.getMessage().splitlines()[0] if record.getMessage() else ""
            self.unexpected.append(f"{record.name}: {first}")

    @property
    def count(self) -> int:
        """Records logged."""
        return sum(self.expected.values()) + len(self.unexpected)

    def summary(self) -> Text | None:
        """One paragraph saying how many records were logged, why, and where (None: none)."""
        if not self.count:
            return None
        where = str(self.path)
        causes = ", ".join(f"{cause} {n}" for cause, n in self.expected.items())
        if not self.unexpected:
            return Text(
                f"{self.count} warnings of the demo's deliberate failures ({causes}) were "
                f"logged to {where}",
                style="dim",
            )
        unexpected = len(self.unexpected)
        text = Text.assemble(
            (f"{unexpected} unexpected warning{'s' if unexpected > 1 else ''}", "bold yellow"),
            f" logged to {where} (the first: {self.unexpected[0]})",
        )
        if causes:
            text.append(f"; {self.count - unexpected} expected ones too ({causes})", style="dim")
        return text


@contextmanager
def capture_logs(path: Path | None = None) -> Iterator[DemoLog]:
    """Route log records of WARNING and above to a :class:`DemoLog` while the block runs.

    The handler sits on the root logger, so every logger that propagates
    (the SDK's ``broker.*``, the services' ``services.*``, nats-py's) reaches
    it; the root logger's level is lowered to WARNING for the block if it was
    higher. Other handlers are left alone: ``signalbox demo`` installs none on
    the terminal (:func:`services.cli.main.demo`).
    """
    root = logging.getLogger()
    handler = DemoLog(path)
    level = root.level
    if root.level > logging.WARNING:
        root.setLevel(logging.WARNING)
    root.addHandler(handler)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
