"""`make bench`'s record format, its runner and the README table generated from its results (no
services, no network: the benchmarks here are tiny scripts in tmp_path)."""

from __future__ import annotations

import json
import os
import sys
import textwrap
from pathlib import Path

from benchmarks import report, run_all


def test_readme_table_is_the_newest_results_file() -> None:
    """README.md's generated block is what the generator makes of the newest committed results
    file, so the README's figures cannot drift from the data (`make bench-readme` after
    `make bench`)."""
    newest = report.newest_results()
    text = report.README.read_text()
    block = text.split(report.BEGIN)[1].split(report.END)[0]
    assert block.strip() == report.readme_block(newest).strip()
    results = json.loads(newest.read_text())
    # Every benchmark of the run is in the table, also the skipped and failed ones.
    for run in results["benchmarks"]:
        assert f"| {run['name']} |" in block


def test_record_round_trips(tmp_path: Path) -> None:
    figures = [
        report.Figure(
            "runner events/s",
            30_000.0,
            "events/s",
            report.Baseline("passthrough", 100_000.0),
            ratio=0.31,
            ratio_note="median of 2 paired rounds",
            goal=report.Goal("ratio", ">=", 0.85),
        ),
        report.Figure("load", 2.5, "s", goal=report.Goal("value", "<=", 3.0, "at 10M")),
        report.Figure("throughput", 50.0, "req/s", report.Baseline("bare", 200.0)),
    ]
    path = tmp_path / "record.json"
    argv = ["benchmarks/tune.py", "--quick", "--json", str(path), "--rounds", "2"]
    report.write(path, "fake", figures, quick=True, details={"n": 3}, argv=argv)
    record, read_back = report.read(path)
    assert read_back == figures
    assert record["benchmark"] == "fake" and record["quick"] and record["details"] == {"n": 3}
    # The command is one to paste: the reporting sink is not part of it.
    assert {f.command for f in read_back} == {"python benchmarks/tune.py --quick --rounds 2"}
    # The explicit (paired) ratio is kept; the others are value / baseline.
    assert [f.ratio for f in read_back] == [0.31, None, 0.25]
    assert [f.goal_met for f in read_back] == [False, True, None]


def test_quick_keeps_explicit_flags() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=10_000_000)
    parser.add_argument("--rounds", type=int, default=5)
    report.add_arguments(parser)
    args = parser.parse_args(["--quick", "--rounds", "3"])
    report.apply_quick(parser, args, events=500_000, rounds=2)
    assert (args.events, args.rounds) == (500_000, 3)
    args = parser.parse_args([])
    report.apply_quick(parser, args, events=500_000, rounds=2)
    assert (args.events, args.rounds) == (10_000_000, 5)


OK_SCRIPT = """
import sys
from pathlib import Path

from benchmarks import report

args = sys.argv[1:]
path = args[args.index("--json") + 1]
print("measuring ...")
report.write(
    Path(path),
    "good",
    [report.Figure("speed", 3.0, "x/s", report.Baseline("floor", 6.0))],
    quick="--quick" in args,
)
"""

FAILING_SCRIPT = """
import sys
print("starting")
print("broker unreachable: connection refused", file=sys.stderr)
sys.exit(3)
"""


