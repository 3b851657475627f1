"""Launch configurations of the Triton kernels: one table, read by the launchers and by
tests/test_triton_kernels.py (which compiles every entry for sm_80 and sm_90 and
fails on register spills).

A program holds BLOCK_N tokens x BLOCK_C channels (C rounded up to a power of two) per
live [BLOCK_N, BLOCK_C] tile in registers. The forward keeps about eight such tiles
alive (k and v in and out of a stage, the modulation, a mixture, offsets), the
backward about twenty (the inputs kept for recomputation, the gradients of k and v,
the recomputed stage, the modulation's prefix and suffix products). The table holds
each tile at 4 to 16 values per thread (BLOCK_N * BLOCK_C / (32 * num_warps)); every
entry compiled free of spills for sm_80 and sm_90 with triton 3.9 (the counts are in
tests/test_triton_kernels.py's output: 72-145 registers for mask_fusion, ~200-225
for the slot-attention forward, 206-255 for its backward).

Chunking (the deterministic sums over tokens): a program walks TILES consecutive
token tiles of one batch item and writes one partial; TILES depends on the shape
only, never on the device, so results are the same on every GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import triton


@dataclass(frozen=True)
class Launch:
    block_n: int
    num_warps: int


# kernel -> BLOCK_C -> launch.
TABLE = {
    "mask_fusion": {16: Launch(64, 4), 32: Launch(32, 4), 64: Launch(16, 4), 128: Launch(16, 8),
                    256: Launch(8, 8)},
    # (BLOCK_C = 128 at 8 tokens spilled in bfloat16 on sm_90, ptxas's choice at 64
    # registers; 16 tokens does not.)
    "mask_fusion_backward": {16: Launch(32, 4), 32: Launch(16, 4), 64: Launch(8, 4),
                             128: Launch(16, 8), 256: Launch(8, 8)},
    "slot_attention_pass": {16: Launch(64, 4), 32: Launch(32, 4), 64: Launch(16, 4),
                            128: Launch(16, 8), 256: Launch(8, 8)},
    "slot_attention_pass_backward": {16: Launch(16, 4), 32: Launch(16, 4), 64: Launch(8, 4),
                                     128: Launch(8, 8), 256: Launch(4, 8)},
}
CHANNEL_BLOCKS = (16, 32, 64, 128, 256)

# ptxas's own register budget for 8 warps (128 per thread on sm_80, 80 on sm_90)
# spilled where 255 registers fit: every launch allows the architectural maximum
# (PTX .maxnreg), at the price of one resident program per SM at 8 warps.
MAX_REGISTERS = 255

# Programs walk up to this many tiles: enough that the partials (K*C values per
# chunk) stay a few percent of the token traffic at 1080p.
MAX_TILES = 16
# ... but keep at least this many chunks per batch item where N allows it, so a
# single image still fills an H100's 132 SMs several times over.
MIN_CHUNKS = 64


def launch(kernel: str, block_c: int) -> Launch:
    return TABLE[kernel][block_c]


def tiles_per_chunk(tokens: int, block_n: int) -> int:
    blocks = triton.cdiv(tokens, block_n)
    return max(1, min(MAX_TILES, blocks // MIN_CHUNKS))
