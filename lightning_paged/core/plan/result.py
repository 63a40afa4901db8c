"""A memory plan: the predicted peak and its parts, whether it fits, what paging absorbs, the longest sequence.

:meth:`MemoryPlan.to_dict` is the JSON of ``lightning-paged plan --json``; :meth:`MemoryPlan.render`
its text. Byte counts are integers; ``None`` means "not known" (no device memory given).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from lightning_paged.core.units import format_bytes

COMPONENTS: dict[str, str] = {
    "weights_4bit": "4-bit weights (packed)",
    "quant_constants": "quantization constants",
    "weights_other": "non-quantized weights (embeddings, head, norms)",
    "lora_weights": "LoRA weights",
    "lora_grads": "LoRA gradients",
    "ddp_buckets": "DDP gradient buckets",
    "fsdp_gathered": "FSDP blocks gathered in flight",
    "optimizer_unpaged": "optimizer state, not paged",
    "optimizer_paged": "optimizer state, paged",
    "activations": "activations kept for backward",
    "loss": "the loss (logits and after)",
    "temporaries": "temporaries",
    "kernel_workspace": "kernel workspace (CUDA kernels)",
    "cuda_context": "CUDA context",
    "allocator_slack": "allocator slack (segments, fragmentation, cuBLAS)",
}
"""Every component key of ``components``, in display order, with its label."""


@dataclass
class SeqLenPlan:
    """The plan of one sequence length."""

    seq_len: int
    peak_bytes: int
    """Predicted peak device bytes of one training step, paged state resident."""
    evicted_bytes: int
    """Paged bytes the driver must evict for this step to fit (0 when it fits as it is, or nothing known)."""
    components: dict[str, int] = field(default_factory=dict)
    phase: str = ""
    """Where the step peaks: ``forward``, ``backward`` or ``optimizer``."""
    peak_without_paged_bytes: int = 0
    """The step's peak if every paged byte were on the host (and the optimizer step's, which pages it back)."""


@dataclass
class MemoryPlan:
    """What a training step will need, predicted before it runs. See ``docs/plan.md``."""

    target: str
    """``cuda`` (a GPU: kernel workspaces, allocator rounding and slack, the context) or ``cpu``."""
    model: str
    """The model planned: type, parameters and layers."""
    batch_size: int
    seq_len: int
    """The planned sequence length: the longest the data can produce."""
    device_memory: int | None
    peak_bytes: int
    components: dict[str, int]
    paged_bytes: int
    """Bytes of optimizer state in paged (managed) memory: what the driver can evict under pressure."""
    fits: bool | None
    """The step fits with every paged byte on the device."""
    fits_with_paging: bool | None
    """The step fits once paged state is evicted during the forward and backward passes."""
    evicted_bytes: int
    """Bytes evicted per step at ``seq_len`` (and paged back in at the optimizer step)."""
    pcie_seconds: float
    """Time of moving ``evicted_bytes`` out and back over PCIe at the assumed rate."""
    longest_seq_len: int | None
    """Longest sequence (at this batch size) that fits with paging; up to ``max_seq_len``."""
    longest_seq_len_without_paging: int | None
    max_seq_len: int
    """The longest sequence searched (the model's ``max_position_embeddings`` unless given)."""
    by_seq_len: list[SeqLenPlan]
    world_size: int = 1
    levers: list[str] = field(default_factory=list)
    """What would make a step that does not fit fit, most effective first."""
    notes: list[str] = field(default_factory=list)
    """What the plan assumed."""
    seconds: float = 0.0
    """How long planning took."""

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["by_seq_len"] = [
            {"seq_len": p.seq_len, "peak_bytes": p.peak_bytes, "evicted_bytes": p.evicted_bytes}
            | {"phase": p.phase, "components": p.components}
            for p in self.by_seq_len
        ]
        return data

    def render(self) -> str:
        """The plan as text: the breakdown at ``seq_len``, the verdict, the longest sequences, each length."""
        budget = "unknown" if self.device_memory is None else format_bytes(self.device_memory)
        lines = [
            f"Memory plan: {self.model}, batch {self.batch_size} x {self.seq_len} tokens, target {self.target}"
            + (f", per rank of {self.world_size}" if self.world_size > 1 else "")
            + f", device memory {budget}",
            "",
            f"  {'component':<52} {'bytes':>12}",
        ]
        for key, label in COMPONENTS.items():
            if self.components.get(key):
                lines.append(f"  {label:<52} {format_bytes(self.components[key]):>12}")
        lines.append(
            f"  {'predicted peak' + _phase(self.by_seq_len, self.seq_len):<52} {format_bytes(self.peak_bytes):>12}"
        )
        lines.append("")
        lines.append("  " + self.verdict())
        if self.longest_seq_len is not None:
            lines.append(
                f"  longest sequence that fits: {_longest(self.longest_seq_len, self.max_seq_len)} with paging, "
                f"{_longest(self.longest_seq_len_without_paging, self.max_seq_len)} without"
            )
        if len(self.by_seq_len) > 1:
            lines += ["", f"  {'seq_len':>8} {'peak':>12} {'evicted':>12}"]
            for p in self.by_seq_len:
                lines.append(
                    f"  {p.seq_len:>8} {format_bytes(p.peak_bytes):>12} {format_bytes(p.evicted_bytes):>12}"
                )
        if self.levers:
            lines += ["", "  To make it fit:"] + [f"  - {lever}" for lever in self.levers]
        if self.notes:
            lines += ["", "  Assumed:"] + [f"  - {note}" for note in self.notes]
        lines.append(f"\n  planned in {self.seconds:.1f} s")
        return "\n".join(lines)

    def verdict(self) -> str:
        if self.fits is None:
            return "fits: unknown (no device memory given)"
        if self.fits:
            spare = (self.device_memory or 0) - self.peak_bytes
            return f"fits, {format_bytes(spare)} to spare"
        if self.fits_with_paging:
            return (
                f"fits only with paging: about {format_bytes(self.evicted_bytes)} of optimizer state evicted per "
                f"step at {self.seq_len} tokens and paged back in, about {self.pcie_seconds:.2f} s of PCIe traffic"
            )
        return "does NOT fit, even with every paged byte evicted"


def _phase(points: list[SeqLenPlan], seq_len: int) -> str:
    phase = next((p.phase for p in points if p.seq_len == seq_len), "")
    return (
        f" (in the {phase} pass)"
        if phase in ("forward", "backward")
        else (" (at the optimizer step)" if phase else "")
    )


def _longest(value: int | None, cap: int) -> str:
    if value is None:
        return "unknown"
    if value == 0:
        return "none"
    return f"{value}+ (the model's limit)" if value >= cap else str(value)
