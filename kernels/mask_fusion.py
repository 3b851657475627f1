"""mask_fusion in Triton: forward, in place, backward.

    out[b,n,c] = (base[b,n,c] or 1) * prod_j sum_i masks[j][b,i,n] * tables[j][tb,i,c]

(exposure_slot/ops/mask_fusion.py has the op's definition and its reference twin;
kernels/modulation.py the factor packing and the per-tile modulation maths.)

Layout: the factors packed into masks [B,S,N] and tables [B,S,C]; base, out and grad
[B,N,C] contiguous (rows of C values per token).

Launch: forward, one program per tile of BLOCK_N tokens of one batch item (grid
[cdiv(N, BLOCK_N), B]); the in-place op is the forward writing into ``base`` (each
element is read before the same thread overwrites it). Backward, one program per
chunk of TILES tiles, which writes the chunk's grad_table partial [S, C]; the host
adds the partials in chunk order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import config
from .modulation import (accumulator, accumulator_torch, channel_block, check_limits,
                         launch_kernel, modulation, modulation_backward, pack_factors,
                         reduce_partials, slot_block, split_mask_grads, split_table_grads)


# stages_code is 0 (all factors in one stage); a runtime argument like the
# slot-attention kernel's, so that both call the same device functions.
@triton.jit(do_not_specialize=["J", "slots_code", "stages_code"])
def mask_fusion_kernel(masks_ptr, tables_ptr, base_ptr, out_ptr, N, C, S, J, slots_code,
                       stages_code,
                       HAS_BASE: tl.constexpr, ACC: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_C: tl.constexpr):
    b = tl.program_id(1)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_c = tl.arange(0, BLOCK_C)
    n_ok = offs_n < N
    c_ok = offs_c < C
    batch = b.to(tl.int64) * N * C  # then int32 offsets within the item: fewer registers
    base_ptr += batch
    out_ptr += batch
    ptrs = offs_n[:, None] * C + offs_c[None, :]
    ok = n_ok[:, None] & c_ok[None, :]
    if HAS_BASE:
        mod = tl.load(base_ptr + ptrs, mask=ok, other=0.0).to(ACC)
    else:
        mod = tl.full([BLOCK_N, BLOCK_C], 1.0, ACC)
    mod = modulation(mod, 0, masks_ptr, tables_ptr, b, offs_n, n_ok, offs_c, c_ok, S, N, C,
                     J, slots_code.to(tl.int64), stages_code.to(tl.int64), ACC, BLOCK_N, BLOCK_C)
    tl.store(out_ptr + ptrs, mod.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit(do_not_specialize=["J", "slots_code", "stages_code", "TILES"])
def mask_fusion_backward_kernel(grad_ptr, masks_ptr, tables_ptr, base_ptr, grad_masks_ptr,
                                grad_base_ptr, grad_tables_partial_ptr, N, C, S, J, slots_code,
                                stages_code,
                                TILES, HAS_BASE: tl.constexpr, ACC: tl.constexpr,
                                SLOTS: tl.constexpr, BLOCK_N: tl.constexpr,
                                BLOCK_C: tl.constexpr):
    chunk = tl.program_id(0)
    b = tl.program_id(1)
    offs_c = tl.arange(0, BLOCK_C)
    offs_s = tl.arange(0, SLOTS)
    c_ok = offs_c < C
    slots_code = slots_code.to(tl.int64)
    stages_code = stages_code.to(tl.int64)
    batch = b.to(tl.int64) * N * C
    grad_ptr += batch
    base_ptr += batch
    grad_base_ptr += batch
    g_table = tl.zeros([SLOTS, BLOCK_C], ACC)
    for tile in range(TILES):
        offs_n = (chunk * TILES + tile) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        ptrs = offs_n[:, None] * C + offs_c[None, :]
        ok = n_ok[:, None] & c_ok[None, :]
        gm = tl.load(grad_ptr + ptrs, mask=ok, other=0.0).to(ACC)
        if HAS_BASE:
            base = tl.load(base_ptr + ptrs, mask=ok, other=0.0).to(ACC)
        else:
            base = 1.0
        g_base, g_table = modulation_backward(
            gm, base, 0, masks_ptr, tables_ptr, grad_masks_ptr, g_table, b, offs_n, n_ok,
            offs_c, c_ok, S, N, C, J, slots_code, stages_code, ACC, BLOCK_N, BLOCK_C)
        if HAS_BASE:
            tl.store(grad_base_ptr + ptrs, g_base.to(grad_base_ptr.dtype.element_ty), mask=ok)
    chunks = tl.num_programs(0)
    tl.store(grad_tables_partial_ptr + ((b * chunks + chunk) * SLOTS + offs_s[:, None]) * BLOCK_C
             + offs_c[None, :], g_table)


# ---------------------------------------------------------------- host side


def _prepare(op, masks, tables, base):
    batch, tokens, channels = masks[0].shape[0], masks[0].shape[2], tables[0].shape[2]
    slots = [m.shape[1] for m in masks]
    check_limits(op, tokens, channels, slots)
    packed_masks, packed_tables, code, slots = pack_factors(masks, tables, batch)
    return batch, tokens, channels, packed_masks, packed_tables, code, slots


def forward(masks, tables, base, out, launch=launch_kernel) -> None:
    """Writes mask_fusion(masks, tables, base) into ``out`` (contiguous; may be ``base``)."""
    batch, tokens, channels, pm, pt, code, slots = _prepare("mask_fusion", masks, tables, base)
    block_c = channel_block(channels)
    cfg = config.launch("mask_fusion", block_c)
    base_c = None if base is None else base.contiguous()
    grid = (triton.cdiv(tokens, cfg.block_n), batch)
    launch(mask_fusion_kernel, grid,
           (pm, pt, out if base_c is None else base_c, out, tokens, channels, sum(slots),
            len(slots), code, 0),
           dict(HAS_BASE=base is not None, ACC=accumulator(out.dtype),
                BLOCK_N=cfg.block_n, BLOCK_C=block_c),
           cfg.num_warps)


def backward(grad, masks, tables, base, launch=launch_kernel):
    """(grad_masks, grad_tables, grad_base or None) of mask_fusion."""
    batch, tokens, channels, pm, pt, code, slots = _prepare(
        "mask_fusion_backward", masks, tables, base)
    dtype = grad.dtype
    block_c = channel_block(channels)
    block_s = slot_block(sum(slots))
    cfg = config.launch("mask_fusion_backward", block_c)
    tiles = config.tiles_per_chunk(tokens, cfg.block_n)
    chunks = triton.cdiv(tokens, cfg.block_n * tiles)
    grad_c = grad.contiguous()
    base_c = None if base is None else base.contiguous()
    grad_masks = torch.empty_like(pm)
    grad_base = None if base is None else torch.empty_like(base_c)
    partials = torch.empty((batch, chunks, block_s, block_c), device=grad.device,
                           dtype=accumulator_torch(dtype))
    launch(mask_fusion_backward_kernel, (chunks, batch),
           (grad_c, pm, pt, grad_c if base_c is None else base_c, grad_masks,
            grad_c if grad_base is None else grad_base, partials, tokens, channels, sum(slots),
            len(slots), code, 0, tiles),
           dict(HAS_BASE=base is not None, ACC=accumulator(dtype), SLOTS=block_s,
                BLOCK_N=cfg.block_n, BLOCK_C=block_c),
           cfg.num_warps)
    grad_packed = reduce_partials(partials)[:, :sum(slots), :channels]
    return (split_mask_grads(grad_masks, slots),
            split_table_grads(grad_packed, tables, slots, dtype), grad_base)
