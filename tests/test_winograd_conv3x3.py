"""The Winograd convolution op (CPU): against its PyTorch twin (pad, pixel
(un)shuffles, F.conv2d, bias, residual, GELU), its torch.library registration,
determinism, errors, and the inference path that uses it.

Tolerances, relative to the largest magnitude of the expected output (sums of
products of mixed signs):
- float64 kernel vs float64 twin: 1e-12 (the transforms are exact up to rounding;
  observed ~1e-15);
- float32 kernel vs float64 twin on the same values: 2e-5. F(4x4, 3x3)'s transforms
  have entries up to 8 and their filter transform 1/6 and 1/24, so float32 rounds a
  few times worse than a direct convolution (observed up to 5e-6, against ~5e-7 for
  F.conv2d in float32), plus the float32 GELU's erf (absolute error below 3e-7).
Repeated runs, and runs on 1 or 2 threads, must agree bit for bit.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import requires_kernels
from exposure_slot.ops.winograd_conv3x3 import (permute_phases, winograd_conv3x3_reference,
                                                winograd_filter)

pytestmark = requires_kernels
TOLERANCES = {torch.float64: 1e-12, torch.float32: 2e-5}
LANES = {torch.float64: 8, torch.float32: 16}


def make_case(dtype, batch, x_channels, height, width, out_phase_channels, unshuffle, shuffle,
              bias, residual, seed):
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)
    in_channels = x_channels * unshuffle ** 2
    out_channels = out_phase_channels * shuffle ** 2
    x = rand(batch, x_channels, height * unshuffle, width * unshuffle)
    weight = rand(out_channels, in_channels, 3, 3) / (9 * in_channels) ** 0.5
    b = rand(out_channels) if bias else None
    res = rand(batch, out_phase_channels, height * shuffle, width * shuffle) if residual else None
    return x, weight, b, res


def run_op(x, weight, bias, residual, reflect, unshuffle, shuffle, gelu, dtype):
    """The op on ``dtype`` copies (channels-last), through the in-place variant when
    there is a residual."""
    cast = lambda t: None if t is None else t.to(dtype)
    args = (x.to(dtype), winograd_filter(weight, dtype), cast(bias), reflect, unshuffle,
            shuffle, gelu)
    if residual is None:
        return torch.ops.exposure_slot.winograd_conv3x3(*args)
    out = residual.to(dtype).contiguous(memory_format=torch.channels_last)
    torch.ops.exposure_slot.winograd_conv3x3_(out, *args)
    return out


def assert_matches(dtype, x, weight, bias, residual, reflect, unshuffle, shuffle, gelu):
    expected = winograd_conv3x3_reference(x, weight, bias, residual, reflect, unshuffle,
                                          shuffle, gelu)
    actual = run_op(x, weight, bias, residual, reflect, unshuffle, shuffle, gelu, dtype)
    assert actual.dtype == dtype and actual.shape == expected.shape
    assert actual.is_contiguous(memory_format=torch.channels_last)
    scale = expected.abs().max().item()
    assert scale > 0.1  # the case can show a wrong result
    err = (actual.double() - expected).abs().max().item()
    assert err <= TOLERANCES[dtype] * scale, f"max error {err:.3g} at scale {scale:.3g}"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("unshuffle, shuffle", [(1, 1), (2, 1), (1, 2), (2, 2)])
@pytest.mark.parametrize("reflect", [False, True], ids=["zeros", "reflect"])
@pytest.mark.parametrize("gelu, bias, residual", [(False, False, False), (True, True, False),
                                                  (True, False, True), (False, True, True)],
                         ids=["plain", "bias-gelu", "residual-gelu", "bias-residual"])
def test_matches_reference(dtype, unshuffle, shuffle, reflect, gelu, bias, residual):
    lanes = LANES[dtype]
    # 13 x 10: ragged tiles on both sides; 3 batch items share one tile list.
    case = make_case(dtype, 3, lanes, 13, 10, 2 * lanes, unshuffle, shuffle, bias, residual,
                     seed=unshuffle + 2 * shuffle + 4 * reflect + 8 * gelu + 16 * residual)
    assert_matches(dtype, *case[:2], case[2], case[3], reflect, unshuffle, shuffle, gelu)


@settings(max_examples=25, deadline=None)
@given(dtype=st.sampled_from([torch.float64, torch.float32]), batch=st.sampled_from([1, 3]),
       height=st.integers(1, 23), width=st.integers(1, 23), x_vectors=st.integers(1, 3),
       out_vectors=st.integers(1, 5), unshuffle=st.sampled_from([1, 2]),
       shuffle=st.sampled_from([1, 2]), reflect=st.booleans(), gelu=st.booleans(),
       bias=st.booleans(), residual=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_matches_reference_on_random_shapes(dtype, batch, height, width, x_vectors, out_vectors,
                                            unshuffle, shuffle, reflect, gelu, bias, residual,
                                            seed):
    if reflect:
        height, width = max(height, 2), max(width, 2)
    lanes = LANES[dtype]
    x, weight, b, res = make_case(dtype, batch, x_vectors * lanes, height, width,
                                  out_vectors * lanes, unshuffle, shuffle, bias, residual, seed)
    expected = winograd_conv3x3_reference(x, weight, b, res, reflect, unshuffle, shuffle, gelu)
    actual = run_op(x, weight, b, res, reflect, unshuffle, shuffle, gelu, dtype)
    err = (actual.double() - expected).abs().max().item()
    assert err <= TOLERANCES[dtype] * max(expected.abs().max().item(), 1e-3)


def test_large_map_and_input_layouts():
    """A 64-channel map of 70 x 90 (several blocks per thread), given NCHW and as a
    non-contiguous slice: the op takes any strides."""
    x, weight, bias, _ = make_case(torch.float32, 1, 64, 70, 90, 64, 1, 1, True, False, seed=5)
    expected = winograd_conv3x3_reference(x, weight, bias, None, False, 1, 1, True)
    wide = torch.cat([x, x], dim=3).float()[..., :90]  # non-contiguous
    for given_x in (x.float(), wide, x.float().contiguous(memory_format=torch.channels_last)):
        actual = torch.ops.exposure_slot.winograd_conv3x3(
            given_x, winograd_filter(weight, torch.float32), bias.float(), False, 1, 1, True)
        assert (actual.double() - expected).abs().max() <= 2e-5 * expected.abs().max()


def test_float32_error_is_a_few_times_the_direct_convolutions():
    """The rounding the tolerance above allows for, measured: Winograd F(4x4, 3x3)
    against F.conv2d, both float32, on the same 32-channel map."""
    x, weight, bias, _ = make_case(torch.float32, 1, 32, 64, 64, 32, 1, 1, True, False, seed=6)
    exact = F.conv2d(x, weight, bias, padding=1)
    direct = F.conv2d(x.float(), weight.float(), bias.float(), padding=1)
    wino = run_op(x, weight, bias, None, False, 1, 1, False, torch.float32)
    direct_err = (direct.double() - exact).abs().max().item()
    wino_err = (wino.double() - exact).abs().max().item()
    assert 0 < wino_err <= 20 * direct_err
    assert wino_err <= 2e-5 * exact.abs().max().item()


def test_permute_phases_matches_pixel_shuffle_orders():
    """A weight permuted by permute_phases, used on the op's phase-major channels,
    computes PyTorch's conv(pixel_unshuffle(x)) and pixel_shuffle(conv(x))."""
    x, weight, _, _ = make_case(torch.float64, 2, 16, 6, 8, 16, 2, 1, False, False, seed=7)
    torch_order = F.conv2d(F.pixel_unshuffle(x, 2), weight, padding=1)
    ours = winograd_conv3x3_reference(x, permute_phases(weight, 1), None, None, False, 2, 1)
    torch.testing.assert_close(ours, torch_order, rtol=0, atol=1e-12)
    x, weight, _, _ = make_case(torch.float64, 2, 16, 6, 8, 16, 1, 2, False, False, seed=8)
    torch_order = F.pixel_shuffle(F.conv2d(x, weight, padding=1), 2)
    ours = winograd_conv3x3_reference(x, permute_phases(weight, 0), None, None, False, 1, 2)
    torch.testing.assert_close(ours, torch_order, rtol=0, atol=1e-12)


