"""slot_attention_pass in Triton: forward and backward.

Formula (exposure_slot/ops/slot_attention_pass.py has the op's definition and its
reference twin; csrc/cpu/slot_attention_pass.cpp the same maths in C++). Per token,
through D stages d = 0 .. D-1:

    h_d = (x_{d-1} - mean) * rstd      x_{-1} = k_in (v_in for the v chain)
    y_d = h_d * weight_d + bias_d
    x_d = y_d * m_d                    m_d = base_d * prod_{factors of stage d} mixture
    k = x^k_{D-1}, v = x^v_{D-1}
    s = softmax over slots of q . k,   A = s + attn_eps
    attn[b,i,n] = A_i,  attn_sum[b,i] = sum_n A_i,  attn_v[b,i,:] = sum_n A_i v

Backward, for gradients g_attn, g_sum, g_v of the three outputs:

    gA_i = g_attn[i,n] + g_sum[i] + g_v[i] . v
    gl_i = s_i (gA_i - sum_j s_j gA_j);  gk = sum_i gl_i q_i;  g q_i += gl_i k
    gv   = sum_i A_i g_v[i]
    then stage d = D-1 .. 0:  g m_d = gk * y^k_d + gv * y^v_d  (-> modulation_backward)
      gy = gx * m_d;  g weight_d += gy h_d;  g bias_d += gy
      gh = gy * weight_d;  gx_{d-1} = rstd (gh - mean_c(gh) - h_d mean_c(gh h_d))

Nothing of size [B,N,C] is stored between stages: the forward recomputes the chain
per token tile; the backward recomputes it up to stage d for each d (D(D+1)/2 stage
evaluations, D <= 4), since a kernel cannot keep a list of per-stage tiles.

Layout: k_in, v_in, stage bases and their gradients [B,N,C] contiguous; norm
weights [D,C]; queries [B,K,C]; attn [B,K,N]; stats [B,N,D,4] (mean and 1/std of
the k row, then of the v row, per stage); factors packed as in modulation.py. A
program holds a tile of BLOCK_N tokens x BLOCK_C channels (C padded to a power of
two, padded channels held at zero through the chain) and the K <= 16 slots padded to
BLOCK_K = 16 (padded logits are -inf, padded A zero). Products over slots are
per-slot loops of row reductions and outer products, not tl.dot: float32 FMA dots
hold whole operand rows per thread and spilled (tests/test_triton_kernels.py).

Launch: grid [chunks, B]; a program walks TILES consecutive tiles (a chunk) of one
batch item, accumulates its sums over tokens in registers and writes one partial
per chunk (forward: attn_sum [K] and attn_v [K,C]; backward: the query gradient,
the four norm-parameter gradients [D,C] and the packed table gradient); the host
adds the partials in chunk order (deterministic, no atomics).

Stage bases: up to MAX_STAGES pointers, one per stage, with a bit mask of the
stages that have one (compile-time), since a kernel cannot take a tensor list.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..ops.mask_fusion import KERNEL_DTYPES
from ..ops.slot_attention_pass import check_args
from . import config
from .modulation import (accumulator, accumulator_torch, channel_block, check_device,
                         check_limits, encode, launch_kernel, modulation,
                         modulation_backward, pack_factors, reduce_partials, slot_block,
                         slot_row, split_mask_grads, split_table_grads)

MAX_STAGES = 4
MAX_QUERY_SLOTS = 16
BLOCK_K = 16


@triton.jit
def norm_stats(x, c_ok, C, eps):
    """Mean and 1/sqrt(var + eps) of each row of x (padded channels are zero)."""
    mean = tl.sum(x, axis=1) / C
    centred = tl.where(c_ok[None, :], x - mean[:, None], 0.0)
    var = tl.sum(centred * centred, axis=1) / C
    return mean, 1.0 / tl.sqrt(var + eps)


@triton.jit
def affine(x, mean, rstd, w_ptr, b_ptr, d: tl.constexpr, offs_c, c_ok, C, ACC: tl.constexpr):
    """(h, y) of a LayerNorm with the stage-d weight and bias rows."""
    w = tl.load(w_ptr + d * C + offs_c, mask=c_ok, other=0.0).to(ACC)
    bias = tl.load(b_ptr + d * C + offs_c, mask=c_ok, other=0.0).to(ACC)
    h = tl.where(c_ok[None, :], (x - mean[:, None]) * rstd[:, None], 0.0)
    return h, h * w[None, :] + bias[None, :]


@triton.jit
def pick(d: tl.constexpr, p0, p1, p2, p3):
    """The stage-d entry of four per-stage pointers."""
    return p0 if d == 0 else (p1 if d == 1 else (p2 if d == 2 else p3))


@triton.jit
def stage_modulation(d: tl.constexpr, base0, base1, base2, base3, masks_ptr, tables_ptr, b,
                     offs_n, n_ok, offs_c, c_ok, ptrs, ok, S, N, C, J, slots_code, stages_code,
                     BASES: tl.constexpr, ACC: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_C: tl.constexpr):
    """(base tile or 1.0, m_d) of stage d at a token tile."""
    if (BASES >> d) & 1:
        base = tl.load(pick(d, base0, base1, base2, base3) + ptrs, mask=ok, other=0.0).to(ACC)
        mod = base
    else:
        base = 1.0
        mod = tl.full([BLOCK_N, BLOCK_C], 1.0, ACC)
    mod = modulation(mod, d, masks_ptr, tables_ptr, b, offs_n, n_ok, offs_c, c_ok, S, N, C, J,
                     slots_code, stages_code, ACC, BLOCK_N, BLOCK_C)
    return base, mod


@triton.jit
def chain(xk, xv, STAGES: tl.constexpr, KNOWN: tl.constexpr, WRITE_STATS: tl.constexpr,
          stats_in_ptr, stats_out_ptr, nkw, nkb, nvw, nvb, base0, base1, base2, base3,
          masks_ptr, tables_ptr, b, offs_n, n_ok, offs_c, c_ok, ptrs, ok, S, N, C, J,
          slots_code, stages_code, norm_eps, D: tl.constexpr, BASES: tl.constexpr,
          ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    """x^k, x^v after stages 0 .. STAGES-1; the first KNOWN stages take their
    LayerNorm statistics from stats_in [B,N,KNOWN,4]; with WRITE_STATS every stage's
    are stored to stats_out [B,N,D,4]."""
    rows = (b * N + offs_n).to(tl.int64)
    for d in tl.static_range(STAGES):
        if d < KNOWN:
            known = stats_in_ptr + (rows * KNOWN + d) * 4
            mean_k = tl.load(known, mask=n_ok, other=0.0).to(ACC)
            rstd_k = tl.load(known + 1, mask=n_ok, other=1.0).to(ACC)
            mean_v = tl.load(known + 2, mask=n_ok, other=0.0).to(ACC)
            rstd_v = tl.load(known + 3, mask=n_ok, other=1.0).to(ACC)
        else:
            mean_k, rstd_k = norm_stats(xk, c_ok, C, norm_eps)
            mean_v, rstd_v = norm_stats(xv, c_ok, C, norm_eps)
        if WRITE_STATS:
            out = stats_out_ptr + (rows * D + d) * 4
            out_ty = stats_out_ptr.dtype.element_ty
            tl.store(out, mean_k.to(out_ty), mask=n_ok)
            tl.store(out + 1, rstd_k.to(out_ty), mask=n_ok)
            tl.store(out + 2, mean_v.to(out_ty), mask=n_ok)
            tl.store(out + 3, rstd_v.to(out_ty), mask=n_ok)
        _, yk = affine(xk, mean_k, rstd_k, nkw, nkb, d, offs_c, c_ok, C, ACC)
        _, yv = affine(xv, mean_v, rstd_v, nvw, nvb, d, offs_c, c_ok, C, ACC)
        _, mod = stage_modulation(d, base0, base1, base2, base3, masks_ptr, tables_ptr, b,
                                  offs_n, n_ok, offs_c, c_ok, ptrs, ok, S, N, C, J, slots_code,
                                  stages_code, BASES, ACC, BLOCK_N, BLOCK_C)
        xk = yk * mod
        xv = yv * mod
    return xk, xv


@triton.jit
def slot_column(x, offs_k, i):
    """Column i of a [BLOCK_N, BLOCK_K] tile, as a [BLOCK_N] vector."""
    return tl.sum(tl.where(offs_k[None, :] == i, x, 0.0), axis=1)


@triton.jit
def slot_add(acc, offs_k, i, row):
    """acc [BLOCK_K, BLOCK_C] with ``row`` [BLOCK_C] added to its row i."""
    return acc + tl.where(offs_k[:, None] == i, row[None, :], 0.0)


@triton.jit
def slot_softmax(k, q_ptr, b, K, C, offs_c, c_ok, offs_k, n_ok, attn_eps, ACC: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """(s, A) [BLOCK_N, BLOCK_K] for the tile's k [BLOCK_N, BLOCK_C] and the queries
    [B,K,C]; both zero at padded slots and invalid tokens. The logits are K row
    reductions rather than a tl.dot (see modulation.mixture on FMA dots)."""
    logits = tl.full([BLOCK_N, BLOCK_K], float("-inf"), ACC)
    for i in range(K):
        q_i = slot_row(q_ptr, b, i, K, C, offs_c, c_ok, ACC)
        logits = tl.where(offs_k[None, :] == i, tl.sum(k * q_i[None, :], axis=1)[:, None],
                          logits)
    top = tl.max(logits, axis=1)
    e = tl.exp(logits - top[:, None])
    s = e / tl.sum(e, axis=1)[:, None]
    valid = n_ok[:, None] & (offs_k < K)[None, :]
    return tl.where(valid, s, 0.0), tl.where(valid, s + attn_eps, 0.0)


@triton.jit(do_not_specialize=["J", "slots_code", "stages_code", "TILES"])
def slot_attention_pass_kernel(
        k_in_ptr, v_in_ptr, nkw, nkb, nvw, nvb, base0, base1, base2, base3, masks_ptr,
        tables_ptr, q_ptr, stats_in_ptr, attn_ptr, stats_out_ptr, sum_partial_ptr,
        v_partial_ptr, N, C, K, S, J, slots_code, stages_code, TILES, norm_eps, attn_eps,
        D: tl.constexpr, KNOWN: tl.constexpr, BASES: tl.constexpr, ACC: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
        BLOCK_K: tl.constexpr):
    chunk = tl.program_id(0)
    b = tl.program_id(1)
    offs_c = tl.arange(0, BLOCK_C)
    offs_k = tl.arange(0, BLOCK_K)
    c_ok = offs_c < C
    s_ok = offs_k < K
    slots_code = slots_code.to(tl.int64)
    stages_code = stages_code.to(tl.int64)
    batch = b.to(tl.int64) * N * C  # then int32 offsets within the item: fewer registers
    k_in_ptr += batch
    v_in_ptr += batch
    base0 += batch
    base1 += batch
    base2 += batch
    base3 += batch
    sum_acc = tl.zeros([BLOCK_K], ACC)
    v_acc = tl.zeros([BLOCK_K, BLOCK_C], ACC)
    for tile in range(TILES):
        offs_n = (chunk * TILES + tile) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        ptrs = offs_n[:, None] * C + offs_c[None, :]
        ok = n_ok[:, None] & c_ok[None, :]
        xk = tl.load(k_in_ptr + ptrs, mask=ok, other=0.0).to(ACC)
        xv = tl.load(v_in_ptr + ptrs, mask=ok, other=0.0).to(ACC)
        k, v = chain(xk, xv, D, KNOWN, True, stats_in_ptr, stats_out_ptr, nkw, nkb, nvw, nvb,
                     base0, base1, base2, base3, masks_ptr, tables_ptr, b, offs_n, n_ok,
                     offs_c, c_ok, ptrs, ok, S, N, C, J, slots_code, stages_code, norm_eps, D,
                     BASES, ACC, BLOCK_N, BLOCK_C)
        _, a = slot_softmax(k, q_ptr, b, K, C, offs_c, c_ok, offs_k, n_ok, attn_eps, ACC,
                            BLOCK_N, BLOCK_K)
        tl.store(attn_ptr + (b * K + offs_k[None, :]).to(tl.int64) * N + offs_n[:, None],
                 a.to(attn_ptr.dtype.element_ty), mask=n_ok[:, None] & s_ok[None, :])
        sum_acc += tl.sum(a, axis=0)
        for i in range(K):
            v_acc = slot_add(v_acc, offs_k, i,
                             tl.sum(slot_column(a, offs_k, i)[:, None] * v, axis=0))
    part = b * tl.num_programs(0) + chunk
    tl.store(sum_partial_ptr + part * BLOCK_K + offs_k, sum_acc)
    tl.store(v_partial_ptr + (part * BLOCK_K + offs_k[:, None]) * BLOCK_C + offs_c[None, :],
             v_acc)


@triton.jit(do_not_specialize=["J", "slots_code", "stages_code", "TILES"])
def slot_attention_pass_backward_kernel(
        g_attn_ptr, g_sum_ptr, g_v_ptr, k_in_ptr, v_in_ptr, nkw, nkb, nvw, nvb,
        base0, base1, base2, base3, masks_ptr, tables_ptr, q_ptr,
        grad_k_ptr, grad_v_ptr, gbase0, gbase1, gbase2, gbase3, grad_masks_ptr,
        q_partial_ptr, norm_partial_ptr, table_partial_ptr,
        N, C, K, S, J, slots_code, stages_code, TILES, norm_eps, attn_eps,
        D: tl.constexpr, BASES: tl.constexpr, ACC: tl.constexpr, SLOTS: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
        BLOCK_D: tl.constexpr):
    chunk = tl.program_id(0)
    b = tl.program_id(1)
    offs_c = tl.arange(0, BLOCK_C)
    offs_k = tl.arange(0, BLOCK_K)
    offs_d = tl.arange(0, BLOCK_D)
    c_ok = offs_c < C
    s_ok = offs_k < K
    slots_code = slots_code.to(tl.int64)
    stages_code = stages_code.to(tl.int64)
    g_sum = tl.load(g_sum_ptr + b * K + offs_k, mask=s_ok, other=0.0).to(ACC)
    batch = b.to(tl.int64) * N * C  # then int32 offsets within the item: fewer registers
    k_in_ptr += batch
    v_in_ptr += batch
    base0 += batch
    base1 += batch
    base2 += batch
    base3 += batch
    grad_k_ptr += batch
    grad_v_ptr += batch
    gbase0 += batch
    gbase1 += batch
    gbase2 += batch
    gbase3 += batch
    q_acc = tl.zeros([BLOCK_K, BLOCK_C], ACC)
    gwk_acc = tl.zeros([BLOCK_D, BLOCK_C], ACC)
    gbk_acc = tl.zeros([BLOCK_D, BLOCK_C], ACC)
    gwv_acc = tl.zeros([BLOCK_D, BLOCK_C], ACC)
    gbv_acc = tl.zeros([BLOCK_D, BLOCK_C], ACC)
    table_acc = tl.zeros([SLOTS, BLOCK_C], ACC)
    for tile in range(TILES):
        offs_n = (chunk * TILES + tile) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        ptrs = offs_n[:, None] * C + offs_c[None, :]
        ok = n_ok[:, None] & c_ok[None, :]
        k_in = tl.load(k_in_ptr + ptrs, mask=ok, other=0.0).to(ACC)
        v_in = tl.load(v_in_ptr + ptrs, mask=ok, other=0.0).to(ACC)
        k, v = chain(k_in, v_in, D, 0, False, k_in_ptr, k_in_ptr, nkw, nkb, nvw, nvb,
                     base0, base1, base2, base3, masks_ptr, tables_ptr, b, offs_n, n_ok,
                     offs_c, c_ok, ptrs, ok, S, N, C, J, slots_code, stages_code, norm_eps, D,
                     BASES, ACC, BLOCK_N, BLOCK_C)
        s, a = slot_softmax(k, q_ptr, b, K, C, offs_c, c_ok, offs_k, n_ok, attn_eps, ACC,
                            BLOCK_N, BLOCK_K)

        # Through the softmax.
        g_a = tl.load(g_attn_ptr + (b * K + offs_k[None, :]).to(tl.int64) * N + offs_n[:, None],
                      mask=n_ok[:, None] & s_ok[None, :], other=0.0).to(ACC)
        g_a += g_sum[None, :]
        for i in range(K):
            g_v_i = slot_row(g_v_ptr, b, i, K, C, offs_c, c_ok, ACC)
            g_a += tl.where(offs_k[None, :] == i, tl.sum(v * g_v_i[None, :], axis=1)[:, None],
                            0.0)
        weighted = tl.sum(s * g_a, axis=1)
        g_l = s * (g_a - weighted[:, None])
        gk = tl.zeros([BLOCK_N, BLOCK_C], ACC)
        gv = tl.zeros([BLOCK_N, BLOCK_C], ACC)
        for i in range(K):
            g_l_i = slot_column(g_l, offs_k, i)
            a_i = slot_column(a, offs_k, i)
            gk += g_l_i[:, None] * slot_row(q_ptr, b, i, K, C, offs_c, c_ok, ACC)[None, :]
            gv += a_i[:, None] * slot_row(g_v_ptr, b, i, K, C, offs_c, c_ok, ACC)[None, :]
            q_acc = slot_add(q_acc, offs_k, i, tl.sum(g_l_i[:, None] * k, axis=0))

        # Back through the chain, last stage first: gk, gv are the gradients of x_d.
        for d in tl.static_range(D - 1, -1, -1):
            xk, xv = chain(k_in, v_in, d, 0, False, k_in_ptr, k_in_ptr, nkw, nkb, nvw, nvb,
                           base0, base1, base2, base3, masks_ptr, tables_ptr, b, offs_n, n_ok,
                           offs_c, c_ok, ptrs, ok, S, N, C, J, slots_code, stages_code,
                           norm_eps, D, BASES, ACC, BLOCK_N, BLOCK_C)
            mean_k, rstd_k = norm_stats(xk, c_ok, C, norm_eps)
            mean_v, rstd_v = norm_stats(xv, c_ok, C, norm_eps)
            hk, yk = affine(xk, mean_k, rstd_k, nkw, nkb, d, offs_c, c_ok, C, ACC)
            hv, yv = affine(xv, mean_v, rstd_v, nvw, nvb, d, offs_c, c_ok, C, ACC)
            base, mod = stage_modulation(d, base0, base1, base2, base3, masks_ptr, tables_ptr,
                                         b, offs_n, n_ok, offs_c, c_ok, ptrs, ok, S, N, C, J,
                                         slots_code, stages_code, BASES, ACC, BLOCK_N, BLOCK_C)
            g_mod = gk * yk + gv * yv
            g_base, table_acc = modulation_backward(
                g_mod, base, d, masks_ptr, tables_ptr, grad_masks_ptr, table_acc, b, offs_n,
                n_ok, offs_c, c_ok, S, N, C, J, slots_code, stages_code, ACC, BLOCK_N, BLOCK_C)
            if (BASES >> d) & 1:
                gbase_ptr = pick(d, gbase0, gbase1, gbase2, gbase3)
                tl.store(gbase_ptr + ptrs, g_base.to(gbase_ptr.dtype.element_ty), mask=ok)
            gk = gk * mod
            gv = gv * mod
            row = offs_d[:, None] == d
            gwk_acc += tl.where(row, tl.sum(gk * hk, axis=0)[None, :], 0.0)
            gbk_acc += tl.where(row, tl.sum(gk, axis=0)[None, :], 0.0)
            gwv_acc += tl.where(row, tl.sum(gv * hv, axis=0)[None, :], 0.0)
            gbv_acc += tl.where(row, tl.sum(gv, axis=0)[None, :], 0.0)
            wk = tl.load(nkw + d * C + offs_c, mask=c_ok, other=0.0).to(ACC)
            wv = tl.load(nvw + d * C + offs_c, mask=c_ok, other=0.0).to(ACC)
            gk = norm_backward(gk * wk[None, :], hk, rstd_k, C)
            gv = norm_backward(gv * wv[None, :], hv, rstd_v, C)
        tl.store(grad_k_ptr + ptrs, gk.to(grad_k_ptr.dtype.element_ty), mask=ok)
        tl.store(grad_v_ptr + ptrs, gv.to(grad_v_ptr.dtype.element_ty), mask=ok)

    part = b * tl.num_programs(0) + chunk
    tl.store(q_partial_ptr + (part * BLOCK_K + offs_k[:, None]) * BLOCK_C + offs_c[None, :],
             q_acc)
    norm_rows = (part * 4 * BLOCK_D + offs_d[:, None]) * BLOCK_C + offs_c[None, :]
    tl.store(norm_partial_ptr + norm_rows, gwk_acc)
    tl.store(norm_partial_ptr + norm_rows + BLOCK_D * BLOCK_C, gbk_acc)
    tl.store(norm_partial_ptr + norm_rows + 2 * BLOCK_D * BLOCK_C, gwv_acc)
    tl.store(norm_partial_ptr + norm_rows + 3 * BLOCK_D * BLOCK_C, gbv_acc)
    offs_s = tl.arange(0, SLOTS)
    tl.store(table_partial_ptr + (part * SLOTS + offs_s[:, None]) * BLOCK_C + offs_c[None, :],
             table_acc)


@triton.jit
def norm_backward(gh, h, rstd, C):
    """Gradient of a LayerNorm's input from that of its normalised output h."""
    mean_gh = tl.sum(gh, axis=1) / C
    mean_ghh = tl.sum(gh * h, axis=1) / C
    return rstd[:, None] * (gh - mean_gh[:, None] - h * mean_ghh[:, None])


