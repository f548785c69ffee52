#!/usr/bin/env python3
"""Plots of a Kestrel run history (the JSON-lines file of --history), for `kestrel report --plot`.

    python3 scripts/plot_report.py HISTORY --out OUT.svg|OUT.png

Two panels: (a) ms/token per chunk of the latest run record, (b) tokens/s against prompt length
across records, one series per model and settings (run records and bench prompt tests). The
output is written to a temporary file beside OUT and renamed into place, so a failed plot
leaves no partial file. Exit status: 0 done, 1 bad input or unwritable output, 3 no matplotlib.
"""

import argparse
import json
import os
import sys
import tempfile


def fail(message, code=1):
    print(f"plot_report.py: {message}", file=sys.stderr)
    sys.exit(code)


def read_history(path):
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as e:
        fail(f"cannot read history file '{path}': {e.strerror}")
    records = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            rec = None
        if not isinstance(rec, dict):
            fail(f"history file '{path}', line {n}: not a JSON object")
        records.append((n, rec))
    if not records:
        fail(f"history file '{path}' is empty")
    return records


def kind_of(rec):
    kind = rec.get("kind")
    if kind:
        return kind
    if "prompt_tokens" in rec:
        return "run"
    if "avg_ts" in rec:
        return "bench"
    return ""


def settings_label(s):
    label = (f"b={s.get('n_batch', 0)} ub={s.get('n_ubatch', 0)} ctk={s.get('type_k', '?')} "
             f"ctv={s.get('type_v', '?')} t={s.get('n_threads', 0)} ngl={s.get('n_gpu_layers', 0)}")
    if s.get("chunking") not in (None, "", "balanced"):
        label += f" {s['chunking']}"
    return label


def model_name(path):
    return os.path.basename(str(path or "?"))


def points(records):
    """(series label, prompt tokens, tokens/s) of every run and bench prompt test."""
    out = []
    for _, rec in records:
        kind = kind_of(rec)
        try:
            if kind == "run":
                n = int(rec.get("prompt_tokens") or 0)
                ms = float(rec.get("ms_per_token") or 0)
                if n <= 0 or ms <= 0:
                    continue
                model = rec.get("model")
                name = model_name(model.get("path") or model.get("name")) if isinstance(
                    model, dict) else model_name(model)
                label = f"{name} {settings_label(rec.get('settings') or {})}"
                out.append((label, n, 1000.0 / ms))
            elif kind == "bench":
                n, gen = int(rec.get("n_prompt") or 0), int(rec.get("n_gen") or 0)
                ts = float(rec.get("avg_ts") or 0)
                if n <= 0 or gen > 0 or ts <= 0:
                    continue
                label = f"{model_name(rec.get('model_filename'))} {settings_label(rec)} (bench)"
                out.append((label, n, ts))
        except (TypeError, ValueError, AttributeError):
            continue
    return out


def latest_run_chunks(records):
    for n, (_, rec) in reversed(list(enumerate(records, 1))):
        chunks = rec.get("chunks")
        if kind_of(rec) == "run" and isinstance(chunks, list) and chunks:
            rows = []
            for i, c in enumerate(chunks):
                if not isinstance(c, dict):
                    continue
                first = int(c.get("first_token", 0) or 0)
                tokens = int(c.get("n_tokens", 0) or 0)
                ms = c.get("ms_per_token")
                if ms is None and tokens > 0:
                    ms = float(c.get("ms", 0) or 0) / tokens
                rows.append((i + 1, first, tokens, float(ms or 0)))
            return n, rec, rows
    return None, None, []


def draw(records, out, fmt):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_a, ax_b) = plt.subplots(1, 2, figsize=(13, 5))
    line, rec, rows = latest_run_chunks(records)
    if rows:
        xs = [r[0] for r in rows]
        ax_a.bar(xs, [r[3] for r in rows], color="#4878a8")
        ax_a.set_xticks(xs, [f"{r[0]}\n{r[1]}-{r[1] + r[2]}" for r in rows])
        ms = float(rec.get("ms_per_token") or 0)
        if ms > 0:
            ax_a.axhline(ms, color="#c05030", linestyle="--", label=f"whole prompt {ms:.2f}")
            ax_a.legend(fontsize=8)
        ax_a.set_title(f"ms/token per chunk, latest run (record #{line})", fontsize=10)
    else:
        ax_a.text(0.5, 0.5, "no run record with chunks", ha="center", va="center",
                  transform=ax_a.transAxes)
        ax_a.set_title("ms/token per chunk", fontsize=10)
    ax_a.set_xlabel("chunk (tokens)")
    ax_a.set_ylabel("ms/token")

    series = {}
    for label, n, tps in points(records):
        series.setdefault(label, []).append((n, tps))
    if series:
        for label, pts in series.items():
            pts.sort()
            ax_b.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        ax_b.legend(fontsize=7)
    else:
        ax_b.text(0.5, 0.5, "no prompt record", ha="center", va="center",
                  transform=ax_b.transAxes)
    ax_b.set_title("tokens/s against prompt length", fontsize=10)
    ax_b.set_xlabel("prompt tokens")
    ax_b.set_ylabel("tokens/s")
    ax_b.grid(True, alpha=0.3)
    fig.tight_layout()

    directory = os.path.dirname(os.path.abspath(out))
    try:
        fd, tmp = tempfile.mkstemp(prefix=os.path.basename(out) + ".", suffix=".tmp",
                                   dir=directory)
    except OSError as e:
        fail(f"cannot write '{out}': {e.strerror}")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; a plot is an ordinary file
        with os.fdopen(fd, "wb") as f:
            # No date in the SVG, so the same history draws the same file.
            fig.savefig(f, format=fmt, metadata={"Date": None} if fmt == "svg" else None)
        os.replace(tmp, out)
    except Exception as e:  # noqa: BLE001 - any failure must remove the temporary
        try:
            os.unlink(tmp)
        except OSError:
            pass
        fail(f"cannot write '{out}': {e}")
    finally:
        plt.close(fig)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("history")
    ap.add_argument("--out", required=True, help="OUT.svg or OUT.png")
    args = ap.parse_args()
    fmt = os.path.splitext(args.out)[1].lower().lstrip(".")
    if fmt not in ("svg", "png"):
        fail(f"--out {args.out}: the file name must end in .svg or .png")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        fail("matplotlib is not installed: pip install matplotlib", code=3)
    draw(read_history(args.history), args.out, fmt)


if __name__ == "__main__":
    main()
