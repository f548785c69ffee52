#!/usr/bin/env python3
"""Write a llama-family GGUF model with random weights, for tests and benchmarks.

    python3 scripts/synth_gguf.py --out tiny.gguf --arch llama --shape tiny --type q4_0 [--tied]
    python3 scripts/synth_gguf.py --out l2.gguf --shape llama2-7b --type q4_0

Two ways to make the weights:

* "real" (the default for n_embd < 2048): float weights drawn from a normal distribution with
  a variance that keeps the network numerically sane (logits with a std of a few units, no
  overflow), then converted with gguf.quants.quantize. Tests compare against these.
* "fast" (the default for n_embd >= 2048, i.e. the benchmark shapes): random quant blocks are
  written directly (random nibbles / int8 and random fp16 scales), chunk by chunk, so a 7B
  Q4_0 file takes seconds and little memory. The per-block scales are chosen so the weights
  have about the same std as in the "real" mode.
* "fast" with --scale-range LO,HI (Q4_0, Q4_1, Q8_0): the test models of ANCHORS.md, whose
  blocks have random quants and fp16 scales uniform in [LO, HI] (ANCHORS: 0.002,0.02; Q4_1's
  min is -7.5 times the scale). Random bytes come straight from an SFC64 generator into the
  file, at about 1 GiB/s: a 3.5 GiB llama2-7b Q4_0 takes a few seconds.

    python3 scripts/synth_gguf.py --out l2.gguf --shape llama2-7b --type q4_0 --scale-range 0.002,0.02

Tensor layout (GGUF dims, ne0 first = the contiguous input dim), per layer i:
  token_embd.weight [n_embd, n_vocab]      blk.i.attn_norm.weight [n_embd] F32
  blk.i.attn_q.weight [n_embd, n_embd]     blk.i.attn_k/v.weight [n_embd, n_head_kv*head_dim]
  blk.i.attn_output.weight [n_embd, n_embd]
  blk.i.ffn_norm.weight [n_embd] F32       blk.i.ffn_gate/up.weight [n_embd, n_ff]
  blk.i.ffn_down.weight [n_ff, n_embd]     qwen2 only: blk.i.attn_q/k/v.bias F32
  output_norm.weight [n_embd] F32          output.weight [n_embd, n_vocab] (absent with --tied)
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from pathlib import Path

import numpy as np
import gguf
from gguf import GGMLQuantizationType as QT

# name -> (n_embd, n_layer, n_head, n_head_kv, n_ff, n_vocab)
SHAPES = {
    "tiny":      (128,  2,  4,  2,   320,    512),
    "tiny-k":    (256,  2,  4,  2,   512,    512),   # K-quants need 256-multiple inputs
    "small":     (256,  3,  8,  2,   704,   1024),
    "llama2-7b": (4096, 32, 32, 32, 11008,  32000),
    "llama3-8b": (4096, 32, 32,  8, 14336, 128256),
    "llama3-1b": (2048, 16, 32,  8,  8192, 128256),
}

TYPES = {
    "f32":  (QT.F32,  gguf.LlamaFileType.ALL_F32),
    "f16":  (QT.F16,  gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (QT.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q4_0": (QT.Q4_0, gguf.LlamaFileType.MOSTLY_Q4_0),
    "q4_1": (QT.Q4_1, gguf.LlamaFileType.MOSTLY_Q4_1),
    "q8_0": (QT.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
    "q5_0": (QT.Q5_0, gguf.LlamaFileType.MOSTLY_Q5_0),
    "q5_1": (QT.Q5_1, gguf.LlamaFileType.MOSTLY_Q5_1),
    "q4_k": (QT.Q4_K, gguf.LlamaFileType.MOSTLY_Q4_K_S),
    "q5_k": (QT.Q5_K, gguf.LlamaFileType.MOSTLY_Q5_K_S),
    "q6_k": (QT.Q6_K, gguf.LlamaFileType.MOSTLY_Q6_K),
    # A Q4_K_M-like mix: Q4_K everywhere except the output head (Q6_K) and attn_v / ffn_down of
    # the layers llama.cpp gives more bits (see mixed_type).
    "q4_k_m": (QT.Q4_K, gguf.LlamaFileType.MOSTLY_Q4_K_M),
}

ARCHS = ("llama", "qwen2")

# Target std of the logits: output weights get std LOGIT_STD / sqrt(n_embd), since the final
# rmsnorm makes its input have unit RMS.
LOGIT_STD = 3.0

# Elements per generated chunk in fast mode (bounds memory to a few hundred MiB).
CHUNK_ELEMENTS = 1 << 25


@dataclasses.dataclass
class HParams:
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    n_ff: int
    n_vocab: int

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def check(self) -> None:
        if self.n_embd % self.n_head or self.n_head % self.n_head_kv:
            raise ValueError(f"bad head counts: {self}")
        if self.head_dim % 2:
            raise ValueError("head_dim must be even (RoPE)")


@dataclasses.dataclass
class TensorSpec:
    name: str
    ne: tuple[int, ...]      # GGUF dims, ne0 (contiguous) first
    qtype: QT
    init: str                # "normal" (mean 0), "norm" (1 + 0.1*normal), "bias" (0.1*normal)
    std: float = 1.0         # std for "normal"

    @property
    def n_elements(self) -> int:
        return math.prod(self.ne)

    @property
    def nbytes(self) -> int:
        block, type_size = gguf.GGML_QUANT_SIZES[self.qtype]
        return self.n_elements // block * type_size


def more_bits(layer: int, n_layer: int) -> bool:
    """The layers whose attn_v / ffn_down a Q4_K_M file stores in Q6_K: the first and last
    eighth of the layers and every third layer in between (llama.cpp's rule of thumb)."""
    return layer < n_layer // 8 or layer >= 7 * n_layer // 8 or (layer - n_layer // 8) % 3 == 2


def mixed_type(wtype: str, qtype: QT, name: str, n_layer: int) -> QT:
    """The type of one 2-D tensor: qtype, except in the q4_k_m mix."""
    if wtype != "q4_k_m":
        return qtype
    if name == "output.weight":
        return QT.Q6_K
    if name.endswith(("attn_v.weight", "ffn_down.weight")):
        return QT.Q6_K if more_bits(int(name.split(".")[1]), n_layer) else QT.Q4_K
    return QT.Q4_K


def tensor_plan(arch: str, hp: HParams, qtype: QT, tied: bool, wtype: str = "") -> list[TensorSpec]:
    """Every tensor of the model in file order, with its GGUF dims, type and initialisation."""
    e, ff, kv_dim = hp.n_embd, hp.n_ff, hp.n_head_kv * hp.head_dim
    f32 = QT.F32
    # With a tied head the embedding is also the output matrix: give it the output's scale.
    embd_std = LOGIT_STD / math.sqrt(e) if tied else 1.0
    plan = [TensorSpec("token_embd.weight", (e, hp.n_vocab), qtype, "normal", embd_std)]
    for i in range(hp.n_layer):
        b = f"blk.{i}."
        plan += [
            TensorSpec(b + "attn_norm.weight", (e,), f32, "norm"),
            TensorSpec(b + "attn_q.weight", (e, e), qtype, "normal", 1 / math.sqrt(e)),
            TensorSpec(b + "attn_k.weight", (e, kv_dim), qtype, "normal", 1 / math.sqrt(e)),
            TensorSpec(b + "attn_v.weight", (e, kv_dim), qtype, "normal", 1 / math.sqrt(e)),
        ]
        if arch == "qwen2":
            plan += [
                TensorSpec(b + "attn_q.bias", (e,), f32, "bias"),
                TensorSpec(b + "attn_k.bias", (kv_dim,), f32, "bias"),
                TensorSpec(b + "attn_v.bias", (kv_dim,), f32, "bias"),
            ]
        plan += [
            TensorSpec(b + "attn_output.weight", (e, e), qtype, "normal", 1 / math.sqrt(e)),
            TensorSpec(b + "ffn_norm.weight", (e,), f32, "norm"),
            TensorSpec(b + "ffn_gate.weight", (e, ff), qtype, "normal", 1 / math.sqrt(e)),
            TensorSpec(b + "ffn_up.weight", (e, ff), qtype, "normal", 1 / math.sqrt(e)),
            TensorSpec(b + "ffn_down.weight", (ff, e), qtype, "normal", 1 / math.sqrt(ff)),
        ]
    plan.append(TensorSpec("output_norm.weight", (e,), f32, "norm"))
    if not tied:
        plan.append(TensorSpec("output.weight", (e, hp.n_vocab), qtype, "normal", LOGIT_STD / math.sqrt(e)))
    for t in plan:
        if len(t.ne) == 2:
            t.qtype = mixed_type(wtype, t.qtype, t.name, hp.n_layer)
    return plan


# ---------------------------------------------------------------------------------------------
# "real" mode: float values, converted with gguf.quants.quantize


def real_values(rng: np.random.Generator, t: TensorSpec) -> np.ndarray:
    """Float32 values of a tensor, numpy shape = reversed GGUF dims (rows = ne1, cols = ne0)."""
    shape = tuple(reversed(t.ne))
    z = rng.standard_normal(shape, dtype=np.float32)
    if t.init == "norm":
        return 1.0 + 0.1 * z
    if t.init == "bias":
        return 0.1 * z
    return z * np.float32(t.std)


def _f16_bytes(x: np.ndarray) -> np.ndarray:
    """float32 [n] -> uint8 [n, 2] (fp16, little-endian)."""
    return x.astype("<f2").view(np.uint8).reshape(-1, 2)


def quantize_k(x: np.ndarray, qtype: QT) -> np.ndarray:
    """Q4_K / Q5_K / Q6_K blocks [n_blocks, type_size] of float32 values (a multiple of 256).

    gguf-py only dequantizes the K-quants, so this is a plain numpy quantizer (independent of
    Kestrel's C++ one): per 32 (Q4_K/Q5_K) an affine range [min(min, 0), max] coded with 6-bit
    scale and min codes under fp16 super-scales; per 16 (Q6_K) a symmetric scale max/-32 coded
    as int8 under an fp16 super-scale.
    """
    x = np.asarray(x, dtype=np.float32).reshape(-1, 256)
    nb = x.shape[0]
    with np.errstate(divide="ignore", invalid="ignore"):
        if qtype in (QT.Q4_K, QT.Q5_K):
            qmax = 15 if qtype == QT.Q4_K else 31
            xs = x.reshape(nb, 8, 32)
            lo = np.minimum(xs.min(axis=-1), 0)
            hi = xs.max(axis=-1)
            s, o = (hi - lo) / qmax, -lo                                            # [nb, 8]
            d = (s.max(axis=-1) / 63).astype(np.float16).astype(np.float32)[:, None]
            dmin = (o.max(axis=-1) / 63).astype(np.float16).astype(np.float32)[:, None]
            sc = np.where(d > 0, np.clip(np.round(s / d), 0, 63), 0).astype(np.uint8)
            mn = np.where(dmin > 0, np.clip(np.round(o / dmin), 0, 63), 0).astype(np.uint8)
            scale = (d * sc)[..., None]
            off = (dmin * mn)[..., None]
            q = np.where(scale > 0, np.clip(np.round((xs + off) / scale), 0, qmax), 0).astype(np.uint8)
            q = q.reshape(nb, 4, 2, 32)                                              # [nb, i, s, l]
            qs = (q[:, :, 0] & 15) | ((q[:, :, 1] & 15) << 4)                        # [nb, 4, 32]
            packed = np.zeros((nb, 12), dtype=np.uint8)
            packed[:, 0:4] = (sc[:, 0:4] & 63) | ((sc[:, 4:8] >> 4) << 6)
            packed[:, 4:8] = (mn[:, 0:4] & 63) | ((mn[:, 4:8] >> 4) << 6)
            packed[:, 8:12] = (sc[:, 4:8] & 15) | ((mn[:, 4:8] & 15) << 4)
            parts = [_f16_bytes(d[:, 0]), _f16_bytes(dmin[:, 0]), packed]
            if qtype == QT.Q5_K:
                hb = (q >> 4).reshape(nb, 8, 32)                                     # bit j of qh[l]
                qh = np.zeros((nb, 32), dtype=np.uint8)
                for j in range(8):
                    qh |= hb[:, j] << np.uint8(j)
                parts.append(qh)
            parts.append(qs.reshape(nb, 128))
            return np.concatenate(parts, axis=-1)
        if qtype == QT.Q6_K:
            xs = x.reshape(nb, 16, 16)
            imax = np.abs(xs).argmax(axis=-1)[..., None]
            s = np.take_along_axis(xs, imax, axis=-1)[..., 0] / -32                # [nb, 16]
            d = (np.abs(s).max(axis=-1) / 127).astype(np.float16).astype(np.float32)[:, None]
            sc = np.where(d > 0, np.clip(np.round(s / d), -128, 127), 0).astype(np.int8)
            eff = (d * sc.astype(np.float32))[..., None]
            q = np.where(eff != 0, np.clip(np.round(xs / eff), -32, 31) + 32, 32).astype(np.uint8)
            q = q.reshape(nb, 2, 4, 32)                                              # [nb, h, c, l]
            ql = np.concatenate([(q[:, :, 0] & 15) | ((q[:, :, 2] & 15) << 4),
                                 (q[:, :, 1] & 15) | ((q[:, :, 3] & 15) << 4)], axis=-1)  # [nb, 2, 64]
            qh = ((q[:, :, 0] >> 4) | ((q[:, :, 1] >> 4) << 2) | ((q[:, :, 2] >> 4) << 4)
                  | ((q[:, :, 3] >> 4) << 6))                                        # [nb, 2, 32]
            return np.concatenate([ql.reshape(nb, 128), qh.reshape(nb, 64), sc.view(np.uint8),
                                   _f16_bytes(d[:, 0])], axis=-1)
    raise ValueError(f"quantize_k: {qtype.name}")


def quantize(values: np.ndarray, qtype: QT) -> np.ndarray:
    if qtype in (QT.Q4_K, QT.Q5_K, QT.Q6_K):
        return quantize_k(values, qtype)
    return gguf.quants.quantize(values, qtype)


def real_chunks(rng: np.random.Generator, t: TensorSpec):
    """The tensor's bytes in one piece: quantized floats."""
    yield quantize(real_values(rng, t), t.qtype)


# ---------------------------------------------------------------------------------------------
# "fast" mode: random blocks written directly, chunk by chunk

# std of the integer part of a block's values: Q4_0 (q - 8), Q4_1 q, q in 0..15; Q8_0 int8
_Q4_STD = math.sqrt((16 * 16 - 1) / 12)   # 4.61
_Q8_STD = math.sqrt((256 * 256 - 1) / 12)  # 73.9


def random_blocks(rng: np.random.Generator, qtype: QT, n_blocks: int, std: float) -> np.ndarray:
    """n_blocks random Q4_0 / Q4_1 / Q8_0 blocks whose values have about the given std.

    The quant bytes (nibbles or int8) are uniform random; each block's fp16 scale d is uniform
    in [0.3, 1.7] * std / std(q) with a random sign (Q4_0's q - 8 has mean -0.5: without the
    sign every row would share a bias direction). For Q4_1 the offset m is about -7.5 d (mean
    0) plus a little noise.
    """
    _, type_size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
    q_std = _Q8_STD if qtype == QT.Q8_0 else _Q4_STD
    d = rng.uniform(0.3, 1.7, size=n_blocks).astype(np.float32) * np.float32(std / q_std)
    if qtype != QT.Q4_1:
        d *= rng.choice(np.array([-1.0, 1.0], dtype=np.float32), size=n_blocks)
    blocks[:, 0:2] = d.astype(np.float16).view(np.uint8).reshape(n_blocks, 2)
    if qtype == QT.Q4_1:
        m = d * (-7.5 + 0.5 * rng.standard_normal(n_blocks, dtype=np.float32))
        blocks[:, 2:4] = m.astype(np.float16).view(np.uint8).reshape(n_blocks, 2)
    return blocks


# Byte offsets of the fp16 scale fields of the 5-bit and K-quant blocks, and the mean code the
# second field must cancel (Q5_1 min = -15.5 d; Q4_K/Q5_K dmin * E[mn] = d * E[sc] * E[q]).
_SCALE_FIELDS = {QT.Q5_0: (0, None, 0), QT.Q5_1: (0, 2, -15.5), QT.Q4_K: (0, 2, 7.5),
                 QT.Q5_K: (0, 2, 15.5), QT.Q6_K: (208, None, 0)}


def random_blocks_ext(rng: np.random.Generator, qtype: QT, n_blocks: int, std: float) -> np.ndarray:
    """n_blocks random Q5_0 / Q5_1 / Q4_K / Q5_K / Q6_K blocks whose values have about the given
    std: random bytes, fp16 scales uniform in [0.3, 1.7] (random sign for the symmetric types),
    then every scale multiplied by the factor that gives a sample of blocks the wanted std."""
    _, type_size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
    d_off, m_off, m_mean = _SCALE_FIELDS[qtype]
    d = rng.uniform(0.3, 1.7, size=n_blocks).astype(np.float32)
    if m_off is None:
        d *= rng.choice(np.array([-1.0, 1.0], dtype=np.float32), size=n_blocks)
        m = None
    else:
        m = d * np.float32(m_mean) * (1 + 0.05 * rng.standard_normal(n_blocks, dtype=np.float32))

    def put(scale: float) -> None:
        blocks[:, d_off:d_off + 2] = _f16_bytes(d * np.float32(scale))
        if m is not None:
            blocks[:, m_off:m_off + 2] = _f16_bytes(m * np.float32(scale))

    put(1e-3)
    sample = gguf.quants.dequantize(blocks[:256], qtype)
    put(1e-3 * std / max(float(np.std(sample)), 1e-30))
    return blocks


# Types --scale-range applies to: the scale d is the first fp16 of the block.
SCALE_RANGE_TYPES = (QT.Q4_0, QT.Q4_1, QT.Q8_0)


def range_blocks(rng: np.random.Generator, qtype: QT, n_blocks: int,
                 scale_range: tuple[float, float]) -> np.ndarray:
    """n_blocks Q4_0 / Q4_1 / Q8_0 blocks of random quant bytes whose fp16 scales d are uniform
    in scale_range (positive, as ANCHORS.md states the test models); Q4_1's min is -7.5 d.
    Draws raw 64-bit words (no per-byte sampling), so it runs at memory speed."""
    _, type_size = gguf.GGML_QUANT_SIZES[qtype]
    nbytes = n_blocks * type_size
    words = rng.bit_generator.random_raw((nbytes + 7) // 8)
    blocks = words.view(np.uint8)[:nbytes].reshape(n_blocks, type_size)
    lo, hi = scale_range
    d = rng.random(n_blocks, dtype=np.float32)
    d *= np.float32(hi - lo)
    d += np.float32(lo)
    blocks[:, 0:2] = d.astype("<f2").view(np.uint8).reshape(n_blocks, 2)
    if qtype == QT.Q4_1:
        d *= np.float32(-7.5)
        blocks[:, 2:4] = d.astype("<f2").view(np.uint8).reshape(n_blocks, 2)
    return blocks


def random_floats(rng: np.random.Generator, qtype: QT, n: int, std: float) -> np.ndarray:
    """n random normal values with the given std, as F32, F16 or BF16 (uint16 bits)."""
    x = rng.standard_normal(n, dtype=np.float32)
    x *= np.float32(std)
    if qtype == QT.F32:
        return x
    if qtype == QT.F16:
        return x.astype(np.float16)
    return (x.view(np.uint32) >> 16).astype(np.uint16)  # BF16 by truncation


def fast_chunks(rng: np.random.Generator, t: TensorSpec,
                scale_range: tuple[float, float] | None = None):
    """The tensor's bytes in chunks of whole rows, at most about CHUNK_ELEMENTS elements each;
    with scale_range, quantized blocks come from range_blocks."""
    if t.init != "normal":  # norms and biases are small: real values
        yield real_values(rng, t)
        return
    ne0, rows = t.ne[0], math.prod(t.ne[1:])
    rows_per_chunk = max(1, CHUNK_ELEMENTS // ne0)
    block, _ = gguf.GGML_QUANT_SIZES[t.qtype]
    for r0 in range(0, rows, rows_per_chunk):
        n = min(rows_per_chunk, rows - r0) * ne0
        if scale_range is not None and t.qtype in SCALE_RANGE_TYPES:
            yield range_blocks(rng, t.qtype, n // block, scale_range)
        elif t.qtype in (QT.F32, QT.F16, QT.BF16):
            yield random_floats(rng, t.qtype, n, t.std)
        elif t.qtype in _SCALE_FIELDS:
            yield random_blocks_ext(rng, t.qtype, n // block, t.std)
        else:
            yield random_blocks(rng, t.qtype, n // block, t.std)


# ---------------------------------------------------------------------------------------------
# the writer


def write_model(out: str | Path, arch: str = "llama", shape: str = "tiny", wtype: str = "f32",
                tied: bool = False, seed: int = 0, ctx: int = 4096, rope_base: float | None = None,
                fast: bool | None = None, overrides: dict | None = None, verbose: bool = True,
                vocab_from: str | None = None, chat_template: str | None = None,
                scale_range: tuple[float, float] | None = None) -> dict:
    """Write one model; returns a summary dict (params, bytes, seconds, hparams).

    scale_range: (lo, hi) for fast mode with Q4_0 / Q4_1 / Q8_0 weights: block scales uniform
    in [lo, hi] and raw random quants (ANCHORS.md's test models: (0.002, 0.02)).

    vocab_from: a GGUF whose tokenizer.* keys are copied (n_vocab follows its vocabulary), so
    a synthetic model tokenizes like a real one; chat_template: text for
    tokenizer.chat_template."""
    vocab_fields = []
    if vocab_from:
        reader = gguf.GGUFReader(vocab_from)
        vocab_fields = [f for k, f in reader.fields.items() if k.startswith("tokenizer.")]
        overrides = dict(overrides or {})
        overrides["n_vocab"] = len(reader.fields["tokenizer.ggml.tokens"].data)
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}")
    hp = HParams(*SHAPES[shape])
    for k, v in (overrides or {}).items():
        if v is not None:
            setattr(hp, k, v)
    hp.check()
    qtype, ftype = TYPES[wtype]
    block = 256 if wtype == "q4_k_m" else gguf.GGML_QUANT_SIZES[qtype][0]
    if hp.n_embd % block or hp.n_ff % block:
        raise ValueError(f"n_embd and n_ff must be multiples of {block} for {wtype}")
    if fast is None:
        fast = hp.n_embd >= 2048 or scale_range is not None
    if scale_range is not None:
        if not fast:
            raise ValueError("--scale-range needs fast mode (random blocks), not --real")
        if wtype not in ("q4_0", "q4_1", "q8_0"):
            raise ValueError(f"--scale-range applies to q4_0, q4_1 and q8_0, not {wtype}")
        lo, hi = scale_range
        if not 0 < lo <= hi < 65504:
            raise ValueError(f"--scale-range {lo},{hi}: need 0 < LO <= HI < 65504 (fp16)")
    if rope_base is None:
        rope_base = 1e6 if arch == "qwen2" else 1e4
    eps = 1e-6 if arch == "qwen2" else 1e-5
    t_start = time.time()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")  # renamed at the end: no half-written models

    w = gguf.GGUFWriter(tmp, arch)
    w.add_name(f"kestrel-synth-{arch}-{shape}-{wtype}{'-tied' if tied else ''}")
    w.add_context_length(ctx)
    w.add_embedding_length(hp.n_embd)
    w.add_block_count(hp.n_layer)
    w.add_feed_forward_length(hp.n_ff)
    w.add_head_count(hp.n_head)
    w.add_head_count_kv(hp.n_head_kv)
    w.add_layer_norm_rms_eps(eps)
    w.add_rope_freq_base(rope_base)
    w.add_rope_dimension_count(hp.head_dim)
    w.add_vocab_size(hp.n_vocab)
    w.add_file_type(ftype)
    if vocab_fields:
        for f in vocab_fields:
            sub = f.types[1] if len(f.types) > 1 else None
            w.add_key_value(f.name, f.contents(), f.types[0], sub)
    else:
        # Minimal tokenizer. GGUFWriter refuses empty arrays, so there is no merges key.
        w.add_tokenizer_model("gpt2")
        w.add_token_list([f"<t{i}>" for i in range(hp.n_vocab)])
        w.add_token_types([int(gguf.TokenType.NORMAL)] * hp.n_vocab)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
    if chat_template is not None:
        w.add_chat_template(chat_template)

    plan = tensor_plan(arch, hp, qtype, tied, wtype)
    for t in plan:
        # numpy-order shape (reversed GGUF dims); with raw_dtype set and a non-uint8 dtype the
        # shape is taken as element counts.
        w.add_tensor_info(t.name, tuple(reversed(t.ne)), np.dtype(np.float32), t.nbytes, raw_dtype=t.qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()

    # Tensor data, streamed: each tensor starts at an aligned offset (the offsets written in the
    # tensor infos are the running sum of sizes padded to the alignment).
    if scale_range is None:
        rng = np.random.default_rng(seed)
    else:
        rng = np.random.Generator(np.random.SFC64(seed))   # fast raw words for range_blocks
    fout = w.fout[0]
    w.write_padding(fout, fout.tell())
    for t in plan:
        written = 0
        chunks = fast_chunks(rng, t, scale_range) if fast else real_chunks(rng, t)
        for data in chunks:
            data = np.ascontiguousarray(data)
            fout.write(data.data)
            written += data.nbytes
        if written != t.nbytes:
            raise AssertionError(f"{t.name}: wrote {written} bytes, expected {t.nbytes}")
        w.write_padding(fout, written)
    w.close()
    tmp.replace(out)

    n_params = sum(t.n_elements for t in plan)
    summary = {
        "path": str(out), "arch": arch, "shape": shape, "type": wtype, "tied": tied,
        "fast": fast, "scale_range": list(scale_range) if scale_range else None, "params": n_params, "bytes": out.stat().st_size,
        "seconds": time.time() - t_start, "hparams": dataclasses.asdict(hp),
    }
    if verbose:
        print(f"wrote {out}: {arch} {shape} {wtype}{' tied' if tied else ''} "
              f"({'quantized floats' if not fast else 'random blocks' if scale_range is None else f'random blocks, scales in [{scale_range[0]:g}, {scale_range[1]:g}]'}) "
              f"n_embd={hp.n_embd} n_layer={hp.n_layer} n_head={hp.n_head} n_head_kv={hp.n_head_kv} "
              f"n_ff={hp.n_ff} n_vocab={hp.n_vocab}: {n_params / 1e6:.2f} M params, "
              f"{summary['bytes'] / 2**20:.1f} MiB, {summary['seconds']:.1f} s")
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="output .gguf path")
    ap.add_argument("--arch", choices=ARCHS, default="llama")
    ap.add_argument("--shape", choices=SHAPES, default="tiny")
    ap.add_argument("--type", choices=TYPES, default="f32", dest="wtype",
                    help="type of every 2-D tensor (norms and biases are always F32)")
    ap.add_argument("--tied", action="store_true", help="no output.weight: the head reuses token_embd")
    ap.add_argument("--seed", type=int, default=0)
    for k in ("n-embd", "n-layer", "n-head", "n-head-kv", "n-ff", "n-vocab"):
        ap.add_argument(f"--{k}", type=int, help="override the shape's value")
    ap.add_argument("--rope-base", type=float, help="default 10000 (llama), 1000000 (qwen2)")
    ap.add_argument("--ctx", type=int, default=4096, help="{arch}.context_length")
    ap.add_argument("--vocab-from", help="copy the tokenizer.* keys of this GGUF")
    ap.add_argument("--chat-template", help="file whose text becomes tokenizer.chat_template")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--fast", action="store_true", default=None,
                      help="random quant blocks (default when n_embd >= 2048)")
    mode.add_argument("--real", action="store_false", dest="fast",
                      help="quantize real-valued weights (default when n_embd < 2048)")
    ap.add_argument("--scale-range", metavar="LO,HI",
                    help="fast mode, q4_0/q4_1/q8_0: block scales uniform in [LO, HI] and raw random "
                         "quants (ANCHORS.md's test models: 0.002,0.02); implies --fast")
    a = ap.parse_args(argv)
    scale_range = None
    if a.scale_range:
        try:
            lo, hi = (float(x) for x in a.scale_range.split(","))
        except ValueError:
            ap.error(f"--scale-range {a.scale_range!r}: expected LO,HI, e.g. 0.002,0.02")
        scale_range = (lo, hi)
    overrides = {k: getattr(a, k) for k in ("n_embd", "n_layer", "n_head", "n_head_kv", "n_ff", "n_vocab")}
    try:
        template = Path(a.chat_template).read_text() if a.chat_template else None
        write_model(a.out, a.arch, a.shape, a.wtype, a.tied, a.seed, a.ctx, a.rope_base, a.fast,
                    overrides, vocab_from=a.vocab_from, chat_template=template,
                    scale_range=scale_range)
    except ValueError as e:
        print(f"synth_gguf: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
