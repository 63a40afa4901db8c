"""Converting to QLoRA and sharding together: no rank ever holds the whole 4-bit model.

:func:`convert_and_shard` does what :func:`~lightning_paged.core.qlora.convert_to_qlora` followed by
:func:`~lightning_paged.core.fsdp.shard_model` does, block by block: each repeated block's linear
weights are read (from the model directory's files, or from the model's own tensors) and quantized
one layer at a time on the device, its other weights placed and its adapters added, and then
``fully_shard`` keeps this rank's piece of every parameter and frees the rest before the next block
is read. A rank's peak is about the 4-bit model divided by the world size, plus one block in 4 bits
and one layer in 16 bits; the weights outside the blocks (embeddings, final norm, head) are placed
whole once the blocks are sharded, and then sharded with the root.

Each rank's packed bytes and quantization constants are exactly those of a whole-model quantization,
cut as FSDP cuts (``torch.chunk`` along dim 0). The adapters are drawn block after block in the order
the whole-model conversion draws them (only they draw random numbers, and quantizing draws none), so
from the same random state every rank gets the adapters that conversion gives; rank zero's are
broadcast anyway. (An adapted layer outside the blocks is added last: the same order, unless it
comes before the blocks in the model.) Framework-free: the Lightning and Fabric strategies call this.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lightning_paged.core.compat.peft import mark_loaded_in_4bit, unmark_loaded_in_4bit
from lightning_paged.core.compat.torch import own_buffers
from lightning_paged.core.deferred import deferred_directory, mark_deferred
from lightning_paged.core.errors import SettingError
from lightning_paged.core.fsdp import ShardReport, find_blocks, local_tensor
from lightning_paged.core.layers4bit import (
    linear4bit_layers,
    place_non_quantized,
    quantize_linear,
    quantized_weight_bytes,
    set_submodule,
)
from lightning_paged.core.loading.files import WeightFiles
from lightning_paged.core.loading.stream import (
    LoadReport,
    _layer,
    _place_unquantized,
    _trim_host_heap,
    plan_load,
)
from lightning_paged.core.lora import checkpointing, inject_lora, lora_config
from lightning_paged.core.offload import enable_activation_offload
from lightning_paged.core.qlora import ConversionReport
from lightning_paged.core.qlora_config import STORAGE_DTYPES, QLoRAConfig
from lightning_paged.core.selection import select_layers


def convert_and_shard(
    model: nn.Module,
    config: QLoRAConfig,
    device: torch.device,
    mesh: Any,
    *,
    block_class: str | None = None,
    reshard_after_forward: bool = True,
) -> tuple[ConversionReport, ShardReport]:
    """Convert ``model`` to NF4 QLoRA and shard it over ``mesh``, one block at a time (see the module).

    ``model`` is built empty from a directory (:func:`~lightning_paged.core.loading.empty_model`), whose
    files every rank reads itself, or holds its weights (the same on every rank: broadcast them first).
    ``config.quant_storage`` must be a floating type. Returns the conversion's report (a
    :class:`~lightning_paged.core.loading.LoadReport` for a directory) and this rank's shard report.
    """
    from torch.distributed.fsdp import fully_shard

    config.validate()
    if not STORAGE_DTYPES[config.quant_storage].is_floating_point:
        raise SettingError(
            "quant_storage",
            config.quant_storage,
            "must be a floating type to shard 4-bit weights (convert with quant_storage equal to compute_dtype)",
        )
    blocks = find_blocks(model, block_class)
    kind = type(blocks[0]).__name__  # before fully_shard gives it an FSDP subclass
    linear_names, quantized, targets = select_layers(model, config)
    named = list(model.named_modules())  # the original modules, by the names the files use
    prefixes = [next(n for n, m in named if m is block) for block in blocks]
    originals: dict[str, Any] = {name: model.get_submodule(name) for name in quantized}
    totals = _Totals(
        params=sum(p.numel() for p in model.parameters()),
        replaced_16bit=sum(linear.weight.numel() * 2 for linear in originals.values()),
    )
    lora = lora_config(config, targets, linear_names)
    source_of = _DirectorySource if deferred_directory(model) is not None else _TensorSource
    with source_of.open(model, config, device) as source:  # a directory's files are checked here
        for param in model.parameters():
            param.requires_grad_(False)
        if config.gradient_checkpointing:
            checkpointing(model)
        offload = enable_activation_offload(model) if config.offload_activations else None
        for block, prefix in zip(blocks, prefixes):
            inside = [(n, m) for n, m in named if n == prefix or n.startswith(prefix + ".")]
            _fill(source, model, inside, originals, totals)
            _adapt(block, lora, [t[len(prefix) + 1 :] for t in targets if t.startswith(prefix + ".")], device)
            _broadcast_trainable(block, mesh)
            fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward)
            source.trim()
        outside = [(n, m) for n, m in named if not any(n == p or n.startswith(p + ".") for p in prefixes)]
        _fill(source, model, outside, originals, totals)
        rest = [t for t in targets if not any(t.startswith(p + ".") for p in prefixes)]
        if rest:
            _adapt(model, lora, rest, device)
        mark_loaded_in_4bit(model)
        model.peft_config = {"default": lora}  # type: ignore[assignment]
        _broadcast_trainable(model, mesh)
        fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        report = source.report(
            ConversionReport(
                quantized=quantized,
                skipped=[n for n in linear_names if n not in quantized],
                adapted=list(targets),
                total_params=totals.params + trainable,
                trainable_params=trainable,
                quantized_bytes=totals.quantized,
                replaced_16bit_bytes=totals.replaced_16bit,
                offload=offload,
                offload_requested=config.offload_activations,
            )
        )
    layers: list[Any] = linear4bit_layers(model)
    shard = ShardReport(
        block_class=kind,
        blocks=len(blocks),
        world_size=mesh.size(),
        local_packed_bytes=sum(local_tensor(la.weight).numel() * la.weight.element_size() for la in layers),
        total_packed_bytes=totals.packed,
        quant_state_bytes=totals.quantized - totals.packed,
    )
    return report, shard


def _adapt(module: nn.Module, lora: Any, targets: list[str], device: torch.device) -> None:
    """The adapters of ``targets`` (names within ``module``), added by PEFT as to the whole model."""
    if not targets:
        return
    inject_lora(module, replace(lora, target_modules=targets), device)
    module.__dict__.pop("peft_config", None)  # the model's own, set once on the root
    unmark_loaded_in_4bit(module)


class _Totals:
    def __init__(self, params: int, replaced_16bit: int) -> None:
        self.params = params
        """Parameters of the model before the adapters (each quantized weight counted whole)."""
        self.replaced_16bit = replaced_16bit
        self.quantized = 0
        """Packed 4-bit bytes plus quantization constants of every layer, whole."""
        self.packed = 0


def _fill(
    source: Any,
    model: nn.Module,
    modules: list[tuple[str, nn.Module]],
    originals: dict[str, Any],
    totals: _Totals,
) -> None:
    """Give ``modules`` (original modules by name) their weights: each 4-bit layer quantized in turn."""
    linears = [(n, originals[n]) for n, _ in modules if n in originals]
    source.place([(n, m) for n, m in modules if n not in originals], linears)
    for name, linear in linears:
        new: Any = source.layer(name, linear)
        set_submodule(model, name, new)
        totals.quantized += quantized_weight_bytes(new)
        totals.packed += new.weight.numel() * new.weight.element_size()
        del originals[name], new
        linear.to("meta")  # its 16-bit weight is not needed any more


def _is_dtensor(tensor: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def _broadcast_trainable(module: nn.Module, mesh: Any) -> None:
    """Rank zero's adapters on every rank (each initialised its own) before FSDP keeps each rank's piece."""
    if mesh.size() < 2:
        return
    group, source = mesh.get_group(), mesh.mesh.flatten()[0].item()
    for param in module.parameters():
        if param.requires_grad and not _is_dtensor(param):
            dist.broadcast(param.data, src=source, group=group)


class _TensorSource:
    """The weights of a model that holds them: each layer quantized from its own weight."""

    def __init__(self, model: nn.Module, config: QLoRAConfig, device: torch.device) -> None:
        self.model, self.config, self.device = model, config, device

    @classmethod
    @contextlib.contextmanager
    def open(cls, model: nn.Module, config: QLoRAConfig, device: torch.device) -> Iterator[_TensorSource]:
        yield cls(model, config, device)

    def place(self, plain: list[tuple[str, nn.Module]], linears: list[tuple[str, nn.Module]]) -> None:
        """``plain`` modules' weights and buffers on the device (the linear layers are quantized next)."""
        modules = [m for _, m in plain]
        place_non_quantized(self.model, self.config, self.device, modules=modules)
        for module in modules:
            buffers = own_buffers(module)
            for name, buffer in list(buffers.items()):
                if buffer is not None:
                    buffers[name] = buffer.to(self.device)

    def layer(self, name: str, linear: nn.Module) -> nn.Module:
        assert isinstance(linear, nn.Linear)
        return quantize_linear(linear, self.config, self.device)

    def trim(self) -> None:
        _trim_if_host(self.device)

    def report(self, report: ConversionReport) -> ConversionReport:
        return report


