"""Shared setup of the models tests: one torch thread (tiny matmuls; the machine is shared)."""

import torch

torch.set_num_threads(1)
