"""The small interface every event source implements."""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable

from lightning_paged.core.eviction.records import StepCounters

log = logging.getLogger(__name__)

Notify = Callable[[str], None]
"""Where a source reports something the user should know once (a log warning, Lightning's rank-zero warning)."""


class SourceUnavailable(RuntimeError):
    """A source cannot run here; the message says why, in words a user can act on.

    ``expected`` marks the ordinary cases (no GPU, optional package not installed) that automatic
    selection passes over without a warning; CUPTI refusing unified-memory profiling is not one.
    """

    def __init__(self, message: str, expected: bool = False) -> None:
        super().__init__(message)
        self.expected = expected


class EventSource(ABC):
    """Measures unified-memory activity between :meth:`begin_step` and :meth:`end_step`.

    The recorder calls ``start`` once, then for every training step ``begin_step``, optionally
    ``begin_optimizer_step``, then ``synchronize`` and ``end_step``; ``stop`` at the end. A source
    never reads the contents of paged tensors: that would migrate their pages to the host.
    """

    name: str = "none"
    """The value of the ``source`` field in the records this source produces."""

    def start(self) -> None:  # noqa: B027 (optional hook)
        """Begin collecting. Raises :class:`SourceUnavailable` with the reason when it cannot."""

    def stop(self) -> None:  # noqa: B027 (optional hook)
        """Stop collecting and release what ``start`` took."""

    def begin_step(self, step: int) -> None:  # noqa: B027 (optional hook)
        """Mark the start of training step ``step``."""

    def begin_optimizer_step(self) -> None:  # noqa: B027 (optional hook)
        """Mark the moment the optimizer starts updating (after backward)."""

    def synchronize(self) -> None:  # noqa: B027 (optional hook)
        """Wait for queued device work so the step's end is a true end."""

    @abstractmethod
    def end_step(self, step: int) -> StepCounters:
        """Mark the end of step ``step`` and return what happened since its ``begin_step``."""

    def unattributed(self) -> dict[str, int]:
        """Totals of events that fell outside every step window (between steps, or delivered late)."""
        return {}


class OnceNotifier:
    """Passes each distinct message to ``notify`` the first time only."""

    def __init__(self, notify: Notify | None = None) -> None:
        self._notify = notify or log.warning
        self._seen: set[str] = set()

    def __call__(self, message: str) -> None:
        if message not in self._seen:
            self._seen.add(message)
            self._notify(message)
