"""Where a model runs: the CPU allocator setting of ``nrgpt.device.keep_freed_memory``."""

from __future__ import annotations

import platform
import subprocess
import sys
import textwrap

import pytest

from .conftest import REPO

# In a fresh process (malloc's state depends on what the process allocated before): the minor page faults
# of writing a 64 MiB tensor (above glibc's largest mmap threshold) for the first time and again after it
# was freed.
_FAULTS = textwrap.dedent("""
    import resource, sys, torch
    from nrgpt.device import keep_freed_memory
    kept = keep_freed_memory() if sys.argv[1] == "keep" else False
    def faults():
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        torch.empty(64 << 20, dtype=torch.uint8).fill_(1)
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    print(kept, faults(), faults())
""")


def _faults(mode: str) -> tuple[bool, int, int]:
    out = subprocess.run([sys.executable, "-c", _FAULTS, mode], capture_output=True, text=True, cwd=REPO,
                         check=True).stdout.split()
    return out[0] == "True", int(out[1]), int(out[2])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_freed_tensor_memory_is_reused_without_page_faults():
    kept, first, again = _faults("default")
    pages = (64 << 20) // 4096
    assert not kept and first > pages // 2 and again > pages // 2  # the default hands the block back every time
    kept, first, again = _faults("keep")
    assert kept and first > pages // 2  # the first write faults the pages in
    assert again < pages // 20  # the freed block is reused as it is
