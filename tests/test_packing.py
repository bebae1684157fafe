"""Dense bit packing: checked against a plain-Python bit-stream reference."""

from __future__ import annotations

import math

import pytest
import torch

from mopeq_core.packing import pack_codes, packed_nbytes, unpack_codes

torch.set_num_threads(1)


def reference_pack(values: list[int], bits: int) -> bytes:
    """Little-endian bit stream, one bit at a time: bit j of the stream is bit j % 8 of byte j // 8."""
    out = bytearray(math.ceil(len(values) * bits / 8))
    pos = 0
    for v in values:
        for b in range(bits):
            if (v >> b) & 1:
                out[pos // 8] |= 1 << (pos % 8)
            pos += 1
    return bytes(out)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("numel", [0, 1, 3, 7, 8, 9, 15, 17, 63, 1001])
def test_round_trip_and_length(bits: int, numel: int) -> None:
    g = torch.Generator().manual_seed(bits * 1000 + numel)
    codes = torch.randint(0, 2**bits, (numel,), generator=g, dtype=torch.int64).to(torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.dim() == 1
    assert packed.numel() == math.ceil(numel * bits / 8) == packed_nbytes(numel, bits)
    assert bytes(packed.tolist()) == reference_pack(codes.tolist(), bits)
    back = unpack_codes(packed, bits, numel)
    assert back.dtype == torch.uint8
    assert torch.equal(back, codes)


def test_three_bit_codes_take_three_bits() -> None:
    codes = torch.tensor([7, 0, 5, 2, 1, 6, 3, 4], dtype=torch.uint8)
    packed = pack_codes(codes, 3)
    assert packed.numel() == 3
    assert bytes(packed.tolist()) == reference_pack(codes.tolist(), 3)


def test_multidimensional_input_is_flattened_row_major() -> None:
    codes = torch.randint(0, 16, (5, 7), dtype=torch.int64).to(torch.uint8)
    packed = pack_codes(codes, 4)
    assert packed.numel() == math.ceil(35 * 4 / 8)
    assert torch.equal(unpack_codes(packed, 4, 35).view(5, 7), codes)
    # extreme values survive at every width
    for bits in range(1, 9):
        full = torch.full((13,), 2**bits - 1, dtype=torch.uint8)
        assert torch.equal(unpack_codes(pack_codes(full, bits), bits, 13), full)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 7])
def test_out_of_range_codes_rejected(bits: int) -> None:
    codes = torch.zeros(10, dtype=torch.uint8)
    codes[4] = 2**bits
    with pytest.raises(ValueError, match="out of range"):
        pack_codes(codes, bits)
    with pytest.raises(ValueError, match="out of range"):
        pack_codes(torch.tensor([0, -1, 1], dtype=torch.int16), bits)


def test_bad_arguments_rejected() -> None:
    codes = torch.randint(0, 8, (17,), dtype=torch.int64).to(torch.uint8)
    packed = pack_codes(codes, 3)
    with pytest.raises(ValueError, match="bytes, expected"):
        unpack_codes(packed[:-1], 3, 17)
    with pytest.raises(ValueError, match="bytes, expected"):
        unpack_codes(torch.cat([packed, packed[:1]]), 3, 17)
    with pytest.raises(ValueError, match="uint8"):
        unpack_codes(packed.to(torch.int32), 3, 17)
    with pytest.raises(ValueError, match="1-D"):
        unpack_codes(packed.view(1, -1), 3, 17)
    for bad_bits in (0, 9):
        with pytest.raises(ValueError, match="bits"):
            pack_codes(codes, bad_bits)
        with pytest.raises(ValueError, match="bits"):
            unpack_codes(packed, bad_bits, 17)
    with pytest.raises(ValueError, match="integer"):
        pack_codes(codes.float(), 3)
