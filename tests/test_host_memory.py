"""keep_freed_memory: after it, a freed large tensor's pages are reused instead of
faulted in afresh; the command line tool turns it on.

Each check runs in a fresh interpreter: the setting is process-wide and would
otherwise change how the rest of the test session allocates."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

import exposure_slot.cli

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# Allocates and fills maps of 8-64 MiB (a forward's sizes) three times over, and
# counts the minor page faults of the third round: with freed memory kept it reuses
# the pages the first two touched.
REFILL_FAULTS = """
import resource, sys, torch
from exposure_slot import keep_freed_memory
took = keep_freed_memory() if sys.argv[1] == "keep" else None
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def one_round():
    maps = [torch.empty((mib << 20) // 4) for mib in (8, 16, 32, 64, 8, 16, 32, 64)]
    for m in maps:
        m.fill_(1)
one_round()
one_round()
before = faults()
one_round()
print(took, faults() - before)
"""


def refill_faults(mode: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", REFILL_FAULTS, mode], capture_output=True,
                         text=True, check=True).stdout.split()
    return out[0], int(out[1])


@pytest.mark.skipif(not GLIBC, reason="keep_freed_memory tunes glibc's malloc; "
                                      "this C library is not glibc")
def test_freed_memory_is_reused_instead_of_faulted_in():
    took, kept_faults = refill_faults("keep")
    _, plain_faults = refill_faults("plain")
    assert took == "True"
    # A round is 240 MiB: 61440 pages of 4 KiB (120 of 2 MiB where huge pages are
    # always on). glibc's defaults unmap most of it on free, so the next round faults
    # it in again (53-59 thousand faults measured); kept, 0-16384 (a 64 MiB block
    # sometimes comes from new heap rather than the freed one).
    assert plain_faults >= 64
    assert kept_faults <= plain_faults // 2


@pytest.mark.skipif(GLIBC, reason="checks the answer where the C library is not glibc")
def test_other_c_libraries_are_left_alone():
    from exposure_slot import keep_freed_memory

    assert keep_freed_memory() is False


def test_every_command_line_run_keeps_freed_memory(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(exposure_slot.cli, "keep_freed_memory", calls.append)
    assert exposure_slot.cli.main(["example-image", str(tmp_path / "a.png"),
                                   "--size", "37x29"]) == 0
    assert calls == [64 << 20]


@pytest.mark.parametrize("max_block", [0, -1, 1 << 31])
def test_block_size_out_of_range_is_refused(max_block):
    from exposure_slot import keep_freed_memory

    with pytest.raises(ValueError, match="max_block"):
        keep_freed_memory(max_block)
