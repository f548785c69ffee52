#!/usr/bin/env python3
"""Independent float64 reference forward pass for llama / qwen2 GGUF models.

    python3 scripts/reference.py -m model.gguf --tokens 1,2,3 --out logits.npy

    from reference import Model
    logits = Model("model.gguf").logits([1, 2, 3])   # np.ndarray [n_tokens, n_vocab] float64

Weights are read with gguf.GGUFReader and dequantized with gguf.quants.dequantize; everything
after that is float64. The whole prompt is processed at once, with a causal mask. Written for
clarity, not speed: it is meant for the small test models.

Notation in the shape comments: T = number of tokens, E = n_embd, H = n_head, Hkv = n_head_kv,
D = head_dim = E / H, F = n_ff, V = n_vocab.
"""
from __future__ import annotations

import argparse
import sys

import numpy as np
import gguf


def rmsnorm(x: np.ndarray, eps: float) -> np.ndarray:
    """x / sqrt(mean(x^2) + eps) over the last axis."""
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)  # same shape as x


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def softmax(x: np.ndarray) -> np.ndarray:
    """Softmax over the last axis; -inf entries get probability 0."""
    e = np.exp(x - np.max(x, axis=-1, keepdims=True))
    return e / np.sum(e, axis=-1, keepdims=True)


def rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, neox: bool) -> np.ndarray:
    """Rotate pairs of x by the per-position angles.

    x: [T, heads, D]; cos, sin: [T, D/2]. "normal" layout (llama) pairs (x[2i], x[2i+1]); "neox"
    layout (qwen2) pairs (x[i], x[i + D/2]). Each pair (a, b) -> (a cos - b sin, a sin + b cos).
    """
    half = x.shape[-1] // 2
    c = cos[:, None, :]                       # [T, 1, D/2]
    s = sin[:, None, :]                       # [T, 1, D/2]
    if neox:
        a, b = x[..., :half], x[..., half:]   # [T, heads, D/2] each
    else:
        a, b = x[..., 0::2], x[..., 1::2]     # [T, heads, D/2] each
    out = np.empty_like(x)                    # [T, heads, D]
    if neox:
        out[..., :half] = a * c - b * s
        out[..., half:] = a * s + b * c
    else:
        out[..., 0::2] = a * c - b * s
        out[..., 1::2] = a * s + b * c
    return out


