"""The one record format every benchmark writes, and the README table generated from it.

A benchmark given `--json PATH` writes one record there (besides its usual console output):

    {"format": 1, "benchmark": "tune", "quick": true, "figures": [Figure, ...], "details": {...}}

Each figure: name, value and unit; its baseline (name, value), measured in the same run; the
ratio (value / baseline value, unless the benchmark pairs its measurements and says so in
`ratio_note`); the goal if there is one and whether it holds; and the command that produced it
(the benchmark's argv without `--json PATH`, which only says where the record goes).

`make bench` (benchmarks/run_all.py) gathers the records of every benchmark into
benchmarks/results/<UTC date>.json with the machine they ran on, and

    python benchmarks/report.py readme

rewrites README.md's table between the `bench:begin` / `bench:end` markers from the newest
results file, so every figure in that table comes from a command.
"""

from __future__ import annotations

import argparse
import json
import operator
import os
import resource
import shlex
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
README = ROOT / "README.md"
BEGIN = "<!-- bench:begin -->"
END = "<!-- bench:end -->"
FORMAT = 1

_OPS: dict[str, Callable[[float, float], bool]] = {">=": operator.ge, "<=": operator.le}


@dataclass(frozen=True)
class Goal:
    on: Literal["value", "ratio"]
    op: Literal[">=", "<="]
    target: float
    note: str = ""  # e.g. the size the goal was set for

    def holds(self, figure: Figure) -> bool | None:
        subject = figure.value if self.on == "value" else figure.ratio
        return None if subject is None else _OPS[self.op](subject, self.target)

    def text(self, unit: str) -> str:
        target = with_unit(self.target, unit) if self.on == "value" else f"{self.target:g}x"
        return f"{self.on} {self.op} {target}" + (f" ({self.note})" if self.note else "")


@dataclass(frozen=True)
class Baseline:
    name: str
    value: float


@dataclass
class Figure:
    name: str
    value: float
    unit: str
    baseline: Baseline | None = None
    ratio: float | None = None
    ratio_note: str = ""
    goal: Goal | None = None
    goal_met: bool | None = None
    command: str = ""

    def __post_init__(self) -> None:
        if self.ratio is None and self.baseline is not None and self.baseline.value:
            self.ratio = self.value / self.baseline.value
        if self.goal is not None:
            self.goal_met = self.goal.holds(self)


@dataclass(frozen=True)
class CpuClock:
    """The machine's cumulative CPU time from /proc/stat (all cores, seconds): what the
    hypervisor took from this VM (steal) and everything. The difference of two readings says
    how much of a run's CPU time was stolen: on the shared 2-core VMs here steal comes in
    bursts of up to a whole core, which stalls whatever runs then (latency tails above all).
    None where /proc/stat does not exist."""

    steal_s: float
    total_s: float

    @classmethod
    def read(cls, stat: Path = Path("/proc/stat")) -> CpuClock | None:
        try:
            fields = stat.read_text().splitlines()[0].split()
        except (OSError, IndexError):
            return None
        if fields[:1] != ["cpu"] or len(fields) < 9:
            return None
        ticks = [int(x) for x in fields[1:]]
        # user nice system idle iowait irq softirq steal [guest guest_nice, already in user]
        hz = os.sysconf("SC_CLK_TCK")
        return cls(steal_s=ticks[7] / hz, total_s=sum(ticks[:8]) / hz)

    def steal_share_since(self, before: CpuClock | None) -> float | None:
        """The share of the CPU time since `before` that was stolen (0..1)."""
        if before is None or self.total_s <= before.total_s:
            return None
        return (self.steal_s - before.steal_s) / (self.total_s - before.total_s)


def steal_since(before: CpuClock | None) -> float | None:
    """The share of the CPU time stolen from `before` to now (None if either is unknown)."""
    now = CpuClock.read()
    return now.steal_share_since(before) if now else None


def steal_text(share: float | None) -> str:
    return "steal unknown" if share is None else f"{share:.0%} of the CPU time stolen"


