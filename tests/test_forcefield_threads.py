"""``torch_on_one_thread`` is scoped: ``TorchEnergy.energy_and_forces`` gives torch's thread count back
on return and when it raises, and never leaves a changed count behind."""

import pytest
import torch

from openflow.plugins.openmm.forcefield import TorchEnergy, torch_on_one_thread
from openflow.systems import alanine_dipeptide


def test_energy_and_forces_restores_the_thread_count_also_on_an_error():
    threads = torch.get_num_threads()
    energy = TorchEnergy(alanine_dipeptide(solvent="vacuum"))  # heavy kernels: torch runs serially inside the call
    x = energy.system.from_positions(energy.system.positions)[None]
    seen = []
    original = energy._chunk_energy_gradient

    def spy(chunk, chunk_size):
        seen.append(torch.get_num_threads())
        return original(chunk, chunk_size)

    energy._chunk_energy_gradient = spy
    energy.energy_and_forces(x)
    assert seen == [1] and torch.get_num_threads() == threads
    with pytest.raises(ValueError, match="chunk_size"):
        energy.energy_and_forces(x, chunk_size=0)  # raised inside the scope
    assert torch.get_num_threads() == threads


def test_the_scope_restores_a_count_set_before_it():
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(max(threads, 2))
        with pytest.raises(KeyError):
            with torch_on_one_thread():
                assert torch.get_num_threads() == 1
                raise KeyError("inside")
        assert torch.get_num_threads() == max(threads, 2)
    finally:
        torch.set_num_threads(threads)
