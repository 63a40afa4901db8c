"""Which optimizer algorithms bitsandbytes can run with 8-bit state on a CUDA GPU, read from bitsandbytes.

bitsandbytes dispatches an 8-bit optimizer update by device (``torch.ops.bitsandbytes.
optimizer_update_8bit_blockwise``). Its CPU kernel accepts every algorithm, its CUDA kernel only those
in the table ``str2optimizer8bit_blockwise`` of ``bitsandbytes/backends/cuda/ops.py``, and raises
"Unsupported optimizer name" at the first step for any other (in 0.50.2: ``lamb`` and ``lars``,
whose 32-bit CUDA kernels exist). A run that trains on a CPU can therefore fail on a GPU after its
set-up. :func:`cuda_8bit_refusal` says so before the first step, from the library's own table.

The table is read, in this order, from the imported CUDA backend (where CUDA is available), from
the installed source file of that backend (parsed, never executed: on a CPU build of torch the module
fails at import), or, when neither can be read, from :data:`CUDA_8BIT_ALGORITHMS_0_50`.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
from pathlib import Path
from typing import Any

import torch

TABLES = {8: "str2optimizer8bit_blockwise", 32: "str2optimizer32bit"}
"""The dicts in ``bitsandbytes/backends/cuda/ops.py`` keyed by the algorithms that have CUDA kernels."""
CUDA_ALGORITHMS_0_50 = {
    8: frozenset({"adam", "momentum", "rmsprop", "lion", "adagrad", "ademamix"}),
    32: frozenset({"adam", "momentum", "rmsprop", "lion", "adagrad", "lamb", "ademamix", "lars"}),
}
"""The keys of those tables in bitsandbytes 0.50.2 (``backends/cuda/ops.py``, lines 986-1023 and 1025-1056)."""


@functools.cache
def cuda_algorithms(bits: int) -> tuple[frozenset[str], str]:
    """Algorithm names (bitsandbytes' ``optimizer_name``) with a CUDA kernel at ``bits``, and where they were read."""
    table = TABLES[bits]
    if torch.cuda.is_available():  # bitsandbytes imports its CUDA backend itself then (its __init__.py)
        try:
            from bitsandbytes.backends.cuda import ops
        except Exception:  # a broken CUDA install: read the source instead
            pass
        else:
            return frozenset(getattr(ops, table)), "bitsandbytes.backends.cuda.ops"
    keys = _keys_in_source(table)
    if keys:
        return keys, "the source of bitsandbytes/backends/cuda/ops.py"
    return CUDA_ALGORITHMS_0_50[bits], "the tables of bitsandbytes 0.50.2"


def cuda_8bit_algorithms() -> tuple[frozenset[str], str]:
    """:func:`cuda_algorithms` for 8-bit state."""
    return cuda_algorithms(8)


def _keys_in_source(table: str) -> frozenset[str]:
    """The string keys of the table, parsed (never executed) from the installed backend's source."""
    try:
        spec = importlib.util.find_spec("bitsandbytes")
    except (ImportError, ValueError):
        return frozenset()
    if spec is None or not spec.submodule_search_locations:
        return frozenset()
    path = Path(next(iter(spec.submodule_search_locations))) / "backends" / "cuda" / "ops.py"
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (OSError, SyntaxError, UnicodeDecodeError):
        return frozenset()
    for node in tree.body:
        if (
            isinstance(node, ast.Assign)
            and any(isinstance(t, ast.Name) and t.id == table for t in node.targets)
            and isinstance(node.value, ast.Dict)
        ):
            return frozenset(
                k.value for k in node.value.keys if isinstance(k, ast.Constant) and isinstance(k.value, str)
            )
    return frozenset()


def cuda_8bit_refusal(optimizer: Any, device: torch.device | None = None) -> str | None:
    """The bitsandbytes algorithm of ``optimizer`` when its first step would fail on CUDA, else None.

    A parameter takes the 8-bit update when bitsandbytes' per-parameter config
    (``Optimizer8bit.get_config``, overrides included) has ``optim_bits`` 8 and the parameter has at
    least ``min_8bit_size`` elements (``Optimizer2State.init_state``); smaller ones keep 32-bit
    state. ``device`` stands for every parameter's device (None: each parameter's own).
    """
    name = getattr(optimizer, "optimizer_name", None)
    if not isinstance(name, str) or not hasattr(optimizer, "get_config"):
        return None
    kernels, _ = cuda_8bit_algorithms()
    if name in kernels:
        return None
    for gindex, group in enumerate(optimizer.param_groups):
        for pindex, param in enumerate(group["params"]):
            if (device or param.device).type != "cuda":
                continue
            config = optimizer.get_config(gindex, pindex, group)
            if config["optim_bits"] == 8 and param.numel() >= config["min_8bit_size"]:
                return name
    return None
