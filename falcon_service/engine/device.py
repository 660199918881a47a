"""Moving small tensors between host and device without making the host wait for the device.

On CUDA, a copy from ordinary (pageable) host memory synchronises with the device, and so does
reading a device value on the host (`.item()`, `.tolist()`, `int(t.max())`). Uploads here go
through pinned memory asynchronously (PyTorch's pinned-memory cache does not reuse a block until
its copy has run); downloads land in pinned memory and are waited for only when the host needs
them, by an event recorded behind them. On the CPU both are plain tensors.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq

import torch


class Download:
    """Device tensors on their way to the host; `wait()` returns them once they have arrived."""

    def __init__(self, tensors: list[torch.Tensor], event: torch.cuda.Event | None) -> None:
        self._tensors = tensors
        self._event = event

    def wait(self) -> list[torch.Tensor]:
        if self._event is not None:
            self._event.synchronize()
            self._event = None
        return self._tensors


class DeviceIO:
    """Uploads and downloads for one device."""

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.is_cuda = self.device.type == "cuda"

    def upload(self, values: Seq[int] | Seq[float] | Seq[bool] | torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """A host list (or CPU tensor) as a tensor on the device; never a synchronising copy."""
        host = values.to(dtype) if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
        if not self.is_cuda:
            return host.to(self.device)
        return host.pin_memory().to(self.device, non_blocking=True)

    def download(self, tensors: Seq[torch.Tensor]) -> Download:
        """Start copying `tensors` to the host; their values are read after `wait()`."""
        if not self.is_cuda:
            return Download(list(tensors), None)
        copies = []
        for t in tensors:
            host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            host.copy_(t, non_blocking=True)
            copies.append(host)
        event = torch.cuda.Event()
        event.record()
        return Download(copies, event)
