"""From measured dry runs to a plan: components per phase, ranks, paging, the longest sequence, the levers.

Framework-free arithmetic over what :func:`~lightning_paged.core.plan.engine.dry_run` measured:

- a phase's components are the counter's categories at that phase's peak; on CUDA the paged state is
  what the optimizer touched (managed memory takes device pages only where written), and the CUDA
  context and the allocator's slack are added (:mod:`lightning_paged.core.plan.cuda`);
- ranks: with FSDP each rank keeps ``1/world_size`` of the weights, adapters, gradients and optimizer
  state (quantization constants whole, as ``core/fsdp.py`` leaves them) and gathers two blocks at a time;
  under DDP each rank holds the model and a second copy of the gradients in DDP's buckets;
- paging: a step fits with paging when its forward and backward passes fit with every paged byte
  evicted and its optimizer step fits with them all back; the bytes evicted are those over the device.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lightning_paged.core.optimizers import OptimizerConfig
from lightning_paged.core.paging import POOL_SLAB_BYTES
from lightning_paged.core.plan import cuda
from lightning_paged.core.plan.result import COMPONENTS, MemoryPlan, SeqLenPlan
from lightning_paged.core.plan.step import StepLoss
from lightning_paged.core.qlora_config import QLoRAConfig
from lightning_paged.core.units import format_bytes

Measure = dict[str, dict[str, float]]
SHARDED = (
    "weights_4bit",
    "weights_other",
    "lora_weights",
    "lora_grads",
    "optimizer_paged",
    "optimizer_unpaged",
)
"""Components FSDP divides among ranks."""
GROWING = ("activations", "loss", "temporaries", "kernel_workspace")
"""Components that grow with the batch (and the sequence)."""
SEARCH_RUNS = 10
"""Lengths at most measured while searching the longest sequence that fits."""
PRECISION = 1 / 256
MIN_STEP = 8
"""The longest sequence reported is within ``PRECISION`` of the true one, or ``MIN_STEP`` tokens if more."""


@dataclass
class Settings:
    config: Any
    qlora: QLoRAConfig
    optimizer: OptimizerConfig
    batch_size: int
    packed: bool
    micro_batches: int
    target: str
    world_size: int
    sharded: bool
    step_loss: StepLoss | None
    loss: tuple[str, int, bool] | None
    """The run's loss as planned: kind, chunk size, whether FSDP made it standard; None for a ``step_loss``."""
    context_bytes: int
    device_memory: int | None


