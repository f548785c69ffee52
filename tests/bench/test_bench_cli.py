#!/usr/bin/env python3
"""`kestrel bench` as a command: output formats, the cartesian product of the settings, depths
(-d), the llama-bench comparison, --history, --config, and refusal of bad input. No timing is
judged (timings on a shared machine are noise); only structure and counts.

    python3 tests/bench/test_bench_cli.py --kestrel build/bin/kestrel --workdir build/bench_cli

Pass criteria: every output format parses (md table with llama-bench's columns, a JSON array,
JSON lines, CSV) with one row per combination and test; --vs-llama-bench adds the ratio of the
matching tests and null for the others; --history appends records that read back; --config
applies unless a flag overrides it; every bad input exits non-zero with a message naming the
problem, writes nothing on stdout and creates no history file. Exit status 0 = all passed.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

LLAMA_BENCH_FIELDS = [
    "build_commit", "cpu_info", "gpu_info", "backends", "model_filename", "model_type",
    "model_size", "model_n_params", "n_batch", "n_ubatch", "n_threads", "type_k", "type_v",
    "n_gpu_layers", "n_prompt", "n_gen", "n_depth", "test_time", "avg_ns", "stddev_ns", "avg_ts",
    "stddev_ts",
]
KESTREL_FIELDS = ["kestrel_version", "device", "chunking", "test"]
MD_COLUMNS = ["model", "size", "params", "backend", "threads", "n_batch", "n_ubatch", "type_k",
              "type_v", "ngl", "test", "t/s"]

# Small and quick: one thread, one repetition unless a test needs more.
FAST = ["-t", "1", "-r", "1", "--no-warmup"]

failures: list[str] = []


def check(cond: bool, what: str) -> None:
    print(("ok    " if cond else "FAIL  ") + what)
    if not cond:
        failures.append(what)


class Bench:
    def __init__(self, kestrel: str, model: Path):
        self.kestrel = kestrel
        self.model = model

    def run(self, *args: str, model: bool = True) -> subprocess.CompletedProcess:
        cmd = [self.kestrel, "bench"] + (["-m", str(self.model)] if model else []) + list(args)
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120)

    def ok(self, *args: str, **kw) -> str:
        p = self.run(*args, **kw)
        if p.returncode != 0:
            raise RuntimeError(f"kestrel bench {' '.join(args)} failed ({p.returncode}):\n{p.stderr}")
        return p.stdout

    def json(self, *args: str, **kw) -> list[dict]:
        return json.loads(self.ok("-o", "json", *args, **kw))


def md_table(text: str) -> tuple[list[str], list[list[str]]]:
    rows = [line for line in text.splitlines() if line.startswith("|")]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in rows]
    return cells[0], cells[2:]  # header, (rule), rows


def test_formats(b: Bench) -> None:
    args = ["-p", "16", "-n", "4", *FAST]
    header, rows = md_table(b.ok(*args))
    check(header[:len(MD_COLUMNS)] == MD_COLUMNS, f"md: header columns {header}")
    check(len(rows) == 2 and [r[header.index("test")] for r in rows] == ["pp16", "tg4"],
          "md: one row per test (pp16, tg4)")
    check(all("±" in r[header.index("t/s")] for r in rows), "md: t/s as 'mean ± sd'")
    text = b.ok(*args)
    check("device: cpu:" in text and "build: kestrel" in text, "md: device and version lines")

    results = b.json(*args)
    check(isinstance(results, list) and len(results) == 2, "json: an array of 2 results")
    for r in results:
        missing = [f for f in LLAMA_BENCH_FIELDS + KESTREL_FIELDS if f not in r]
        check(not missing, f"json: llama-bench and Kestrel fields present (missing {missing})")
    r = results[0]
    check(r["n_prompt"] == 16 and r["n_gen"] == 0 and r["test"] == "pp16", "json: pp16 test")
    check(r["type_k"] == "f16" and r["n_gpu_layers"] == 0 and r["backends"] == "cpu",
          "json: type_k f16, ngl 0, backend cpu")
    check(r["model_size"] > 0 and r["model_n_params"] > 0 and r["avg_ts"] > 0, "json: sizes, t/s")
    check(len(r["samples_ns"]) == 1 and len(r["samples_ts"]) == 1, "json: one sample per repetition")

    lines = b.ok("-o", "jsonl", *args).splitlines()
    objs = [json.loads(line) for line in lines]
    check(len(objs) == 2 and all(isinstance(o, dict) for o in objs), "jsonl: one object per line")

    table = list(csv.DictReader(io.StringIO(b.ok("-o", "csv", *args))))
    check(len(table) == 2, "csv: 2 rows")
    check(all(f in table[0] for f in LLAMA_BENCH_FIELDS), "csv: llama-bench fields in the header")
    check(table[1]["n_gen"] == "4" and table[1]["test"] == "tg4", "csv: tg4 row")


def test_product(b: Bench) -> None:
    results = b.json("-b", "32,64", "-ub", "16,32", "-p", "16", "-n", "4", *FAST)
    got = sorted((r["n_batch"], r["n_ubatch"], r["test"]) for r in results)
    want = sorted((nb, nub, t) for nb in (32, 64) for nub in (16, 32) for t in ("pp16", "tg4"))
    check(got == want, "-b 32,64 -ub 16,32 -p 16 -n 4: 4 combinations x 2 tests")

    results = b.json("-ctk", "f16,q8_0", "-ctv", "q4_0", "-p", "8", "-n", "0", *FAST)
    check(sorted(r["type_k"] for r in results) == ["f16", "q8_0"] and
          all(r["type_v"] == "q4_0" for r in results), "-ctk f16,q8_0 -ctv q4_0: 2 rows")

    results = b.json("-p", "8,12", "-n", "2", "-pg", "8,2", "-pg", "4,2", "-r", "2", "-t", "1")
    check([r["test"] for r in results] == ["pp8", "pp12", "tg2", "pp8+tg2", "pp4+tg2"],
          "-p 8,12 -n 2 -pg 8,2 -pg 4,2: tests in llama-bench's order")
    check(all(len(r["samples_ns"]) == 2 for r in results), "-r 2: two samples per test")
    pg = results[3]
    check(pg["n_prompt"] == 8 and pg["n_gen"] == 2, "-pg 8,2: n_prompt 8, n_gen 2")
    check(abs(pg["samples_ts"][0] - 10 * 1e9 / pg["samples_ns"][0]) < 1e-6 * pg["samples_ts"][0],
          "pg: t/s counts prompt and generated tokens")

    p = b.run("-o", "json", "-t", "1,2", "-b", "16,32", "-p", "8", "-n", "0", "-r", "1")
    results = json.loads(p.stdout)
    check(sorted((r["n_threads"], r["n_batch"]) for r in results) ==
          [(1, 16), (1, 32), (2, 16), (2, 32)] and p.stderr.count("loading") == 2,
          "-t 1,2 -b 16,32: 4 rows, the model loaded once per thread count")

    m = str(b.model)
    results = b.json("-m", f"{m},{m}", "-m", m, "-p", "8", "-n", "0", *FAST, model=False)
    check(len(results) == 3, "-m A,B -m C: three models measured")


def test_depth(b: Bench, work: Path) -> None:
    results = b.json("-p", "8", "-n", "2", "-d", "0,16", *FAST)
    check([r["test"] for r in results] == ["pp8", "tg2", "pp8 @ d16", "tg2 @ d16"] and
          [r["n_depth"] for r in results] == [0, 0, 16, 16],
          "-d 0,16: every test at every depth, depth outermost, n_depth in the results")
    pp = results[2]
    check(abs(pp["samples_ts"][0] - 8 * 1e9 / pp["samples_ns"][0]) < 1e-6 * pp["samples_ts"][0],
          "-d: t/s counts the test's tokens, not the depth's")
    _, rows = md_table(b.ok("-p", "8", "-n", "0", "-d", "16", *FAST))
    check(len(rows) == 1 and "pp8 @ d16" in rows[0], "-d 16: md test column 'pp8 @ d16'")
    ref = work / "llama-bench-depth.json"
    ref.write_text(json.dumps([{"n_prompt": 8, "n_gen": 0, "n_depth": 16, "avg_ts": 10.0}]))
    results = b.json("-p", "8", "-n", "0", "-d", "0,16", "--vs-llama-bench", str(ref), *FAST)
    check(results[0]["vs_llama_cpp"] is None and results[1]["vs_llama_cpp"] is not None,
          "--vs-llama-bench: a test matches llama-bench's test of the same depth only")


def test_vs_llama_bench(b: Bench, work: Path) -> None:
    ref = [
        {"model_filename": "/elsewhere/" + b.model.name, "n_prompt": 16, "n_gen": 0,
         "n_depth": 0, "n_batch": 2048, "n_ubatch": 512, "n_threads": 1, "type_k": "f16",
         "type_v": "f16", "avg_ts": 1000.0, "stddev_ts": 1.0},
        {"model_filename": "/elsewhere/" + b.model.name, "n_prompt": 0, "n_gen": 4,
         "n_depth": 0, "n_batch": 2048, "n_ubatch": 512, "n_threads": 1, "type_k": "f16",
         "type_v": "f16", "avg_ts": 50.0, "stddev_ts": 1.0},
    ]
    path = work / "llama-bench.json"
    path.write_text(json.dumps(ref, indent=2))
    results = b.json("-p", "16", "-n", "4", "-pg", "4,4", "--vs-llama-bench", str(path), *FAST)
    pp, tg, pg = results
    check(pp["llama_bench_avg_ts"] == 1000.0 and
          abs(pp["vs_llama_cpp"] - pp["avg_ts"] / 1000.0) < 1e-9 * pp["vs_llama_cpp"],
          "--vs-llama-bench: pp16 ratio = Kestrel t/s / llama-bench avg_ts")
    check(abs(tg["vs_llama_cpp"] - tg["avg_ts"] / 50.0) < 1e-9 * tg["vs_llama_cpp"],
          "--vs-llama-bench: tg4 ratio")
    check(pg["vs_llama_cpp"] is None, "--vs-llama-bench: a test llama-bench did not run has null")
    header, rows = md_table(b.ok("-p", "16", "-n", "0", "--vs-llama-bench", str(path), *FAST))
    col = header.index("vs llama.cpp") if "vs llama.cpp" in header else -1
    check(col >= 0 and float(rows[0][col]) > 0, "--vs-llama-bench: md column 'vs llama.cpp'")
    results = b.json("-p", "16", "-n", "0", "-b", "64", "--vs-llama-bench", str(path), *FAST)
    check(results[0]["vs_llama_cpp"] is None, "--vs-llama-bench: another n_batch does not match")


def test_history(b: Bench, work: Path) -> None:
    hist = work / "history.jsonl"
    hist.unlink(missing_ok=True)
    b.ok("-p", "8", "-n", "2", "--history", str(hist), *FAST)
    b.ok("-p", "8", "-n", "0", "--history", str(hist), *FAST)
    records = [json.loads(line) for line in hist.read_text().splitlines()]
    check(len(records) == 3, "--history: one record per result, appended")
    check(all(r.get("kind") == "bench" and "avg_ts" in r and "recorded_at" in r for r in records),
          "--history: records with kind 'bench', avg_ts, recorded_at")
    check([r["test"] for r in records] == ["pp8", "tg2", "pp8"], "--history: in order")


def test_config(b: Bench, work: Path) -> None:
    cfg = work / "settings.json"
    cfg.write_text(json.dumps({"kestrel_settings": 1, "n_batch": 64, "n_ubatch": 16,
                               "n_threads": 1, "type_k": "q8_0", "chunking": "fixed"}))
    r = b.json("-p", "8", "-n", "0", "-r", "1", "--config", str(cfg))[0]
    check((r["n_batch"], r["n_ubatch"], r["n_threads"], r["type_k"], r["chunking"]) ==
          (64, 16, 1, "q8_0", "fixed"), "--config: the file's settings apply")
    r = b.json("-p", "8", "-n", "0", "-r", "1", "-b", "32", "-ctk", "f16", "--config", str(cfg))[0]
    check((r["n_batch"], r["n_ubatch"], r["type_k"]) == (32, 16, "f16"),
          "--config: flags on the command line win")


def test_profile(b: Bench) -> None:
    args = ["-p", "16", "-n", "2", "-r", "2", "-t", "1", "--profile"]
    results = b.json(*args)
    check(all(isinstance(r.get("profile"), dict) and r["profile"] for r in results),
          "--profile: json results carry a 'profile' object")
    text = b.ok(*args)
    check(text.count("## Per-op profile: ") == 2 and "| op |" in text,
          "--profile: md has one profile table per test after the results")
    check("profile" not in b.json("-p", "16", "-n", "0", *FAST)[0], "no --profile: no profile")


def test_bad_input(b: Bench, work: Path) -> None:
    hist = work / "bad-history.jsonl"
    bad_ref = work / "bad-llama-bench.json"
    bad_ref.write_text('[{"n_prompt": 16}]')
    gpu_cfg = work / "gpu-settings.json"
    gpu_cfg.write_text(json.dumps({"kestrel_settings": 1, "n_gpu_layers": 3}))
    # -ngl without a GPU backend to take the layers: a CPU-only build refuses it outright; a build
    # with a GPU backend (OpenCL on PoCL in CI) refuses it with the CPU backend forced (with
    # "auto" it would run on the CPU with a note, which is not bad input there).
    m = re.search(r"available: ([a-z0-9_, ]+)\)", b.run("--help", model=False).stdout)
    gpu_build = m is not None and m.group(1).strip() != "cpu"
    if gpu_build:
        gpu_layer_cases = [(["--backend", "cpu", "-ngl", "5"], "runs on the CPU"),
                           (["--backend", "cpu", "--config", str(gpu_cfg)], "runs on the CPU")]
    else:
        gpu_layer_cases = [(["-ngl", "5"], "no GPU backend"),
                           (["--config", str(gpu_cfg)], "no GPU backend")]
    cases = [
        (["--no-such-flag"], "no-such-flag"),
        (["-o", "xml"], "xml"),
        (["-ctk", "q9"], "q9"),
        (["-ctv", "q9"], "q9"),
        (["--backend", "cuda"], "available: cpu"),
        *gpu_layer_cases,
        (["-r", "0"], "repetition"),
        (["-b", "0"], "-b 0"),
        (["-pg", "512"], "-pg 512"),
        (["-p", "0", "-n", "0"], "nothing to measure"),
        (["--n-depth=-1"], "-d -1"),
        (["--vs-llama-bench", str(bad_ref)], "n_gen"),
        (["--vs-llama-bench", str(work / "absent.json")], "absent.json"),
        (["--config", str(work / "absent-settings.json")], "absent-settings.json"),
    ]
    for args, needle in cases:
        hist.unlink(missing_ok=True)
        p = b.run("--history", str(hist), *FAST[:2], *args)
        check(p.returncode != 0 and needle in p.stderr and p.stdout == "" and not hist.exists(),
              f"bad input {' '.join(args)}: non-zero exit, message names '{needle}', no output "
              f"(rc {p.returncode}, stderr {p.stderr.strip()[:120]!r})")
    hist.unlink(missing_ok=True)
    p = b.run("-m", str(work / "missing.gguf"), "-p", "8", "--history", str(hist), model=False)
    check(p.returncode != 0 and "missing.gguf" in p.stderr and p.stdout == "" and
          not hist.exists(), "missing model: non-zero exit naming the file, no output")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kestrel", required=True)
    ap.add_argument("--workdir", required=True)
    args = ap.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    model = work / "tiny-q4_0.gguf"
    if not model.exists():
        subprocess.run([sys.executable, str(REPO / "scripts" / "synth_gguf.py"), "--out",
                        str(model), "--shape", "tiny", "--type", "q4_0"], check=True)
    b = Bench(args.kestrel, model)
    for test in (test_formats, test_product, test_profile):
        test(b)
    for test in (test_depth, test_vs_llama_bench, test_history, test_config, test_bad_input):
        test(b, work)
    print(f"\n{len(failures)} failure(s)" if failures else "\nall passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
