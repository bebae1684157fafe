"""Dense bit packing of unsigned integer codes of any width 1..8.

Layout (little-endian bit stream): code ``k`` occupies bits ``[k*bits, (k+1)*bits)`` of the stream, and bit ``j`` of
the stream is bit ``j % 8`` of byte ``j // 8``. A ``bits``-wide code therefore takes exactly ``bits`` bits: 8 codes
of 3 bits take 3 bytes, and ``numel`` codes take ``ceil(numel * bits / 8)`` bytes. Unused bits of the last byte are 0.

The work is vectorised: codes are processed in chunks of 8 (8 codes x ``bits`` bits = ``bits`` whole bytes), each
chunk assembled into one int64 word and split into bytes with shifts, so no Python loop runs per value and the
temporary memory is about 8 bytes per 8 codes plus the output.
"""

from __future__ import annotations

import torch

__all__ = ["pack_codes", "packed_nbytes", "unpack_codes"]


def _check_bits(bits: int) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an integer in 1..8, got {bits!r}")
    return bits


def packed_nbytes(numel: int, bits: int) -> int:
    """Bytes that ``numel`` codes of width ``bits`` take when packed: ``ceil(numel * bits / 8)``."""
    _check_bits(bits)
    return (numel * bits + 7) // 8


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned codes (any shape, values in ``[0, 2**bits)``) densely into a 1-D uint8 tensor.

    Returns ``ceil(codes.numel() * bits / 8)`` bytes on the codes' device. Raises ``ValueError`` for a non-integer
    tensor, a bad width, or a code outside ``[0, 2**bits)``.
    """
    _check_bits(bits)
    if not isinstance(codes, torch.Tensor):
        raise TypeError(f"codes must be a torch.Tensor, got {type(codes).__name__}")
    if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
        raise ValueError(f"codes must be an integer tensor (uint8), got dtype {codes.dtype}")
    flat = codes.reshape(-1)
    numel = flat.numel()
    nbytes = packed_nbytes(numel, bits)
    if numel == 0:
        return torch.empty(0, dtype=torch.uint8, device=codes.device)
    lo, hi = int(flat.min()), int(flat.max())
    if lo < 0 or hi >= (1 << bits):
        raise ValueError(
            f"codes out of range for {bits}-bit packing: values span [{lo}, {hi}], allowed [0, {(1 << bits) - 1}]"
        )
    if bits == 8:
        return flat.to(torch.uint8).clone()

    n_chunks = (numel + 7) // 8
    words = torch.zeros(n_chunks * 8, dtype=torch.int64, device=codes.device)
    words[:numel] = flat.to(torch.int64)
    words = words.view(n_chunks, 8)
    shifts = torch.arange(8, device=codes.device, dtype=torch.int64) * bits
    word = (words << shifts).sum(dim=1)  # 8 codes -> one word of 8*bits <= 56 significant bits, no overlap
    byte_shifts = torch.arange(bits, device=codes.device, dtype=torch.int64) * 8
    out = ((word[:, None] >> byte_shifts) & 0xFF).to(torch.uint8).reshape(-1)
    return out[:nbytes].clone()


def unpack_codes(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: a 1-D uint8 tensor of ``numel`` codes.

    Raises ``ValueError`` when ``packed`` is not a 1-D uint8 tensor of exactly ``ceil(numel * bits / 8)`` bytes.
    """
    _check_bits(bits)
    if isinstance(numel, bool) or not isinstance(numel, int) or numel < 0:
        raise ValueError(f"numel must be a non-negative integer, got {numel!r}")
    if not isinstance(packed, torch.Tensor):
        raise TypeError(f"packed must be a torch.Tensor, got {type(packed).__name__}")
    if packed.dtype != torch.uint8:
        raise ValueError(f"packed codes must be uint8, got dtype {packed.dtype}")
    if packed.dim() != 1:
        raise ValueError(f"packed codes must be 1-D, got shape {tuple(packed.shape)}")
    expected = packed_nbytes(numel, bits)
    if packed.numel() != expected:
        raise ValueError(
            f"packed codes have {packed.numel()} bytes, expected {expected} for {numel} codes of {bits} bits"
        )
    if numel == 0:
        return torch.empty(0, dtype=torch.uint8, device=packed.device)
    if bits == 8:
        return packed.clone()

    n_chunks = (numel + 7) // 8
    buf = torch.zeros(n_chunks * bits, dtype=torch.int64, device=packed.device)
    buf[:expected] = packed.to(torch.int64)
    buf = buf.view(n_chunks, bits)
    byte_shifts = torch.arange(bits, device=packed.device, dtype=torch.int64) * 8
    word = (buf << byte_shifts).sum(dim=1)
    shifts = torch.arange(8, device=packed.device, dtype=torch.int64) * bits
    codes = ((word[:, None] >> shifts) & ((1 << bits) - 1)).to(torch.uint8).reshape(-1)
    return codes[:numel].clone()
