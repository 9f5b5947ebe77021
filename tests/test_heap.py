"""openflow.heap.keep_freed_memory: glibc keeps a freed 16 MiB block (resident) once it is set."""
import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(sys.platform != "linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")

# a fresh process: malloc + touch + free 16 MiB, then print whether the thresholds were set and
# how much resident memory the freed block left behind
SCRIPT = """
import ctypes, os, sys
from openflow.heap import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else False
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
def resident():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
before = resident()
block = libc.malloc(16 << 20)
ctypes.memset(block, 1, 16 << 20)
libc.free(block)
print(applied, resident() - before)
"""


def _run(mode: str, **environment) -> tuple[str, int]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")} | environment
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, env=env, check=True).stdout.split()
    return out[0], int(out[1])


def test_freed_memory_is_kept_only_once_set():
    applied, kept = _run("keep")
    assert applied == "True" and kept >= 15 << 20  # the freed block stays resident for reuse
    applied, kept = _run("default")
    assert applied == "False" and kept < 1 << 20  # glibc's default: mmap'd and returned at once


def test_the_users_malloc_setting_wins():
    applied, _ = _run("keep", MALLOC_TRIM_THRESHOLD_="131072")
    assert applied == "False"
