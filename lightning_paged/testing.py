"""CPU stand-ins for what only a CUDA GPU has, shipped once for the tests and the benchmarks.

- :class:`HostMemory`: managed memory stood in for by host tensors marked paged, so the paging
  policy, the pool, coverage and re-paging run on CPU;
- :class:`FakeProbe`: device memory as numbers, for the pressure source;
- :class:`FakeCupti`: the ``cupti.cupti`` module of cupti-python, delivering synthetic
  unified-memory counter records;
- :class:`FakeCudaGenerators`: ``torch.cuda``'s random generator functions over stand-in devices,
  for the per-step generator states of a resume;
- :func:`tiny_llama_config`: the tiny Llama that the tests and their subprocess scripts build.

Each replaces a real seam (``ManagedMemory``, ``MemoryProbe``, the CUPTI binding,
``lightning_paged.core.sampling._cuda``); the code
above the seam is the code that runs on a GPU.
"""

from __future__ import annotations

import enum
import os
from types import SimpleNamespace
from typing import Any

import torch

from lightning_paged.core.eviction.sources import MemorySample
from lightning_paged.core.paging import ManagedMemory

MIB = 1024 * 1024
GIB = 1024 * MIB


def tiny_llama_config(**overrides: Any) -> Any:
    """A two-block Llama config small enough to train in a test; ``overrides`` win."""
    from transformers import LlamaConfig

    settings: dict[str, Any] = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    settings.update(overrides)
    return LlamaConfig(**settings)


class FakeCudaGenerators:
    """``torch.cuda``'s generator functions over ``devices`` stand-in devices, ``current`` the current one.

    Each device's generator is a CPU ``torch.Generator`` seeded by its index. As in torch
    (``cuda/random.py``): ``get_rng_state``/``set_rng_state`` take ``"cuda"`` (the current device,
    the default), an index or a ``torch.device``, ``*_all`` cover ``range(device_count())``, and a
    device that is not there raises ``IndexError`` (``torch.cuda.default_generators[idx]``).
    :meth:`draw` draws from the current device's generator, as dropout on it would.
    """

    def __init__(self, devices: int, current: int = 0) -> None:
        self.generators = [torch.Generator().manual_seed(1000 + index) for index in range(devices)]
        self.current = current

    def is_available(self) -> bool:
        return bool(self.generators)

    def is_initialized(self) -> bool:
        return bool(self.generators)

    def device_count(self) -> int:
        return len(self.generators)

    def current_device(self) -> int:
        return self.current

    def _generator(self, device: int | str | torch.device) -> torch.Generator:
        if isinstance(device, str):
            device = torch.device(device)
        index = device if isinstance(device, int) else device.index
        return self.generators[self.current if index is None else index]

    def get_rng_state(self, device: int | str | torch.device = "cuda") -> torch.Tensor:
        return self._generator(device).get_state()

    def set_rng_state(self, new_state: torch.Tensor, device: int | str | torch.device = "cuda") -> None:
        self._generator(device).set_state(new_state)

    def get_rng_state_all(self) -> list[torch.Tensor]:
        return [self.get_rng_state(index) for index in range(self.device_count())]

    def set_rng_state_all(self, new_states: list[torch.Tensor]) -> None:
        for index, state in enumerate(new_states):
            self.set_rng_state(state, index)

    def draw(self, n: int = 4) -> torch.Tensor:
        return torch.rand(n, generator=self.generators[self.current])