# ---------------------------------------------------------------- host side


class _Prepared:
    """The packed, contiguous arguments shared by the forward and backward launchers."""

    def __init__(self, op, k_in, v_in, norms, stage_bases, base_stages, factor_masks,
                 factor_tables, factor_stages, queries):
        check_device(op, k_in)
        self.batch, self.tokens, self.channels = k_in.shape
        self.slots = queries.shape[1]
        self.depth = norms[0].shape[0]
        factor_slots = [m.shape[1] for m in factor_masks]
        check_limits(op, self.tokens, self.channels, factor_slots)
        if self.slots > MAX_QUERY_SLOTS:
            raise ValueError(f"{op}: the Triton kernels implement K <= {MAX_QUERY_SLOTS} slots, "
                             f"got queries of shape {list(queries.shape)}")
        if self.depth > MAX_STAGES:
            raise ValueError(f"{op}: the Triton kernels implement D <= {MAX_STAGES} stages, got "
                             f"norm weights of shape {list(norms[0].shape)}")
        self.dtype = k_in.dtype
        self.k_in, self.v_in = k_in.contiguous(), v_in.contiguous()
        self.norms = [t.contiguous() for t in norms]
        self.queries = queries.contiguous()
        per_stage = [None] * MAX_STAGES
        for t, d in zip(stage_bases, base_stages):
            per_stage[d] = t.contiguous()
        self.base_mask = sum(1 << d for d in base_stages)
        self.bases = [self.k_in if t is None else t for t in per_stage]
        if factor_masks:
            self.masks, self.tables, self.slots_code, self.factor_slots = pack_factors(
                factor_masks, factor_tables, self.batch)
        else:  # never read: J = 0
            self.masks, self.tables, self.slots_code, self.factor_slots = (
                self.k_in, self.k_in, 0, [])
        self.stages_code = encode(factor_stages)
        self.block_c = channel_block(self.channels)
        self.block_s = slot_block(sum(self.factor_slots))

    def constants(self):
        return dict(D=self.depth, BASES=self.base_mask, ACC=accumulator(self.dtype),
                    BLOCK_C=self.block_c, BLOCK_K=BLOCK_K)

    def sizes(self):
        return (self.tokens, self.channels, self.slots, sum(self.factor_slots),
                len(self.factor_slots), self.slots_code, self.stages_code)


