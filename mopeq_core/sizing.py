"""Byte accounting for packed weights. Pure Python (no torch) so the API can estimate budgets.

A quantized [out, in] matrix with group size G stores:
- codes: out*in*bits bits, packed densely (a 3-bit weight takes 3 bits),
- one float16 scale per (row, group),
- asymmetric only: one zero point per (row, group), packed at the same width as the codes.
Symmetric quantization has an implicit zero point and stores none.
"""

from __future__ import annotations

import math

SCALE_BYTES = 2  # float16


def n_groups(in_features: int, group_size: int) -> int:
    return math.ceil(in_features / group_size)


def packed_code_bytes(n_values: int, bits: int) -> int:
    return math.ceil(n_values * bits / 8)


def matrix_bytes(out_features: int, in_features: int, bits: int, group_size: int, symmetric: bool) -> int:
    """Bytes of one quantized matrix: packed codes + scales (+ packed zeros when asymmetric)."""
    groups = out_features * n_groups(in_features, group_size)
    total = packed_code_bytes(out_features * in_features, bits) + groups * SCALE_BYTES
    if not symmetric:
        total += packed_code_bytes(groups, bits)
    return total


def expert_bytes(shapes: list[tuple[int, int]], bits: int, group_size: int, symmetric: bool) -> int:
    """Bytes of one expert whose projections have the given [out, in] shapes, all at ``bits``."""
    return sum(matrix_bytes(o, i, bits, group_size, symmetric) for o, i in shapes)
