"""Runs every CUDA kernel of exposure_slot._C (csrc/cuda) once or twice on small
shapes, for NVIDIA's compute-sanitizer:

    compute-sanitizer --tool memcheck  python benchmarks/sanitize_cuda.py
    compute-sanitizer --tool racecheck python benchmarks/sanitize_cuda.py
    compute-sanitizer --tool synccheck python benchmarks/sanitize_cuda.py

Shapes cover odd token counts (a partial last tile and block), K from 1 to 16, C
with partial channel vectors and every lane-group size, batched and shared tables,
stages with and without bases, the stats cache, the in-place op, and all four
dtypes; forward and backward of both ops. Exits non-zero if the extension has no
CUDA kernels or no GPU is visible. Results are not checked here (the tests do
that): the sanitizer's report is the result.
"""

from __future__ import annotations

import sys

import torch

from exposure_slot import ops

DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
# (B, N, C, K, stages): each stage (has_base, [(K_j, table_batched), ...]).
PASSES = [
    (1, 1, 16, 1, [(False, [])]),
    (2, 301, 37, 7, [(True, [(3, False)]), (False, [(7, True), (2, False)])]),
    (1, 1031, 128, 16, [(False, [(16, True)]), (True, []), (False, [(1, False)])]),
    (3, 97, 256, 3, [(True, [(10, False)])]),
    (2, 259, 5, 10, [(False, [(3, True)]), (False, [])]),
]
FUSIONS = [  # (B, N, C, [(K_j, table_batched), ...], with_base)
    (1, 1, 16, [(1, False)], False),
    (2, 301, 37, [(3, False), (7, True)], True),
    (3, 1031, 256, [(16, True), (2, False), (10, False)], True),
    (2, 259, 3, [(5, False)], False),
]


def run_pass(B, N, C, K, stages, dtype, gen):
    dev = "cuda"
    rand = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64).to(dev, dtype)
    D = len(stages)
    k_in, v_in = rand(B, N, C), rand(B, N, C)
    norms = [1 + 0.3 * rand(D, C), 0.3 * rand(D, C), 1 + 0.3 * rand(D, C), 0.3 * rand(D, C)]
    bases = [1 + 0.5 * rand(B, N, C) if has_base else None for has_base, _ in stages]
    masks, tables, factor_stages = [], [], []
    for d, (_, factors) in enumerate(stages):
        for Kj, batched in factors:
            masks.append((0.05 + torch.rand(B, Kj, N, generator=gen, dtype=torch.float64))
                         .to(dev, dtype))
            tables.append(0.2 + rand(B if batched else 1, Kj, C))
            factor_stages.append(d)
    queries = rand(B, K, C) * (2.0 / C ** 0.5)
    leaves = [t.requires_grad_() for t in [k_in, v_in, *norms, *masks, *tables, queries]
              + [b for b in bases if b is not None]]
    attn, attn_sum, attn_v, stats = ops.slot_attention_pass(
        k_in, v_in, *norms, bases, masks, tables, factor_stages, queries, backend="cuda")
    loss = attn.float().square().sum() + attn_sum.float().sum() + attn_v.float().square().sum()
    torch.autograd.grad(loss, leaves)
    with torch.no_grad():  # the stats cache: every leading S stages
        for S in range(D + 1):
            ops.slot_attention_pass(k_in, v_in, *norms, bases, masks, tables, factor_stages,
                                    queries, stats[:, :, :S], backend="cuda")


def run_fusion(B, N, C, factors, with_base, dtype, gen):
    dev = "cuda"
    masks = [(0.05 + torch.rand(B, K, N, generator=gen, dtype=torch.float64)).to(dev, dtype)
             for K, _ in factors]
    tables = [torch.randn(B if batched else 1, K, C, generator=gen, dtype=torch.float64)
              .to(dev, dtype) for K, batched in factors]
    base = torch.randn(B, N, C, generator=gen, dtype=torch.float64).to(dev, dtype) \
        if with_base else None
    leaves = [t.requires_grad_() for t in masks + tables + ([base] if with_base else [])]
    out = ops.mask_fusion(masks, tables, base, backend="cuda")
    torch.autograd.grad(out.float().square().sum(), leaves)
    with torch.no_grad():
        target = torch.randn(B, N, C, generator=gen, dtype=torch.float64).to(dev, dtype)
        ops.mask_fusion_([m.detach() for m in masks], [t.detach() for t in tables], target,
                         backend="cuda")


def main() -> int:
    if not torch.cuda.is_available() or not ops.cuda_kernels_available():
        print("sanitize_cuda: needs a GPU and exposure_slot._C built with its CUDA kernels",
              file=sys.stderr)
        return 1
    gen = torch.Generator().manual_seed(0)
    for dtype in DTYPES:
        for case in PASSES:
            run_pass(*case, dtype, gen)
        for case in FUSIONS:
            run_fusion(*case, dtype, gen)
    torch.cuda.synchronize()
    print(f"sanitize_cuda: ran {len(DTYPES) * (len(PASSES) + len(FUSIONS))} cases")
    return 0


if __name__ == "__main__":
    sys.exit(main())
