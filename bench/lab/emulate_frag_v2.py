#!/usr/bin/env python3
"""Lane-level emulation of src/backend/cuda/matmul_frag_v2.cu (Q4_0 and Q8_0), checked against a
float64 reference: each lane's registers are built with the kernel's own formulas (the words it
loads, __byte_perm, the code-to-half2 placement) and assembled into mma.sync m16n8k16 operands
by the PTX fragment layouts (A row-major: a0 (g, 2c..2c+1), a1 (g+8, ..), a2 (g, 2c+8..),
a3 (g+8, 2c+8..); B col-major: b0 (k 2c..2c+1, n g), b1 (k 2c+8.., n g); C: c0..c1 (g, 2c..),
c2..c3 (g+8, 2c..)). It checks the kernel's mapping of k-slots to elements without a GPU; keep it
in step with the kernel.

  python3 bench/lab/emulate_frag_v2.py [seed]
"""
import numpy as np, struct, sys
rng = np.random.default_rng(int(sys.argv[1]) if len(sys.argv) > 1 else 1)

def byte_perm(x, y, s):
    b = list(struct.pack('<I', x)) + list(struct.pack('<I', y))
    out = [b[(s >> (4*i)) & 7] for i in range(4)]
    return struct.unpack('<I', bytes(out))[0]

def codes_to_half2(pair, d, q4):
    bits = ((pair & 0x000F000F) | 0x64006400) if q4 else ((pair ^ 0x00800080) | 0x64006400)
    off = 1032.0 if q4 else 1152.0
    lo = np.frombuffer(struct.pack('<H', bits & 0xFFFF), np.float16)[0]
    hi = np.frombuffer(struct.pack('<H', bits >> 16), np.float16)[0]
    return (np.float16(np.float16(lo - np.float16(off)) * d), np.float16(np.float16(hi - np.float16(off)) * d))

def run(q4, n_in, n_out, T, NT, splits_target=3):
    nb = n_in // 32
    bpl = 2 if q4 else 1; step = 4 * bpl
    if q4:
        qs = rng.integers(0, 256, size=(n_out, nb, 16), dtype=np.uint8)
    else:
        qs = rng.integers(0, 256, size=(n_out, nb, 32), dtype=np.uint8)
    d = rng.uniform(0.002, 0.02, size=(n_out, nb)).astype(np.float16)
    x = rng.standard_normal((T, n_in)).astype(np.float16)
    # reference: decoded weights
    W = np.zeros((n_out, n_in))
    for r in range(n_out):
        for b in range(nb):
            if q4:
                codes = np.concatenate([qs[r, b] & 15, qs[r, b] >> 4]).astype(np.int32) - 8
            else:
                codes = qs[r, b].view(np.int8).astype(np.int32)
            W[r, 32*b:32*b+32] = (codes.astype(np.float16) * d[r, b]).astype(np.float16)
    ref = x.astype(np.float64) @ W.T  # [T][n_out]
    row_blocks = -(-n_out // 64)
    quanta = -(-nb // 8)
    splits = max(1, min(splits_target, max(1, min(quanta // 2, 16))))
    bps = -(-(-(-nb // splits)) // 8) * 8
    out = np.zeros((splits, T, n_out))
    for by in range(splits):
        kb0 = by * bps; kb1 = min(nb, kb0 + bps)
        for bx in range(row_blocks):
            for warp in range(4):
                row0 = bx * 64 + 16 * warp
                acc = np.zeros((NT // 8, 16, 8))
                cb = kb0
                while cb < kb1:
                    # per lane registers
                    A_lane = {}; B_lane = {}
                    for h in range(bpl):
                        for q in range(4):
                            for sub in range(2):
                                A = np.zeros((16, 16)); Bm = [np.zeros((16, 8)) for _ in range(NT // 8)]
                                for lane in range(32):
                                    g, c = lane // 4, lane % 4
                                    rows = [min(row0 + g, n_out - 1), min(row0 + g + 8, n_out - 1)]
                                    b = cb + c + 4 * h
                                    inb = b < kb1
                                    words = []
                                    for ab in range(2):
                                        if inb:
                                            raw = bytes(qs[rows[ab], b]); sc = d[rows[ab], b]
                                        else:
                                            raw = bytes(16 if q4 else 32); sc = np.float16(0)
                                        w32 = struct.unpack('<%dI' % (len(raw)//4), raw)
                                        if q4:
                                            v = w32[2 * (q % 2) + sub]
                                            v = v >> 4 if q >= 2 else v
                                        else:
                                            v = w32[2 * q + sub]
                                        words.append((v, sc))
                                    (qa, sa), (qb, sb) = words
                                    a0 = codes_to_half2(byte_perm(qa, 0, 0x4140), sa, q4)
                                    a1 = codes_to_half2(byte_perm(qb, 0, 0x4140), sb, q4)
                                    a2 = codes_to_half2(byte_perm(qa, 0, 0x4342), sa, q4)
                                    a3 = codes_to_half2(byte_perm(qb, 0, 0x4342), sb, q4)
                                    # PTX A layout (row): a0: (g, 2c..2c+1), a1: (g+8, 2c..), a2: (g, 2c+8..), a3: (g+8, 2c+8..)
                                    A[g, 2*c:2*c+2] = a0; A[g+8, 2*c:2*c+2] = a1
                                    A[g, 2*c+8:2*c+10] = a2; A[g+8, 2*c+8:2*c+10] = a3
                                    for j in range(NT // 8):
                                        t = 8 * j + g
                                        e0 = 8 * q
                                        vals = np.zeros(8, np.float16)
                                        if t < T and inb:
                                            vals = x[t, 32*b + e0: 32*b + e0 + 8]
                                        bx0 = vals[0:2] if sub == 0 else vals[4:6]
                                        bx1 = vals[2:4] if sub == 0 else vals[6:8]
                                        # PTX B layout (col): b0: (k 2c..2c+1, n g), b1: (k 2c+8.., n g)
                                        Bm[j][2*c:2*c+2, g] = bx0; Bm[j][2*c+8:2*c+10, g] = bx1
                                n_tiles = min(NT // 8, (T + 7) // 8)
                                for j in range(n_tiles):
                                    acc[j] += A.astype(np.float64) @ Bm[j].astype(np.float64)
                    cb += step
                for j in range(NT // 8):
                    for lane in range(32):
                        g, c = lane // 4, lane % 4
                        for e in range(4):
                            t = 8 * j + 2 * c + e % 2
                            r = row0 + g + 8 * (e // 2)
                            # C layout: c0,c1: (g, 2c..2c+1), c2,c3: (g+8, 2c..)
                            val = acc[j][g + 8 * (e // 2), 2 * c + e % 2]
                            if t < T and r < n_out:
                                out[by, t, r] = val
    got = out.sum(0)
    err = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    print(f"{'q4_0' if q4 else 'q8_0'} n_in={n_in} n_out={n_out} T={T} NT={NT} splits={splits} rel err {err:.2e}")
    return err

errs = []
for q4 in (True, False):
    errs.append(run(q4, 96, 37, 9, 16))
    errs.append(run(q4, 1024, 70, 5, 8, 2))
    errs.append(run(q4, 512, 130, 16, 16, 1))
assert max(errs) < 1e-12, errs
print("ok")
