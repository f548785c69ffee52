#!/usr/bin/env python3
"""`--profile`: per-op times by op kind, in the markdown report and the JSON report, overall
and per chunk; profiling changes no result (logits bit-identical) and, off, leaves no trace.
The warm-up pass of GPU backends (OpenCL when built): reported, outside the profile, no logit
changed. Micro-batches overlapping across a CPU/OpenCL split: the same logits as run serially.
No timing bounds: only that the numbers are consistent (shares within the wall time)."""
import argparse
import json
import os
import struct
import subprocess
import sys

failures = []


def check(ok, what):
    print(("ok   " if ok else "FAIL ") + what, flush=True)
    if not ok:
        failures.append(what)


def check_warm_up(run, backend):
    """A GPU backend (OpenCL on PoCL in CI; --gpu-backend cuda on the GPU machine) runs one untimed
    pass before the prompt: the report says so, and neither the logits nor the profile's op counts
    change."""
    gpu = ["--backend", backend, "-ngl", "99"]
    try:
        warm, warm_logits, p = run(gpu + ["--profile", "--report"], "warm")
        cold, cold_logits, _ = run(gpu + ["--profile", "--no-warmup"], "cold")
    except RuntimeError as e:
        if backend.lower() in str(e).lower():
            print(f"skip warm-up checks (no {backend} backend: {str(e).strip()[:200]})")
            return
        raise
    check(warm.get("warmup_ms", 0) > 0 and "one pass of 16 tokens, not timed" ==
          warm.get("warmup", "") and "| warm-up (before timing) |" in p.stdout,
          f"{backend}: the warm-up pass is reported ({warm.get('warmup_ms')} ms, {warm.get('warmup')!r})")
    check(cold.get("warmup_ms", 0) == 0, "--no-warmup runs none")
    check(warm_logits == cold_logits, "the warm-up changes no logit (bit-identical)")
    calls = lambda r: {o["op"]: o["calls"] for o in r["profile"]["ops"]}
    check(calls(warm) == calls(cold), "the warm-up pass is not in the profile")
    check(calls(cold).get("copy logits to host") == 6,
          f"{backend}: every micro-batch's logits copy is timed ({calls(cold)})")


def check_overlap(kestrel, model, tokens, workdir, backend):
    """A split placement (layer 0 on the CPU, layer 1 on the GPU, the head on the CPU) lets the CPU
    layers of one micro-batch run while the device finishes the previous one: the last logits must
    be bit-identical to the same micro-batches run one after the other (--profile turns the
    overlap off) and agree with the CPU backend."""
    def last_logits(extra, name):
        out = os.path.join(workdir, f"overlap-{name}.f32")
        p = subprocess.run([kestrel, "run", "-m", model, "--tokens", tokens, "-n", "0", "-b", "64",
                            "-ub", "8", "--dump-last-logits", out] + extra,
                           capture_output=True, text=True)
        if p.returncode != 0:
            raise RuntimeError(p.stderr)
        with open(out, "rb") as f:
            return f.read()
    split = ["--backend", backend, "-ngl", "1"]
    try:
        overlapped = last_logits(split, "overlapped")
    except RuntimeError as e:
        if backend.lower() in str(e).lower():
            print(f"skip overlap checks (no {backend} backend: {str(e).strip()[:200]})")
            return
        raise
    serial = last_logits(split + ["--profile"], "serial")
    cpu = last_logits(["--backend", "cpu"], "cpu")
    check(len(overlapped) > 0 and overlapped == serial,
          f"{backend} -ngl 1: overlapped micro-batches give the serial run's last logits (bit-identical)")
    a = struct.unpack(f"{len(overlapped) // 4}f", overlapped)
    b = struct.unpack(f"{len(cpu) // 4}f", cpu)
    err = max(abs(x - y) for x, y in zip(a, b)) / max(max(abs(y) for y in b), 1e-30)
    check(len(a) == len(b) and err < 1e-3,
          f"{backend} -ngl 1 overlapped: last logits within 1e-3 of the CPU backend's (max rel. {err:.2e})")


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--kestrel", required=True)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--gpu-backend", default="opencl", help="the GPU backend to check (opencl, cuda)")
    args = ap.parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
    model = os.path.join(args.workdir, "tiny-q4_0.gguf")
    subprocess.run([sys.executable, os.path.join(root, "scripts", "synth_gguf.py"), "--out", model,
                    "--shape", "tiny", "--type", "q4_0"], check=True, capture_output=True)
    tokens = ",".join(str(3 + (i * 7919) % 200) for i in range(70))
    base = [args.kestrel, "run", "-m", model, "--tokens", tokens, "-n", "0", "-b", "32",
            "-ub", "16"]

    def run(extra, name):
        js, logits = (os.path.join(args.workdir, f"{name}.{ext}") for ext in ("json", "f32"))
        p = subprocess.run(base + extra + ["--report-json", js, "--dump-logits", logits],
                           capture_output=True, text=True)
        if p.returncode != 0:
            raise RuntimeError(p.stderr)
        with open(js) as f, open(logits, "rb") as g:
            return json.load(f), g.read(), p

    # The CPU backend by name: on a machine with a GPU the default would pick it.
    cpu = ["--backend", "cpu"]
    plain, plain_logits, _ = run(cpu, "plain")
    prof, prof_logits, p = run(cpu + ["--profile", "--report"], "profiled")
    check("profile" not in plain and all("profile" not in c for c in plain["chunks"]),
          "without --profile the report carries no profile")
    check(plain_logits == prof_logits, "profiling changes no logit (bit-identical)")
    ops = {o["op"]: o for o in prof["profile"]["ops"]}
    want = {"matmul q4_0", "attention", "rms_norm", "rope", "kv_store", "swiglu", "add", "embed"}
    check(want <= set(ops), f"op kinds recorded: {sorted(ops)}")
    # tiny: 2 layers; 70 tokens run as balanced chunks 24+23+23, each in 2 micro-batches
    # Per layer 4 matmul entries: Q/K/V as one group, wo, gate/up as one group, down.
    n_layer, n_ubatch = 2, 6
    check(ops["attention"]["calls"] == n_layer * n_ubatch and
          ops["matmul q4_0"]["calls"] == 4 * n_layer * n_ubatch,
          f"calls: attention {ops['attention']['calls']}, matmul {ops['matmul q4_0']['calls']}")
    wall = prof["profile"]["wall_ms"]
    total = sum(o["ms"] for o in ops.values())
    check(abs(wall - prof["total_ms"]) < 1e-6 and 0 < total <= wall * 1.001,
          f"op time {total:.2f} ms within the wall time {wall:.2f} ms")
    shares = [c["profile"]["ops_ms"] / c["ms"] for c in prof["chunks"]]
    check(len(prof["chunks"]) == 3 and all(0 < s <= 1.001 for s in shares),
          f"every chunk has its own profile (shares of the chunk {[round(s, 3) for s in shares]})")
    check("## Per-op profile" in p.stdout and "| matmul q4_0 |" in p.stdout and
          "largest ops (share of the chunk)" in p.stdout, "markdown report shows the profile")
    check("warmup_ms" not in plain or plain["warmup_ms"] == 0,
          "the CPU backend runs no warm-up pass")
    check_warm_up(run, args.gpu_backend)
    check_overlap(args.kestrel, model, tokens, args.workdir, args.gpu_backend)
    print(f"{len(failures)} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