def process_cpu(proc: Path = Path("/proc")) -> dict[int, tuple[str, float]]:
    """Every process's cumulative CPU time (user + system, seconds) by pid, with a short name:
    its command line's first word, or Ray's process title (`ray::ServeReplica:...`), so a
    soak can say which process took the CPU in a slow minute (the replica, HAProxy, the broker,
    Redis). Processes that end while being read are skipped; {} without /proc."""
    hz = os.sysconf("SC_CLK_TCK")
    found: dict[int, tuple[str, float]] = {}
    for entry in proc.glob("[0-9]*"):
        try:
            stat = (entry / "stat").read_text()
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        # The name in parentheses may hold spaces or ")": the fields start after the last ")".
        fields = stat[stat.rindex(")") + 2 :].split()
        utime, stime = int(fields[11]), int(fields[12])
        words = [a.decode(errors="replace") for a in argv if a]
        name = words[0] if words and words[0].startswith("ray::") else ""
        if words and not name:
            name = Path(words[0].split(" ")[0]).name
            if name.startswith("python"):  # say which program: its script or -m module
                program = [w for w in words[1:] if not w.startswith("-") or w == "-m"]
                program = program[:2] if program[:1] == ["-m"] else program[:1]
                name = " ".join([name, *program]).splitlines()[0][:60]
        name = name or stat[stat.index("(") + 1 : stat.rindex(")")]  # a kernel thread
        found[int(entry.name)] = (name, (utime + stime) / hz)
    return found


def busiest_since(
    before: dict[int, tuple[str, float]],
    count: int = 4,
    proc: Path = Path("/proc"),
    ended: dict[str, float] | None = None,
) -> list[tuple[str, float]]:
    """The `count` names that used the most CPU since `before` (seconds, summed over the
    processes of one name; a process started meanwhile counts from zero). A process that ended
    meanwhile has left /proc: `ended` gives such ones by name with their CPU time as their
    parent measured it (the soak's load generator, from RUSAGE_CHILDREN)."""
    used: dict[str, float] = dict(ended or {})
    for pid, (name, cpu_s) in process_cpu(proc).items():
        start = before[pid][1] if pid in before else 0.0  # kernel threads rename themselves
        used[name] = used.get(name, 0.0) + max(cpu_s - start, 0.0)
    return sorted(used.items(), key=lambda item: -item[1])[:count]


def children_cpu() -> float:
    """CPU time (user + system, seconds) of this process's waited-for children, so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def busiest_text(busiest: list[tuple[str, float]]) -> str:
    return ", ".join(f"{name} {seconds:.1f} s" for name, seconds in busiest)


def command_line(argv: list[str] | None = None) -> str:
    """How this benchmark was started, as a command to paste: `python <script> <args>` with the
    script relative to the repository and `--json PATH` left out."""
    argv = list(sys.argv if argv is None else argv)
    script = Path(argv[0]).absolute().resolve()
    rest, skip = [], False
    for arg in argv[1:]:
        if skip:
            skip = False
        elif arg == "--json":
            skip = True
        elif not arg.startswith("--json="):
            rest.append(arg)
    shown = script.relative_to(ROOT) if script.is_relative_to(ROOT) else Path(script.name)
    return shlex.join(["python", str(shown), *rest])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`--quick` and `--json`, the same for every benchmark."""
    parser.add_argument(
        "--quick", action="store_true", help="small sizes, for `make bench` (explicit flags win)"
    )
    parser.add_argument(
        "--json", type=Path, help="also write the figures here (benchmarks/report.py)"
    )


def apply_quick(parser: argparse.ArgumentParser, args: argparse.Namespace, **quick: Any) -> None:
    """With --quick, each option still at its full-mode default takes its quick value."""
    if args.quick:
        for name, value in quick.items():
            if getattr(args, name) == parser.get_default(name):
                setattr(args, name, value)


def write(
    path: Path | None,
    benchmark: str,
    figures: list[Figure],
    *,
    quick: bool,
    details: dict[str, Any] | None = None,
    argv: list[str] | None = None,
) -> None:
    if path is None:
        return
    command = command_line(argv)
    for figure in figures:
        figure.command = figure.command or command
    record = {
        "format": FORMAT,
        "benchmark": benchmark,
        "quick": quick,
        "figures": [asdict(f) for f in figures],
        "details": details or {},
    }
    path.write_text(json.dumps(record, indent=2, default=str) + "\n")


def figure_from_dict(data: dict[str, Any]) -> Figure:
    data = dict(data)
    if data.get("baseline") is not None:
        data["baseline"] = Baseline(**data["baseline"])
    if data.get("goal") is not None:
        data["goal"] = Goal(**data["goal"])
    goal_met = data.pop("goal_met", None)
    figure = Figure(**data)
    if figure.goal is None:
        figure.goal_met = goal_met
    return figure


def read(path: Path) -> tuple[dict[str, Any], list[Figure]]:
    record = json.loads(path.read_text())
    if record.get("format") != FORMAT:
        raise ValueError(f"{path}: record format {record.get('format')}, expected {FORMAT}")
    return record, [figure_from_dict(f) for f in record["figures"]]


