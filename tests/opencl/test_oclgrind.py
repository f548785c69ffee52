#!/usr/bin/env python3
"""The OpenCL kernels under Oclgrind (Debian's `oclgrind`, an OpenCL device simulator that checks
every memory access): forward passes of tiny synthetic models on `--backend opencl` with
Oclgrind as the only platform, its data-race detection on, and any report it prints (an access
out of bounds, a race on local or global memory between work-items, a barrier that not every
work-item reaches) fails the test. Conformance tests show that kernels compute the right values
on the devices we have; this shows they do not depend on them: a missing barrier or a read past
a buffer that PoCL and NVIDIA's driver happen to tolerate could break on a phone's GPU.

The runs cover every kernel of the forward pass: prompts of more and fewer than a tile's tokens
(matmul_tiled with a partial tile, matmul_tiled16 with split-K, matmul_small), decode steps
(single-query attention), the f16, q8_0 and q4_0 KV caches (kv_store's quantize-on-write,
attention_block with and without key splits), the repacked Q4_0 / Q8_0 weights and the generic
decoder (Q4_K), a layer split across CPU and device, and NVIDIA's tensor-core kernels (fragments
and template) with their mma emulated. Oclgrind has no cl_khr_fp16, so the half kernels are not
among them (Intel's runtime runs those: opencl_intel_ops).

Exit 77 (a skip) when Oclgrind is not installed."""
import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))

OCLGRIND_ICD = Path("/usr/lib/oclgrind/liboclgrind-rt-icd.so")
# Oclgrind's reports name the kernel and the offending work-item.
REPORT = re.compile(r"^\s*(Kernel: |Invalid (read|write)|.*data race|Work-group divergence|"
                    r"Uninitialized)", re.M)

# (what, (shape, weight type), prompt tokens, flags over DEFAULTS, Oclgrind device settings):
# the docstring says why each.
DEFAULTS = {"-n": "0", "-ngl": "99"}
# A small device: 64 work-items a group and 24 KiB of local memory take the backend's narrow
# shapes (32 x 32 tiles, 64-work-item groups) and leave attention_block (27 KiB) to the
# one-query kernel.
SMALL_DEVICE = {"OCLGRIND_MAX_WGSIZE": "64", "OCLGRIND_LOCAL_MEM_SIZE": "24576"}
RUNS = [
    ("q4_0 40-token prompt, q4_0 cache, 2 decode steps", ("tiny", "q4_0"), 40,
     {"-ctk": "q4_0", "-ctv": "q4_0", "-n": "2"}, {}),
    ("q4_0 micro-batches of 16 and a 7-token tail, q8_0 cache", ("tiny", "q4_0"), 39,
     {"-ub": "16", "-ctk": "q8_0", "-ctv": "q8_0"}, {}),
    ("q8_0 71 tokens (a full tile and a 7-token tail), f16 cache", ("tiny", "q8_0"), 71, {}, {}),
    ("q4_k (the generic decoder) 20 tokens, decode step", ("tiny-k", "q4_k"), 20, {"-n": "1"}, {}),
    ("q4_0 one layer on the device (-ngl 1)", ("tiny", "q4_0"), 24, {"-ngl": "1"}, {}),
    # The tensor-core kernels of NVIDIA devices with their mma emulated: the register-fragment
    # kernel (NVIDIA's default for micro-batches of 9-16 tokens) and the template's local tiles.
    # Their split-K sums run as a reduce launch here: the default in-kernel sums (a work-group
    # reading what others wrote after an atomic count) are outside OpenCL 1.2's memory model,
    # and Oclgrind reports them as a race; on NVIDIA membar.gl orders them, the pattern of CUDA's
    # threadfence reduction.
    ("tensor-core fragments (emulated), q4_0 micro-batches of 16", ("tiny", "q4_0"), 32,
     {"-ub": "16"}, {"KESTREL_CL_NV_MMA": "emulate", "KESTREL_CL_NV_REDUCE": "launch"}),
    ("tensor-core template (emulated), q4_0 micro-batches of 16", ("tiny", "q4_0"), 32,
     {"-ub": "16"},
     {"KESTREL_CL_NV_MMA": "emulate", "KESTREL_CL_NV_REDUCE": "launch", "KESTREL_CL_NV_FRAG": "0"}),
    ("small device: q4_0 40 tokens in micro-batches of 20, q4_0 cache, decode step",
     ("tiny", "q4_0"), 40, {"-ub": "20", "-ctk": "q4_0", "-ctv": "q4_0", "-n": "1"},
     SMALL_DEVICE),
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kestrel", required=True)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--timeout", type=float, default=600, help="seconds per run")
    ap.add_argument("--only", default="", help="run only the cases whose name contains this")
    args = ap.parse_args()
    if not OCLGRIND_ICD.exists():
        print(f"skip: {OCLGRIND_ICD} not found (Debian package oclgrind)")
        return 77
    import synth_gguf  # noqa: E402 (after the skip: numpy and gguf are the tests' deps)

    work = Path(args.workdir)
    (work / "icd").mkdir(parents=True, exist_ok=True)
    (work / "icd" / "oclgrind.icd").write_text(f"{OCLGRIND_ICD}\n")
    models = {}
    for shape, wtype in sorted({r[1] for r in RUNS}):
        path = work / f"llama-{shape}-{wtype}.gguf"
        if not path.exists():
            synth_gguf.write_model(path, "llama", shape, wtype, seed=7, verbose=False)
        models[(shape, wtype)] = path
    # Local memory 64 KiB instead of Oclgrind's 32 for the large-device runs: Oclgrind 21.10
    # counts the local arrays of every kernel whose name starts with the launched one's
    # (matmul_tiled: its own 24 KiB and matmul_tiled16's 18 KiB, "43008 exceeds 32768"); no
    # kernel uses more than 32 KiB.
    env = dict(os.environ, OCL_ICD_VENDORS=str(work / "icd"), OCLGRIND_DATA_RACES="1",
               OCLGRIND_LOCAL_MEM_SIZE="65536", KESTREL_CL_CACHE_DIR=str(work / "cl_cache"))
    failures = 0
    runs = [r for r in RUNS if args.only in r[0]]
    for what, model, n_tokens, extra, device in runs:
        tokens = ",".join(str((7 * i + 3) % 500) for i in range(n_tokens))
        flags = dict(DEFAULTS, **extra)
        cmd = [args.kestrel, "run", "-m", str(models[model]), "--tokens", tokens, "--backend",
               "opencl", "--no-warmup"] + [v for kv in flags.items() for v in kv]
        t0 = time.time()
        try:
            p = subprocess.run(cmd, env=dict(env, **device), capture_output=True, text=True,
                               timeout=args.timeout)
            rc, out = p.returncode, p.stdout + p.stderr
        except subprocess.TimeoutExpired:
            rc, out = None, f"timed out after {args.timeout:.0f} s"
        reports = REPORT.findall(out)
        ok = rc == 0 and not reports
        print(f"{'ok  ' if ok else 'FAIL'} {what} [{time.time() - t0:.0f} s]", flush=True)
        if not ok:
            failures += 1
            print(f"  exit {rc}; {len(reports)} Oclgrind report lines; $ {' '.join(cmd[:4])} ...")
            print("\n".join("  | " + line for line in out.splitlines()[:60]))
    print(f"oclgrind: {len(runs) - failures}/{len(runs)} runs clean")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