def slot_attention_pass(k_in, v_in, norm_k_weight, norm_k_bias, norm_v_weight, norm_v_bias,
                        stage_bases, base_stages, factor_masks, factor_tables, factor_stages,
                        queries, stats, norm_eps, attn_eps, launch=launch_kernel):
    op = "slot_attention_pass"
    check_args(k_in, v_in, norm_k_weight, norm_k_bias, norm_v_weight, norm_v_bias,
                   stage_bases, base_stages, factor_masks, factor_tables, factor_stages, queries,
                   stats, dtypes=KERNEL_DTYPES)
    p = _Prepared(op, k_in, v_in, (norm_k_weight, norm_k_bias, norm_v_weight, norm_v_bias),
                  stage_bases, base_stages, factor_masks, factor_tables, factor_stages, queries)
    B, N, C, K, D = p.batch, p.tokens, p.channels, p.slots, p.depth
    cfg = config.launch("slot_attention_pass", p.block_c)
    tiles = config.tiles_per_chunk(N, cfg.block_n)
    chunks = triton.cdiv(N, cfg.block_n * tiles)
    device, acc = k_in.device, accumulator_torch(p.dtype)
    attn = torch.empty((B, K, N), dtype=p.dtype, device=device)
    stats_out = torch.empty((B, N, D, 4), dtype=p.dtype, device=device)
    sum_partial = torch.empty((B, chunks, BLOCK_K), dtype=acc, device=device)
    v_partial = torch.empty((B, chunks, BLOCK_K, p.block_c), dtype=acc, device=device)
    known = 0 if stats is None else stats.shape[2]
    stats_in = p.k_in if stats is None else stats.contiguous()
    launch(slot_attention_pass_kernel, (chunks, B),
           (p.k_in, p.v_in, *p.norms, *p.bases, p.masks, p.tables, p.queries, stats_in, attn,
            stats_out, sum_partial, v_partial, *p.sizes(), tiles, float(norm_eps),
            float(attn_eps)),
           dict(KNOWN=known, BLOCK_N=cfg.block_n, **p.constants()), cfg.num_warps)
    attn_sum = reduce_partials(sum_partial)[:, :K].to(p.dtype)
    attn_v = reduce_partials(v_partial)[:, :K, :C].to(p.dtype)
    return attn, attn_sum.contiguous(), attn_v.contiguous(), stats_out