# ---- README table ------------------------------------------------------------------------------
def newest_results(directory: Path = RESULTS) -> Path:
    files = sorted(directory.glob("*.json"))
    if not files:
        raise FileNotFoundError(f"no results in {directory}: run `make bench`")
    return files[-1]


def with_unit(value: float, unit: str) -> str:
    return f"{_number(value)} {unit}".rstrip()


def _number(value: float) -> str:
    if value == 0 or abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:,.3g}" if abs(value) < 10 else f"{value:,.1f}"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _steal_clause(results: dict[str, Any]) -> str:
    """What the hypervisor took, over the run and in the benchmarks it took most from (results
    files before 2026-12-03 did not record it)."""
    share = results["machine"].get("cpu_steal_share")
    if share is None:
        return ""
    worst = sorted(
        (run for run in results["benchmarks"] if run.get("cpu_steal_share") is not None),
        key=lambda run: -run["cpu_steal_share"],
    )[:3]
    each = ", ".join(f"{run['name']} {run['cpu_steal_share']:.0%}" for run in worst)
    return f"; {share:.0%} of the CPU time was stolen by the hypervisor (most in: {each})"


def table(results: dict[str, Any], source: str) -> str:
    """The README's generated block (without the markers) for one results file."""
    machine = results["machine"]
    git = results["git"]
    lines = [
        f"Generated by `python benchmarks/report.py readme` from `{source}`: `make bench` "
        f"(every benchmark in quick mode), {results['started']} to {results['finished']} UTC "
        f"({results['seconds'] / 60:.1f} min), "
        f"commit {git['commit'][:7]}{' with uncommitted changes' if git['dirty'] else ''}; "
        f"{machine['cores']} cores, {machine['memory_gb']:.0f} GB, {machine['cpu']}, Python "
        f"{machine['python']}, load average {machine['load_before'][0]:.2f} before, "
        f"{machine['load_after'][0]:.2f} after{_steal_clause(results)}. Quick sizes are "
        "smaller than the full runs "
        "(see each command), so goals set for a full size are indicative here.",
        "",
        "| benchmark | figure | value | baseline (same run) | ratio | goal | command |",
        "|---|---|---|---|---|---|---|",
    ]
    for run in results["benchmarks"]:
        name = run["name"]
        if run["status"] != "ok":
            reason = run.get("reason") or f"exit {run.get('exit_code')}"
            lines.append(
                f"| {name} | **{run['status']}**: {_cell(reason)} | | | | | "
                f"`{_cell(run['command'])}` |"
            )
            continue
        for figure in (figure_from_dict(f) for f in run["figures"]):
            baseline = (
                f"{_cell(figure.baseline.name)}: {with_unit(figure.baseline.value, figure.unit)}"
                if figure.baseline
                else "-"
            )
            ratio = "-" if figure.ratio is None else f"{figure.ratio:.2f}x"
            if figure.ratio_note:
                ratio += f" ({_cell(figure.ratio_note)})"
            goal = "-"
            if figure.goal is not None:
                verdict = "**met**" if figure.goal_met else "**missed**"
                goal = f"{_cell(figure.goal.text(figure.unit))}: {verdict}"
            lines.append(
                f"| {name} | {_cell(figure.name)} | {with_unit(figure.value, figure.unit)} | "
                f"{baseline} | {ratio} | {goal} | `{_cell(figure.command)}` |"
            )
    return "\n".join(lines)


def replace_block(text: str, block: str) -> str:
    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
        raise ValueError(f"README.md needs exactly one {BEGIN} ... {END} block")
    head, rest = text.split(BEGIN)
    _, tail = rest.split(END)
    return f"{head}{BEGIN}\n{block}\n{END}{tail}"


def readme_block(results_path: Path) -> str:
    results = json.loads(results_path.read_text())
    source = results_path.resolve().relative_to(ROOT).as_posix()
    return table(results, source)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="benchmark records and the README table")
    parser.add_argument("action", choices=("readme",))
    parser.add_argument("--results", type=Path, help="a results file (default: the newest)")
    parser.add_argument("--check", action="store_true", help="fail if README.md differs")
    args = parser.parse_args(argv)
    source = args.results or newest_results()
    text = README.read_text()
    updated = replace_block(text, readme_block(source))
    if args.check:
        if updated != text:
            print(f"README.md's benchmark table is not the one of {source}", file=sys.stderr)
            return 1
        return 0
    README.write_text(updated)
    print(f"README.md: table from {source}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
