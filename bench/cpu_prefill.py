#!/usr/bin/env python3
"""CPU prompt-evaluation benchmark: Kestrel against llama.cpp's figures in ANCHORS.md.

Synthesizes the llama3-1b shape (Q4_0, random weights: speed does not depend on values) if it
is missing, runs `kestrel run` on random token ids for each test, keeps the best of -r
repetitions, prints a table and writes JSON. With llama-cpp-python installed and --peer, it
races llama.cpp in the same run (same model file, threads and batch sizes).

  python3 bench/cpu_prefill.py --kestrel build/bin/kestrel [-r 3] [--peer] [--out bench.json]
"""
import argparse
import json
import os
import random
import re
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# llama.cpp, CPU, 2 cores (AMD EPYC, AVX-512 VNNI), llama3-1b Q4_0, tokens/s (ANCHORS.md)
ANCHORS = {
    ("pp128", 512, 512): 135.0,
    ("pp327", 512, 512): 111.0,
    ("pp512", 512, 512): 115.0,
    ("pp327", 128, 16): 127.0,
    ("tg32", 512, 512): 45.0,
}
TESTS = [("pp128", 512, 512), ("pp327", 512, 512), ("pp512", 512, 512), ("pp327", 128, 16),
         ("tg32", 512, 512)]


N_VOCAB = [128000]  # random prompt ids stay below this; set from the model in main()


def run_kestrel(kestrel, model, test, n_batch, n_ubatch, threads, seed):
    rng = random.Random(seed)
    kind, n = test[:2], int(test[2:])
    n_prompt = n if kind == "pp" else 8
    tokens = ",".join(str(rng.randrange(1000, N_VOCAB[0])) for _ in range(n_prompt))
    cmd = [kestrel, "run", "-m", model, "--tokens", tokens, "-n", str(0 if kind == "pp" else n + 1),
           "-b", str(n_batch), "-ub", str(n_ubatch), "-t", str(threads), "--temp", "0",
           "--ignore-eos", "--report-json", "/tmp/kestrel-bench.json"]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"kestrel failed: {out.stderr}")
    rep = json.load(open("/tmp/kestrel-bench.json"))
    if kind == "pp":
        return rep["tokens_per_s"]
    return rep["generation"]["tokens_per_s"]


def run_peer(model, test, n_batch, n_ubatch, threads, seed):
    from llama_cpp import Llama  # llama-cpp-python
    rng = random.Random(seed)
    kind, n = test[:2], int(test[2:])
    llm = Llama(model_path=model, n_ctx=1024, n_batch=n_batch, n_ubatch=n_ubatch,
                n_threads=threads, n_threads_batch=threads, verbose=False, logits_all=False)
    if kind == "pp":
        tokens = [rng.randrange(1000, N_VOCAB[0]) for _ in range(n)]
        t0 = time.perf_counter()
        llm.eval(tokens)
        return n / (time.perf_counter() - t0)
    llm.eval([rng.randrange(1000, N_VOCAB[0]) for _ in range(8)])
    t0 = time.perf_counter()
    for _ in range(n):
        llm.eval([rng.randrange(1000, N_VOCAB[0])])
    return n / (time.perf_counter() - t0)


def vocab_size(model):
    import gguf
    f = gguf.GGUFReader(model).fields.get("tokenizer.ggml.tokens")
    return len(f.data) if f else 128000


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kestrel", default=os.path.join(ROOT, "build/bin/kestrel"))
    ap.add_argument("--type", default="q4_0",
                    help="weight type of the synthesized model (q4_0, q4_k, q4_k_m, q6_k, ...)")
    ap.add_argument("--model", help="default: models/llama3-1b-TYPE.gguf (synthesized if missing)")
    ap.add_argument("-r", "--repetitions", type=int, default=3)
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--peer", action="store_true", help="race llama-cpp-python in the same run")
    ap.add_argument("--only", default="", help="comma list of tests, e.g. pp512,tg32")
    ap.add_argument("--out", default="bench-cpu.json")
    args = ap.parse_args()
    if args.model is None:
        args.model = os.path.join(ROOT, f"models/llama3-1b-{args.type}.gguf")

    if not os.path.exists(args.model):
        os.makedirs(os.path.dirname(args.model), exist_ok=True)
        # With Llama 3's real vocabulary (scripts/fetch_testdata.sh) llama.cpp can load the
        # model too, so --peer works; without it the model has a placeholder vocabulary.
        vocab = os.path.join(ROOT, "models/llama.cpp/vocab/ggml-vocab-llama-bpe.gguf")
        extra = ["--vocab-from", vocab] if os.path.exists(vocab) else []
        subprocess.run([sys.executable, os.path.join(ROOT, "scripts/synth_gguf.py"), "--out",
                        args.model, "--shape", "llama3-1b", "--type", args.type, *extra],
                       check=True)
    N_VOCAB[0] = min(128000, vocab_size(args.model))
    # ANCHORS.md's CPU figures are for the synthesized llama3-1b Q4_0 only.
    anchored = os.path.basename(args.model) == "llama3-1b-q4_0.gguf"
    only = set(filter(None, args.only.split(",")))
    rows = []
    for test, nb, nub in TESTS:
        if only and test not in only:
            continue
        ours = []
        for r in range(args.repetitions + 1):  # the first run warms the page cache
            v = run_kestrel(args.kestrel, args.model, test, nb, nub, args.threads, seed=r)
            if r > 0:
                ours.append(v)
        peer = None
        if args.peer:
            peer = max(run_peer(args.model, test, nb, nub, args.threads, seed=r)
                       for r in range(args.repetitions))
        rows.append({"test": test, "n_batch": nb, "n_ubatch": nub, "threads": args.threads,
                     "kestrel_tps": max(ours), "kestrel_runs": ours,
                     "llama_cpp_anchor_tps": ANCHORS.get((test, nb, nub)) if anchored else None,
                     "llama_cpp_same_run_tps": peer})
    print(f"\n{os.path.basename(args.model)}, CPU, {args.threads} threads, best of "
          f"{args.repetitions}\n")
    print("| test | b | ub | Kestrel t/s | llama.cpp anchor t/s | ratio | llama.cpp same run t/s | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        a, p, k = r["llama_cpp_anchor_tps"], r["llama_cpp_same_run_tps"], r["kestrel_tps"]
        anchor = f"{a:.0f} | {k / a:.2f}x" if a else "- | -"
        peer = f"{p:.1f} | {k / p:.2f}x" if p else "- | -"
        print(f"| {r['test']} | {r['n_batch']} | {r['n_ubatch']} | {k:.1f} | {anchor} | {peer} |")
    with open(args.out, "w") as f:
        json.dump({"model": args.model, "device": "cpu", "results": rows}, f, indent=2)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
