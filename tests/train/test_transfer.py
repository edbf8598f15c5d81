"""Small CPU-made tensors reach a GPU through pinned memory without blocking; on the CPU nothing changes."""

from __future__ import annotations

from unittest import mock

import torch

from lora_trainer.train.transfer import to_device


def test_cpu_to_cpu_is_the_same_tensor():
    tensor = torch.arange(4)
    assert to_device(tensor, torch.device("cpu")) is tensor


def test_cpu_to_cuda_goes_through_pinned_memory_without_blocking():
    tensor = mock.Mock(device=torch.device("cpu"))
    cuda = torch.device("cuda", 0)
    result = to_device(tensor, cuda)
    tensor.pin_memory.assert_called_once_with()
    tensor.pin_memory.return_value.to.assert_called_once_with(cuda, non_blocking=True)
    assert result is tensor.pin_memory.return_value.to.return_value
    tensor.to.assert_not_called()