def test_failed_benchmark_is_recorded_and_the_run_fails(tmp_path: Path) -> None:
    good, bad = tmp_path / "good.py", tmp_path / "bad.py"
    good.write_text(textwrap.dedent(OK_SCRIPT))
    bad.write_text(textwrap.dedent(FAILING_SCRIPT))
    silent = tmp_path / "silent.py"
    silent.write_text("print('forgot the record')\n")
    benchmarks = [
        run_all.Benchmark("bad", [sys.executable, str(bad), "--quick"]),
        run_all.Benchmark("good", [sys.executable, str(good), "--quick"]),
        run_all.Benchmark("silent", [sys.executable, str(silent)]),
        run_all.Benchmark(
            "needs-demo", [sys.executable, str(good)], needs=lambda: "needs `make demo`"
        ),
    ]
    path, code = run_all.run(benchmarks, tmp_path / "results")
    assert code == 1
    results = json.loads(path.read_text())
    runs = {run["name"]: run for run in results["benchmarks"]}
    assert [run["name"] for run in results["benchmarks"]] == ["bad", "good", "silent", "needs-demo"]
    assert runs["bad"]["status"] == "failed" and runs["bad"]["exit_code"] == 3
    assert "broker unreachable: connection refused" in runs["bad"]["tail"]
    assert runs["good"]["status"] == "ok"
    [figure] = runs["good"]["figures"]
    assert (figure["value"], figure["ratio"]) == (3.0, 0.5)
    assert runs["silent"]["status"] == "failed" and "no record" in runs["silent"]["reason"]
    assert runs["needs-demo"]["status"] == "skipped"
    assert runs["needs-demo"]["reason"] == "needs `make demo`"
    assert results["machine"]["cores"] >= 1 and len(results["git"]["commit"]) == 40
    # /proc/stat was read around each benchmark and the whole run (Linux, as here).
    assert isinstance(runs["good"]["cpu_steal_share"], float)
    assert isinstance(results["machine"]["cpu_steal_share"], float)
    # The table names the failure and the skip instead of dropping them.
    table = report.table(results, "results.json")
    assert "| bad | **failed**: exit 3 |" in table
    assert "| needs-demo | **skipped**: needs `make demo` |" in table


def test_only_a_skip_does_not_fail_the_run(tmp_path: Path) -> None:
    skipped = run_all.Benchmark("later", [sys.executable, "-c", "pass"], needs=lambda: "no stack")
    _, code = run_all.run([skipped], tmp_path)
    assert code == 0


def test_steal_share_counts_the_hypervisor_s_ticks_against_all_but_guest_time(
    tmp_path: Path,
) -> None:
    """/proc/stat's guest columns are already inside user time: counting them again would
    understate the steal share. The table names the run's share and the benchmarks that lost
    the most."""
    stat = tmp_path / "stat"
    stat.write_text("cpu  100 0 50 800 10 0 0 40 7 0\ncpu0 1 2 3\n")
    before = report.CpuClock.read(stat)
    stat.write_text("cpu  200 0 100 900 10 0 0 140 57 0\n")
    after = report.CpuClock.read(stat)
    assert before is not None and after is not None
    # steal +100 ticks of user +100, system +50, idle +100, steal +100 (guest +50 not again)
    assert after.steal_share_since(before) == 100 / 350
    assert before.steal_share_since(after) is None  # readings out of order say nothing
    stat.write_text("intr 1 2 3\n")
    assert report.CpuClock.read(stat) is None
    assert report.CpuClock.read(tmp_path / "missing") is None

    results = json.loads(report.newest_results().read_text())
    results["machine"]["cpu_steal_share"] = 0.25
    for run, share in zip(results["benchmarks"], [0.05, 0.61, None, 0.3], strict=False):
        run["cpu_steal_share"] = share
    names = [run["name"] for run in results["benchmarks"]]
    header = report.table(results, "results.json").splitlines()[0]
    assert (
        f"25% of the CPU time was stolen by the hypervisor (most in: {names[1]} 61%, "
        f"{names[3]} 30%, {names[0]} 5%)" in header
    )


def test_gc_pauses_over_a_soak_count_only_the_collections_since_its_start() -> None:
    """`make soak-serving`'s GC line: the replica's histogram read twice, the difference
    summarised (a long collection before the soak must not show as the soak's longest)."""
    from benchmarks.serving import GcPauses
    from serving.metrics import ServingMetrics

    metrics = ServingMetrics()  # not serving_metrics(): no gc hook in the test process
    full = metrics.gc_pause.labels("2")
    full.observe(0.2)
    before = GcPauses.parse(metrics.render().decode())
    for seconds in (0.004, 0.040, 0.076):
        full.observe(seconds)
    line = GcPauses.parse(metrics.render().decode()).since(before)
    assert line == (
        "replica GC pauses: gen0 none; gen1 none; "
        "gen2 3 x mean 40.00 ms (median <= 50 ms, longest <= 100 ms)"
    )


