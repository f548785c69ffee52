#!/usr/bin/env python3
"""Where a decode step's GPU time goes, from an ncu CSV of every kernel of a short `kestrel bench`
tg run (bench/lab/decode_kernels.sh): the launches are split into tokens at each embedding
kernel, and the last complete tokens (graph replays) are summed by kernel: launches per token, GPU
time per token, and the mean and largest time per launch. Compare the total with the wall time
of a token (1 / t/s) to see how much of it is spent between kernels."""
import argparse
import csv
import statistics
from collections import defaultdict


def read_kernels(path):
    with open(path, newline="") as f:
        rows = [r for r in csv.reader(f)]
    head = next(i for i, r in enumerate(rows) if "Kernel Name" in r)
    cols = rows[head]
    name_col, time_col = cols.index("Kernel Name"), cols.index("gpu__time_duration.sum")
    unit = rows[head + 1][time_col] if not rows[head + 1][0].isdigit() else "ns"
    scale = {"ns": 1e-3, "usecond": 1.0, "us": 1.0, "msecond": 1e3, "nsecond": 1e-3}.get(unit, 1e-3)
    out = []
    for r in rows[head + 1:]:
        if len(r) <= time_col or not r[0].strip().isdigit():
            continue
        try:
            out.append((r[name_col], float(r[time_col].replace(",", "")) * scale))
        except ValueError:
            pass
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("csv")
    ap.add_argument("--marker", default="embed", help="substring of the once-per-token kernel")
    ap.add_argument("--tokens", type=int, default=3, help="last complete tokens to sum")
    ap.add_argument("--wall-tps", type=float, default=0, help="t/s of the same run without ncu")
    a = ap.parse_args()
    kernels = read_kernels(a.csv)
    starts = [i for i, (n, _) in enumerate(kernels) if a.marker in n]
    if len(starts) < 2:
        raise SystemExit(f"ncu_tokens: fewer than two '{a.marker}' kernels in {len(kernels)} launches")
    spans = list(zip(starts[:-1], starts[1:]))[-a.tokens:]
    per = defaultdict(list)
    for s, e in spans:
        for n, t in kernels[s:e]:
            per[n].append(t)
    n_tok = len(spans)
    total = sum(sum(v) for v in per.values()) / n_tok
    print(f"{len(kernels)} kernels profiled; last {n_tok} tokens: "
          f"{sum(len(v) for v in per.values()) / n_tok:.0f} launches, {total:.1f} us of GPU time per token")
    if a.wall_tps:
        wall = 1e6 / a.wall_tps
        print(f"wall time per token {wall:.1f} us (at {a.wall_tps:.1f} t/s): "
              f"{wall - total:.1f} us ({100 * (wall - total) / wall:.0f}%) outside the kernels")
    print(f"{'kernel':60s} {'per tok':>7s} {'us/tok':>8s} {'share':>6s} {'mean us':>8s} {'max us':>7s}")
    for n, v in sorted(per.items(), key=lambda kv: -sum(kv[1])):
        s = sum(v) / n_tok
        print(f"{n[:60]:60s} {len(v) / n_tok:7.1f} {s:8.1f} {100 * s / total:5.1f}% "
              f"{statistics.mean(v):8.2f} {max(v):7.2f}")


if __name__ == "__main__":
    main()
