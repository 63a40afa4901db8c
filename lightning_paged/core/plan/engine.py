"""Planning a run's memory: dry runs of a few decoder blocks, scaled to the model, plus arithmetic.

A dry run (:func:`dry_run`) converts the model on fake tensors and runs two real training steps of
it under :class:`~lightning_paged.core.plan.counter.LiveBytes`. A 70B model's dry run would cost
minutes of Python, so :func:`plan_memory` runs the model with 2 and with 3 decoder blocks: every
byte count at each phase's peak is affine in the number of identical blocks, and the model's is
``m(2) + (n - 2) * (m(3) - m(2))`` (``tests/core/plan`` checks that against the whole model). The
longest sequence comes from a quadratic fit over three lengths (the bytes of one step are at most
quadratic in its length: attention masks), checked by dry runs at the answer.
"""

from __future__ import annotations

import copy
import functools
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any, Literal, get_args

import torch

from lightning_paged.core.causal_lm_loss import batch_loss
from lightning_paged.core.compat.torch import real_tensors
from lightning_paged.core.errors import SettingError
from lightning_paged.core.loading import directory_config
from lightning_paged.core.loss import DEFAULT_CHUNK_SIZE, LOSS_KINDS, LossKind
from lightning_paged.core.models import transformers_config
from lightning_paged.core.optimizers import OptimizerConfig
from lightning_paged.core.paged_optimizer import optimizer_and_schedule, optimizer_config
from lightning_paged.core.plan import cuda, offload
from lightning_paged.core.plan.counter import LiveBytes
from lightning_paged.core.plan.fake import SmallOnesReal, fake_mode, fake_qlora_model, planning_batch
from lightning_paged.core.plan.planner import Measure, Planner, Settings, describe, levers, notes
from lightning_paged.core.plan.result import MemoryPlan
from lightning_paged.core.plan.step import PlanMemory, StepLoss, measure_step
from lightning_paged.core.qlora_config import QLoRAConfig, qlora_config

PlanTarget = Literal["cuda", "cpu"]
"""What the plan is for: a CUDA GPU, or the host (the dry run's own device, for checking the plan)."""
PLAN_TARGETS: tuple[str, ...] = get_args(PlanTarget)
SCALE_FROM = (2, 3)
"""Block counts of the two dry runs a deeper model is scaled from."""


class DryRun:
    """A converted model on fake tensors with its optimizer, measured at as many batch shapes as asked.

    The optimizer step's peak does not depend on the batch but through the batch's own tensors: it is
    measured at the first shape and carried over to the others with the batch's bytes replaced.
    """

    def __init__(
        self,
        config: Any,
        qlora: QLoRAConfig,
        optimizer: OptimizerConfig,
        *,
        target: PlanTarget = "cuda",
        step_loss: StepLoss | None = None,
        micro_batches: int = 1,
    ) -> None:
        self.config = config
        self.target = target
        self.step_loss: StepLoss = step_loss or batch_loss
        self.micro_batches = micro_batches
        self.offload: offload.PlanOffload | None = None
        self.mode = fake_mode()
        constant = replace(optimizer, scheduler="constant", warmup_steps=0)  # a schedule holds no memory
        with self.mode:
            self.model = fake_qlora_model(config, qlora, self.mode)
            if qlora.offload_activations:  # the run's hooks, made to move the dry run's tensors
                self.offload, self.step_loss = offload.install(self.model, self.step_loss)
            with real_tensors():  # bitsandbytes builds its code tables from Python numbers
                self.optimizer, _ = optimizer_and_schedule(
                    self.model, constant, total_steps=None, memory=PlanMemory()
                )
        self._optimizer_phase: dict[str, float] | None = None

    def measure(self, batch_size: int, seq_len: int, packed: bool = False) -> Measure:
        """What each phase of a training step on a ``batch_size`` x ``seq_len`` batch held at its peak."""
        counter = LiveBytes(
            round_size=cuda.round_size if self.target == "cuda" else None,
            workspace=cuda.workspace if self.target == "cuda" else None,
        )
        batch = planning_batch(batch_size, seq_len, int(self.config.vocab_size), packed)
        first = self._optimizer_phase is None
        if self.offload is not None:
            self.offload.counter = counter
        with self.mode, SmallOnesReal(), counter:
            measured = measure_step(
                self.model,
                self.optimizer,
                self.step_loss,
                batch,
                counter,
                self.micro_batches,
                optimizer_step=first,
            )
        out: Measure = {}
        for phase, peak in measured.peaks.items():
            values: dict[str, float] = dict(peak.by_category)
            values.update({f"class:{k}": v for k, v in peak.by_class.items()})
            values["paged_state"] = measured.paged_state_bytes
            values["paged_pooled"] = measured.pooled_span_bytes
            out[phase] = values
        if first:
            self._optimizer_phase = out["optimizer"]
        else:
            assert self._optimizer_phase is not None
            out["optimizer"] = dict(self._optimizer_phase, batch=sum(_nbytes(v) for v in batch.values()))
        return out


