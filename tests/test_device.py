"""Where a model runs: the CPU allocator setting of ``nrgpt.device.keep_freed_memory``."""

from __future__ import annotations

import platform
import subprocess
import sys
import textwrap

import pytest

from .conftest import REPO

# In a fresh process (malloc's state depends on what the process allocated before): the minor page faults
# of writing a 64 MiB tensor (above glibc's largest mmap threshold), eight times over, each freed before
# the next is made.
_FAULTS = textwrap.dedent("""
    import resource, sys, torch
    from nrgpt.device import keep_freed_memory
    kept = keep_freed_memory() if sys.argv[1] == "keep" else False
    def faults():
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        torch.empty(64 << 20, dtype=torch.uint8).fill_(1)
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    print(kept, *[faults() for _ in range(8)])
""")


def _faults(mode: str) -> tuple[bool, list[int]]:
    out = subprocess.run([sys.executable, "-c", _FAULTS, mode], capture_output=True, text=True, cwd=REPO,
                         check=True).stdout.split()
    return out[0] == "True", [int(n) for n in out[1:]]


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_freed_tensor_memory_is_reused_without_page_faults():
    pages = (64 << 20) // 4096
    kept, faults = _faults("default")
    assert not kept and min(faults) > pages // 2  # the default hands the block back every time
    kept, faults = _faults("keep")
    assert kept and faults[0] > pages // 2  # the first write faults the pages in
    # posix_memalign's padding can make the heap grow by a second block once (where the freed block sits
    # first decides, and ASLR moves it); from then on every freed block is reused as it is
    assert sum(faults) < 2 * pages + pages // 20
    assert sum(faults[3:]) < pages // 20
