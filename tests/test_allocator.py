"""glibc heap policies of samv2_components.allocator: freed memory handed back (inference) or kept (training).

Each check runs in a fresh interpreter: the settings are process-wide and would change every later test's memory."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from samv2_components.allocator import retain_freed_memory
from samv2_components.errors import SAMv2InputError

glibc_only = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="the policies are glibc's"
)

#: a fresh interpreter's helpers: resident memory, and glibc's count of separately mapped bytes (mallinfo2)
_PRELUDE = """
import ctypes, gc
class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
def mapped_mib():
    return libc.mallinfo2().hblkhd / 2**20
def heap_mib():
    return libc.mallinfo2().arena / 2**20
def rss_mib():
    for line in open('/proc/self/status'):
        if line.startswith('VmRSS'):
            return int(line.split()[1]) / 1024
"""


def _run(code: str) -> list[float]:
    out = subprocess.run([sys.executable, "-c", _PRELUDE + code], capture_output=True, text=True, check=True)
    return [float(v) for v in out.stdout.split()]


@glibc_only
def test_freed_heap_memory_is_returned_to_the_os():
    """After a forward pass the heap's freed blocks go back to the OS (glibc's malloc_trim): half of 2,000 blocks of
    64 KB freed in a checkerboard stay resident until then (the kept halves stop the heap from shrinking itself)."""
    (released,) = _run(
        """
from samv2_components.allocator import return_freed_heap_memory
blocks = [bytearray(b'x' * 65536) for _ in range(2000)]
del blocks[::2]
gc.collect()
before = rss_mib()
return_freed_heap_memory()
print(before - rss_mib())
"""
    )
    assert released >= 40  # MiB: 62.5 MiB were freed


@glibc_only
def test_retained_memory_serves_large_tensors_from_the_heap_and_keeps_them():
    """Before: a 64 MiB tensor is mapped on its own and unmapped when freed. After retain_freed_memory(): it comes
    from the heap, and the heap keeps the memory when the tensor is freed, so the next one is not faulted in."""
    values = _run(
        """
import torch
from samv2_components.allocator import retain_freed_memory
mapped_before = mapped_mib()
x = torch.ones(16, 2**20)  # 64 MiB
mapped_default = mapped_mib() - mapped_before
del x
applied = retain_freed_memory()
mapped_before, heap_before = mapped_mib(), heap_mib()
x = torch.ones(16, 2**20)
mapped_retained, heap_grown = mapped_mib() - mapped_before, heap_mib() - heap_before
del x
gc.collect()
heap_kept = heap_mib() - heap_before
print(mapped_default, float(applied), mapped_retained, heap_grown, heap_kept)
"""
    )
    mapped_default, applied, mapped_retained, heap_grown, heap_kept = values
    assert mapped_default >= 64  # glibc's default: a separate mapping
    assert applied == 1.0
    assert mapped_retained < 1 and heap_grown >= 64  # on the heap now
    assert heap_kept >= 64  # freed, yet kept for the next allocation


@glibc_only
def test_retain_disabled_changes_nothing():
    """retain_freed_memory(False) and the command line's "false" leave glibc's default: large tensors stay mapped."""
    values = _run(
        """
import torch
from samv2_components.allocator import retain_freed_memory
applied = [retain_freed_memory(False), retain_freed_memory("false")]
mapped_before = mapped_mib()
x = torch.ones(16, 2**20)
print(float(any(applied)), mapped_mib() - mapped_before)
"""
    )
    assert values[0] == 0.0 and values[1] >= 64


def test_retain_refuses_bad_settings():
    with pytest.raises(SAMv2InputError, match="retain_freed_memory"):
        retain_freed_memory("sometimes")
    with pytest.raises(ValueError, match="top_pad_mb"):
        retain_freed_memory(True, top_pad_mb=4096)
