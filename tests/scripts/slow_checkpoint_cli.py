"""Run by tests/test_cli.py: the ``lightning-paged`` command with slow checkpoint writes.

Every ``.ckpt`` file is written in 64 KiB pieces with a pause after each, through the real atomic
writer, so that the test can kill the process with SIGKILL while a checkpoint is being written.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from lightning_paged.commands.main import main
from lightning_paged.core import atomic

_real_atomic_write = atomic.atomic_write


class _SlowFile:
    def __init__(self, file: Any) -> None:
        self._file = file

    def write(self, data: bytes) -> int:
        view = memoryview(data)
        for start in range(0, len(view), 65536):
            self._file.write(view[start : start + 65536])
            self._file.flush()
            time.sleep(0.03)
        return len(view)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._file, name)


def _slow_atomic_write(path: Any, write: Any) -> None:
    if not str(path).endswith(".ckpt"):
        return _real_atomic_write(path, write)
    return _real_atomic_write(path, lambda file: write(_SlowFile(file)))


atomic.atomic_write = _slow_atomic_write

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
