"""Modulations in Triton: products of mask-weighted fusions ("mixtures"), shared by
``mask_fusion.py`` and ``slot_attention_pass.py`` (the Triton twin of
csrc/cpu/mixtures.h).

Formula. A factor j is a pair (masks_j [B,K_j,N], table_j [B or 1,K_j,C]); its
mixture at token (b, n) is the C-vector

    f_j[c] = sum_i masks_j[b,i,n] * table_j[tb,i,c]          (tb = b, or 0 if shared)

and a stage's modulation is m = base * prod_{j in stage} f_j (base optional). For an
upstream gradient gm of m:

    g_base              = gm * prod_j f_j
    gf_j                = gm * base * prod_{l<j} f_l * prod_{l>j} f_l   (no division:
                                                                         a factor may be 0)
    grad_masks_j[b,i,n] = sum_c gf_j[c] * table_j[tb,i,c]
    grad_table_j[tb,i,c] = sum over tokens of masks_j[b,i,n] * gf_j[c]

Packed layout. A kernel cannot take a list of tensors, so the host packs the factors
of one call into two buffers (``pack_factors``):

    masks  [B, S, N]  the factors' masks one after another along the slot axis
    tables [B, S, C]  likewise; a shared [1,K_j,C] table is repeated over the batch

(S = sum_j K_j <= 64, small next to the [B,N,C] tensors), and describes the factors
in two integers passed as plain kernel arguments (no device copy, nothing for a CUDA
graph to miss): ``slots_code`` holds K_j - 1 and ``stages_code`` the stage of
factor j, each in the 4 bits at 4*j. The kernels work on token tiles [BLOCK_N,
BLOCK_C]; a mixture is a sum of K_j outer products (a slot's [BLOCK_N] mask weights
times its [BLOCK_C] table row), and the grad_table accumulator is one [SLOTS,
BLOCK_C] tile over the packed slots (SLOTS = S rounded up to a power of two).

Sums over tokens (grad_table here, attn_sum / attn_v and the norm and query
gradients in slot_attention_pass) are deterministic: each program owns a chunk of
consecutive tokens of one batch item, accumulates in registers, writes one partial,
and the host adds the partials in chunk order (``reduce_partials``). No atomics.

Accumulation: float32 for float32/bfloat16/float16 inputs, float64 for float64.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from . import config

MAX_FACTORS = 15  # 4 bits per factor in a 64-bit code
MAX_FACTOR_SLOTS = 16
MAX_SLOTS = 64  # S, all factors of one call together
MAX_CHANNELS = 256


def check_device(op: str, t: torch.Tensor) -> None:
    """Raise ValueError for CPU tensors unless Triton's interpreter is on."""
    if t.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"exposure_slot_triton::{op}: the Triton kernels compute on CUDA "
                         "tensors, or on CPU tensors when TRITON_INTERPRET=1 was set before "
                         "they were imported")


def launch_kernel(kernel, grid, args, constexprs, num_warps) -> None:
    """How the launchers start a kernel; tests/test_triton_kernels.py passes a recorder
    instead (with meta tensors), to compile the very same launches for sm_80 and sm_90."""
    kernel[grid](*args, **constexprs, num_warps=num_warps, maxnreg=config.MAX_REGISTERS)


