"""Part c of the GPU validation: paged optimizer state yields to an activation spike, and the monitor sees it.

A 12-layer Llama of TinyLlama's width (NF4, LoRA r=64 on every projection, ``paged_adamw_32bit``:
about 220 MB of paged state), without gradient checkpointing so activations grow with the sequence.

1. Calibrate: after a first step (the state exists and is resident), each length of the ramp runs
   once with the allocator's cache emptied before it; what it takes from the driver is the growth
   of *reserved* memory (``max_memory_reserved`` after ``reset_peak_memory_stats``), not of
   allocated memory: the driver sees whole segments, rounded and fragmented.
2. Ballast: with the cache emptied, ``torch.cuda.mem_get_info`` gives what the driver has free
   (resident managed pages count as used there). An ordinary ``torch.empty`` on the device (never
   managed memory) leaves free what the longest step needs minus half the paged state.
3. Ramp: short to long and back, the CUPTI and pressure sources recording side by side, the cache
   emptied after every step, so a step starts from what the driver has free and the state evicted
   by a long step can page back in during the next optimizer step.

What the physics guarantees, and so what is checked (:func:`judge`): a step that needs at least
``margin`` more than is free cannot be served without evicting managed pages, and one that needs at
least ``margin`` less than is free never has to; every step fits, since none needs more than free
plus the evictable state minus ``margin``. Steps between the two bounds are recorded, not judged.
The optimizer step's time after an eviction is recorded, not judged.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace
from typing import Any, Literal

from gpu_registry import Context, part

MIB = 2**20
MARGIN_MIN, MARGIN_MAX = 16 * MIB, 64 * MIB
RAMP = [512, 512, 1024, 2048, 4096, 4096, 2048, 512, 512, 4096, 512, 512]
DRY_RAMP = [16, 16, 32, 64, 32, 16]

Expectation = Literal["evict", "stay", "either"]


@dataclass(frozen=True)
class BallastPlan:
    """How much to leave free, and what each step length is then expected to do."""

    needs: dict[int, int]
    """Bytes each step length takes from the driver (growth of reserved memory), by length."""
    state: int
    """Bytes of optimizer state in managed memory (all of it resident before the ballast)."""
    margin: int
    """Uncertainty allowed on either side of the free memory before a step is judged."""
    free: int
    """Bytes to leave free (the target; after the ballast, what ``mem_get_info`` reported)."""

    def expectation(self, length: int) -> Expectation:
        need = self.needs[length]
        if need >= self.free + self.margin:
            return "evict"
        if need <= self.free - self.margin:
            return "stay"
        return "either"


def plan_ballast(needs: dict[int, int], state: int, free: int) -> tuple[BallastPlan | None, str]:
    """Leave free the longest step's need minus half the paged state; None and why, when that cannot separate."""
    from common import fmt_bytes

    margin = max(MARGIN_MIN, min(MARGIN_MAX, state // 4))
    longest, shortest = max(needs.values()), min(needs.values())
    target = longest - state // 2
    if state // 2 < margin:
        return None, f"the paged state ({fmt_bytes(state)}) is too small to evict a measurable part of it"
    if shortest + margin > target:
        return None, (
            f"cannot separate short from long steps: the shortest takes {fmt_bytes(shortest)}, the longest "
            f"{fmt_bytes(longest)}, paged state {fmt_bytes(state)}"
        )
    if target >= free:
        return None, f"the longest step's {fmt_bytes(longest)} already exceeds the {fmt_bytes(free)} free"
    return BallastPlan(needs=dict(needs), state=state, margin=margin, free=target), ""


def judge(plan: BallastPlan, steps: list[dict[str, Any]], source: str, ramp: list[int]) -> dict[str, Any]:
    """Each step against what the physics guarantees, with ``source``'s counts.

    CUPTI counts eviction records (exact): an "evict" step has some, a "stay" step none. The
    pressure source estimates (free-memory drops, or every byte the device sent over PCIe): an
    "evict" step shows at least half the margin, a "stay" step less.
    """
    exact = source == "cupti"
    bound = plan.margin // 2
    problems = []
    counts = {"evict": [0, 0], "stay": [0, 0]}
    for i, step in enumerate(steps):
        length = step["seq_len"]
        if "error" in step:
            problems.append(f"step {i} ({length} tokens): {step['error']}")
            continue
        expected = plan.expectation(length)
        if expected == "either" or source not in step:
            continue
        evicted = step[source]["evicted_bytes"] or 0
        held = (
            (evicted > 0 if exact else evicted >= bound)
            if expected == "evict"
            else (evicted == 0 if exact else evicted < bound)
        )
        counts[expected][0] += held
        counts[expected][1] += 1
        if not held:
            problems.append(
                f"step {i} ({length} tokens) should {expected} but {source} counted {evicted} bytes evicted"
            )
    if len(steps) < len(ramp):
        problems.append(f"the ramp stopped after {len(steps)} of {len(ramp)} steps")
    if not counts["evict"][1] or not counts["stay"][1]:
        problems.append("the plan left no step that must evict, or none that must not")
    return {"ok": not problems, "problems": problems, "counts": counts}


def _model(ctx: Context) -> tuple[Any, Any, Any, int]:
    """The model (built on the device), its paged optimizer, the managed-memory stand-in (dry run) and the vocabulary."""
    import torch
    from gpu_tokens import MODEL
    from transformers import LlamaForCausalLM
    from workloads import TINY

    from lightning_paged.core.optimizers import build_optimizer, param_groups
    from lightning_paged.core.paging import PagingPolicy
    from lightning_paged.core.qlora import QLoRAConfig, convert_to_qlora
    from lightning_paged.testing import HostMemory

    workload = replace(TINY, num_layers=2) if ctx.dry_run else replace(MODEL, num_layers=12)
    torch.manual_seed(0)
    with torch.device(ctx.device):
        model = LlamaForCausalLM(workload.llama_config())
    compute = "float32" if ctx.dry_run else "bfloat16"
    config = QLoRAConfig(
        compute_dtype=compute, lora_r=64, lora_alpha=128, lora_dropout=0.0, gradient_checkpointing=False
    )
    convert_to_qlora(model, config, device=ctx.device)
    model.train()
    memory = HostMemory() if ctx.dry_run else None
    policy = PagingPolicy(memory=memory) if memory is not None else PagingPolicy()
    optimizer = build_optimizer(
        "paged_adamw_32bit", param_groups(model.named_parameters(), 0.0), paging=policy, lr=1e-4
    )
    return model, optimizer, memory, workload.vocab_size


@part("c", "eviction scenario: CUPTI and pressure side by side", budget_s=60)
def part_eviction(ctx: Context) -> dict[str, Any]:
    from lightning_paged.core.eviction.sources.cupti_setup import configure_counters, cupti_unavailable_reason
    from lightning_paged.testing import FakeCupti, FakeProbe

    fake = FakeCupti() if ctx.dry_run else None  # the dry run's CUPTI: synthetic records, the same calls
    early = configure_counters(
        0, binding=fake
    )  # before this process's first CUDA call, as NVIDIA's sample does
    import torch
    from gpu_tokens import ballast_bytes

    from lightning_paged.core.eviction.paged import PagedBytes
    from lightning_paged.core.eviction.recorder import EvictionRecorder
    from lightning_paged.core.eviction.sources import CuptiSource, PressureSource, SourceUnavailable

    model, optimizer, memory, vocab = _model(ctx)
    cuda = not ctx.dry_run

    def step(length: int, recorders: dict[str, Any] | None = None) -> None:
        for r in (recorders or {}).values():
            r.begin_step(seq_len=length)
        ids = torch.randint(0, vocab, (1, length), device=ctx.device)
        model(input_ids=ids, labels=ids).loss.backward()
        for r in (recorders or {}).values():
            r.begin_optimizer_step()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def between_steps() -> None:
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()  # the next step starts from what the driver has free

    def need(length: int) -> int:
        between_steps()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_reserved()
        step(length)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_reserved() - base

    ramp = DRY_RAMP if ctx.dry_run else RAMP
    if cuda:  # never ask for more managed memory than a fraction of what the card has free
        managed = 8 * sum(p.numel() for p in model.parameters() if p.requires_grad)  # two float32 states each
        if managed > torch.cuda.mem_get_info()[0] // 4:
            return {
                "status": "failed",
                "headline": f"refused: {managed} bytes of paged state is over a quarter of the free memory",
            }
    step(min(ramp))  # creates the (paged) optimizer state
    result: dict[str, Any] = {"configured_before_cuda": early, "ramp": ramp}
    plan = ballast = None
    if cuda:
        needs = {
            length: need(length) for length in sorted(set(ramp))
        }  # also loads every kernel the ramp uses
        state = PagedBytes(0)()
        between_steps()
        free = torch.cuda.mem_get_info()[0]
        result.update(
            needs_bytes=needs,
            paged_state_bytes=state,
            managed_bytes=PagedBytes(0).capacity(),
            free_before_ballast=free,
        )
        plan, problem = plan_ballast(needs, state, free)
        ctx.progress({k: v for k, v in result.items() if k != "ramp"})
        if plan is None:
            return {**result, "status": "failed", "headline": problem}
        ballast = torch.empty(
            ballast_bytes(free, plan.free), dtype=torch.uint8, device=ctx.device
        )  # plain cudaMalloc
        plan = replace(plan, free=torch.cuda.mem_get_info()[0])
        result.update(ballast_bytes=ballast.numel(), free_after_ballast=plan.free, margin_bytes=plan.margin)
        result["expectations"] = {length: plan.expectation(length) for length in sorted(set(ramp))}
    recorders: dict[str, EvictionRecorder] = {}
    paged = (lambda: memory.allocated_bytes) if memory is not None else PagedBytes(0)
    try:
        cupti = (
            CuptiSource(0, binding=fake, sync=lambda: None) if ctx.dry_run else CuptiSource(device_index=0)
        )
        cupti.start()
        recorders["cupti"] = EvictionRecorder(cupti, ctx.path("cupti.jsonl"), paged_bytes=paged)
    except SourceUnavailable as err:
        result["cupti_unavailable"] = str(err) or cupti_unavailable_reason()
    pressure = PressureSource(probe=FakeProbe()) if ctx.dry_run else PressureSource(device_index=0)
    pressure.start()
    recorders["pressure"] = EvictionRecorder(pressure, ctx.path("pressure.jsonl"), paged_bytes=paged)

    steps: list[dict[str, Any]] = []
    for length in ramp:
        try:
            step(length, recorders)
        except torch.cuda.OutOfMemoryError as err:
            steps.append({"seq_len": length, "error": "out of memory: " + str(err).splitlines()[0]})
            ctx.progress(steps[-1])
            for r in recorders.values():
                with contextlib.suppress(Exception):  # close the step the error cut short
                    r.end_step()
            break
        row: dict[str, Any] = {"seq_len": length, "expected": plan.expectation(length) if plan else None}
        for name, r in recorders.items():
            rec = r.end_step()
            row[name] = {
                "evicted_bytes": rec.evicted_bytes,
                "paged_in_bytes": rec.paged_in_bytes,
                "gpu_page_faults": rec.gpu_page_faults,
                "optimizer_step_s": rec.optimizer_step_s,
                "step_s": rec.step_s,
                "device_free_bytes": rec.device_free_bytes,
            }
        between_steps()
        steps.append(row)
        ctx.progress(row)
    for r in recorders.values():
        r.close()
    del ballast
    exact = "cupti" if "cupti" in recorders else "pressure"
    result["steps"] = steps
    if plan is None:  # the dry run: no device memory, so nothing to judge
        ok = len(steps) == len(ramp)
        return {
            **result,
            "status": "passed" if ok else "failed",
            "headline": f"dry run: {len(steps)} of {len(ramp)} ramp steps recorded by {', '.join(recorders)}; "
            "the eviction checks need a GPU",
        }
    verdict = {name: judge(plan, steps, name, ramp) for name in recorders}
    main = verdict[exact]
    evict, stay = main["counts"]["evict"], main["counts"]["stay"]
    evicted = sum((s.get(exact) or {}).get("evicted_bytes") or 0 for s in steps)
    from common import fmt_bytes

    return {
        **result,
        "status": "passed" if main["ok"] else "failed",
        "headline": f"{exact}: steps that must evict did {evict[0]}/{evict[1]}, steps that must not stayed "
        f"{stay[0]}/{stay[1]}, {fmt_bytes(evicted)} evicted in all"
        + (f"; {main['problems'][0]}" if main["problems"] else ""),
        "verdict": verdict,
    }
