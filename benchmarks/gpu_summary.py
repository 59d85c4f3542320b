"""A short text summary of a ``benchmarks/gpu_check.sh`` results folder (standard library only).

    python benchmarks/gpu_summary.py RESULTS_DIR

Reads what the check wrote there, each part only if present: ``env.txt`` (the device and
versions), the pytest JUnit XML files (counts, and the tests that failed), the offload
benchmark JSON files (one line per configuration) and the hook overhead JSON. Prints the
summary; ``gpu_check.sh`` writes it to ``$OUT/summary.txt``.
"""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

# The lines of env.txt the summary repeats.
ENV_KEYS = ("python ", "torch ", "device ", "cuda available", "hydra-offload ", "== commit",
            "== sources")  # fmt: skip


def env_lines(folder: Path) -> list[str]:
    path = folder / "env.txt"
    if not path.exists():
        return ["env: not recorded"]
    return [line for line in path.read_text().splitlines() if line.startswith(ENV_KEYS)]


def pytest_lines(folder: Path) -> list[str]:
    files = sorted(folder.glob("pytest-junit*.xml"))
    if not files:
        return ["pytest -m cuda: no JUnit XML (the run did not finish; see pytest.log)"]
    totals = dict.fromkeys(("tests", "failures", "errors", "skipped"), 0)
    seconds = 0.0
    failed: list[str] = []
    for path in files:
        try:
            root = ET.parse(path).getroot()
        except ET.ParseError as err:
            failed.append(f"{path.name}: unreadable ({err})")
            continue
        for suite in root.iter("testsuite"):
            for key in totals:
                totals[key] += int(suite.get(key, 0))
            seconds += float(suite.get("time", 0))
        for case in root.iter("testcase"):
            for bad in (*case.findall("failure"), *case.findall("error")):
                message = (bad.get("message") or "").strip().splitlines()
                first = message[0][:160] if message else bad.tag
                failed.append(f"{case.get('classname')}::{case.get('name')}: {first}")
    passed = totals["tests"] - totals["failures"] - totals["errors"] - totals["skipped"]
    lines = [
        f"pytest -m cuda: {totals['tests']} tests in {seconds:.0f}s: {passed} passed, "
        f"{totals['failures']} failed, {totals['errors']} errors, {totals['skipped']} skipped"
    ]
    lines += [f"  FAILED {line}" for line in failed[:20]]
    if len(failed) > 20:
        lines.append(f"  ... and {len(failed) - 20} more (pytest.log)")
    return lines


def _gib(value: float | None) -> str:
    return "-" if value is None else f"{value / 2**30:.2f}"


def bench_lines(path: Path) -> list[str]:
    try:
        report = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        return [f"{path.name}: unreadable ({err})"]
    bandwidth = report.get("bandwidth", {}).get("gb_per_s") or 0.0
    lines = [
        f"{path.parent.name}/{path.name}: {report.get('device_name')}, torch "
        f"{report.get('torch')}, preset {report.get('preset')}, {report.get('step')}, "
        f"H2D {bandwidth:.1f} GB/s",
        f"  {'configuration':44} {'step ms':>9} {'slowdown':>8} {'saved GiB':>9} "
        f"{'H2D GB/s':>8} {'overlap':>7} {'max diff':>8}",
    ]
    for row in report.get("rows", []):
        if "skipped" in row:
            lines.append(f"  {row['name']:44} skipped: {row['skipped']}")
            continue
        lines.append(
            f"  {row['name']:44} {row.get('step_ms', 0):9.1f} {row.get('slowdown', 0):8.3f} "
            f"{_gib(row.get('device_bytes_saved')):>9} {row.get('h2d_gb_per_s', 0):8.2f} "
            f"{row.get('overlap_efficiency', 0):7.3f} {row.get('max_abs_diff', 0):8.2g}"
        )
    setup = report.get("setup")
    if setup:
        lines.append(
            f"  setup, {setup['weights_bytes'] / 1e9:.2f} GB: apply UVA "
            f"{setup['apply_uva_vs_copy']:.2f} x one pinned copy, prefetch "
            f"{setup['apply_prefetch G=1_vs_copy']:.2f} x"
        )
    return lines


def hook_lines(path: Path) -> list[str]:
    try:
        report = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        return [f"{path.name}: unreadable ({err})"]
    lines = [f"hook overhead ({report.get('layers')} layers, CPU): us added per layer"]
    for row in report.get("results", []):
        value = row.get("overhead_us_per_layer", f"skipped: {row.get('skipped')}")
        lines.append(f"  {row['name']:44} {value}")
    return lines


def summary(folder: Path) -> str:
    lines = [*env_lines(folder), "", *pytest_lines(folder)]
    for path in sorted(folder.glob("bench-*/offload-*.json")):
        lines += ["", *bench_lines(path)]
    for path in sorted(folder.glob("hook-overhead/hook_overhead-*.json")):
        lines += ["", *hook_lines(path)]
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    lines += ["", f"files ({len(files)}): " + " ".join(files)]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__.split("\n\n")[1].strip(), file=sys.stderr)
        return 2
    print(summary(Path(argv[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