def _nbytes(value: Any) -> int:
    return value.numel() * value.element_size() if isinstance(value, torch.Tensor) else 0


def dry_run(
    config: Any,
    qlora: QLoRAConfig,
    optimizer: OptimizerConfig,
    batch_size: int,
    seq_len: int,
    *,
    packed: bool = False,
    micro_batches: int = 1,
    step_loss: StepLoss | None = None,
    target: PlanTarget = "cuda",
) -> Measure:
    """One dry run of the whole ``config`` model: what each phase of a training step held at its peak."""
    run = DryRun(config, qlora, optimizer, target=target, step_loss=step_loss, micro_batches=micro_batches)
    return run.measure(batch_size, seq_len, packed)


def with_layers(config: Any, layers: int) -> Any:
    """``config`` with ``layers`` decoder blocks (its per-block lists cut to match)."""
    config = copy.deepcopy(config)
    config.num_hidden_layers = layers
    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, list):
        config.layer_types = layer_types[:layers]
    return config


def scalable(config: Any) -> bool:
    """Whether the blocks repeat identically, so a few of them stand for all (else the whole model runs)."""
    layers = getattr(config, "num_hidden_layers", None)
    if not isinstance(layers, int) or layers <= max(SCALE_FROM):
        return False
    layer_types = getattr(config, "layer_types", None)
    return not isinstance(layer_types, list) or len(set(layer_types)) <= 1


def scaled(small: Measure, large: Measure, layers: int) -> Measure:
    """Each figure of a ``layers``-block model from those at 2 and 3 blocks."""
    lo, hi = SCALE_FROM
    out: Measure = {}
    for phase in small.keys() & large.keys():
        keys = small[phase].keys() | large[phase].keys()
        out[phase] = {
            k: small[phase].get(k, 0)
            + (layers - lo) / (hi - lo) * (large[phase].get(k, 0) - small[phase].get(k, 0))
            for k in keys
        }
    return out


def resolve_model_config(
    value: Any, setting: str = "model_config", where: str = "", tokenizer: Any = None
) -> Any:
    """A transformers config from a config object, a dict with ``model_type``, or a directory / ``config.json`` path.

    A dict is read as a run's ``model_config`` is (:func:`~lightning_paged.core.models.transformers_config`,
    ``vocab_size`` from ``tokenizer`` when given), a path as a run's model directory is
    (:func:`~lightning_paged.core.loading.directory_config`: ``config.json`` alone, no weight file).
    Errors name ``<where><setting>`` (or ``<where>model_config.<key>``).
    """
    from pathlib import Path

    from transformers import PretrainedConfig

    if isinstance(value, PretrainedConfig):
        return copy.deepcopy(value)
    if isinstance(value, (str, Path)):
        path = Path(value).expanduser()
        if not (path / "config.json" if path.is_dir() else path).is_file():
            raise SettingError(
                setting,
                str(value),
                "is neither a model directory with config.json nor a config.json file",
                where,
            )
        try:
            return directory_config(path)
        except (OSError, ValueError) as err:
            raise SettingError(
                setting, str(value), f"cannot be read as a transformers config ({err})", where
            ) from None
    if not isinstance(value, Mapping):
        raise SettingError(
            setting,
            value,
            "must be a transformers config, a dict with model_type, or a config.json path",
            where,
        )
    try:
        return transformers_config(value, tokenizer)
    except SettingError as err:
        raise err.located(where) from None