def slot_attention_pass_backward(grad_attn, grad_attn_sum, grad_attn_v, k_in, v_in,
                                 norm_k_weight, norm_k_bias, norm_v_weight, norm_v_bias,
                                 stage_bases, base_stages, factor_masks, factor_tables,
                                 factor_stages, queries, stats, attn, norm_eps, attn_eps,
                                 launch=launch_kernel):
    # stats and attn (the forward's LayerNorm statistics and softmax) are only
    # checked: the kernel recomputes them from the rows it holds (reading attn
    # instead is for a session with a GPU to measure).
    op = "slot_attention_pass_backward"
    grads = (grad_attn, grad_attn_sum, grad_attn_v)
    check_args(k_in, v_in, norm_k_weight, norm_k_bias, norm_v_weight, norm_v_bias,
                   stage_bases, base_stages, factor_masks, factor_tables, factor_stages, queries,
                   stats, grads=grads, attn=attn, dtypes=KERNEL_DTYPES, op=op)
    p = _Prepared(op, k_in, v_in, (norm_k_weight, norm_k_bias, norm_v_weight, norm_v_bias),
                  stage_bases, base_stages, factor_masks, factor_tables, factor_stages, queries)
    B, N, C, K, D = p.batch, p.tokens, p.channels, p.slots, p.depth
    cfg = config.launch("slot_attention_pass_backward", p.block_c)
    tiles = config.tiles_per_chunk(N, cfg.block_n)
    chunks = triton.cdiv(N, cfg.block_n * tiles)
    device, acc = k_in.device, accumulator_torch(p.dtype)
    block_d = triton.next_power_of_2(D)
    grad_k_in = torch.empty_like(p.k_in)
    grad_v_in = torch.empty_like(p.v_in)
    grad_bases = [torch.empty_like(p.k_in) for _ in stage_bases]
    per_stage = [grad_k_in] * MAX_STAGES  # never written: no base at that stage
    for g, d in zip(grad_bases, base_stages):
        per_stage[d] = g
    grad_masks = torch.empty_like(p.masks) if factor_masks else grad_k_in  # J = 0: unused
    q_partial = torch.empty((B, chunks, BLOCK_K, p.block_c), dtype=acc, device=device)
    norm_partial = torch.empty((B, chunks, 4, block_d, p.block_c), dtype=acc, device=device)
    table_partial = torch.empty((B, chunks, p.block_s, p.block_c), dtype=acc, device=device)
    launch(slot_attention_pass_backward_kernel, (chunks, B),
           (grad_attn.contiguous(), grad_attn_sum.contiguous(), grad_attn_v.contiguous(),
            p.k_in, p.v_in, *p.norms, *p.bases, p.masks, p.tables, p.queries, grad_k_in,
            grad_v_in, *per_stage, grad_masks, q_partial, norm_partial, table_partial,
            *p.sizes(), tiles, float(norm_eps), float(attn_eps)),
           dict(BLOCK_N=cfg.block_n, BLOCK_D=block_d, SLOTS=p.block_s, **p.constants()),
           cfg.num_warps)
    grad_queries = reduce_partials(q_partial)[:, :K, :C].to(p.dtype).contiguous()
    grad_norms = reduce_partials(norm_partial).sum(dim=0)[:, :D, :C].to(p.dtype)
    if factor_masks:
        grad_tables = split_table_grads(
            reduce_partials(table_partial)[:, :sum(p.factor_slots), :C], factor_tables,
            p.factor_slots, p.dtype)
        grad_factor_masks = split_mask_grads(grad_masks, p.factor_slots)
    else:
        grad_tables, grad_factor_masks = [], []
    return (grad_k_in, grad_v_in, *(g.clone() for g in grad_norms.unbind(0)), grad_bases,
            grad_factor_masks, grad_tables, grad_queries)
