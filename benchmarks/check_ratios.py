#!/usr/bin/env python
"""Regression check that survives noisy machines: compare fast/reference RATIOS, not times.

Absolute times move with the machine (load, clocks, other jobs); the ratio of two
implementations timed in the same run moves much less. For every benchmark group present in both
files (same op/model, mode and size), this computes ``time(fast) / time(reference)`` in the
baseline and in the current run and fails when the current ratio is worse by more than
``--max-slowdown`` (1.25: fast lost 25% of its standing against the reference). Peak memory
(``extra_info.peak_memory_bytes``) gets the same treatment with ``--max-memory-growth``.

    python benchmarks/check_ratios.py BASELINE.json CURRENT.json [--max-slowdown 1.25]

BASELINE may also be a folder (a ``--benchmark-storage``): its newest ``*.json`` is used.
Exit status: 0 no regression, 1 regression, 2 nothing to compare.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys


def load_run(path: str) -> dict:
    if os.path.isdir(path):
        files = glob.glob(os.path.join(path, "**", "*.json"), recursive=True)
        if not files:
            raise SystemExit(f"no *.json under {path}")
        path = max(files, key=os.path.getmtime)
    with open(path) as fh:
        data = json.load(fh)
    data["_path"] = path
    return data


def by_group(run: dict, stat: str) -> dict:
    """{group: {impl: (seconds, peak_memory_bytes or None)}}"""
    groups: dict = {}
    for bench in run.get("benchmarks", []):
        info = bench.get("extra_info", {})
        impl = info.get("impl") or bench.get("params", {}).get("impl")
        if impl is None or bench.get("group") is None:
            continue
        groups.setdefault(bench["group"], {})[impl] = (bench["stats"][stat], info.get("peak_memory_bytes"))
    return groups


def _ratio(numerator, denominator):
    return None if numerator is None or not denominator else numerator / denominator


def compare(baseline: dict, current: dict, impls, stat: str, max_slowdown: float, max_memory_growth: float):
    """Rows (group, impl, base time ratio, current time ratio, change, base mem ratio, current mem ratio,
    memory change, verdict) and the number of regressions."""
    base_groups, cur_groups = by_group(baseline, stat), by_group(current, stat)
    rows, regressions = [], 0
    for group in sorted(set(base_groups) & set(cur_groups)):
        base, cur = base_groups[group], cur_groups[group]
        if "reference" not in base or "reference" not in cur:
            continue
        for impl in impls:
            if impl not in base or impl not in cur:
                continue
            base_time = _ratio(base[impl][0], base["reference"][0])
            cur_time = _ratio(cur[impl][0], cur["reference"][0])
            time_change = _ratio(cur_time, base_time)
            base_mem = _ratio(base[impl][1], base["reference"][1])
            cur_mem = _ratio(cur[impl][1], cur["reference"][1])
            mem_change = _ratio(cur_mem, base_mem)
            problems = []
            if time_change is not None and time_change > max_slowdown:
                problems.append("SLOWER")
            if max_memory_growth and mem_change is not None and mem_change > max_memory_growth:
                problems.append("MORE MEMORY")
            regressions += bool(problems)
            rows.append((group, impl, base_time, cur_time, time_change, base_mem, cur_mem, mem_change,
                         " + ".join(problems) or "ok"))
    return rows, regressions


def format_rows(rows, stat: str) -> str:
    def num(value, suffix=""):
        return "-" if value is None else f"{value:.3f}{suffix}"

    head = (f"{'group':<40} {'impl':<14} {'time ' + stat + ' ratio base':>20} {'now':>7} {'change':>8} "
            f"{'mem ratio base':>15} {'now':>7} {'change':>8}  verdict")
    lines = [head, "-" * len(head)]
    for group, impl, bt, ct, tc, bm, cm, mc, verdict in rows:
        lines.append(f"{group:<40} {impl:<14} {num(bt):>20} {num(ct):>7} {num(tc, 'x'):>8} "
                     f"{num(bm):>15} {num(cm):>7} {num(mc, 'x'):>8}  {verdict}")
    lines.append("ratio = implementation / reference within one run (lower is better); "
                 "change = now / base (above 1: worse)")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("baseline", help="pytest-benchmark JSON (or a --benchmark-storage folder: newest file)")
    parser.add_argument("current", help="pytest-benchmark JSON of this run (--benchmark-json=PATH)")
    parser.add_argument("--max-slowdown", type=float, default=1.25,
                        help="fail when impl/reference time ratio grew by more than this factor (default 1.25)")
    parser.add_argument("--max-memory-growth", type=float, default=1.25,
                        help="fail when impl/reference peak-memory ratio grew by more than this factor; 0: off")
    parser.add_argument("--stat", default="min", choices=("min", "median", "mean"),
                        help="timing statistic (default min: the least disturbed by other jobs on the machine)")
    parser.add_argument("--impl", nargs="+", default=["fast"],
                        help="implementations checked against the reference (default: fast)")
    args = parser.parse_args(argv)

    baseline, current = load_run(args.baseline), load_run(args.current)
    base_dev = {b.get("extra_info", {}).get("device") for b in baseline.get("benchmarks", [])}
    cur_dev = {b.get("extra_info", {}).get("device") for b in current.get("benchmarks", [])}
    if base_dev != cur_dev:
        print(f"warning: baseline ran on {sorted(map(str, base_dev))}, this run on {sorted(map(str, cur_dev))}: "
              "ratios of different devices are not comparable", file=sys.stderr)
    base_threads = {b.get("extra_info", {}).get("threads") for b in baseline.get("benchmarks", [])}
    cur_threads = {b.get("extra_info", {}).get("threads") for b in current.get("benchmarks", [])}
    if base_dev == cur_dev and base_threads != cur_threads and any(d and d.startswith("cpu") for d in cur_dev):
        print(f"warning: baseline used {sorted(map(str, base_threads))} CPU threads, this run {sorted(map(str, cur_threads))} "
              "(pytest ... --bench-threads N): CPU ratios depend on the thread count", file=sys.stderr)
    rows, regressions = compare(baseline, current, args.impl, args.stat, args.max_slowdown, args.max_memory_growth)
    print(f"baseline: {baseline['_path']}\ncurrent:  {current['_path']}")
    if not rows:
        print("no benchmark group with the reference and " + "/".join(args.impl) + " in both files")
        return 2
    print(format_rows(rows, args.stat))
    print(f"{regressions} regression(s) beyond {args.max_slowdown}x time"
          + (f" / {args.max_memory_growth}x memory" if args.max_memory_growth else "") + f" in {len(rows)} comparison(s)")
    return 1 if regressions else 0


if __name__ == "__main__":
    sys.exit(main())
