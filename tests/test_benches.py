"""Every bench still runs (issue 16, item 14): a bench that cannot run is a defect.

Benchmarks are scripts, not tests (``bench/README.md``). Each one here runs as a child
process the way a user runs it, ``python bench/<name>.py --quick``, with
``SIGNALBOX_BENCH_SMOKE=1`` (``bench/_common.py``: ``smoke_run``), which cuts its
counts and durations to the least that still runs every path and prints every table.
The test checks that it exits 0, prints its tables, and leaves nothing behind in its
temporary folder. It never looks at a figure: on a shared CI machine they mean nothing,
and a bench reports a missed target as MISS, not as a failure.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"

pytestmark = [pytest.mark.nats, pytest.mark.timeout(300)]


@dataclass(frozen=True, slots=True)
class Bench:
    """One bench script: what its smoke run must print, and how long it may take.

    Attributes:
        headings: Texts the output must contain (table titles, row labels), compared
            with runs of whitespace collapsed (Rich wraps a title wider than its table).
        seconds: Longest its smoke run may take before it is stopped (a hang, not a
            slow machine: smoke runs take a few seconds to a minute).
        linux_only: Why it runs on Linux only (empty: anywhere).
    """

    headings: tuple[str, ...]
    seconds: float = 120.0
    linux_only: str = ""


BENCHES: dict[str, Bench] = {
    "calls": Bench(
        (
            "Machine",
            "Calls: raw nats-py vs mediated",
            "Write-ahead decisions: cost (same run)",
            "Ratios to raw",
            "Routing on the call path",
            "CPU per request (µs, by process)",
        )
    ),
    "policy": Bench(
        (
            "Machine",
            "Decisions through the Cedar decider, one core",
            "sb.authz vs raw NATS request-reply",
        )
    ),
    "cost": Bench(
        ("Machine", "Usage ingestion,", "Authorize + reserve (sb.authz, sb.cost.reserve)")
    ),
    "audit": Bench(
        (
            "Machine",
            "(a) Audit events chained and stored (events/s)",
            "(b) Replay and verify over SB_AUDIT",
        )
    ),
    "discovery": Bench(("Machine", "Discovery at 200 agents", "Heartbeats at 200 agents")),
    "restart": Bench(
        ("Server killed (SIGKILL) and restarted by the stack: seconds until served again",)
    ),
    # Every fault once, the 3-node cluster included (local processes); a row each.
    "chaos": Bench(
        (
            "Machine",
            "Faults under load: what every executed call and acknowledged report left behind",
            "policy replica -9 (1 of 2)",
            "nats-server restart",
            "up's server -9",
            "cluster node -9 (of 3)",
            "cost service -9",
        ),
        seconds=240.0,
        linux_only="POSIX signals and prctl (a service dies with the bench)",
    ),
}


def bench_scripts() -> set[str]:
    """The runnable benches: ``bench/*.py`` with a ``__main__`` block, not the helpers
    (``_common.py`` runs only as the benches' services child)."""
    return {
        path.stem
        for path in BENCH.glob("*.py")
        if not path.name.startswith("_") and 'if __name__ == "__main__":' in path.read_text()
    }


def test_every_bench_script_has_a_smoke_run() -> None:
    assert bench_scripts() == set(BENCHES), "add the new bench to BENCHES (or remove it)"


def _collapsed(text: str) -> str:
    return re.sub(r"\s+", " ", text)


def _child_env(tmp: Path) -> dict[str, str]:
    """This environment without ``SIGNALBOX_*`` settings (a bench measures the defaults,
    on the store it creates: not CI's PostgreSQL), smoke-sized, temporary files in ``tmp``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIGNALBOX_")}
    env.update(SIGNALBOX_BENCH_SMOKE="1", TMPDIR=str(tmp), PYTHONUNBUFFERED="1")
    return env


def _run(name: str, bench: Bench, tmp: Path) -> subprocess.CompletedProcess[str]:
    """``python bench/<name>.py --quick`` from the repository root; stopped like Ctrl-C
    (SIGTERM: the bench stops what it started) if it hangs, then killed."""
    proc = subprocess.Popen(
        [sys.executable, str(BENCH / f"{name}.py"), "--quick"],
        cwd=ROOT, env=_child_env(tmp), stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        out, err = proc.communicate(timeout=bench.seconds)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        try:
            out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        pytest.fail(f"{name}.py --quick still ran after {bench.seconds:g} s:\n{err[-3000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.mark.parametrize("name", sorted(BENCHES))
def test_bench_runs_smoke_sized_and_prints_its_tables(name: str, tmp_path: Path) -> None:
    bench = BENCHES[name]
    if bench.linux_only and sys.platform != "linux":
        pytest.skip(f"{name}.py needs Linux: {bench.linux_only}")
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    done = _run(name, bench, tmp)
    assert done.returncode == 0, f"{name}.py exited {done.returncode}:\n{done.stderr[-3000:]}"
    printed = _collapsed(done.stdout)
    missing = [h for h in bench.headings if _collapsed(h) not in printed]
    assert not missing, f"{name}.py did not print {missing}:\n{done.stdout[-3000:]}"
    # bench/README.md: each bench removes everything it started when it exits.
    assert not list(tmp.iterdir()), f"{name}.py left {sorted(p.name for p in tmp.iterdir())}"
