"""Quantize and dequantize for communication: int8, fp8 (e4m3) and fp4 (e2m1), per-block scales.

A flat fp32 tensor is cut into blocks of `block` values; each block is scaled by its
absolute maximum so that the largest value maps onto the format's largest code, and the
scale travels with the codes as fp32. The wire form (`Quantized.payload`) is one uint8
buffer, codes then scales, so a collective moves a single tensor:

| format | codes | largest code | rounding | error bound per value |
| --- | --- | --- | --- | --- |
| int8 | 1 byte, -127..127 | 127 | to nearest | s / 2 |
| fp8 | 1 byte, float8_e4m3fn | 448 | to nearest even (torch's cast) | max(2^-4 |x|, 2^-10 s) |
| fp4 | 4 bits, two per byte, e2m1 | 6 | to nearest, ties to even code | max(s / 4, |x| / 4) |

where s = block absmax / largest code; e2m1 magnitudes are 0, .5, 1, 1.5, 2, 3, 4, 6.

`quantize_reference` is the plain, slow statement of each format (every candidate code
compared); `quantize` is the path used for communication (a cast or a bucket search and
bit packing). Tests hold them bit-identical. Inputs must be finite: a block with an inf or
NaN has no scale, and that is reported rather than sent.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["FORMATS", "Quantized", "bits_per_value", "dequantize", "error_bound", "payload_bytes",
           "quantize", "quantize_reference"]

FORMATS = ("int8", "fp8", "fp4")
_QMAX = {"int8": 127.0, "fp8": 448.0, "fp4": 6.0}
_CODE_BITS = {"int8": 8, "fp8": 8, "fp4": 4}
# e2m1 magnitudes by code (bit 3 is the sign).
_FP4_GRID = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
_FP4_MIDS = (_FP4_GRID[1:] + _FP4_GRID[:-1]) / 2
# Both values of every packed byte (low nibble first), for decoding by table look-up.
_FP4_SIGNED = torch.cat([_FP4_GRID, -_FP4_GRID])
_FP4_PAIRS = torch.stack([_FP4_SIGNED[torch.arange(256) & 0xF],
                          _FP4_SIGNED[torch.arange(256) >> 4]], dim=1)


@dataclass(frozen=True)
class Quantized:
    """Codes and per-block scales of `numel` values, packed into one uint8 `payload`."""

    fmt: str
    block: int
    numel: int
    payload: torch.Tensor

    @property
    def nbytes(self) -> int:
        return self.payload.numel()


def _blocks(numel: int, block: int) -> int:
    return -(-numel // block)


def _code_bytes(fmt: str, n_blocks: int, block: int) -> int:
    return n_blocks * block * _CODE_BITS[fmt] // 8


def payload_bytes(numel: int, *, fmt: str, block: int) -> int:
    """Bytes of the wire form of `numel` values (codes of the padded blocks + fp32 scales)."""
    _check(fmt, block)
    nb = _blocks(numel, block)
    return _code_bytes(fmt, nb, block) + 4 * nb


def bits_per_value(fmt: str, block: int) -> float:
    """Bits on the wire per value, scales included (fp32: 32)."""
    if fmt == "none":
        return 32.0
    return _CODE_BITS[fmt] + 32.0 / block


def error_bound(x: torch.Tensor, *, fmt: str, block: int) -> torch.Tensor:
    """The largest |x - dequantize(quantize(x))| each value may have (the table above)."""
    _check(fmt, block)
    xb, _ = _padded(x, block)
    s = (xb.abs().amax(dim=1, keepdim=True) / _QMAX[fmt]).expand_as(xb)
    a = xb.abs()
    if fmt == "int8":
        b = s / 2
    elif fmt == "fp8":
        b = torch.maximum(a * 2.0**-4, s * 2.0**-10)
    else:
        b = torch.maximum(s / 4, a / 4)
    # Plus float rounding of the scale arithmetic itself.
    return (b * (1 + 2.0**-20) + a * 2.0**-22).reshape(-1)[: x.numel()]


def _check(fmt: str, block: int) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"quantization format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if block < 2 or block % 2:
        raise ValueError(f"quantization block {block}: use an even number >= 2")


def _padded(x: torch.Tensor, block: int) -> tuple[torch.Tensor, int]:
    flat = x.detach().reshape(-1).float()
    nb = _blocks(flat.numel(), block)
    if nb * block != flat.numel():
        flat = torch.cat([flat, flat.new_zeros(nb * block - flat.numel())])
    return flat.view(nb, block), nb


def _scales(xb: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, 1/scale) per block; an all-zero block has scale 0 and codes 0."""
    amax = xb.abs().amax(dim=1, keepdim=True)
    if not bool(torch.isfinite(amax).all()):
        raise ValueError("cannot quantize a tensor with inf or NaN values (no finite scale)")
    scale = amax / _QMAX[fmt]
    inv = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
    return scale, inv


