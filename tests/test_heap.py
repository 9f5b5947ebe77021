"""forcefield.heap.keep_freed_memory: glibc keeps a freed 16 MiB block (resident) once it is set, and only
when asked: constructing a ``TorchEnergy`` leaves malloc alone unless ``keep_freed_memory=True``."""

import os
import platform
import subprocess
import sys

import pytest

import openflow.plugins.openmm.forcefield.heap as heap
from openflow.plugins.openmm.forcefield import TorchEnergy, batched_energy
from openflow.systems import harmonic_chain

pytestmark = pytest.mark.skipif(sys.platform != "linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")

# a fresh process: malloc + touch + free 16 MiB, then print whether the thresholds were set and
# how much resident memory the freed block left behind
SCRIPT = """
import ctypes, os, sys
from openflow.plugins.openmm.forcefield.heap import keep_freed_memory
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
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, env=env, check=True
    ).stdout.split()
    return out[0], int(out[1])


def test_freed_memory_is_kept_only_once_set():
    applied, kept = _run("keep")
    assert applied == "True" and kept >= 15 << 20  # the freed block stays resident for reuse
    applied, kept = _run("default")
    assert applied == "False" and kept < 1 << 20  # glibc's default: mmap'd and returned at once


def test_the_users_malloc_setting_wins():
    applied, _ = _run("keep", MALLOC_TRIM_THRESHOLD_="131072")
    assert applied == "False"


def test_torch_energy_sets_it_only_when_asked(monkeypatch):
    """``TorchEnergy``/``batched_energy`` call ``keep_freed_memory`` only with ``keep_freed_memory=True``."""
    calls = []
    monkeypatch.setattr(heap, "keep_freed_memory", lambda: calls.append(1) or True)
    system = harmonic_chain(n=4, boundary="fixed-free")
    TorchEnergy(system)
    batched_energy(system, energy="torch")
    assert calls == []
    TorchEnergy(system, keep_freed_memory=True)
    batched_energy(system, energy="torch", keep_freed_memory=True)
    assert calls == [1, 1]


def test_a_default_torch_energy_leaves_malloc_alone():
    """In a fresh process, building and evaluating a default ``TorchEnergy`` keeps glibc's default."""
    prelude = (
        "import torch\n"
        "from openflow.plugins.openmm.forcefield import TorchEnergy\n"
        "from openflow.systems import harmonic_chain\n"
        "energy = TorchEnergy(harmonic_chain(n=4, boundary='fixed-free'))\n"
        "energy.energy_and_forces(torch.zeros(8, energy.dim, dtype=torch.float64))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run(
        [sys.executable, "-c", prelude + SCRIPT, "default"], capture_output=True, text=True, env=env, check=True
    ).stdout.split()
    assert out[0] == "False" and int(out[1]) < 1 << 20
