#!/usr/bin/env python3
"""Dequantize raw GGUF blocks with gguf-py (an independent implementation of the block layouts).

    python3 tests/unit/gguf_dequant.py TYPE IN.bin OUT.bin

TYPE is a ggml type name (Q5_0, Q4_K, ...); IN holds whole blocks back to back; OUT receives
the values as little-endian float32. Used by test_quant.cpp (QuantGgufPy) to check Kestrel's
scalar dequantizers bit for bit. Exit status 3 when the gguf package is missing.
"""
import sys

import numpy as np

try:
    import gguf
except ImportError:
    sys.exit(3)

qtype = gguf.GGMLQuantizationType[sys.argv[1]]
_, type_size = gguf.GGML_QUANT_SIZES[qtype]
raw = np.fromfile(sys.argv[2], dtype=np.uint8).reshape(-1, type_size)
gguf.quants.dequantize(raw, qtype).astype("<f4").tofile(sys.argv[3])
