#!/usr/bin/env python3
"""`kestrel report` end to end: runs of a tiny synthetic model recorded with --history, then the
trend table, JSON, the target table, plots, and bad input.

    python3 tests/report/test_report_cli.py --kestrel build/bin/kestrel --workdir build/report

Checks (no timing bounds: the numbers are whatever the machine gives):
  * four `kestrel run --history H` with -b 8, 16, 16, 40 -> four trend rows in order; the second
    -b 16 run compares with the first ("vs #2"), the others have no comparable record ("-");
  * a `kestrel bench --history` pp40 result with -b 16 compares with the first -b 16 run;
  * `-o json` parses and holds the same rows; `--target-ms 20-50` (latest record) and
    `--target-all` give the target table; a hand-made bench record is shown and an unknown kind
    is skipped with a note;
  * `--plot out.svg` is well-formed XML with an <svg> root, `--plot out.png` starts with the PNG
    signature, and no temporary file stays beside them;
  * bad input (missing file, empty file, a non-JSON line, --target-ms 50-20, --plot out.txt, an
    unwritable plot path, no python3, no matplotlib, no plotting script) ends with a
    "kestrel: error:" message, a non-zero exit and no output file.
Exit status 0 = passed, 1 = failed, 77 = passed but matplotlib is missing (plots not checked).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FAILURES: list[str] = []


def check(cond: bool, what: str, detail: str = "") -> None:
    print(f"{'ok  ' if cond else 'FAIL'} {what}")
    if not cond:
        FAILURES.append(what)
        if detail:
            print("     " + detail.replace("\n", "\n     "))


def run(args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    e = dict(os.environ)
    if env:
        e.update(env)
    return subprocess.run(args, capture_output=True, text=True, env=e, timeout=300)


def expect_error(kestrel: str, what: str, args: list[str], needle: str,
                 out: Path | None = None, env: dict | None = None) -> None:
    p = run([kestrel, "report", *args], env)
    msg = p.stderr.strip()
    good = p.returncode != 0 and msg.startswith("kestrel: error:") and needle in msg
    check(good, f"error: {what}", f"rc={p.returncode} stderr={msg!r} (wanted {needle!r})")
    if out is not None:
        left = [x.name for x in out.parent.glob(out.name + "*")] if out.parent.is_dir() else []
        check(not left, f"error: {what}: no output file left", f"left: {left}")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kestrel", required=True)
    ap.add_argument("--workdir", required=True)
    args = ap.parse_args()
    k = args.kestrel
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)

    model = work / "tiny-q4_0.gguf"
    p = run([sys.executable, str(REPO / "scripts/synth_gguf.py"), "--out", str(model),
             "--shape", "tiny", "--type", "q4_0"])
    if p.returncode != 0:
        print(p.stdout + p.stderr)
        return 1

    hist = work / "history.jsonl"
    tokens = ",".join(str(1 + (i * 7) % 500) for i in range(40))
    for b in (8, 16, 16, 40):
        p = run([k, "run", "-m", str(model), "--tokens", tokens, "-n", "0", "-b", str(b),
                 "-ub", str(b), "-t", "2", "--history", str(hist)])
        check(p.returncode == 0, f"kestrel run -b {b} --history", p.stderr)
    lines = hist.read_text().splitlines()
    check(len(lines) == 4, "history has one line per run", f"{len(lines)} lines")

    # The trend table.
    p = run([k, "report", str(hist)])
    check(p.returncode == 0, "report: exit 0", p.stderr)
    md = p.stdout
    header = ("| # | version | date | kind | model | settings | prompt tokens | ms/token | "
              "tokens/s | change vs first |")
    check(header in md, "report: trend table header", md)
    rows = [r for r in md.splitlines() if r.startswith("| ") and r[2].isdigit()]
    check(len(rows) == 4, "report: four rows", md)
    if len(rows) == 4:
        cells = [[c.strip() for c in r.strip("|").split("|")] for r in rows]
        check([c[0] for c in cells] == ["1", "2", "3", "4"], "report: rows in order", md)
        check(all(c[3] == "run" and c[4] == model.name and c[6] == "40" for c in cells),
              "report: kind, model and prompt tokens", md)
        check(cells[0][5].startswith("b=8 ub=8 ") and cells[3][5].startswith("b=40 ub=40 "),
              "report: settings summary", md)
        check(all(float(c[7]) > 0 and float(c[8]) > 0 for c in cells),
              "report: ms/token and tokens/s", md)
        check(cells[0][9] == "-" and cells[1][9] == "baseline" and "vs #2" in cells[2][9]
              and cells[3][9] == "-", "report: change vs first comparable record", md)

    # JSON.
    p = run([k, "report", str(hist), "-o", "json"])
    try:
        j = json.loads(p.stdout)
    except ValueError:
        j = None
    check(p.returncode == 0 and isinstance(j, dict), "report -o json parses", p.stdout[:500])
    if isinstance(j, dict):
        recs = j.get("records", [])
        check(len(recs) == 4 and recs[2]["baseline"] == 2 and recs[0]["baseline"] is None
              and recs[3]["settings"]["n_batch"] == 40 and recs[0]["prompt_tokens"] == 40
              and len(recs[0].get("chunk_ms_per_token", [])) == 5,
              "report -o json: records", json.dumps(recs)[:800])

    # The target table.
    p = run([k, "report", str(hist), "--target-ms", "20-50"])
    check(p.returncode == 0 and "## Against the target (20-50 ms/token)" in p.stdout
          and "| 4 | prompt evaluation | 20-50 ms/token |" in p.stdout
          and "| 4 | throughput | 20-50 tokens/s |" in p.stdout,
          "report --target-ms 20-50: the latest record", p.stdout + p.stderr)
    p = run([k, "report", str(hist), "--target-ms", "20-50", "--target-all", "-o", "json"])
    try:
        tj = json.loads(p.stdout)["target"]
        good = ([r["record"] for r in tj["rows"]] == [1, 2, 3, 4]
                and tj["low_ms_per_token"] == 20 and tj["high_ms_per_token"] == 50)
    except (ValueError, KeyError, TypeError):
        good = False
    check(p.returncode == 0 and good, "report --target-all -o json: every record", p.stdout[:600])

    # `kestrel bench --history` into a copy: its pp40 result compares with the -b 16 runs.
    withbench = work / "withbench.jsonl"
    shutil.copy(hist, withbench)
    p = run([k, "bench", "-m", str(model), "-p", "40", "-n", "0", "-r", "1", "-b", "16", "-ub",
             "16", "-t", "2", "--history", str(withbench)])
    check(p.returncode == 0, "kestrel bench --history", p.stderr)
    p = run([k, "report", str(withbench), "-o", "json"])
    try:
        last = json.loads(p.stdout)["records"][-1]
        good = last["kind"] == "bench" and last["prompt_tokens"] == 40 and last["baseline"] == 2
    except (ValueError, KeyError, IndexError, TypeError):
        good = False
    check(p.returncode == 0 and good, "report: bench result compares with the runs",
          p.stdout[-800:] + p.stderr)

    # Bench records and unknown kinds.
    mixed = work / "mixed.jsonl"
    bench = {"kind": "bench", "model_filename": str(model), "n_prompt": 512, "n_gen": 0,
             "n_batch": 512, "n_ubatch": 512, "type_k": "f16", "type_v": "f16", "n_threads": 2,
             "n_gpu_layers": 0, "avg_ts": 250.0, "stddev_ts": 3.0, "device": "cpu",
             "kestrel_version": "0.1.0 (abc1234)"}
    mixed.write_text(hist.read_text() + json.dumps(bench) + "\n" +
                     json.dumps({"kind": "tune", "best": {}}) + "\n")
    p = run([k, "report", str(mixed)])
    check(p.returncode == 0 and "| 5 | abc1234 |" in p.stdout and "| 4.00 | 250.00 ± 3.00 |"
          in p.stdout and "record 6 skipped" in p.stdout and "tune" in p.stdout,
          "report: bench record shown, unknown kind noted", p.stdout + p.stderr)

    # Bad input.
    expect_error(k, "missing file", [str(work / "nope.jsonl")], "cannot read")
    empty = work / "empty.jsonl"
    empty.write_text("")
    expect_error(k, "empty file", [str(empty)], "empty")
    bad = work / "bad.jsonl"
    bad.write_text(lines[0] + "\n" + lines[1] + "\n{this is not json\n")
    expect_error(k, "non-JSON line", [str(bad)], "line 3")
    expect_error(k, "--target-ms 50-20", [str(hist), "--target-ms", "50-20"], "50-20")
    expect_error(k, "--target-ms abc", [str(hist), "--target-ms", "abc"], "LOW-HIGH")
    txt = work / "out.txt"
    expect_error(k, "--plot out.txt", [str(hist), "--plot", str(txt)], ".svg or .png", txt)
    missing_dir = work / "no-such-dir" / "out.svg"
    expect_error(k, "--plot into a missing directory", [str(hist), "--plot", str(missing_dir)],
                 "cannot write", missing_dir)
    under_file = hist / "out.png"  # the history file is not a directory
    expect_error(k, "--plot under a regular file", [str(hist), "--plot", str(under_file)],
                 "cannot write")
    out_np = work / "nopython.svg"
    expect_error(k, "--plot without python3", [str(hist), "--plot", str(out_np)], "python3",
                 out_np, env={"KESTREL_PYTHON": str(work / "no-python3")})
    fake = work / "fake-site"
    (fake / "matplotlib").mkdir(parents=True)
    (fake / "matplotlib" / "__init__.py").write_text("raise ImportError('no matplotlib here')\n")
    out_nm = work / "nomatplotlib.svg"
    expect_error(k, "--plot without matplotlib", [str(hist), "--plot", str(out_nm)],
                 "pip install matplotlib", out_nm, env={"PYTHONPATH": str(fake)})
    out_ns = work / "noscript.svg"
    expect_error(k, "--plot without the script", [str(hist), "--plot", str(out_ns)],
                 "KESTREL_SCRIPTS_DIR", out_ns, env={"KESTREL_SCRIPTS_DIR": str(work / "x")})

    # Plots.
    have_mpl = run([sys.executable, "-c", "import matplotlib"]).returncode == 0
    if have_mpl:
        plots = work / "plots"
        plots.mkdir()
        svg, png = plots / "out.svg", plots / "out.png"
        p = run([k, "report", str(hist), "--plot", str(svg)])
        check(p.returncode == 0 and svg.is_file(), "report --plot out.svg", p.stderr)
        try:
            root = ET.parse(svg).getroot()
            good = root.tag.endswith("svg")
        except (ET.ParseError, OSError):
            good = False
        check(good, "out.svg is an SVG document")
        check("ms/token" in p.stdout, "report --plot still prints the table", p.stdout)
        p = run([k, "report", str(mixed), "--plot", str(png), "-o", "json"])
        check(p.returncode == 0 and png.is_file()
              and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", "report --plot out.png", p.stderr)
        left = sorted(x.name for x in plots.iterdir())
        check(left == ["out.png", "out.svg"], "no temporary file beside the plots", str(left))
        p = run([k, "report", str(hist), "--plot", str(plots / "again.svg")],
                env={"KESTREL_SCRIPTS_DIR": str(REPO / "scripts")})
        check(p.returncode == 0 and (plots / "again.svg").is_file(),
              "KESTREL_SCRIPTS_DIR points at the script", p.stderr)

    if FAILURES:
        print(f"\n{len(FAILURES)} check(s) failed: " + "; ".join(FAILURES))
        return 1
    if not have_mpl:
        print("\nplots not checked: matplotlib is missing (pip install matplotlib)")
        return 77
    print("\nall checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
