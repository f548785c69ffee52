#!/usr/bin/env python3
"""`kestrel tune` on a tiny synthetic model: it writes a valid settings file that `run --config`
accepts, its table lists the defaults and the winner, and the winner is no slower than the
defaults as measured again in one run (tune confirms before it writes, and keeps the defaults
otherwise; no timing bound is asserted here). Bad input ends in a message and no file."""
import argparse
import json
import os
import subprocess
import sys

failures = []


def check(ok, what):
    print(("ok   " if ok else "FAIL ") + what, flush=True)
    if not ok:
        failures.append(what)


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--kestrel", required=True)
    ap.add_argument("--workdir", required=True)
    args = ap.parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
    model = os.path.join(args.workdir, "tiny-q4_0.gguf")
    subprocess.run([sys.executable, os.path.join(root, "scripts", "synth_gguf.py"), "--out", model,
                    "--shape", "tiny", "--type", "q4_0"], check=True, capture_output=True)

    for extra, name in [([], "prompt"), (["--decode", "-n", "4"], "decode")]:
        out = os.path.join(args.workdir, f"settings-{name}.json")
        if os.path.exists(out):
            os.remove(out)
        p = subprocess.run([args.kestrel, "tune", "-m", model, "-p", "48", "-r", "1",
                            "--max-trials", "12", "-o", out, *extra], capture_output=True, text=True)
        check(p.returncode == 0 and os.path.exists(out), f"tune ({name}) exits 0 and writes {out}")
        if p.returncode != 0:
            print(p.stderr)
            continue
        with open(out) as f:
            s = json.load(f)
        check(s.get("kestrel_settings") == 1 and {"n_batch", "n_ubatch", "n_threads", "type_k",
                                                   "type_v"} <= set(s),
              f"settings file has the tuned keys: {sorted(s)}")
        t = s["tuned_for"]
        check(t["tokens_per_s"] >= t["defaults_tokens_per_s"] and t["n_prompt"] == 48,
              f"winner {t['tokens_per_s']:.1f} t/s >= defaults {t['defaults_tokens_per_s']:.1f} "
              f"(as written after the one-run confirmation)")
        check("(defaults)" in p.stdout and "**winner**" in p.stdout and "trials" in p.stderr,
              "table marks the defaults and the winner; progress and estimate on stderr")
        r = subprocess.run([args.kestrel, "run", "-m", model, "--tokens", "1,2,3,4,5", "-n", "2",
                            "--config", out, "--report"], capture_output=True, text=True)
        check(r.returncode == 0 and f"| n_batch | {s['n_batch']} |" in r.stdout,
              "run --config applies the settings")

    bad = os.path.join(args.workdir, "bad.json")
    for what, override in [("-p 0", {"-p": "0"}), ("-r 0", {"-r": "0"}),
                           ("missing model", {"-m": os.path.join(args.workdir, "none.gguf")}),
                           ("unwritable output", {"-o": "/proc/kestrel/x.json"})]:
        if os.path.exists(bad):
            os.remove(bad)
        opts = {"-m": model, "-p": "16", "-r": "1", "--max-trials": "2", "-o": bad, **override}
        full = [args.kestrel, "tune"] + [x for kv in opts.items() for x in kv]
        p = subprocess.run(full, capture_output=True, text=True)
        last = (p.stderr.strip().splitlines() or [""])[-1]
        check(p.returncode == 1 and "error" in p.stderr and not os.path.exists(bad),
              f"bad input ({what}): exit {p.returncode}, {last!r:.90}")
    print(f"{len(failures)} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
