"""The Triton kernels compile for the GPUs they ship for, without spilling.

Every kernel is compiled with ``triton.compile`` for sm_80 (A100) and sm_90 (H100)
at every shipped launch configuration (kernels/config.py: one per channel block
BLOCK_C in 16..256), for float32 inputs, and for bfloat16 on sm_90 (float16 takes
the bfloat16 code path: same register use), with the deepest chain the model drives (D = 3
stages, a base and a factor per stage) and K = 16 slots. The signature comes from the
launchers themselves: they are called with meta tensors of the real dtypes and a
recording launch function, so the compiled argument lists are exactly the ones a
GPU run uses.

Resource use is read with the cuobjdump bundled with triton
(``--dump-resource-usage`` on the cubin): the test fails on any STACK or LOCAL
bytes (register spills) or on shared memory over the device limit per block
(sm_80: 163 KiB, sm_90: 227 KiB), and prints registers per thread (pytest -s).

Compiling needs triton's compiler, not its interpreter, so it runs in a child
process without TRITON_INTERPRET (``python tests/test_triton_kernels.py``);
triton's own cache (~/.triton/cache) makes later runs fast.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton", reason="the Triton backend needs `pip install triton`")

ARCHS = {80: 163 * 1024, 90: 227 * 1024}  # compute capability -> shared memory per block
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
KERNELS = ("mask_fusion", "mask_fusion_backward", "slot_attention_pass",
           "slot_attention_pass_backward")
ROOT = Path(__file__).resolve().parents[1]


def configurations():
    from exposure_slot.kernels import config
    return [(kernel, block_c, dtype) for kernel in KERNELS for block_c in config.CHANNEL_BLOCKS
            for dtype in DTYPES]


def jobs():
    """(kernel, BLOCK_C, dtype, arch): float32 for both GPUs, bfloat16 for sm_90 (its
    register counts on sm_80 matched float32's within a few: compile time is CPU time
    here, about two seconds a kernel)."""
    return [(k, c, d, arch) for k, c, d in configurations() for arch in ARCHS
            if d == "float32" or arch == 90]


# ---------------------------------------------------------------- child process


def record_launch(kernel: str, channels: int, dtype_name: str):
    """(kernel function, args, constexprs, num_warps) of one launch, from the launcher
    itself called with meta tensors."""
    from exposure_slot.kernels import mask_fusion, slot_attention_pass

    dtype = DTYPES[dtype_name]
    meta = dict(device="meta", dtype=dtype)
    B, N, D, K = 2, 4096, 3, 16
    launches = []

    def record(fn, grid, args, constexprs, num_warps):
        launches.append((fn, args, constexprs, num_warps))

    masks = [torch.empty(B, 4, N, **meta), torch.empty(B, 3, N, **meta)]
    tables = [torch.empty(1, 4, channels, **meta), torch.empty(B, 3, channels, **meta)]
    tokens = torch.empty(B, N, channels, **meta)
    if kernel == "mask_fusion":
        mask_fusion.forward(masks, tables, tokens, torch.empty_like(tokens), launch=record)
    elif kernel == "mask_fusion_backward":
        mask_fusion.backward(tokens, masks, tables, tokens, launch=record)
    else:
        norms = [torch.empty(D, channels, **meta) for _ in range(4)]
        queries = torch.empty(B, K, channels, **meta)
        chain = (tokens, tokens, *norms, [tokens] * 3, [0, 1, 2], masks, tables, [1, 2], queries)
        if kernel == "slot_attention_pass":
            slot_attention_pass.slot_attention_pass(*chain, None, 1e-5, 1e-8, launch=record)
        else:
            grads = (torch.empty(B, K, N, **meta), torch.empty(B, K, **meta),
                     torch.empty(B, K, channels, **meta))
            slot_attention_pass.slot_attention_pass_backward(*grads, *chain, None, grads[0],
                                                             1e-5, 1e-8,
                                                             launch=record)
    (launch,) = launches
    return launch


POINTER_TYPES = {torch.float32: "*fp32", torch.float64: "*fp64", torch.bfloat16: "*bf16",
                 torch.float16: "*fp16"}


def type_of(value) -> str:
    """Triton's signature type of a launch argument (what its launcher would infer)."""
    if isinstance(value, torch.Tensor):
        return POINTER_TYPES[value.dtype]
    if isinstance(value, float):
        return "fp32"
    return "i32" if -2**31 <= value < 2**31 else "i64"


def signature_of(fn, args, constexprs):
    signature = {name: type_of(value) for name, value in zip(fn.arg_names, args)}
    signature.update((name, "constexpr") for name in constexprs)
    return signature


def resources(cubin: bytes) -> dict[str, int]:
    """REG, STACK, SHARED, LOCAL of the cubin's kernel, from cuobjdump."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"exposure_slot_{os.getpid()}.cubin"
    path.write_bytes(cubin)
    try:
        text = subprocess.run([str(tool), "--dump-resource-usage", str(path)], check=True,
                              capture_output=True, text=True).stdout
    finally:
        path.unlink()
    found = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", text))
    return {key: int(value) for key, value in found.items()}


def compile_one(job):
    kernel, block_c, dtype_name, arch = job
    from triton.backends.compiler import GPUTarget

    from exposure_slot.kernels import config
    from triton.compiler import ASTSource

    fn, args, constexprs, num_warps = record_launch(kernel, block_c, dtype_name)
    src = ASTSource(fn=fn, signature=signature_of(fn, args, constexprs), constexprs=constexprs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": num_warps,
                                       "maxnreg": config.MAX_REGISTERS})
    usage = resources(compiled.asm["cubin"])
    usage["shared_metadata"] = int(compiled.metadata.shared)
    return [kernel, block_c, dtype_name, arch, num_warps, usage]


def main(out_path: str) -> None:
    with ProcessPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        results = list(pool.map(compile_one, jobs()))
    Path(out_path).write_text(json.dumps(results))


# ---------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    out = tmp_path_factory.mktemp("triton") / "resources.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, __file__, str(out)], check=True, cwd=ROOT, env=env)
    return {tuple(r[:4]): r[4:] for r in json.loads(out.read_text())}


@pytest.mark.parametrize("kernel,block_c,dtype,arch", jobs(),
                         ids=[f"{k}-C{c}-{d}-sm_{a}" for k, c, d, a in jobs()])
def test_compiles_without_spills(compiled, kernel, block_c, dtype, arch):
    num_warps, usage = compiled[(kernel, block_c, dtype, arch)]
    print(f"{kernel} BLOCK_C={block_c} {dtype} sm_{arch} num_warps={num_warps}: "
          f"{usage['REG']} registers/thread, shared {usage['shared_metadata']} B, "
          f"stack {usage['STACK']} B, local {usage['LOCAL']} B")
    assert usage["STACK"] == 0 and usage["LOCAL"] == 0, f"register spills: {usage}"
    assert usage["shared_metadata"] <= ARCHS[arch], f"shared memory over the limit: {usage}"


if __name__ == "__main__":
    main(sys.argv[1])