def test_busiest_processes_name_the_one_that_used_the_cpu_meanwhile() -> None:
    """A soak's slow minute is explained by the processes that took the CPU in it: a child
    spinning for half a second of CPU shows up by its program's name with about that much,
    and a process idle throughout (this test's own, while it sleeps) does not lead."""
    import subprocess
    import time

    before = report.process_cpu()
    assert before, "no process read from /proc"
    spin = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.5: pass\n"
    child = subprocess.Popen([sys.executable, "-c", spin, "busy-marker"])
    # Read while the child is still alive (a finished process leaves /proc), after its spin.
    deadline = time.monotonic() + 20
    used = 0.0
    while time.monotonic() < deadline and child.poll() is None:
        busiest = dict(report.busiest_since(before, count=50))
        used = max((s for n, s in busiest.items() if n.startswith("python")), default=0.0)
        if used >= 0.4:
            break
        time.sleep(0.05)
    child.kill()
    child.wait()
    assert used >= 0.4, f"the spinning child was not counted: {busiest}"


def test_process_names_say_which_program_and_kernel_threads_keep_their_count(
    tmp_path: Path,
) -> None:
    """Names: Ray's process title as it is, a Python program by its -m module or script, a
    kernel thread (empty cmdline) by its stat name; a process renamed between two readings
    (kworkers do) counts from its earlier reading, not from zero."""

    def process(pid: int, comm: str, argv: list[str], ticks: int) -> None:
        folder = tmp_path / str(pid)
        folder.mkdir(exist_ok=True)
        rest = " ".join(["S", *["0"] * 10, str(ticks), "0", *["0"] * 5])
        (folder / "stat").write_text(f"{pid} ({comm}) {rest}\n")
        (folder / "cmdline").write_bytes(b"".join(a.encode() + b"\0" for a in argv))

    hz = os.sysconf("SC_CLK_TCK")
    process(10, "ray::ServeRepl", ["ray::ServeReplica:purchase:Model", ""], 0)
    process(11, "python3", ["/usr/bin/python3", "-u", "-m", "serving.bare", "--port", "1"], 0)
    process(12, "kworker/0:1-ev", [], 5 * hz)
    before = report.process_cpu(tmp_path)
    assert {name for name, _ in before.values()} == {
        "ray::ServeReplica:purchase:Model",
        "python3 -m serving.bare",
        "kworker/0:1-ev",
    }
    process(10, "ray::ServeRepl", ["ray::ServeReplica:purchase:Model", ""], 3 * hz)
    process(11, "python3", ["/usr/bin/python3", "-u", "-m", "serving.bare", "--port", "1"], hz)
    process(12, "kworker/0:1-mm", [], 6 * hz)  # renamed, one more second
    busiest = report.busiest_since(before, count=3, proc=tmp_path)
    assert busiest == [
        ("ray::ServeReplica:purchase:Model", 3.0),
        ("python3 -m serving.bare", 1.0),
        ("kworker/0:1-mm", 1.0),
    ]
    # A process that ended meanwhile (the soak's vegeta) is counted from what its parent saw.
    ended = report.busiest_since(before, count=2, proc=tmp_path, ended={"vegeta": 4.0})
    assert ended == [("vegeta", 4.0), ("ray::ServeReplica:purchase:Model", 3.0)]


def test_children_cpu_counts_a_finished_child() -> None:
    """The load generator has left /proc when a soak minute is read: its CPU comes from the
    parent's RUSAGE_CHILDREN, which grows by what a waited-for child spent."""
    import subprocess

    before = report.children_cpu()
    spin = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass\n"
    subprocess.run([sys.executable, "-c", spin], check=True)
    assert report.children_cpu() - before >= 0.25