class _DirectorySource:
    """The weights of a model built empty from a directory: read from its files, checked first."""

    def __init__(
        self, model: nn.Module, config: QLoRAConfig, device: torch.device, files: Any, plan: Any
    ) -> None:
        self.model, self.config, self.device = model, config, device
        self.files, self.plan = files, plan
        self.read = [0]
        self.placed: dict[int, nn.Parameter] = {}

    @classmethod
    @contextlib.contextmanager
    def open(cls, model: nn.Module, config: QLoRAConfig, device: torch.device) -> Iterator[_DirectorySource]:
        with WeightFiles(deferred_directory(model)) as files:
            plan = plan_load(model, files, config)  # every check on the files, before anything changes
            yield cls(model, config, device, files, plan)
        mark_deferred(model, None)

    def place(self, plain: list[tuple[str, nn.Module]], linears: list[tuple[str, nn.Module]]) -> None:
        """``plain`` modules' weights and buffers from the files, and the biases of ``linears``."""
        self.read[0] += _place_unquantized(
            self.model,
            self.files,
            self.plan,
            self.config,
            self.device,
            modules=plain + linears,
            placed=self.placed,
        )
        # the norms' output casts (the dtypes are those the files were just read in)
        place_non_quantized(self.model, self.config, self.device, modules=[m for _, m in plain])

    def layer(self, name: str, linear: nn.Module) -> nn.Module:
        assert isinstance(linear, nn.Linear)
        return _layer(name, linear, self.files, self.plan, self.config, self.device, self.read)

    def trim(self) -> None:
        _trim_if_host(self.device)

    def report(self, report: ConversionReport) -> ConversionReport:
        return LoadReport(
            **report.values(),
            directory=str(self.files.directory),
            files=len(self.files.files),
            tensors_read=self.read[0],
            prequantized=self.plan.prequantized is not None,
        )


def _trim_if_host(device: torch.device) -> None:
    if device.type == "cpu":
        _trim_host_heap()