def _field(reader: gguf.GGUFReader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        if default is None:
            raise KeyError(f"missing GGUF key {key}")
        return default
    return f.contents()


class Model:
    """A GGUF llama / qwen2 model; logits(tokens) runs the reference forward pass."""

    def __init__(self, path: str):
        self.path = str(path)
        self.reader = gguf.GGUFReader(self.path)
        r = self.reader
        self.arch = _field(r, "general.architecture")
        if self.arch not in ("llama", "qwen2"):
            raise ValueError(f"unsupported architecture {self.arch!r}")
        a = self.arch
        self.n_embd = int(_field(r, f"{a}.embedding_length"))
        self.n_layer = int(_field(r, f"{a}.block_count"))
        self.n_ff = int(_field(r, f"{a}.feed_forward_length"))
        self.n_head = int(_field(r, f"{a}.attention.head_count"))
        self.n_head_kv = int(_field(r, f"{a}.attention.head_count_kv", self.n_head))
        self.eps = float(_field(r, f"{a}.attention.layer_norm_rms_epsilon"))
        self.rope_base = float(_field(r, f"{a}.rope.freq_base", 10000.0))
        self.head_dim = self.n_embd // self.n_head
        self.neox = self.arch == "qwen2"  # llama: "normal" RoPE layout; qwen2: "neox"
        self.tensors = {t.name: t for t in r.tensors}
        self.n_vocab = int(self.tensors["token_embd.weight"].shape[1])

    def has(self, name: str) -> bool:
        return name in self.tensors

    def weight(self, name: str) -> np.ndarray:
        """A tensor dequantized to float64, numpy shape = reversed GGUF dims ([out, in] for matrices)."""
        t = self.tensors[name]
        x = gguf.quants.dequantize(t.data, t.tensor_type)
        return np.asarray(x, dtype=np.float64).reshape(tuple(reversed([int(d) for d in t.shape])))

    def rope_tables(self, n_tokens: int) -> tuple[np.ndarray, np.ndarray]:
        """cos and sin of theta[p, i] = p * base^(-2i/D), i in [0, D/2)."""
        d = self.head_dim
        inv_freq = self.rope_base ** (-np.arange(0, d // 2, dtype=np.float64) * 2.0 / d)  # [D/2]
        theta = np.arange(n_tokens, dtype=np.float64)[:, None] * inv_freq[None, :]        # [T, D/2]
        return np.cos(theta), np.sin(theta)                                               # [T, D/2] each

    def logits(self, tokens, kv_type: str | None = None) -> np.ndarray:
        """Logits of every position of the prompt: np.ndarray [T, V] float64.

        kv_type: optional "f16", "q8_0" or "q4_0": round K (after RoPE) and V of every layer
        through that KV cache storage type (round_trip: one row of Hkv*D values per token, blocks
        of 32), as a KV cache does. None (the default) keeps them float64.
        """
        tokens = np.asarray(tokens, dtype=np.int64)                      # [T]
        if tokens.ndim != 1 or len(tokens) == 0:
            raise ValueError("tokens must be a non-empty 1-D list")
        if tokens.min() < 0 or tokens.max() >= self.n_vocab:
            raise ValueError(f"token id out of range [0, {self.n_vocab})")
        T, H, Hkv, D = len(tokens), self.n_head, self.n_head_kv, self.head_dim
        group = H // Hkv                                                 # query heads per kv head
        cos, sin = self.rope_tables(T)                                   # [T, D/2] each
        future = np.triu(np.ones((T, T), dtype=bool), k=1)               # [T, T] True where key pos > query pos

        self.near_ties = 0  # K/V values within NEAR_TIE of a rounding midpoint (round_trip)
        x = self.weight("token_embd.weight")[tokens]                     # [T, E]
        for il in range(self.n_layer):
            p = f"blk.{il}."
            # --- attention ---
            h = rmsnorm(x, self.eps) * self.weight(p + "attn_norm.weight")    # [T, E]
            q = h @ self.weight(p + "attn_q.weight").T                         # [T, H*D]
            k = h @ self.weight(p + "attn_k.weight").T                         # [T, Hkv*D]
            v = h @ self.weight(p + "attn_v.weight").T                         # [T, Hkv*D]
            if self.has(p + "attn_q.bias"):
                q = q + self.weight(p + "attn_q.bias")                         # [T, H*D]
                k = k + self.weight(p + "attn_k.bias")                         # [T, Hkv*D]
                v = v + self.weight(p + "attn_v.bias")                         # [T, Hkv*D]
            q = rope(q.reshape(T, H, D), cos, sin, self.neox)                  # [T, H, D]
            k = rope(k.reshape(T, Hkv, D), cos, sin, self.neox)                # [T, Hkv, D]
            v = v.reshape(T, Hkv, D)                                           # [T, Hkv, D]
            if kv_type is not None:
                ties: list[int] = []
                k = round_trip(k, kv_type, ties)                               # [T, Hkv, D]
                v = round_trip(v, kv_type, ties)                               # [T, Hkv, D]
                self.near_ties += sum(ties)
            out = np.empty((T, H, D))                                          # [T, H, D]
            for hh in range(H):
                kv = hh // group                                               # grouped-query attention
                scores = q[:, hh, :] @ k[:, kv, :].T / np.sqrt(D)              # [T(query), T(key)]
                scores[future] = -np.inf                                       # causal mask
                out[:, hh, :] = softmax(scores) @ v[:, kv, :]                  # [T, D]
            x = x + out.reshape(T, H * D) @ self.weight(p + "attn_output.weight").T  # [T, E]
            # --- feed-forward (SwiGLU) ---
            h = rmsnorm(x, self.eps) * self.weight(p + "ffn_norm.weight")     # [T, E]
            gate = h @ self.weight(p + "ffn_gate.weight").T                    # [T, F]
            up = h @ self.weight(p + "ffn_up.weight").T                        # [T, F]
            x = x + (silu(gate) * up) @ self.weight(p + "ffn_down.weight").T   # [T, E]

        h = rmsnorm(x, self.eps) * self.weight("output_norm.weight")          # [T, E]
        head = "output.weight" if self.has("output.weight") else "token_embd.weight"
        return h @ self.weight(head).T                                         # [T, V]


# A q4_0 value whose x / d lies this close (in steps) to a rounding midpoint has no well-defined
# stored code at f32 precision: an engine whose K/V differ from this float64 pass by ~1e-6 to
# ~1e-5 of a value (f32 matmuls and softmax in another order, errors grown over the layers; up
# to 8x that in steps for a block's largest values) can store the other one, one step (1/8 of
# the block's largest value), and one such flip moves the logits of a small model by ~1e-2.
# round_trip counts them (near_ties) so that a test can avoid prompts that have any.
NEAR_TIE = 1e-4
# The same for a block's fp16 scale, in fp16 ulps: m / -8 this close to the midpoint of two fp16
# values is ~NEAR_TIE_SCALE * 2^-10 of m from it, 5e-7 here, a few f32 ulps: an engine whose m
# differs by that (one layer of f32 arithmetic in another order) stores the other scale and moves
# every code of the block. (At 1e-4 ulps, 1e-7 of m, the OpenCL backends on PoCL and Intel's
# runtime flipped a scale 2.4e-4 ulps from its midpoint: e2e seed 3374020740, llama-tiny-f32.)
NEAR_TIE_SCALE = 5e-4


def round_trip(x: np.ndarray, kv_type: str, near_ties: list[int] | None = None) -> np.ndarray:
    """x stored in a KV cache of kv_type and read back, as float64 of the same shape.

    x: [T, ...] (K after RoPE or V, [T, Hkv, D]). Like the engine's cache, every token is one row
    of all its trailing values (Hkv*D, heads one after another), and the row is stored from
    float32. f32 / f16: per value. q8_0 / q4_0: blocks of 32 consecutive values of the row, each
    with an fp16 scale d (q8_0: d = fp16(amax / 127), q in [-127, 127]; q4_0: d = fp16(m / -8) with
    m the value of largest magnitude, the first on ties, q in [-8, 7]); every value is stored as
    the nearest point of the block's grid q * d with the STORED (fp16-rounded) d, ties away from
    zero. (gguf.quants.quantize / ggml's reference quantizer round against the unrounded scale,
    which does not always give the nearest grid point.)
    """
    shape = x.shape
    rows = np.asarray(x, dtype=np.float64).reshape(shape[0], -1).astype(np.float32)  # [T, row]
    if kv_type == "f32":
        out = rows.astype(np.float64)
    elif kv_type == "f16":
        out = rows.astype(np.float16).astype(np.float64)
    elif kv_type in ("q8_0", "q4_0"):
        if rows.shape[1] % 32:
            raise ValueError(f"{kv_type} KV rows need a multiple of 32 values, got {rows.shape[1]}")
        b = rows.reshape(-1, 32)                                                 # [blocks, 32] float32
        if kv_type == "q8_0":
            d = np.abs(b).max(axis=1, keepdims=True) / np.float32(127)           # [blocks, 1]
            qmin, qmax = -127, 127
        else:
            m = np.take_along_axis(b, np.abs(b).argmax(axis=1)[:, None], axis=1)  # [blocks, 1]
            d = m / np.float32(-8)
            qmin, qmax = -8, 7
        d = d.astype(np.float16).astype(np.float64)                              # the stored scale
        b = b.astype(np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            r = np.where(d == 0, 0.0, b / d)
        q = np.clip(np.sign(r) * np.floor(np.abs(r) + 0.5), qmin, qmax)         # round half away
        if near_ties is not None and kv_type == "q4_0":
            frac = np.abs(r) - np.floor(np.abs(r))
            inside = (r > qmin - 0.5) & (r < qmax + 0.5)                         # not clipped
            ties = int(np.count_nonzero((np.abs(frac - 0.5) < NEAR_TIE) & inside))
            # A whole block moves when its scale is near-tied: m / -8 near the midpoint of two
            # fp16 values, or the two largest magnitudes near-equal with opposite signs (m's sign).
            d32 = np.asarray(m / np.float32(-8), dtype=np.float32).ravel()
            d16 = d32.astype(np.float16)
            ulp = np.spacing(np.abs(d16)).astype(np.float64)
            with np.errstate(divide="ignore", invalid="ignore"):
                off = np.where(ulp > 0, np.abs(d32.astype(np.float64) - d16) / ulp, 0.0)
            ties += int(np.count_nonzero(np.abs(off - 0.5) < NEAR_TIE_SCALE))
            order = np.argsort(-np.abs(b), axis=1)[:, :2]
            top = np.take_along_axis(b, order, axis=1)                           # [blocks, 2]
            close = np.abs(np.abs(top[:, 0]) - np.abs(top[:, 1])) <= NEAR_TIE * np.abs(top[:, 0])
            ties += int(np.count_nonzero(close & (np.sign(top[:, 0]) != np.sign(top[:, 1]))))
            near_ties.append(ties)
        out = (q * d).reshape(rows.shape)
    else:
        raise ValueError(f"unsupported KV type {kv_type!r}")
    return out.reshape(shape)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="float64 reference logits of a GGUF llama/qwen2 model")
    ap.add_argument("-m", "--model", required=True)
    ap.add_argument("--tokens", required=True, help="comma-separated token ids")
    ap.add_argument("--out", help="write the logits [n_tokens, n_vocab] float64 as .npy")
    ap.add_argument("--out-f32", help="also write raw little-endian float32, row-major (like --dump-logits)")
    ap.add_argument("--kv-type", choices=("f16", "q8_0", "q4_0"),
                    help="round K (after RoPE) and V through this KV cache type")
    a = ap.parse_args(argv)
    tokens = [int(t) for t in a.tokens.split(",") if t.strip()]
    model = Model(a.model)
    logits = model.logits(tokens, kv_type=a.kv_type)
    if a.out:
        np.save(a.out, logits)
    if a.out_f32:
        logits.astype("<f4").tofile(a.out_f32)
    print(f"{model.arch}: n_embd={model.n_embd} n_layer={model.n_layer} n_head={model.n_head} "
          f"n_head_kv={model.n_head_kv} n_ff={model.n_ff} n_vocab={model.n_vocab}")
    print(f"logits {logits.shape}: std={logits.std():.3f} min={logits.min():.3f} max={logits.max():.3f} "
          f"finite={bool(np.isfinite(logits).all())}")
    print("argmax per position:", " ".join(str(int(i)) for i in logits.argmax(axis=1)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
