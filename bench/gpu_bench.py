#!/usr/bin/env python3
"""GPU benchmark: `kestrel bench` on the ANCHORS.md test models against llama.cpp's H100 figures
and the issue's targets, and, with --llama-bench, against llama.cpp itself in the same run.

Runs `kestrel bench -o jsonl` once per group of settings (one model load per group; results
stream out per test, so a crash keeps what finished), prints a markdown table (test, settings,
Kestrel t/s mean ± sd, llama.cpp t/s, ratio, target, met) and writes every result as JSON.
A group that fails or times out marks its cases as failed and the rest still run; --budget
bounds the whole. Missing models are synthesized first (scripts/synth_gguf.py, the shapes of
ANCHORS.md, Q4_0 with scales uniform in [0.002, 0.02]).

  python3 bench/gpu_bench.py --kestrel build-gpu/bin/kestrel [-r 3] [--budget 240] [--json OUT]
                             [--llama-bench PATH]

With --llama-bench, each group's tests also run through llama-bench (CUDA build, all layers on
the GPU unless the group says otherwise, flash attention on: llama.cpp's fastest settings) right
after Kestrel's, and the table gains the columns "llama.cpp same run" and its ratio: the ANCHORS
figures were measured on an H100, and the GPU machine may be another card (an H200 has ~1.4x the
memory bandwidth), so only the same-run ratio compares like with like.

Exit status: 0 when every case produced a result (targets met or not), 1 otherwise.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ANCHOR_SCALES = "0.002,0.02"   # ANCHORS.md: Q4_0 scales uniform in [0.002, 0.02]

# llama.cpp (upstream, 2025-11-18), CUDA, H100, llama-bench tokens/s: the table "llama.cpp ...
# CUDA, H100" of ANCHORS.md (/work/shared/ANCHORS.md). Keep in step with that file.
#   (model, settings) -> {test: t/s}
LLAMA_CPP = {
    ("llama2-7b", "all layers, b2048 ub512"):
        {"pp128": 6529, "pp327": 8760, "pp512": 9740, "pp2048": 9453, "pp4096": 8642, "tg128": 279},
    ("llama2-7b", "all layers, b2048 ub512, flash attention"):
        {"pp512": 11261, "pp2048": 11464, "pp4096": 11080, "tg128": 305},
    ("llama2-7b", "all layers, b2048 ub512, flash attention, KV q4_0"):
        {"pp512": 11035, "tg128": 302},
    ("llama2-7b", "b128 ub16, all layers"): {"pp327": 1761},
    ("llama2-7b", "b128 ub16, 31 layers on GPU"): {"pp327": 639},
    ("llama2-7b", "b128 ub128"): {"pp327": 6118},
    ("llama2-7b", "b128 ub16, flash attention, KV q4_0"): {"pp327": 1740},
    ("llama3-8b", "all layers, flash attention"): {"pp512": 10473, "pp2048": 10683, "tg128": 288},
    ("llama3-8b", "b128 ub16, flash attention, KV q4_0"): {"pp327": 1615},
}


@dataclasses.dataclass
class Case:
    name: str             # row label
    group: str            # the kestrel bench call that measures it
    test: str             # kestrel bench's test name (pp512, tg128)
    anchor: tuple[str, str] | None   # key of LLAMA_CPP (its test is `test`)
    target: float | None  # the target, t/s
    # filled in by the run
    result: dict | None = None
    error: str = ""
    peer: dict | None = None   # llama-bench's result in the same run


# group -> (model key, kestrel bench flags, what the settings column says)
GROUPS = {
    "l2-default": ("llama2-7b", ["-p", "128,327,512,2048", "-n", "128"],
                   "defaults (b2048, ub Kestrel's: 2048 on CUDA; f16 KV, all layers)"),
    "l2-kvq4": ("llama2-7b", ["-p", "327,512", "-n", "0", "-ctk", "q4_0", "-ctv", "q4_0"],
                "defaults, KV q4_0"),
    "l2-seed": ("llama2-7b", ["-p", "327", "-n", "0", "-b", "128", "-ub", "16",
                              "-ctk", "q4_0", "-ctv", "q4_0"],
                "b128 ub16, KV q4_0, all layers (the seed's)"),
    "l2-ngl31": ("llama2-7b", ["-p", "327", "-n", "0", "-ngl", "31", "-b", "128", "-ub", "16"],
                 "-ngl 31, b128 ub16, f16 KV"),
    "l3-default": ("llama3-8b", ["-p", "512", "-n", "128"],
                   "defaults (b2048, ub Kestrel's; f16 KV, all layers)"),
    # Decode over a long cache: 3,968 tokens already in the context (llama2's 4,096 less tg128).
    "l2-depth": ("llama2-7b", ["-p", "0", "-n", "128", "-d", "3968"],
                 "defaults, after 3,968 tokens in the context (-d 3968)"),
}
# Environment variables a group's kestrel bench call runs with (the variant groups, below).
GROUP_ENV: dict[str, dict[str, str]] = {}

# A/B variants measured in the same run as the default: (VAR=VALUE, substring of case names, or
# "=NAME": that case alone).
# Each matching case runs again with the variable set (its group's flags, one more kestrel bench
# call), in a row of its own. --ab adds more.
VARIANTS = [
    # The default measured the way the variant rows are: in a kestrel process of its own, not
    # after the group's prefill tests (the default tg128 row measured ~10 t/s below an
    # unchanged variant row on the H200). Compare the variants with this row.
    ("KESTREL_AB_BASELINE=1", "llama2-7b tg128"),
    ("KESTREL_AB_BASELINE=1", "seed case, b128 ub16"),
    # Decode's ffn down as the weight stream of matvec_stream.cu instead of the block-a-4-rows
    # matvec (opt-in since the twenty-seventh session, H100: llama2-7b tg128 440 against 475,
    # llama3-8b 396 against 400).
    ("KESTREL_AB_BASELINE=1", "llama3-8b tg128"),
    ("KESTREL_CUDA_MATVEC_STREAM=1", "tg128"),
    # Decode's ffn down on the K-split matvec instead of its pipelined version (the default since
    # the twenty-eighth session, H100: llama2-7b tg128 481 against 472, llama3-8b 396-399 against
    # 391-394).
    ("KESTREL_CUDA_MATVEC_PIPE=0", "tg128"),
    # (Decode's SwiGLU inside the ffn down stream launch, KESTREL_CUDA_FUSED_SWIGLU=1, needs the
    # stream, KESTREL_CUDA_MATVEC_STREAM=1, as well: no row; H100 tg128 352 against 411.)
    # Decode's SwiGLU in the gate/up matvec's epilogue (opt-in: H100 tg128 402 against 439-441).
    ("KESTREL_CUDA_MATMUL_SWIGLU=1", "tg128"),
    # Decode's residual add and norm in the output / down projections' epilogues (opt-in: H100
    # tg128 383 against 439-441).
    ("KESTREL_CUDA_MATMUL_ADD_NORM=1", "tg128"),
    # A decode layer as one persistent kernel whose weights come through a shared-memory ring
    # (decode_layer.cu, decode_ring.cuh; opt-in).
    ("KESTREL_CUDA_FUSED_DECODE=1", "tg128"),
    # Micro-batches of 5-16 tokens of Q4_0 weights on the fragment kernel (matmul_frag_v2.cu)
    # instead of the copy-engine-fed wgmma kernel (matmul_stream16.cu, the default on sm_90a).
    ("KESTREL_CUDA_STREAM16=0", "b128 ub16"),
    # stream16 with one barrier for all of a block's activations (a barrier for each K step's by
    # default), and with its clusters' last barrier relaxed (opt-in: no gain on the H200).
    ("KESTREL_CUDA_STREAM16_ACT_STEPS=0", "seed case, b128 ub16"),
    ("KESTREL_CUDA_STREAM16_RELAXED_EXIT=1", "seed case, b128 ub16"),
    # stream16's warpgroups taking turns at the steps of every row group (whole groups each by
    # default since the twenty-ninth session, H100: 4,232-4,298 against 4,105-4,146), and its
    # cluster's sum by remote float4 loads instead of each block pushing its results into the
    # slices' owners (the default since the thirtieth session, H100: 4,780 / 4,789 against
    # 4,527-4,575).
    ("KESTREL_CUDA_STREAM16_OWN=0", "seed case, b128 ub16"),
    ("KESTREL_CUDA_STREAM16_PUSH=0", "seed case, b128 ub16"),
    # The kernels between the matmuls without programmatic dependent launches (with them by
    # default).
    ("KESTREL_CUDA_PDL_CHAIN=0", "seed case, b128 ub16"),
    ("KESTREL_CUDA_PDL_CHAIN=0", "llama2-7b tg128"),
    # Recorded passes (decode steps, micro-batches of up to 16) that copy their positions before
    # every layer's RoPE and attention instead of once (the default since the thirty-first
    # session: +5% on both rows).
    ("KESTREL_CUDA_GRAPH_UPLOAD_ONCE=0", "seed case, b128 ub16"),
    ("KESTREL_CUDA_GRAPH_UPLOAD_ONCE=0", "llama2-7b tg128"),
    # RoPE and the KV store in the micro-batch's Q/K/V launch (opt-in: -15% with the positions
    # copied once, -6% without).
    ("KESTREL_CUDA_MATMUL_ROPE_KV=1", "seed case, b128 ub16"),
    # Attention of micro-batches (and, from 1 token, decode steps) with the keys split among
    # blocks (attention_split.cu, opt-in) instead of a block a head for 1 or 4 tokens.
    ("KESTREL_CUDA_ATT_SPLIT_MIN=3", "b128 ub16"),
    ("KESTREL_CUDA_ATT_SPLIT_MIN=1", "llama2-7b tg128"),
    # Attention of micro-batches and decode steps on the rows kernel instead of the tensor cores
    # straight from the cache (attention_tc16.cu, the default from 1 token).
    ("KESTREL_CUDA_ATT_TC16_MIN=17", "b128 ub16"),
    ("KESTREL_CUDA_ATT_TC16_MIN=17", "llama2-7b tg128"),
    # Decode steps' attention on attention_decode.cu up to 2,048 keys and tc16 past them (by
    # default): over a long cache, with the decode kernel for every length (H100 tg128 @ d3968
    # 276 against 291), and tg128 with tc16 at short caches too (KESTREL_CUDA_ATT_DECODE=0).
    ("KESTREL_CUDA_ATT_DECODE_MAX_KEYS=1000000", "tg128 @ d3968"),
    ("KESTREL_CUDA_ATT_DECODE=0", "llama2-7b tg128"),
    # The decode kernel's first pass before its dependency wait (opt-in, not yet measured).
    ("KESTREL_CUDA_ATT_DECODE_EARLY=1", "llama2-7b tg128"),
    # Replays refilled from the named inputs without walking the pass, and a recording's slots
    # copied in one node at its start (both opt-in, not yet measured).
    ("KESTREL_CUDA_GRAPH_DIRECT_STAGE=1", "llama2-7b tg128"),
    ("KESTREL_CUDA_GRAPH_DIRECT_STAGE=1", "seed case, b128 ub16"),
    ("KESTREL_CUDA_GRAPH_ONE_COPY=1", "llama2-7b tg128"),
    # Prompt chunks' wgmma tiles all of 128 tokens (by default each launch picks 128 or 192 by
    # its waves of blocks), and Q, K, V / gate, up as a launch each (grouped by default).
    ("KESTREL_CUDA_WGMMA_BN=128", "=llama2-7b pp327"),
    ("KESTREL_CUDA_WGMMA_BN=128", "=llama2-7b pp512"),
    ("KESTREL_CUDA_WGMMA_BN=128", "=llama2-7b pp2048"),
    ("KESTREL_CUDA_WGMMA_BN=128", "seed case, defaults"),
    ("KESTREL_CUDA_WGMMA_NO_GROUP=1", "llama3-8b pp512"),
    # (The A/B rows of earlier trials -- RoPE + KV store on the rows kernel, SwiGLU four values a
    # thread, the wgmma prompt kernel, the fused decode layer, the fragment kernel's cluster sum
    # -- were measured and dropped from here:
    # bench/NOTES.md has them; each row costs a 7B load of the benchmark's time.)
]

# group -> llama-bench flags for the same settings (with -fa 1: its fastest; -p / -n come from the
# group's tests).
LLAMA_BENCH_FLAGS = {
    "l2-default": ["-ngl", "99", "-fa", "1"],
    "l2-kvq4": ["-ngl", "99", "-fa", "1", "-ctk", "q4_0", "-ctv", "q4_0"],
    "l2-seed": ["-ngl", "99", "-fa", "1", "-b", "128", "-ub", "16", "-ctk", "q4_0", "-ctv", "q4_0"],
    "l2-ngl31": ["-ngl", "31", "-fa", "1", "-b", "128", "-ub", "16"],
    "l3-default": ["-ngl", "99", "-fa", "1"],
    "l2-depth": ["-ngl", "99", "-fa", "1", "-d", "3968"],
}
# Groups that differ from another only in Kestrel's environment take that group's llama-bench run.
PEER_OF: dict[str, str] = {}

L2, L2FA = ("llama2-7b", "all layers, b2048 ub512"), ("llama2-7b", "all layers, b2048 ub512, flash attention")
CASES = [
    Case("llama2-7b pp128", "l2-default", "pp128", L2, None),
    Case("llama2-7b pp327", "l2-default", "pp327", L2, None),
    Case("llama2-7b pp512", "l2-default", "pp512", L2FA, 33000),
    Case("llama2-7b pp2048", "l2-default", "pp2048", L2FA, 35000),
    Case("llama2-7b tg128", "l2-default", "tg128", L2FA, 600),
    Case("llama2-7b pp512 KV q4_0", "l2-kvq4", "pp512",
         ("llama2-7b", "all layers, b2048 ub512, flash attention, KV q4_0"), None),
    Case("llama2-7b pp327 seed case, defaults", "l2-kvq4", "pp327", L2, 25000),
    Case("llama2-7b pp327 seed case, b128 ub16", "l2-seed", "pp327",
         ("llama2-7b", "b128 ub16, flash attention, KV q4_0"), 8000),
    Case("llama2-7b pp327 -ngl 31 b128 ub16", "l2-ngl31", "pp327",
         ("llama2-7b", "b128 ub16, 31 layers on GPU"), 1278),
    Case("llama3-8b pp512", "l3-default", "pp512", ("llama3-8b", "all layers, flash attention"), 31419),
    Case("llama3-8b tg128", "l3-default", "tg128", ("llama3-8b", "all layers, flash attention"), None),
    Case("llama2-7b tg128 @ d3968", "l2-depth", "tg128 @ d3968", None, None),
]


def add_variants(cases: list[Case], variants: list[tuple[str, str]]) -> list[Case]:
    """The cases followed, each, by its variants: the same test in a group of its own that runs
    with VAR=VALUE (GROUPS, GROUP_ENV and PEER_OF entries are added for it). A case at a depth
    ("@ d3968") takes only the variants whose pattern names the depth too."""
    out = []
    for c in cases:
        out.append(c)
        done = set()
        for assign, pattern in variants:
            exact = pattern.startswith("=")
            if (c.name != pattern[1:] if exact else pattern not in c.name) or assign in done:
                continue
            if " @ d" in c.name and " @ d" not in pattern:
                continue
            done.add(assign)
            var, _, value = assign.partition("=")
            g = f"{c.group}+{assign}"
            shape, flags, settings = GROUPS[c.group]
            GROUPS[g] = (shape, flags, f"{settings}, {assign}")
            GROUP_ENV[g] = {var: value}
            PEER_OF[g] = c.group
            out.append(dataclasses.replace(c, name=f"{c.name} ({assign})", group=g))
    return out


def log(msg: str) -> None:
    print(f"gpu_bench: {msg}", flush=True)


def synthesize(shape: str, path: Path) -> None:
    log(f"synthesizing {shape} Q4_0 -> {path}")
    subprocess.run([sys.executable, str(ROOT / "scripts" / "synth_gguf.py"), "--out", str(path),
                    "--shape", shape, "--type", "q4_0", "--scale-range", ANCHOR_SCALES], check=True)


def run_group(kestrel: str, model: Path, flags: list[str], reps: int, timeout: float,
              extra: list[str], env: dict[str, str] | None = None) -> tuple[list[dict], str, float]:
    """Runs one kestrel bench call; returns (results that came out, error text or "", seconds)."""
    cmd = [kestrel, "bench", "-m", str(model), "-r", str(reps), "-o", "jsonl", *flags, *extra]
    log("$ " + " ".join(f"{k}={v}" for k, v in (env or {}).items()) + (" " if env else "")
        + shlex.join(cmd))
    t0 = time.time()
    err = ""
    try:
        p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout,
                           env={**os.environ, **(env or {})})
        out, stderr, rc = p.stdout, p.stderr, p.returncode
    except subprocess.TimeoutExpired as e:
        out, stderr, rc = e.stdout or b"", e.stderr or b"", None
        err = f"timed out after {timeout:.0f} s"
    seconds = time.time() - t0
    results = []
    for line in out.decode("utf-8", "replace").splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                results.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    tail = " | ".join(stderr.decode("utf-8", "replace").strip().splitlines()[-3:])[-400:]
    if rc is not None and rc != 0:
        err = (f"exit {rc}" if rc > 0 else f"killed by signal {-rc}") + (f": {tail}" if tail else "")
    elif rc is None and tail:
        err += f": {tail}"
    return results, err, seconds


def run_llama_bench(llama_bench: str, model: Path, flags: list[str], reps: int,
                    timeout: float) -> tuple[dict[str, dict], str]:
    """llama-bench on the same model and tests: ({test name: result}, error text or "")."""
    cmd = [llama_bench, "-m", str(model), "-r", str(reps), "-o", "jsonl", *flags]
    log("$ " + shlex.join(cmd))
    try:
        p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout)
    except (subprocess.TimeoutExpired, OSError) as e:
        return {}, f"llama-bench: {e}"
    by_test = {}
    for line in p.stdout.decode("utf-8", "replace").splitlines():
        try:
            r = json.loads(line) if line.startswith("{") else None
        except json.JSONDecodeError:
            r = None
        if r:
            n_p, n_g = int(r.get("n_prompt", 0)), int(r.get("n_gen", 0))
            n_d = int(r.get("n_depth", 0))
            name = f"pp{n_p}" if n_g == 0 else f"tg{n_g}" if n_p == 0 else f"pg{n_p},{n_g}"
            by_test[name + (f" @ d{n_d}" if n_d else "")] = r
    err = ""
    if p.returncode != 0:
        tail = " | ".join(p.stderr.decode("utf-8", "replace").strip().splitlines()[-3:])[-300:]
        err = f"llama-bench exit {p.returncode}: {tail}"
    return by_test, err


def group_flags(flags: list[str], tests: list[str]) -> list[str]:
    """The group's flags with -p / -n narrowed to the selected tests (pp N -> -p, tg N -> -n; a
    test's depth, "tg128 @ d3968", is the group's -d)."""
    tests = [t.split(" @ ")[0] for t in tests]
    rest, i = [], 0
    while i < len(flags):
        if flags[i] in ("-p", "-n"):
            i += 2
            continue
        rest.append(flags[i])
        i += 1
    pp = [t[2:] for t in tests if t.startswith("pp")]
    tg = [t[2:] for t in tests if t.startswith("tg")]
    return ["-p", ",".join(pp) if pp else "0", "-n", ",".join(tg) if tg else "0"] + rest


def fmt_ts(x: float | None) -> str:
    return "-" if x is None else f"{x:,.0f}" if x >= 100 else f"{x:,.1f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kestrel", default=str(ROOT / "build-gpu" / "bin" / "kestrel"))
    ap.add_argument("--models", default="/tmp/kestrel-models",
                    help="folder of llama2-7b-q4_0.gguf and llama3-8b-q4_0.gguf (synthesized if missing)")
    ap.add_argument("--llama2", help="llama2-7b Q4_0 model (default MODELS/llama2-7b-q4_0.gguf)")
    ap.add_argument("--llama3", help="llama3-8b Q4_0 model (default MODELS/llama3-8b-q4_0.gguf)")
    ap.add_argument("-r", "--repetitions", type=int, default=3, help="timed runs per test")
    ap.add_argument("--budget", type=float, default=300, help="seconds for all groups together")
    ap.add_argument("--timeout", type=float, default=150, help="seconds per kestrel bench call")
    ap.add_argument("--only", action="append", default=[],
                    help="run only cases whose name contains this substring (repeatable)")
    ap.add_argument("--kestrel-args", default="", help="flags appended to every kestrel bench call")
    ap.add_argument("--llama-bench", help="llama.cpp's llama-bench (CUDA build): race it in the same run")
    ap.add_argument("--ab", action="append", default=[], metavar="VAR=VALUE:CASES",
                    help="also run the cases whose name contains CASES (=NAME: that case alone) "
                         "with the environment variable VAR=VALUE, in rows of their own "
                         "(repeatable; adds to the built-in variants)")
    ap.add_argument("--no-variants", action="store_true", help="skip the built-in A/B variants")
    ap.add_argument("--allow-cpu", action="store_true",
                    help="accept results that ran on the CPU (for trying the script without a GPU)")
    ap.add_argument("--json", default="bench-gpu.json", help="write every result here")
    ap.add_argument("--md", help="also write the markdown table (and its heading) to this file")
    args = ap.parse_args(argv)
    t_start = time.time()
    extra = shlex.split(args.kestrel_args)

    models = {"llama2-7b": Path(args.llama2 or Path(args.models) / "llama2-7b-q4_0.gguf"),
              "llama3-8b": Path(args.llama3 or Path(args.models) / "llama3-8b-q4_0.gguf")}
    variants = [] if args.no_variants else list(VARIANTS)
    for ab in args.ab:
        assign, sep, pattern = ab.partition(":")
        if not sep or "=" not in assign:
            ap.error(f"--ab {ab}: expected VAR=VALUE:CASES")
        variants.append((assign, pattern))
    cases = [c for c in add_variants(CASES, variants)
             if not args.only or any(o in c.name for o in args.only)]
    groups = list(dict.fromkeys(c.group for c in cases))
    if not (Path(args.kestrel).is_file() and os.access(args.kestrel, os.X_OK)):
        for c in cases:
            c.error = f"no kestrel binary at {args.kestrel}"
        groups = []

    calls = []
    peers: dict[str, dict[str, dict]] = {}   # group -> llama-bench's results by test
    if groups and not args.allow_cpu:
        # A tiny model first: a build or machine where --backend auto falls back to the CPU would
        # spend the whole budget on 7B models at CPU speed.
        tiny = Path(args.models) / "tiny-q4_0.gguf"
        try:
            if not tiny.exists():
                subprocess.run([sys.executable, str(ROOT / "scripts" / "synth_gguf.py"), "--out",
                                str(tiny), "--shape", "tiny", "--type", "q4_0"], check=True,
                               stdout=subprocess.DEVNULL)
            results, err, seconds = run_group(args.kestrel, tiny, ["-p", "16", "-n", "0", "--no-warmup"],
                                              1, 60, extra)
        except (subprocess.CalledProcessError, OSError) as e:
            results, err = [], f"cannot synthesize {tiny}: {e}"
        backends = str(results[0].get("backends", "")) if results else ""
        if err or backends.strip() in ("", "cpu"):
            why = err or (f"kestrel bench --backend auto chose the CPU ({results[0].get('device')}), "
                          f"not a GPU: is the CUDA backend built and a device visible? (or --allow-cpu)")
            log(f"probe on {tiny.name} failed: {why}")
            for c in cases:
                c.error = f"probe on a tiny model: {why}"
            groups = []
        else:
            log(f"probe: {results[0].get('backends')} on {results[0].get('device')}")
    for g in groups:
        shape, flags, _ = GROUPS[g]
        mine = [c for c in cases if c.group == g]
        left = args.budget - (time.time() - t_start)
        if left < 10:
            for c in mine:
                c.error = f"not run: --budget {args.budget:g} s used up"
            continue
        model = models[shape]
        if not model.exists():
            try:
                synthesize(shape, model)
            except (subprocess.CalledProcessError, OSError) as e:
                for c in mine:
                    c.error = f"cannot synthesize {model}: {e}"
                continue
        flags = group_flags(flags, [c.test for c in mine])
        results, err, seconds = run_group(args.kestrel, model, flags, args.repetitions,
                                          min(args.timeout, left), extra, GROUP_ENV.get(g))
        calls.append({"group": g, "model": str(model), "flags": flags + extra,
                      "env": GROUP_ENV.get(g, {}), "seconds": seconds,
                      "error": err, "n_results": len(results)})
        by_test = {r.get("test"): r for r in results}
        for c in mine:
            r = by_test.get(c.test)
            if r is None:
                c.error = err or "no result for this test in kestrel bench's output"
            elif "cpu" == str(r.get("backends", "")).strip() and not args.allow_cpu:
                c.result = r
                c.error = f"ran on the CPU, not a GPU (device: {r.get('device')})"
            else:
                c.result = r
        log(f"{g}: {len(results)} results in {seconds:.1f} s" + (f"; {err}" if err else ""))
        left = args.budget - (time.time() - t_start)
        if args.llama_bench and g in PEER_OF:
            peers[g] = peers.get(PEER_OF[g], {})
        elif args.llama_bench and left > 10:
            lflags = group_flags(flags, [c.test for c in mine])[:4] + LLAMA_BENCH_FLAGS[g]
            peers[g], perr = run_llama_bench(args.llama_bench, model, lflags, args.repetitions,
                                             min(args.timeout, left))
            log(f"{g}: llama-bench {len(peers[g])} results" + (f"; {perr}" if perr else ""))
        for c in mine:
            c.peer = peers.get(g, {}).get(c.test)

    # The table.
    rows = []
    for c in cases:
        r = c.result or {}
        ours = r.get("avg_ts") if not c.error else None
        anchor = LLAMA_CPP[c.anchor].get(c.test) if c.anchor else None
        peer = (c.peer or {}).get("avg_ts")
        rows.append({
            "case": c.name, "model": GROUPS[c.group][0], "test": c.test,
            "settings": GROUPS[c.group][2], "flags": GROUPS[c.group][1] + extra,
            "ok": not c.error, "error": c.error,
            "kestrel_avg_ts": ours, "kestrel_stddev_ts": r.get("stddev_ts") if ours else None,
            "llama_cpp_ts": anchor, "llama_cpp_settings": c.anchor[1] if c.anchor else None,
            "ratio": ours / anchor if ours and anchor else None,
            "llama_cpp_same_run_ts": peer,
            "llama_cpp_same_run_flags": (LLAMA_BENCH_FLAGS[PEER_OF.get(c.group, c.group)]
                                         if peer else None),
            "ratio_same_run": ours / peer if ours and peer else None,
            "target_ts": c.target,
            "target_met": (ours >= c.target) if ours is not None and c.target else None,
            "kestrel": r or None,
        })
    device = next((r["kestrel"].get("device") for r in rows if r["kestrel"]), "?")
    version = next((r["kestrel"].get("kestrel_version") for r in rows if r["kestrel"]), "?")
    table = [f"Kestrel {version} on {device}; {args.repetitions} timed runs per test (t/s: mean ± sd); "
             f"llama.cpp: ANCHORS.md (H100, llama-bench)"
             + (f"; same run: {args.llama_bench} (-fa 1)" if args.llama_bench else ""), "",
             "| test | settings | Kestrel t/s | llama.cpp same run | ratio | "
             "llama.cpp ANCHORS t/s (its settings) | ratio | target | met |",
             "|---|---|---|---|---|---|---|---|---|"]
    notes: list[str] = []   # the failures' messages, each once, referenced as [n]
    for row in rows:
        if row["ok"]:
            ours = f"{fmt_ts(row['kestrel_avg_ts'])} ± {fmt_ts(row['kestrel_stddev_ts'])}"
        else:
            if row["error"] not in notes:
                notes.append(row["error"])
            ours = f"FAILED [{notes.index(row['error']) + 1}]"
        llama = (f"{fmt_ts(row['llama_cpp_ts'])} ({row['llama_cpp_settings']})"
                 if row["llama_cpp_ts"] else "-")
        ratio = f"{row['ratio']:.2f}x" if row["ratio"] else "-"
        target = f"≥ {row['target_ts']:,.0f}" if row["target_ts"] else "-"
        met = "-" if row["target_ts"] is None else ("n/a" if row["target_met"] is None
                                                    else "met" if row["target_met"] else "not met")
        same = fmt_ts(row["llama_cpp_same_run_ts"]) if row["llama_cpp_same_run_ts"] else "-"
        same_ratio = f"{row['ratio_same_run']:.2f}x" if row["ratio_same_run"] else "-"
        table.append(f"| {row['case']} | {row['settings']} | {ours} | {same} | {same_ratio} | {llama} "
                     f"| {ratio} | {target} | {met} |")
    n_fail = sum(not r["ok"] for r in rows)
    n_target = sum(r["target_ts"] is not None for r in rows)
    n_met = sum(bool(r["target_met"]) for r in rows)
    table += [""] + [f"[{i + 1}] {n}" for i, n in enumerate(notes)] + ([""] if notes else [])
    # Scratch (activations, staging, weight tiles: device memory beyond the weights and the KV
    # cache) at most, per kestrel bench call; issue 5 allows 1 GiB.
    peaks: dict[str, int] = {}
    for c in cases:
        mem = (c.result or {}).get("device_memory") or {}
        if "scratch_peak_bytes" in mem:
            peaks[c.group] = max(peaks.get(c.group, 0), mem["scratch_peak_bytes"])
    if peaks:
        worst = max(peaks.values())
        table += ["scratch held at most (beyond weights and KV cache; at most 1 GiB allowed): "
                  + ", ".join(f"{g} {b / 2**30:.2f} GiB" for g, b in peaks.items())
                  + (" -- over 1 GiB" if worst > 2**30 else ""), ""]
    table += [f"gpu_bench: {len(rows) - n_fail}/{len(rows)} cases measured, {n_fail} failed; "
                  f"targets met {n_met}/{n_target}; {time.time() - t_start:.0f} s"]
    print("\n" + "\n".join(table))
    if args.md:
        Path(args.md).parent.mkdir(parents=True, exist_ok=True)
        Path(args.md).write_text("\n".join(table) + "\n")

    doc = {"kestrel": args.kestrel, "kestrel_version": version, "device": device,
           "repetitions": args.repetitions, "models": {k: str(v) for k, v in models.items()},
           "anchors_source": "ANCHORS.md (llama.cpp upstream 2025-11-18, CUDA, H100)",
           "calls": calls, "cases": rows, "seconds": time.time() - t_start}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
        log(f"wrote {args.json}")
    return 0 if n_fail == 0 and rows else 1


if __name__ == "__main__":
    sys.exit(main())
