"""Communication quantizers (phalanx/kernels/quant.py): round-trip error per format, the fast
path against the plain reference, ties, zeros, sizes."""

import pytest
import torch

from phalanx.kernels.quant import (
    FORMATS,
    bits_per_value,
    dequantize,
    error_bound,
    payload_bytes,
    quantize,
    quantize_reference,
)

torch.set_num_threads(1)


def _values(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # Heavy-tailed magnitudes across blocks, as pseudo-gradients have, plus exact zeros.
    x = torch.randn(n, generator=g) * torch.rand(n, generator=g) ** 6 * 10.0 ** torch.randint(
        -6, 2, (n,), generator=g)
    x[::97] = 0.0
    return x


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("block", [32, 128])
def test_round_trip_within_the_format_bound(fmt, block):
    x = _values(5000, seed=block)  # 5000 is not a multiple of the block: padding is exercised
    q = quantize(x, fmt=fmt, block=block)
    back = dequantize(q)
    assert back.shape == (5000,) and back.dtype == torch.float32
    err = (back - x).abs()
    bound = error_bound(x, fmt=fmt, block=block)
    assert bool((err <= bound).all()), float((err / bound).max())
    # The bound is tight: the worst value uses most of it (a loose bound would hide a bug).
    assert float((err / bound).max()) > 0.9
    # Relative to each block's largest value, the formats order as their precision.
    amax = torch.cat([x, x.new_zeros(-5000 % block)]).view(-1, block).abs().amax(1)
    worst = (torch.cat([err, err.new_zeros(-5000 % block)]).view(-1, block).amax(1)
             / amax.clamp_min(1e-30)).max()
    assert worst <= {"int8": 1 / 254, "fp8": 1 / 16, "fp4": 1 / 6}[fmt] * 1.0001


@pytest.mark.parametrize("fmt", FORMATS)
def test_fast_path_equals_reference_bit_for_bit(fmt):
    x = _values(3000, seed=7)
    assert torch.equal(quantize(x, fmt=fmt, block=64).payload,
                       quantize_reference(x, fmt=fmt, block=64).payload)


def test_fp4_ties_round_to_the_even_code():
    # Block absmax 6 makes the scale exactly 1: every midpoint of the e2m1 grid is a tie.
    mids = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]
    x = torch.tensor([6.0, *mids, *[-m for m in mids], 0.0])
    expected = torch.tensor([6.0, 0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0,
                             -0.0, -1.0, -1.0, -2.0, -2.0, -4.0, -4.0, 0.0])
    for q in (quantize(x, fmt="fp4", block=16), quantize_reference(x, fmt="fp4", block=16)):
        assert torch.equal(dequantize(q), expected)


@pytest.mark.parametrize("fmt", FORMATS)
def test_zero_blocks_and_exact_values(fmt):
    x = torch.zeros(256)
    x[128:] = torch.linspace(-1, 1, 128)
    back = dequantize(quantize(x, fmt=fmt, block=128))
    assert torch.equal(back[:128], torch.zeros(128))  # an all-zero block: scale 0, no NaN
    assert back[128] == -1.0 and back[-1] == 1.0  # the block maximum is a code exactly


@pytest.mark.parametrize("fmt", FORMATS)
def test_payload_size_is_codes_plus_scales(fmt):
    q = quantize(torch.randn(1000), fmt=fmt, block=128)
    blocks = 8  # 1000 values padded to 1024
    code_bytes = {"int8": 1024, "fp8": 1024, "fp4": 512}[fmt]
    assert q.nbytes == q.payload.numel() == code_bytes + 4 * blocks
    assert payload_bytes(1000, fmt=fmt, block=128) == q.nbytes
    assert q.payload.dtype == torch.uint8
    assert bits_per_value(fmt, 128) == {"int8": 8.25, "fp8": 8.25, "fp4": 4.25}[fmt]


def test_non_finite_input_is_refused():
    with pytest.raises(ValueError, match="inf or NaN"):
        quantize(torch.tensor([1.0, float("nan")]), fmt="int8", block=2)
    with pytest.raises(ValueError, match="format"):
        quantize(torch.ones(4), fmt="int4", block=2)