class Planner:
    """Turns sequence lengths into :class:`SeqLenPlan` points, running (and caching) the dry runs they need."""

    def __init__(
        self, settings: Settings, measure: Callable[[int], tuple[Measure, dict[str, float]]]
    ) -> None:
        self.settings = settings
        self._measure = measure
        self._points: dict[int, SeqLenPlan] = {}
        self._phases: dict[int, dict[str, tuple[float, float]]] = {}

    def point(self, seq_len: int) -> SeqLenPlan:
        """The plan of one sequence length (one set of dry runs, cached)."""
        if seq_len not in self._points:
            measure, per_block = self._measure(seq_len)
            self._points[seq_len], self._phases[seq_len] = self._assemble(seq_len, measure, per_block)
        return self._points[seq_len]

    def _assemble(
        self, seq_len: int, measure: Measure, per_block: dict[str, float]
    ) -> tuple[SeqLenPlan, dict[str, tuple[float, float]]]:
        phases: dict[str, tuple[float, float]] = {}
        best: tuple[float, str, dict[str, int]] | None = None
        for phase, values in measure.items():
            components = self.components(values, per_block)
            total = float(sum(components.values()))
            paged = float(components.get("optimizer_paged", 0))
            phases[phase] = (total, paged)
            if best is None or total > best[0]:
                best = (total, phase, components)
        assert best is not None
        total, phase, components = best
        without = _without_paged(phases)
        budget = self.settings.device_memory
        evicted = 0
        if budget is not None and without <= budget:
            over = max(t for p, (t, _) in phases.items() if p != "optimizer") - budget
            evicted = int(min(max(over, 0), components.get("optimizer_paged", 0)))
        return SeqLenPlan(seq_len, int(total), evicted, components, phase, int(without)), phases

    def components(self, values: dict[str, float], per_block: dict[str, float]) -> dict[str, int]:
        """One phase's components on the target, for one rank."""
        s = self.settings
        out = {k: values.get(k, 0.0) for k in COMPONENTS if k in values}
        if values.get("batch"):
            out["activations"] = out.get("activations", 0.0) + values["batch"]
        if s.target == "cuda":
            out["optimizer_paged"] = values.get("paged_state", 0.0)
        else:  # the host pool holds whole slabs
            pooled = values.get("paged_pooled", 0.0)
            slabs = math.ceil(pooled / POOL_SLAB_BYTES) * POOL_SLAB_BYTES
            out["optimizer_paged"] = (
                values.get("paged_state", 0.0) - pooled + slabs
                if pooled
                else values.get("optimizer_paged", 0.0)
            )
        if s.world_size > 1 and s.sharded:
            for key in SHARDED:
                if key in out:
                    out[key] = out[key] / s.world_size
            block = sum(per_block.get(k, 0.0) for k in ("weights_4bit", "weights_other", "lora_weights"))
            out["fsdp_gathered"] = 2 * block * (1 - 1 / s.world_size)
        elif s.world_size > 1:
            out["ddp_buckets"] = out.get("lora_weights", 0.0)
        if s.target == "cuda":
            classes = {k.split(":", 1)[1]: v for k, v in values.items() if k.startswith("class:")}
            out["cuda_context"] = s.context_bytes
            out["allocator_slack"] = cuda.allocator_slack({k: int(v) for k, v in classes.items()})
        return {k: round(v) for k, v in out.items() if round(v)}

    # -- the longest sequence ------------------------------------------------------------------

    def longest(self, cap: int, around: int) -> tuple[int, int]:
        """Longest sequences (up to ``cap``) that fit with paging and without, each confirmed by a dry run.

        Dry runs bracket the answer (a quadratic through measured lengths guesses past the longest one
        that fits), then a linear interpolation of the measured bytes between the bracket's ends, checked
        by a run one :data:`PRECISION` away on the other side, closes it (:data:`SEARCH_RUNS` runs at
        most). What it reports has been run and fits; up to one ``PRECISION`` more may fit too.
        """
        self.point(around)
        return self._search(cap, True), self._search(cap, False)

    def _need(self, n: int, with_paging: bool) -> int:
        p = self.point(n)
        return p.peak_without_paged_bytes if with_paging else p.peak_bytes

    def _search(self, cap: int, with_paging: bool) -> int:
        budget = self.settings.device_memory
        assert budget is not None
        stepped = False  # the last probe checked one step from an end: if that did not close it, halve
        for _ in range(SEARCH_RUNS):
            fitting = [n for n in self._points if self._need(n, with_paging) <= budget]
            over = [n for n in self._points if self._need(n, with_paging) > budget]
            if not fitting:
                probe = max(1, min(over) // 4)
                if probe == min(over):
                    return 0
                self.point(probe)
                continue
            lo = max(fitting)
            if lo >= cap:
                return cap
            step = max(MIN_STEP, int(lo * PRECISION))
            hi = min((n for n in over if n > lo), default=None)
            if hi is None:
                probe = min(cap, max(lo + step, self._extrapolate(lo, cap, with_paging, budget)))
            elif hi - lo <= step:
                return lo
            else:
                need_lo, need_hi = self._need(lo, with_paging), self._need(hi, with_paging)
                guess = lo + (budget - need_lo) * (hi - lo) // max(need_hi - need_lo, 1)
                if stepped:
                    probe, stepped = (lo + hi) // 2, False
                elif guess - lo < step or hi - guess < step:  # next to an end: check a step away instead
                    probe, stepped = (lo + step if guess - lo < step else hi - step), True
                else:
                    probe = guess
                probe = min(max(probe, lo + 1), hi - 1)
            self.point(probe)
        return max((n for n in self._points if self._need(n, with_paging) <= budget), default=0)

    def _extrapolate(self, lo: int, cap: int, with_paging: bool, budget: int) -> int:
        """A guess past ``lo`` from a quadratic (a line) through three (two) measured lengths near it, else twice ``lo``."""
        near = _spread(list(self._points), lo)
        if len(near) < 2:
            return min(cap, 2 * lo)
        fitted = {
            phase: _quadratic({n: self._phases[n][phase] for n in near}) for phase in self._phases[near[0]]
        }

        def ok(n: int) -> bool:
            values = {phase: (f[0](n), f[1](n)) for phase, f in fitted.items()}
            return (_without_paged(values) if with_paging else max(t for t, _ in values.values())) <= budget

        guess = _largest(ok, cap)
        return guess if guess > lo else min(cap, 2 * lo)


def _spread(points: list[int], guess: int) -> list[int]:
    """Three of ``points`` nearest ``guess``, apart enough for a stable fit (or the three nearest)."""
    gap = max(8, guess // 16)
    chosen: list[int] = []
    for n in sorted(points, key=lambda n: abs(n - guess)):
        if all(abs(n - c) >= gap for c in chosen):
            chosen.append(n)
        if len(chosen) == 3:
            return sorted(chosen)
    return sorted(sorted(points, key=lambda n: abs(n - guess))[:3])


def _without_paged(phases: dict[str, tuple[float, float]]) -> float:
    """The most the device must hold if paged state leaves it during forward and backward."""
    needs = [t - p if phase != "optimizer" else t for phase, (t, p) in phases.items()]
    return max(needs)


def _quadratic(
    samples: dict[int, tuple[float, float]],
) -> tuple[Callable[[int], float], Callable[[int], float]]:
    """Lagrange quadratics through three ``(total, paged)`` samples."""
    xs = sorted(samples)

    def through(index: int) -> Callable[[int], float]:
        def value(n: int) -> float:
            out = 0.0
            for i, xi in enumerate(xs):
                term = samples[xi][index]
                for j, xj in enumerate(xs):
                    if i != j:
                        term *= (n - xj) / (xi - xj)
                out += term
            return out

        return value

    return through(0), through(1)


def _largest(ok: Callable[[int], bool], cap: int) -> int:
    """Largest ``n`` in ``[0, cap]`` with ``ok(n)``, for a monotone ``ok``; 0 when ``ok(1)`` is false."""
    if not ok(1):
        return 0
    if ok(cap):
        return cap
    lo, hi = 1, cap
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo


def describe(config: Any, settings: Settings) -> str:
    layers = getattr(config, "num_hidden_layers", "?")
    hidden = getattr(config, "hidden_size", "?")
    return f"{getattr(config, 'model_type', 'model')} ({layers} blocks, hidden {hidden})"


def notes(settings: Settings) -> list[str]:
    s = settings
    out = [
        f"every row full ({'packed' if s.packed else 'padded'}), every position a target",
        f"{s.optimizer.name}, LoRA r={s.qlora.lora_r}, gradient checkpointing "
        + ("on" if s.qlora.gradient_checkpointing else "off"),
    ]
    if s.target == "cuda":
        out.append(
            f"CUDA context {format_bytes(s.context_bytes)}, allocator fragmentation {cuda.FRAGMENTATION:.0%} "
            "(estimates), kernel workspaces of CUDA's 4-bit matmul and flash attention"
        )
    if s.loss is None:
        out.append("the loss: the step_loss given")
    elif s.loss[0] == "chunked":
        out.append(f"chunked loss: the logits of {s.loss[1]} tokens at a time")
    else:
        out.append(
            "standard loss: every logit" + (" (FSDP runs it whatever the loss setting)" if s.loss[2] else "")
        )
    if s.qlora.offload_activations:
        out.append(
            "offload_activations: the checkpointed layers' inputs wait in host memory, not on the device"
        )
    if s.world_size > 1:
        out.append(f"{'FSDP' if s.sharded else 'DDP'} over {s.world_size} ranks: one rank's share")
    return out


def levers(plan: MemoryPlan, settings: Settings, main: SeqLenPlan) -> list[str]:
    """What would make a plan that does not fit (even with paging) fit, with the numbers the plan gives."""
    budget = plan.device_memory
    if budget is None or plan.fits_with_paging:
        return []
    out = []
    if plan.longest_seq_len == 0:
        out.append("sequence length: not even one token fits; the weights and fixed costs alone are too many")
    if plan.longest_seq_len:
        out.append(
            f"sequence length: at most {plan.longest_seq_len} tokens fit with paging "
            f"({plan.longest_seq_len_without_paging} without)"
        )
    growing = sum(main.components.get(k, 0) for k in GROWING)
    fixed = main.peak_without_paged_bytes - growing
    per_row = growing / settings.batch_size
    if per_row > 0 and budget > fixed:
        rows = int((budget - fixed) // per_row)
        if 0 < rows < settings.batch_size:
            out.append(
                f"batch size: about {rows} rows fit at {plan.seq_len} tokens (accumulate more batches instead)"
            )
    if not settings.qlora.gradient_checkpointing:
        out.append("gradient checkpointing: turn it on (keeps one hidden state per block for backward)")
    saved = main.components.get("activations", 0)
    if saved and not settings.qlora.offload_activations:
        out.append(
            f"activation offloading (offload_activations): moves the checkpointed inputs among the "
            f"{format_bytes(saved)} of activations kept for backward to the host"
        )
    if settings.loss is not None and settings.loss[0] == "standard" and not settings.loss[2]:
        out.append("loss: 'chunked' never holds the logits of the whole batch")
    sharded = sum(
        main.components.get(k, 0) for k in ("weights_4bit", "weights_other", "lora_weights", "lora_grads")
    )
    if sharded and not settings.sharded:
        ranks = next(
            (w for w in (2, 4, 8) if main.peak_without_paged_bytes - sharded * (1 - 1 / w) <= budget), None
        )
        if ranks:
            out.append(
                f"FSDP: sharding over {ranks} GPUs divides the weights, adapters and their state by {ranks}"
            )
    return out
