#!/usr/bin/env python3
"""Emulates the fused decode layer's ring schedule (src/backend/cuda/decode_ring.cuh and
decode_layer.cu's plan_phase / plan_ring) on the CPU and checks its invariants for real shapes,
every block of a 132-SM grid, and random interleavings of the groups within each phase:

- every item of a block is asked for exactly once, into stage seq % stages, and fits the stage;
- copies are whole 16-byte units at 16-byte offsets (scales included);
- bulk copies: a group waits on a stage for item seq only after item seq - stages was read (so
  the stage's barrier is in item seq's phase and its parity is unambiguous);
- cp.async: an item read at round r >= depth of a phase was asked for by the same group's
  threads at round r - depth of the same phase (what the group's wait_group covers); one read at
  round r < depth was asked for before the phase began (covered by the phase's wait_all).

Run: python3 bench/lab/emulate_decode_ring.py   (no GPU; exit status 0 when every check holds)
"""
import random
import sys

THREADS, MAX_ROWS, MAX_GROUPS, MAX_KPT, MAX_STAGES = 512, 8, 8, 2, 16


def plan_phase(parts, n_in, paired, item_kb=18, forced_kpt=0):
    """parts: [(n_out, q8)]; returns the phase dict or None (decode_layer.cu's plan_phase)."""
    if n_in % 32 or n_in // 32 > MAX_KPT * THREADS:
        return None
    nb = n_in // 32
    code_bytes = 32 if any(q8 for _, q8 in parts) else 16
    kpt = forced_kpt or (2 if nb > THREADS // 2 else 1)
    if nb > kpt * THREADS:
        return None
    per_thread = max((nb + kpt - 1) // kpt, THREADS // MAX_GROUPS)
    gsize = (per_thread + 31) // 32 * 32
    if gsize > THREADS:
        return None
    groups = THREADS // gsize
    rows = 0
    for R in range(1, MAX_ROWS + 1):
        copy = R // 2 if paired else R
        if (paired and R % 2) or (copy * nb) % 8:
            continue
        if rows == 0 or R * nb * code_bytes <= item_kb * 1024:
            rows = R
    if rows == 0:
        return None
    copy_rows = rows // 2 if paired else rows
    ends, items = [], 0
    for n_out, _ in parts[:1] if paired else parts:
        items += (n_out + copy_rows - 1) // copy_rows
        ends.append(items)
    return dict(parts=parts, paired=paired, nb=nb, kpt=kpt, gsize=gsize, groups=groups, rows=rows,
                copy_rows=copy_rows, ends=ends, code_bytes=code_bytes)


def plan_ring(phases, union_bytes, ring_kb=152, optin=227 * 1024):
    code_cap = max(p["rows"] * p["nb"] * p["code_bytes"] for p in phases)
    scale_cap = max((p["rows"] * p["nb"] * 2 + 15) // 16 * 16 for p in phases)
    stage_bytes = (code_cap + scale_cap + 127) // 128 * 128
    budget = min(ring_kb * 1024, optin - union_bytes - 2048)
    stages = min(MAX_STAGES, budget // stage_bytes)
    groups = max(p["groups"] for p in phases)
    stages -= stages % groups
    if stages < max(groups, 2):
        return None
    return dict(stages=stages, stage_bytes=stage_bytes, code_cap=code_cap)


def item_copies(ph, ring, item):
    """(dst offset, bytes, src byte offset in its matrix) of each copy of an item."""
    p = next(i for i, e in enumerate(ph["ends"]) if item < e)
    row0 = (item - (ph["ends"][p - 1] if p else 0)) * ph["copy_rows"]
    out = []
    for h in range(2 if ph["paired"] else 1):
        n_out, q8 = ph["parts"][h if ph["paired"] else p]
        rows = min(ph["copy_rows"], n_out - row0)
        cb = 32 if q8 else 16
        out.append((h * ph["copy_rows"] * ph["nb"] * cb, rows * ph["nb"] * cb, row0 * ph["nb"] * cb))
        out.append((ring["code_cap"] + h * ph["copy_rows"] * ph["nb"] * 2,
                    (rows * ph["nb"] * 2 + 15) // 16 * 16, row0 * ph["nb"] * 2))
    return out


def mine(n, b, grid):
    return (n - 1 - b) // grid + 1 if n > b else 0


def check_block(phases, ring, b, grid, rng, errors, what):
    S = ring["stages"]
    counts = [mine(p["ends"][-1] if not p["paired"] else p["ends"][0], b, grid) for p in phases]
    total = sum(counts)
    issued = {}  # seq -> (phase index, group, round) of the asker ("init": before the layer)
    read = set()
    for seq in range(min(S, total)):
        issued[seq] = ("init", None, None)
    first = 0
    for pi, (ph, n) in enumerate(zip(phases, counts)):
        G, depth = ph["groups"], S // ph["groups"]
        progress = {g: 0 for g in range(G)}  # rounds done
        pending = [g for g in range(G) if g < n]
        while pending:
            g = rng.choice(pending)
            r = progress[g]
            k = g + r * G
            seq = first + k
            if seq not in issued:
                errors.append(f"{what} block {b}: item {seq} read before it was asked for")
                return
            if seq - S >= 0 and seq - S not in read:
                errors.append(f"{what} block {b}: bulk wait on stage {seq % S} for item {seq} "
                              f"before item {seq - S} was read")
            src = issued[seq]
            if r >= depth and src != (pi, g, r - depth):
                errors.append(f"{what} block {b}: cp.async item {seq} (phase {pi}, group {g}, "
                              f"round {r}) was asked for by {src}")
            if r < depth and src[0] == pi:
                errors.append(f"{what} block {b}: cp.async item {seq} read at round {r} < depth "
                              f"{depth} but asked for in the same phase by {src}")
            read.add(seq)
            nxt = seq + S
            if nxt < total:
                if nxt in issued:
                    errors.append(f"{what} block {b}: item {nxt} asked for twice")
                issued[nxt] = (pi, g, r)
            progress[g] += 1
            if g + progress[g] * G >= n:
                pending.remove(g)
        first += n
    if len(read) != total:
        errors.append(f"{what} block {b}: {total - len(read)} items never read")


def check_shape(name, E, F, n_head, n_head_kv, D, q8_v_down=False, item_kb=18, kpt=0):
    errors = []
    q_dim, kv_dim = n_head * D, n_head_kv * D
    phases = [
        plan_phase([(q_dim, False), (kv_dim, False), (kv_dim, q8_v_down)], E, False, item_kb, kpt),
        plan_phase([(E, False)], q_dim, False, item_kb, kpt),
        plan_phase([(F, False), (F, False)], E, True, item_kb, kpt),
        plan_phase([(E, q8_v_down)], F, False, item_kb, kpt),
    ]
    if any(p is None for p in phases):
        return [f"{name}: a phase does not plan"]
    n = max(E, q_dim, F)
    union = (max(2 * n + n // 32 * 8, 4 * (D * 17 + 8192)) + 127) // 128 * 128
    ring = plan_ring(phases, union)
    if ring is None:
        return [f"{name}: the ring does not plan"]
    for ph in phases:
        for item in range(ph["ends"][-1]):
            for dst, nbytes, src in item_copies(ph, ring, item):
                if dst % 16 or nbytes % 16 or src % 16 or nbytes <= 0:
                    errors.append(f"{name}: item {item} copy ({dst}, {nbytes}, {src}) unaligned")
                if dst + nbytes > ring["stage_bytes"]:
                    errors.append(f"{name}: item {item} overflows its stage")
    rng = random.Random(1)
    for b in range(132):
        check_block(phases, ring, b, 132, rng, errors, name)
    shape = ", ".join(f"{p['groups']}x{p['gsize']} R={p['rows']}" for p in phases)
    print(f"{name}: {ring['stages']} stages of {ring['stage_bytes']} B; {shape}: "
          f"{'ok' if not errors else str(len(errors)) + ' errors'}")
    return errors


def main():
    errors = []
    for args in [("llama2-7b", 4096, 11008, 32, 32, 128),
                 ("llama3-8b", 4096, 14336, 32, 8, 128),
                 ("smollm2-135m", 576, 1536, 9, 3, 64),
                 ("test gqa", 512, 1376, 8, 2, 64),
                 ("test mha", 512, 1408, 4, 4, 128)]:
        errors += check_shape(*args)
        errors += check_shape(args[0] + " q8_0 V/down", *args[1:], q8_v_down=True)
        errors += check_shape(args[0] + " kpt 2, 9 KB", *args[1:], item_kb=9, kpt=2)
    for e in errors[:20]:
        print(e)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
