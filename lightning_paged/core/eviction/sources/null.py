"""The source for machines with nothing to measure: it says why, once, and counts nothing."""

from __future__ import annotations

from lightning_paged.core.eviction.records import StepCounters
from lightning_paged.core.eviction.sources.base import EventSource, Notify, OnceNotifier


class NullSource(EventSource):
    """No eviction figures: CPU training, no managed memory, or ``source="none"``.

    Sequence lengths and step times are still recorded by the recorder; the counters are ``None``.
    ``reason`` is reported once, when the source starts. With ``cuda_device`` set (``source="none"``
    on a GPU) it still waits for the device at the timing marks, so step times stay true.
    """

    name = "none"

    def __init__(
        self, reason: str, notify: Notify | OnceNotifier | None = None, cuda_device: int | None = None
    ) -> None:
        self.reason = reason
        self._notify = notify if isinstance(notify, OnceNotifier) else OnceNotifier(notify)
        self._cuda_device = cuda_device

    def synchronize(self) -> None:
        if self._cuda_device is not None:  # step times on a GPU are only true after the queue drains
            import torch

            torch.cuda.synchronize(self._cuda_device)

    def start(self) -> None:
        self._notify(
            f"No unified-memory eviction events will be recorded: {self.reason}. "
            "Sequence lengths and step times are still recorded."
        )

    def end_step(self, step: int) -> StepCounters:
        return StepCounters()
