"""Whether an asked-for device exists here: a stage asked for CUDA fails with one line on a machine without it.

`auto` picks CUDA when there is one and the CPU otherwise; an explicit `cuda` or `cuda:N` is a request, and running
it on the CPU without a word would turn minutes into hours on a crawl (a worker without a GPU, a container started
without one, Ray hiding the devices from a task that asked for none).
"""

from __future__ import annotations

import torch


class DeviceUnavailableError(RuntimeError):
    """A stage was asked for a device this machine does not have; the message is one line."""


def device_problem(device: str) -> str | None:
    """Why `device` (cuda or cuda:N) cannot be used on this machine, or None (any other device: not checked)."""
    if not device.startswith("cuda"):
        return None
    if not torch.cuda.is_available():
        return f"device {device} was asked for, but this machine has no usable CUDA device (torch sees none)"
    index = int(device.partition(":")[2] or 0)
    if index >= torch.cuda.device_count():
        return f"device {device} was asked for, but this machine has {torch.cuda.device_count()} CUDA device(s)"
    return None


def check_device(device: str) -> None:
    """DeviceUnavailableError when `device_problem` names one."""
    problem = device_problem(device)
    if problem:
        raise DeviceUnavailableError(problem)