def accumulator(dtype: torch.dtype):
    """The Triton dtype the kernels accumulate in for inputs of ``dtype``."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def accumulator_torch(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def slot_block(slots: int) -> int:
    """SLOTS: the packed slot axis of a grad_table accumulator, a power of two."""
    return max(1, triton.next_power_of_2(slots))


def channel_block(channels: int) -> int:
    return max(16, triton.next_power_of_2(channels))


def check_limits(op: str, tokens: int, channels: int, factor_slots: list[int]) -> None:
    """Raise ValueError for shapes beyond what the Triton kernels implement."""
    if tokens * channels >= 2**31:
        raise ValueError(f"{op}: the Triton kernels index one batch item's [N, C] tokens with "
                         f"32-bit offsets and implement N * C < 2^31, got N = {tokens}, "
                         f"C = {channels}")
    if channels > MAX_CHANNELS:
        raise ValueError(f"{op}: the Triton kernels hold a token's C channels in registers "
                         f"and implement C <= {MAX_CHANNELS}, got C = {channels}")
    if len(factor_slots) > MAX_FACTORS:
        raise ValueError(f"{op}: the Triton kernels take at most {MAX_FACTORS} factors per "
                         f"call, got {len(factor_slots)}")
    if any(k > MAX_FACTOR_SLOTS for k in factor_slots):
        raise ValueError(f"{op}: the Triton kernels implement factors of at most "
                         f"{MAX_FACTOR_SLOTS} slots, got slot counts {factor_slots}")
    if sum(factor_slots) > MAX_SLOTS:
        raise ValueError(f"{op}: the Triton kernels take at most {MAX_SLOTS} slots over all "
                         f"factors of a call, got {sum(factor_slots)} ({factor_slots})")


def pack_factors(masks, tables, batch: int):
    """(masks [B,S,N], tables [B,S,C], slots_code, slot counts) of a non-empty factor
    list."""
    slots = [m.shape[1] for m in masks]
    packed_masks = torch.cat(list(masks), dim=1).contiguous()
    packed_tables = torch.cat([t.expand(batch, -1, -1) for t in tables], dim=1).contiguous()
    return packed_masks, packed_tables, encode([k - 1 for k in slots]), slots


def encode(values) -> int:
    """Four bits per entry, entry j at bit 4*j."""
    code = 0
    for j, value in enumerate(values):
        assert 0 <= value < 16
        code |= int(value) << (4 * j)
    return code


def reduce_partials(partials: torch.Tensor) -> torch.Tensor:
    """Stage two of every sum over tokens: partials [B, chunks, ...] added over the
    chunks in order (torch's reductions use no atomics: bitwise repeatable)."""
    return partials.sum(dim=1)


def split_table_grads(grad_packed: torch.Tensor, tables, slots, dtype):
    """Per-factor table gradients from the packed [B, S, C] one; a shared table's
    gradient is the sum over the batch."""
    out = []
    for t, piece in zip(tables, grad_packed.split(slots, dim=1)):
        if t.shape[0] == 1 and grad_packed.shape[0] != 1:
            piece = piece.sum(dim=0, keepdim=True)
        out.append(piece.to(dtype=dtype, memory_format=torch.contiguous_format, copy=True))
    return out


def split_mask_grads(grad_packed: torch.Tensor, slots):
    """Per-factor mask gradients (separate tensors: an op's outputs never alias)."""
    return [piece.clone(memory_format=torch.contiguous_format)
            for piece in grad_packed.split(slots, dim=1)]


# ---------------------------------------------------------------- device functions


@triton.jit
def factor_field(code, j):
    """Entry j (4 bits) of a code from ``encode``."""
    return ((code >> (4 * j)) & 15).to(tl.int32)


@triton.jit
def slot_row(ptr, b, i, S, C, offs_c, c_ok, ACC: tl.constexpr):
    """Row i of a [B, S, C] tensor at batch item b, as a [BLOCK_C] vector."""
    return tl.load(ptr + (b * S + i) * C + offs_c, mask=c_ok, other=0.0).to(ACC)


@triton.jit
def slot_weights(ptr, b, i, S, N, offs_n, n_ok, ACC: tl.constexpr):
    """Slot i of a [B, S, N] tensor at batch item b and the tile's tokens [BLOCK_N]."""
    return tl.load(ptr + (b * S + i).to(tl.int64) * N + offs_n, mask=n_ok, other=0.0).to(ACC)


@triton.jit
def mixture(masks_ptr, tables_ptr, b, offs_n, n_ok, offs_c, c_ok, slot0, k_j, S, N, C,
            ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    """The mixture of the factor in slots slot0 .. slot0+k_j at a token tile. One
    outer product per slot: a tl.dot over the slot axis would hold all of a thread's
    rows and columns of both operands in registers at once (FMA dots in float32)."""
    f = tl.zeros([BLOCK_N, BLOCK_C], ACC)
    for i in range(slot0, slot0 + k_j):
        w = slot_weights(masks_ptr, b, i, S, N, offs_n, n_ok, ACC)
        t = slot_row(tables_ptr, b, i, S, C, offs_c, c_ok, ACC)
        f += w[:, None] * t[None, :]
    return f


@triton.jit
def modulation(mod, stage, masks_ptr, tables_ptr, b, offs_n, n_ok, offs_c, c_ok, S, N, C,
               J, slots_code, stages_code, ACC: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_C: tl.constexpr):
    """mod * prod of the mixtures of the factors of ``stage``, at a token tile."""
    slot0 = tl.full([], 0, tl.int32)
    for j in range(J):
        k_j = factor_field(slots_code, j) + 1
        if factor_field(stages_code, j) == stage:
            mod = mod * mixture(masks_ptr, tables_ptr, b, offs_n, n_ok, offs_c, c_ok, slot0,
                                k_j, S, N, C, ACC, BLOCK_N, BLOCK_C)
        slot0 += k_j
    return mod


@triton.jit
def modulation_backward(gm, base, stage, masks_ptr, tables_ptr, grad_masks_ptr, g_table,
                        b, offs_n, n_ok, offs_c, c_ok, S, N, C, J, slots_code, stages_code,
                        ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    """Backward of ``modulation`` (times ``base``, a tile or 1.0) for the gradient ``gm``
    of the stage's modulation at a token tile: stores the factors' grad_masks
    entries (packed [B,S,N]), returns (gradient of base = gm * prod f_j, g_table +
    this tile's grad_table contribution; g_table is [SLOTS, BLOCK_C], row = packed slot)."""
    offs_s = tl.arange(0, g_table.shape[0])
    prefix = gm * base  # gm * base * prod_{l<j} f_l
    product = gm  # gm * prod_{l<j} f_l
    slot0 = tl.full([], 0, tl.int32)
    for j in range(J):
        k_j = factor_field(slots_code, j) + 1
        if factor_field(stages_code, j) == stage:
            f_j = mixture(masks_ptr, tables_ptr, b, offs_n, n_ok, offs_c, c_ok, slot0, k_j, S,
                          N, C, ACC, BLOCK_N, BLOCK_C)
            # prod_{l>j} f_l, recomputed: a loop cannot keep a list of earlier tiles.
            suffix = tl.full([BLOCK_N, BLOCK_C], 1.0, ACC)
            slot1 = slot0 + k_j
            for l in range(j + 1, J):
                k_l = factor_field(slots_code, l) + 1
                if factor_field(stages_code, l) == stage:
                    suffix = suffix * mixture(masks_ptr, tables_ptr, b, offs_n, n_ok, offs_c,
                                              c_ok, slot1, k_l, S, N, C, ACC, BLOCK_N, BLOCK_C)
                slot1 += k_l
            gf = tl.where(n_ok[:, None], prefix * suffix, 0.0)
            for i in range(slot0, slot0 + k_j):
                w = slot_weights(masks_ptr, b, i, S, N, offs_n, n_ok, ACC)
                t = slot_row(tables_ptr, b, i, S, C, offs_c, c_ok, ACC)
                g_w = tl.sum(gf * t[None, :], axis=1)
                tl.store(grad_masks_ptr + (b * S + i).to(tl.int64) * N + offs_n,
                         g_w.to(grad_masks_ptr.dtype.element_ty), mask=n_ok)
                g_t = tl.sum(w[:, None] * gf, axis=0)
                g_table += tl.where(offs_s[:, None] == i, g_t[None, :], 0.0)
            prefix = prefix * f_j
            product = product * f_j
        slot0 += k_j
    return product, g_table