def _positive(name: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise SettingError(name, value, "must be a positive whole number")
    return value


def plan_memory(
    model_config: Any,
    *,
    qlora: QLoRAConfig | Mapping[str, Any] | None = None,
    optimizer: OptimizerConfig | Mapping[str, Any] | None = None,
    batch_size: int = 1,
    seq_len: int = 2048,
    seq_lens: Sequence[int] = (),
    packed: bool = False,
    accumulate_grad_batches: int = 1,
    device_memory: int | None = None,
    target: PlanTarget = "cuda",
    world_size: int = 1,
    sharded: bool = False,
    loss: LossKind = "chunked",
    loss_chunk_size: int = DEFAULT_CHUNK_SIZE,
    step_loss: StepLoss | None = None,
    max_seq_len: int | None = None,
    search: bool = True,
    context_bytes: int = cuda.CUDA_CONTEXT_BYTES,
    pcie_bytes_per_s: float = cuda.PCIE_BYTES_PER_S,
) -> MemoryPlan:
    """Predict the peak device memory of one QLoRA training step, before the run, without weights.

    Args:
        model_config: The causal LM: a transformers config, a dict with ``model_type``, or the path of
            a model directory or its ``config.json`` (weights are never read).
        qlora: The conversion settings (:class:`QLoRAConfig` or its fields); None: the defaults.
        optimizer: The optimizer settings (:class:`OptimizerConfig` or its fields); None: the defaults.
        batch_size: Rows per batch (per device).
        seq_len: Tokens per row of the planned batch: the longest the data can produce.
        seq_lens: Further lengths to plan (``by_seq_len``).
        packed: Rows hold several packed samples (``position_ids``, a block-diagonal mask).
        accumulate_grad_batches: Micro-batches per optimizer step (from 2 on, gradients stay live).
        device_memory: Bytes of the device; None: the plan says nothing about fitting.
        target: ``"cuda"`` for a GPU; ``"cpu"`` plans the host run itself (no CUDA terms).
        world_size: Processes; with ``sharded`` the FSDP share of one rank, else one DDP rank.
        sharded: The model is sharded over ``world_size`` ranks (FSDP).
        loss: The run's loss, as ``CausalLMModule``'s setting: ``"chunked"`` (its default; the logits of
            ``loss_chunk_size`` tokens at a time) or ``"standard"`` (every logit). FSDP runs the standard
            loss whatever the setting (the chunked loss falls back there), and so does its plan.
        loss_chunk_size: Tokens per chunk of the chunked loss.
        step_loss: A loss of one's own from ``(model, batch)``, in place of ``loss``.
        max_seq_len: Longest sequence searched; default the model's ``max_position_embeddings``.
        search: Search the longest sequences that fit (needs ``device_memory``).
        context_bytes: The CUDA context's bytes.
        pcie_bytes_per_s: Rate of paging over PCIe, for the eviction time.
    """
    started = time.perf_counter()
    if target not in PLAN_TARGETS:
        raise SettingError("target", target, f"must be one of {', '.join(PLAN_TARGETS)}")
    for name, value in (("batch_size", batch_size), ("seq_len", seq_len), ("world_size", world_size)):
        _positive(name, value)
    _positive("accumulate_grad_batches", accumulate_grad_batches)
    _positive("loss_chunk_size", loss_chunk_size)
    if loss not in LOSS_KINDS:
        raise SettingError("loss", loss, f"must be one of {', '.join(LOSS_KINDS)}")
    planned_loss = "standard" if sharded and world_size > 1 else loss
    for value in seq_lens:
        _positive("seq_lens", value)
    if device_memory is not None:
        _positive("device_memory", device_memory)
    config = resolve_model_config(model_config)
    if target == "cuda":
        config = cuda.cuda_config(config)
    settings = Settings(
        config=config,
        qlora=qlora_config(qlora, "qlora."),
        optimizer=optimizer_config(optimizer, "optimizer."),
        batch_size=batch_size,
        packed=packed,
        micro_batches=min(accumulate_grad_batches, 2),
        target=target,
        world_size=world_size,
        sharded=sharded and world_size > 1,
        step_loss=step_loss or functools.partial(batch_loss, loss=planned_loss, chunk_size=loss_chunk_size),
        loss=None if step_loss is not None else (planned_loss, loss_chunk_size, planned_loss != loss),
        context_bytes=context_bytes if target == "cuda" else 0,
        device_memory=device_memory,
    )
    planner = Planner(settings, _measurer(settings))
    points = [planner.point(n) for n in sorted({seq_len, *seq_lens})]
    main = next(p for p in points if p.seq_len == seq_len)
    cap = max_seq_len or int(getattr(config, "max_position_embeddings", 0) or 0) or seq_len
    longest = longest_without = None
    if device_memory is not None and search:
        longest, longest_without = planner.longest(max(cap, 1), min(seq_len, max(cap, 1)))
    plan = MemoryPlan(
        target=target,
        model=describe(config, settings),
        batch_size=batch_size,
        seq_len=seq_len,
        device_memory=device_memory,
        peak_bytes=main.peak_bytes,
        components=main.components,
        paged_bytes=main.components.get("optimizer_paged", 0),
        fits=None if device_memory is None else main.peak_bytes <= device_memory,
        fits_with_paging=None if device_memory is None else main.peak_without_paged_bytes <= device_memory,
        evicted_bytes=main.evicted_bytes,
        pcie_seconds=2 * main.evicted_bytes / pcie_bytes_per_s,
        longest_seq_len=longest,
        longest_seq_len_without_paging=longest_without,
        max_seq_len=cap,
        by_seq_len=points,
        world_size=world_size,
        notes=notes(settings),
    )
    plan.levers = levers(plan, settings, main)
    plan.seconds = time.perf_counter() - started
    return plan


def _measurer(settings: Settings) -> Callable[[int], tuple[Measure, dict[str, float]]]:
    """Dry runs for one sequence length: of 2 and 3 blocks scaled to the model's, or of the whole model."""
    config = settings.config
    layers = int(config.num_hidden_layers)
    counts = SCALE_FROM if scalable(config) else (layers,)
    runs: dict[int, DryRun] = {}

    def run(blocks: int, seq_len: int) -> Measure:
        if blocks not in runs:
            runs[blocks] = DryRun(
                with_layers(config, blocks) if blocks != layers else config,
                settings.qlora,
                settings.optimizer,
                target=settings.target,  # type: ignore[arg-type]
                step_loss=settings.step_loss,
                micro_batches=settings.micro_batches,
            )
        return runs[blocks].measure(settings.batch_size, seq_len, settings.packed)

    def measure(seq_len: int) -> tuple[Measure, dict[str, float]]:
        if len(counts) == 1:
            whole = run(layers, seq_len)
            return whole, {k: v / layers for k, v in whole["optimizer"].items()}
        small, large = (run(n, seq_len) for n in counts)
        span = counts[1] - counts[0]
        block = {k: (v - small["optimizer"].get(k, 0)) / span for k, v in large["optimizer"].items()}
        return scaled(small, large, layers), block

    return measure
