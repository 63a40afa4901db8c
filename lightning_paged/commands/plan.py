"""``lightning-paged plan``: will a fit config fit the GPU, and how long can its sequences be?

Takes the config and overrides ``fit`` takes (a model directory with only its ``config.json``, or
``model_config``, is enough: no weight is read) and plans the configured batch at the longest
sequence the data produces (``data.init_args.max_length``) with
:func:`~lightning_paged.core.plan.plan_memory`. Prints the plan as text, or as JSON with ``--json``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Mapping
from typing import Any

from lightning_paged.core.errors import SettingError, UsageError
from lightning_paged.core.plan import PLAN_TARGETS, plan_memory, resolve_model_config
from lightning_paged.core.plan import cuda as plan_cuda
from lightning_paged.core.qlora_config import qlora_config_from_init_args
from lightning_paged.core.units import parse_size

MODEL = "model.init_args."
DATA = "data.init_args."
STRATEGY = "trainer.strategy.init_args."
STRATEGIES = {"paged_qlora": 1, "paged_qlora_ddp": 2, "paged_qlora_fsdp": 3}
"""The QLoRA strategies by registry name: 1 one device, 2 data parallel, 3 sharded."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lightning-paged plan",
        description="Predict the peak GPU memory of a fit config's training step before the run, what paging "
        "absorbs, and the longest sequence that fits. Every option of 'lightning-paged fit' is accepted "
        "(--config FILE, --data.init_args.batch_size 2, --vars.model_dir DIR, ...); no weight file is read.",
    )
    parser.add_argument(
        "--device-memory",
        help="memory of the GPU to plan for, e.g. 24GiB or 80GB (default: the visible GPU's total)",
    )
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    parser.add_argument(
        "--seq-len",
        type=int,
        nargs="+",
        default=[],
        metavar="N",
        help="further sequence lengths to plan (by_seq_len); the planned one is data.init_args.max_length",
    )
    parser.add_argument(
        "--target",
        choices=PLAN_TARGETS,
        default="cuda",
        help="cuda (a GPU, the default) or cpu (the host run itself, without CUDA's terms)",
    )
    parser.add_argument(
        "--max-seq-len",
        type=int,
        help="longest sequence to search (default: the model's max_position_embeddings)",
    )
    parser.add_argument(
        "--pcie-bandwidth",
        default=f"{int(plan_cuda.PCIE_BYTES_PER_S / 1e9)}GB",
        help="bytes per second paging moves over PCIe, for the eviction time (default: %(default)s)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command; returns the exit code (bad input is raised, and told in one line by the caller)."""
    args, rest = build_parser().parse_known_args(argv)
    for value in args.seq_len:
        if value < 1:
            raise SettingError("--seq-len", value, "must be positive lengths in tokens")
    from lightning_paged.commands.cli import parse_config

    config = parse_config(rest)
    inputs = plan_inputs(config)
    device_memory = _device_memory(args.device_memory, args.target)
    plan = plan_memory(
        inputs.pop("model_config"),
        device_memory=device_memory,
        seq_lens=args.seq_len,
        target=args.target,
        max_seq_len=args.max_seq_len,
        pcie_bytes_per_s=parse_size(args.pcie_bandwidth, "--pcie-bandwidth"),
        **inputs,
    )
    print(json.dumps(plan.to_dict(), indent=2) if args.json else plan.render())
    return 0


def _device_memory(value: str | None, target: str) -> int | None:
    if value is not None:
        return parse_size(value, "--device-memory")
    if target == "cpu":
        return None
    import torch

    if torch.cuda.is_available():
        _, total = torch.cuda.mem_get_info(torch.cuda.current_device())
        return int(total)
    raise UsageError(
        "--device-memory is required: no GPU is visible here",
        "give the memory of the GPU to plan for, e.g. --device-memory 24GiB",
    )


def plan_inputs(config: Any) -> dict[str, Any]:
    """``plan_memory``'s arguments from a parsed fit config (model, QLoRA strategy, data, trainer)."""
    model = _section(config, "model")
    data = _section(config, "data")
    trainer = config.get("trainer") if isinstance(config, Mapping) else getattr(config, "trainer", None)
    strategy_name, strategy_args = _strategy(_get(trainer, "strategy"))
    kind = STRATEGIES[strategy_name]
    devices = _devices(_get(trainer, "devices"), _get(trainer, "num_nodes") or 1) if kind > 1 else 1
    max_length = data.get("max_length")
    if not isinstance(max_length, int):
        raise SettingError(
            f"{DATA}max_length",
            max_length,
            "is needed to plan: the longest sequence the data module produces",
        )
    model_class = _import(str(_get(_get(config, "model"), "class_path") or ""))
    return {
        "model_config": _model_config(model),
        "qlora": qlora_config_from_init_args(strategy_args, STRATEGY),
        "optimizer": _plain(model.get("optimizer")),
        "batch_size": int(data.get("batch_size") or 1),
        "seq_len": max_length,
        "packed": bool(data.get("packing", False)),
        "accumulate_grad_batches": int(_get(trainer, "accumulate_grad_batches") or 1),
        "world_size": devices,
        "sharded": kind == 3,
        **_loss_settings(model, model_class),
    }


def _loss_settings(model: Mapping[str, Any], model_class: Any) -> dict[str, Any]:
    """``loss`` and ``loss_chunk_size`` of a ``CausalLMModule`` config (defaults filled in by the parser).

    The parser has checked their values against the module's signature already.
    """
    from lightning_paged.lightning.module import CausalLMModule

    if not (isinstance(model_class, type) and issubclass(model_class, CausalLMModule)):
        return {}
    return {name: model[name] for name in ("loss", "loss_chunk_size") if model.get(name) is not None}


def _get(node: Any, key: str) -> Any:
    if node is None:
        return None
    return node.get(key) if isinstance(node, Mapping) else getattr(node, key, None)


def _plain(value: Any) -> Any:
    """A jsonargparse namespace (or dataclass) as plain dicts."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    as_dict = getattr(value, "as_dict", None)
    if callable(as_dict):
        return as_dict()
    if hasattr(value, "__dataclass_fields__"):
        from dataclasses import asdict

        return asdict(value)
    return value


def _section(config: Any, name: str) -> dict[str, Any]:
    node = _get(config, name)
    init_args = _get(node, "init_args")
    return dict(_plain(init_args) or {})


def _import(path: str) -> Any:
    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name) if module else None
    except (ImportError, AttributeError):
        return None


def _strategy(node: Any) -> tuple[str, dict[str, Any]]:
    """The QLoRA strategy's registry name and init arguments; anything else is refused."""
    from lightning_paged.lightning.strategies import (
        PagedQLoRADDPStrategy,
        PagedQLoRAFSDPStrategy,
        PagedQLoRAStrategy,
    )

    if isinstance(node, str) and node in STRATEGIES:
        return node, {}
    cls = _import(str(_get(node, "class_path") or ""))
    for name, known in (
        ("paged_qlora_fsdp", PagedQLoRAFSDPStrategy),
        ("paged_qlora_ddp", PagedQLoRADDPStrategy),
        ("paged_qlora", PagedQLoRAStrategy),
    ):
        if isinstance(cls, type) and issubclass(cls, known):
            return name, dict(_plain(_get(node, "init_args")) or {})
    shown = node if isinstance(node, str) else _get(node, "class_path")
    raise SettingError(
        "trainer.strategy",
        shown,
        f"is not a QLoRA strategy; the plan covers {', '.join(STRATEGIES)} (the model it plans is NF4 QLoRA)",
    )


def _devices(devices: Any, nodes: int) -> int:
    if isinstance(devices, int) and devices > 0:
        return devices * nodes
    if isinstance(devices, (list, tuple)):
        return len(devices) * nodes
    if isinstance(devices, str) and devices.isdigit():
        return int(devices) * nodes
    import torch

    return max(1, torch.cuda.device_count()) * nodes


def _model_config(model: dict[str, Any]) -> Any:
    """The transformers config of ``CausalLMModule``'s init arguments: its directory's config.json, or model_config."""
    directory = model.get("model_name_or_path")
    if directory is not None:
        return resolve_model_config(str(directory), "model_name_or_path", MODEL)
    settings = model.get("model_config")
    if not isinstance(settings, Mapping):
        raise SettingError(
            f"{MODEL}model_name_or_path",
            None,
            "and model_config are both unset; the plan needs the model's architecture (a directory with "
            "config.json, or model_config)",
        )
    tokenizer = None if "vocab_size" in settings else _tokenizer(model.get("tokenizer", "byte"))
    return resolve_model_config(dict(settings), "model_config", MODEL, tokenizer=tokenizer)


def _tokenizer(tokenizer: Any) -> Any:
    """The run's tokenizer, whose size a ``model_config`` without ``vocab_size`` takes (as ``CausalLMModule`` does)."""
    from lightning_paged.core.tokenizer import load_tokenizer

    try:
        return load_tokenizer(str(tokenizer), f"{MODEL}tokenizer")
    except SettingError as err:
        raise SettingError(
            f"{MODEL}model_config.vocab_size",
            None,
            f"is needed to plan when the tokenizer cannot be loaded ({err})",
        ) from None


if __name__ == "__main__":
    sys.exit(main())