def _pack(fmt: str, codes: torch.Tensor, scale: torch.Tensor, numel: int, block: int) -> Quantized:
    payload = torch.cat([codes.reshape(-1), scale.reshape(-1).contiguous().view(torch.uint8)])
    return Quantized(fmt=fmt, block=block, numel=numel, payload=payload)


def _fp4_codes_reference(y: torch.Tensor) -> torch.Tensor:
    """Nearest e2m1 magnitude by comparing |y| with every grid point; ties to the even code."""
    dist = (y.abs().unsqueeze(-1) - _FP4_GRID).abs()
    best = dist.min(dim=-1, keepdim=True).values
    tied = dist == best
    # Among tied codes prefer an even one (mantissa bit 0), else the lowest.
    idx = torch.arange(8)
    rank = torch.where(tied, (idx % 2) * 8 + idx, torch.full_like(idx, 99))
    mag = rank.argmin(dim=-1).to(torch.uint8)
    return mag | (torch.signbit(y).to(torch.uint8) << 3)


def _fp8_codes_reference(y: torch.Tensor) -> torch.Tensor:
    """Nearest e4m3 value among all 127 non-negative finite codes; ties to the even code."""
    grid = torch.arange(127, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    dist = (y.abs().unsqueeze(-1) - grid).abs()
    tied = dist == dist.min(dim=-1, keepdim=True).values
    idx = torch.arange(127)
    mag = torch.where(tied, (idx % 2) * 256 + idx, torch.full_like(idx, 999)).argmin(dim=-1)
    return mag.to(torch.uint8) | (torch.signbit(y).to(torch.uint8) << 7)


def _fp4_codes(y: torch.Tensor) -> torch.Tensor:
    a = y.abs().contiguous()
    mag = torch.bucketize(a, _FP4_MIDS)  # a value on a midpoint gets the lower code here
    # ... which is right when that code is even; an odd one loses the tie to the next code.
    tie = (mag % 2 == 1) & (a == _FP4_MIDS[mag.clamp(max=6)])
    return (mag + tie).to(torch.uint8) | (torch.signbit(y).to(torch.uint8) << 3)


def _nibbles(codes: torch.Tensor) -> torch.Tensor:
    pairs = codes.reshape(-1, 2)
    return pairs[:, 0] | (pairs[:, 1] << 4)


def _encode(x: torch.Tensor, fmt: str, block: int, *, reference: bool) -> Quantized:
    _check(fmt, block)
    xb, _ = _padded(x, block)
    scale, inv = _scales(xb, fmt)
    y = xb * inv
    if fmt == "int8":
        if reference:
            q = torch.tensor([max(-127, min(127, round(float(v)))) for v in y.reshape(-1)],
                             dtype=torch.int8) if y.numel() else torch.zeros(0, dtype=torch.int8)
        else:
            q = torch.round(y).clamp_(-127, 127).to(torch.int8)
        codes = q.reshape(-1).view(torch.uint8)
    elif fmt == "fp8":
        y = y.clamp(-448.0, 448.0)
        codes = (_fp8_codes_reference(y) if reference
                 else y.to(torch.float8_e4m3fn).view(torch.uint8)).reshape(-1)
    else:
        codes = _nibbles((_fp4_codes_reference if reference else _fp4_codes)(y).reshape(-1))
    return _pack(fmt, codes, scale, x.numel(), block)


def quantize(x: torch.Tensor, *, fmt: str, block: int = 128) -> Quantized:
    """The wire form of `x` (any shape, read as flat fp32)."""
    return _encode(x, fmt, block, reference=False)


def quantize_reference(x: torch.Tensor, *, fmt: str, block: int = 128) -> Quantized:
    """The same bytes as `quantize`, computed the plain way (tests compare the two)."""
    return _encode(x, fmt, block, reference=True)


def dequantize(q: Quantized) -> torch.Tensor:
    """Flat fp32 values (length q.numel) from the wire form."""
    nb = _blocks(q.numel, q.block)
    n_codes = _code_bytes(q.fmt, nb, q.block)
    codes, scale = q.payload[:n_codes], q.payload[n_codes:].view(torch.float32).view(nb, 1)
    if q.fmt == "int8":
        vals = codes.view(torch.int8).float()
    elif q.fmt == "fp8":
        vals = codes.view(torch.float8_e4m3fn).float()
    else:
        vals = _FP4_PAIRS[codes.long()].reshape(-1)
    return (vals.view(nb, q.block) * scale).reshape(-1)[: q.numel]