TINY = dict(
    vocab_size=64,
    hidden_size=64,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=1,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
"""Sizes every family's tiny config starts from: hidden 64, one block, a 64-token vocabulary.

Every linear layer's input is a multiple of 64 values: bitsandbytes 0.50.2's CPU ``dequantize_4bit``
kernel scales rows shorter than a 64-value block wrongly (``backends/cpu/ops.py``), which real
models never have."""
MOE = dict(
    num_local_experts=4,
    num_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=64,
    shared_expert_intermediate_size=64,
)
"""The mixture-of-experts sizes (each family reads the names it knows): 4 experts, 2 per token."""
MOE_FAMILIES = ("mixtral", "qwen3_moe", "olmoe", "granitemoe", "qwen2_moe")
SMALL_HEADS = ("gemma", "gemma2", "gemma3_text", "qwen3")
"""Families whose default head_dim (256, 128) is set to 32 in the tiny config."""


def tiny_config(model_type: str, **overrides: Any) -> Any:
    """A tiny transformers config of any causal-LM family (``model_type`` as in ``config.json``)."""
    from transformers import AutoConfig

    settings: dict[str, Any] = dict(TINY, **(MOE if model_type in MOE_FAMILIES else {}))
    if model_type in SMALL_HEADS:
        settings["head_dim"] = 32
    settings.update(overrides)
    return AutoConfig.for_model(model_type, **settings)


class HostMemory(ManagedMemory):
    """Managed memory stood in for by host tensors marked paged, counting what is asked of it.

    Fresh buffers hold garbage (``0xAB``), as fresh device memory would, so a caller that forgets
    to zero them is caught.
    """

    def unavailable_reason(self, device: torch.device) -> str | None:
        return None

    def allocate(self, nbytes: int, device: torch.device) -> torch.Tensor:
        self.allocations += 1
        self.allocated_bytes += nbytes
        buffer = torch.full((nbytes,), 0xAB, dtype=torch.uint8)
        buffer.is_paged = True  # type: ignore[attr-defined]
        buffer.page_deviceid = 0  # type: ignore[attr-defined]
        return buffer

    def zero_(self, buffer: torch.Tensor) -> None:
        buffer.zero_()

    def prefetch(self, tensor: torch.Tensor) -> None:
        if not getattr(tensor, "is_paged", False):
            raise ValueError("prefetch of a tensor that is not in paged memory")
        self.prefetches += 1


class FakeProbe:
    """Device memory as a few numbers: managed pages resident, allocator reserve, PCIe counters.

    A :class:`~lightning_paged.core.eviction.sources.MemoryProbe` for the pressure source off-GPU:
    :meth:`evict` and :meth:`page_in` move managed pages the way an activation spike and the
    optimizer's next touch would, and every :meth:`sample` sees the result.
    """

    def __init__(
        self, total: int = 16 * GIB, resident: int = 4 * GIB, reserved: int = 2 * GIB, pcie: bool = False
    ) -> None:
        self.total, self.resident, self.reserved = total, resident, reserved
        self.retries = self.ooms = 0
        self.rx = self.tx = 0 if pcie else None
        self.samples = 0
        self.syncs = 0

    def sample(self) -> MemorySample:
        self.samples += 1
        free = self.total - self.resident - self.reserved
        return MemorySample(free, self.total, self.reserved, self.retries, self.ooms, self.rx, self.tx)

    def synchronize(self) -> None:
        self.syncs += 1

    def evict(self, n: int) -> None:
        """An activation spike pushes ``n`` bytes of managed pages out to the host."""
        self.resident -= n
        self.reserved += n
        if self.tx is not None:
            self.tx += n

    def page_in(self, n: int) -> None:
        """The optimizer touches its state again: ``n`` bytes come back."""
        self.resident += n
        self.reserved -= n
        if self.rx is not None:
            self.rx += n


class CuptiResult(
    enum.IntEnum
):  # values of CUptiResult (cupti_result.h), names as cupti.cupti.Result has them
    SUCCESS = 0
    ERROR_UM_PROFILING_NOT_SUPPORTED = 30
    ERROR_UM_PROFILING_NOT_SUPPORTED_ON_DEVICE = 31


class FakeCupti:
    """Stands in for the ``cupti.cupti`` module: the names and call shapes of cupti-python 13.4.

    Records are delivered to the registered buffer-completed callback as attribute objects, as the
    bindings do, when ``activity_flush_all`` runs. ``now`` is the CUPTI clock in nanoseconds.
    """

    class cuptiError(Exception):
        def __init__(self, status: int) -> None:
            super().__init__(f"CUPTI error {status}")
            self.status = status

    Result = CuptiResult
    ActivityKind = SimpleNamespace(UNIFIED_MEMORY_COUNTER=25, MEMCPY=1)
    ActivityUnifiedMemoryCounterKind = SimpleNamespace(
        BYTES_TRANSFER_HTOD=1, BYTES_TRANSFER_DTOH=2, GPU_PAGE_FAULT=4, THRASHING=5
    )
    ActivityUnifiedMemoryCounterScope = SimpleNamespace(PROCESS_SINGLE_DEVICE=1)

    class _Config:
        """``ActivityUnifiedMemoryCounterConfig(count)``: array fields set on it, ``kind`` per element."""

        def __init__(self, count: int) -> None:
            self.items = [SimpleNamespace(kind=None) for _ in range(count)]
            self.scope = self.device_id = self.enable = None
            self.ptr = id(self)

        def __getitem__(self, i: int) -> SimpleNamespace:
            return self.items[i]

    def __init__(self, refuse: CuptiResult | None = None) -> None:
        self.refuse = refuse
        self.now = 0
        self.pending: list[SimpleNamespace] = []
        self.completed = None
        self.enabled: set[int] = set()
        self.configured: list[list[int]] = []
        self.flushes = 0
        self._configs: dict[int, FakeCupti._Config] = {}

    def ActivityUnifiedMemoryCounterConfig(self, count: int) -> _Config:
        config = self._Config(count)
        self._configs[config.ptr] = config
        return config

    def activity_configure_unified_memory_counter(self, ptr: int, count: int) -> None:
        if self.refuse is not None:
            raise self.cuptiError(self.refuse)
        config = self._configs[ptr]
        assert config.scope == 1 and config.enable == 1 and len(config.items) == count
        self.configured.append([item.kind for item in config.items])

    def activity_register_callbacks(self, requested, completed) -> None:
        size, max_records = requested()
        assert size > 0 and max_records == 0
        self.completed = completed

    def activity_enable(self, kind: int) -> None:
        self.enabled.add(kind)

    def activity_disable(self, kind: int) -> None:
        self.enabled.discard(kind)

    def activity_flush_all(self, flag: int) -> None:
        assert flag == 1
        self.flushes += 1
        records, self.pending = self.pending, []
        if self.completed is not None and records:
            self.completed(records)

    def get_timestamp(self) -> int:
        return self.now

    def emit(self, counter_kind: int, value: int, start: int, cause: int = 0) -> None:
        """A ``UNIFIED_MEMORY_COUNTER`` record with the fields of ``ActivityUnifiedMemoryCounter3``."""
        if 25 in self.enabled:
            self.pending.append(
                SimpleNamespace(
                    kind=25,
                    counter_kind=counter_kind,
                    value=value,
                    start=start,
                    end=start + 10,
                    address=0x7F0000000000,
                    src_id=0,
                    dst_id=0xFFFFFFFF,
                    flags_=cause,
                    process_id=os.getpid(),
                    stream_id=0,
                    pad=0,
                    processors=[0] * 5,
                )
            )


def fake_cupti(refuse: CuptiResult | None = None) -> FakeCupti:
    return FakeCupti(refuse)


class NotSupportedError(RuntimeError):
    """Same name and base as cupti-python's ``cupti._internal.utils.NotSupportedError``."""


NO_DRIVER = (
    "CUDA driver is not found (libcuda.so.1: cannot open shared object file: No such file or directory)"
)
"""What cupti-python 13.4's first real call says on a machine without a driver."""


class UnusableCupti(FakeCupti):
    """``cupti.cupti`` imported where it cannot run: its structs build, every real call refuses.

    cupti-python imports without a driver or libcupti; its first real call then raises
    ``NotSupportedError`` (a ``RuntimeError``, not ``cuptiError``). ``fail_after`` real calls work
    before that (a driver lost in the middle of a run).
    """

    def __init__(self, fail_after: int = 0) -> None:
        super().__init__()
        self.calls = 0
        self.fail_after = fail_after

    def _call(self) -> None:
        self.calls += 1
        if self.calls > self.fail_after:
            raise NotSupportedError(NO_DRIVER)

    def get_timestamp(self) -> int:
        self._call()
        return super().get_timestamp()

    def activity_configure_unified_memory_counter(self, ptr: int, count: int) -> None:
        self._call()
        super().activity_configure_unified_memory_counter(ptr, count)

    def activity_register_callbacks(self, requested: Any, completed: Any) -> None:
        self._call()
        super().activity_register_callbacks(requested, completed)

    def activity_enable(self, kind: int) -> None:
        self._call()
        super().activity_enable(kind)

    def activity_flush_all(self, flag: int) -> None:
        self._call()
        super().activity_flush_all(flag)

    def activity_disable(self, kind: int) -> None:
        self._call()
        super().activity_disable(kind)