def test_bitwise_repeatable_and_thread_count_independent(restore_threads):
    x, weight, bias, res = make_case(torch.float32, 2, 32, 37, 41, 32, 1, 1, True, True, seed=9)
    outs = []
    for threads in (1, 2, 2):
        torch.set_num_threads(threads)
        outs.append(run_op(x, weight, bias, res, True, 1, 1, True, torch.float32))
    assert all(torch.equal(outs[0], o) for o in outs[1:])


@pytest.mark.parametrize("residual", [False, True], ids=["out-of-place", "in-place"])
def test_opcheck(residual):
    x, weight, bias, res = make_case(torch.float32, 2, 16, 9, 6, 16, 2, 2, True, residual,
                                     seed=10)
    args = (x.float(), winograd_filter(weight, torch.float32), bias.float(), True, 2, 2, True)
    if residual:
        out = res.float().contiguous(memory_format=torch.channels_last)
        torch.library.opcheck(torch.ops.exposure_slot.winograd_conv3x3_, (out, *args))
    else:
        torch.library.opcheck(torch.ops.exposure_slot.winograd_conv3x3, args)


def test_errors_name_the_problem():
    x = torch.randn(1, 16, 8, 8)
    u = winograd_filter(torch.randn(32, 16, 3, 3))
    op = torch.ops.exposure_slot.winograd_conv3x3
    with pytest.raises(RuntimeError, match="float32 or float64"):
        op(x.bfloat16(), u.bfloat16(), None, False, 1, 1, False)
    with pytest.raises(RuntimeError, match="share one dtype"):
        op(x.double(), u, None, False, 1, 1, False)
    with pytest.raises(RuntimeError, match="multiple of 16"):
        op(torch.randn(1, 8, 8, 8), winograd_filter(torch.randn(32, 8, 3, 3)), None, False, 1, 1,
           False)
    with pytest.raises(RuntimeError, match=r"filter must be \[36, Ci, Co\] with Ci = 64"):
        op(x, u, None, False, 2, 1, False)
    with pytest.raises(RuntimeError, match="Co / shuffle"):
        op(x, u, None, False, 1, 2, False)
    with pytest.raises(RuntimeError, match="even"):
        op(torch.randn(1, 16, 7, 8), winograd_filter(torch.randn(32, 64, 3, 3)), None, False, 2,
           1, False)
    with pytest.raises(RuntimeError, match="reflect padding needs a map of at least 2 x 2"):
        op(torch.randn(1, 16, 1, 5), u, None, True, 1, 1, False)
    with pytest.raises(RuntimeError, match=r"bias must be \[Co\]"):
        op(x, u, torch.randn(16), False, 1, 1, False)
    with pytest.raises(RuntimeError, match="channels-last"):
        torch.ops.exposure_slot.winograd_conv3x3_(torch.randn(1, 32, 8, 8), x, u, None, False, 1,
                                                  1, False)
    with pytest.raises(ValueError, match=r"weight must be \[Co, Ci, 3, 3\]"):
        winograd_filter(torch.randn(4, 4, 1, 1))
