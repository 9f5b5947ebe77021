"""Test-suite settings: the tensors here are small, where one torch thread beats two."""

import torch

torch.set_num_threads(1)
