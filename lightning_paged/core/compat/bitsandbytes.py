"""bitsandbytes internals the project relies on, each behind one function. Read from bitsandbytes 0.50.2."""

from __future__ import annotations

from types import MethodType
from typing import Any

READ_FROM = "0.50.2"


def undo_cpu_packing(data: Any, quant_state: Any) -> tuple[Any, Any]:
    """A 4-bit weight in the training layout again after an AVX512-BF16 CPU repacked it for inference.

    ``bitsandbytes.functional._convert_weight_packed_for_cpu_inverse`` (``functional.py``): the CPU
    eval forward repacks in place, and training on such a weight fails or loses input gradients.
    Returns ``(data, quant_state)`` in the training layout.
    """
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    result: tuple[Any, Any] = _convert_weight_packed_for_cpu_inverse(data, quant_state)
    return result


def route_double_state_buffer(optimizer: Any, allocate: Any) -> None:
    """Make AdEMAMix allocate its two-slot state through ``allocate(self, p, dtype=...)`` on this instance.

    bitsandbytes' AdEMAMix allocates ``state1`` with its own ``_get_state_double_buffer``
    (``optim/ademamix.py``), beside the ``get_state_buffer`` every optimizer uses; the paging policy
    replaces both on one optimizer instance.
    """
    optimizer._get_state_double_buffer = MethodType(allocate, optimizer)


def quantize_param4bit(param: Any, device: Any) -> Any:
    """Quantize a ``Params4bit`` on ``device`` as ``Params4bit.to(device)`` does (``Params4bit._quantize``, ``nn/modules.py``).

    The memory plan quantizes on the meta device, where ``to`` would not: the fake kernels of
    ``quantize_4bit``/``quantize_blockwise`` (``_ops.py``) give the real packed and absmax shapes.
    """
    return param._quantize(device)
