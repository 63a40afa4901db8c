"""``lightning-paged export``: a PEFT adapter directory, or a merged model, from a run or a checkpoint.

::

    lightning-paged export RUN_OR_CHECKPOINT --out DIR [--merge] [--base PATH] [--overwrite]

``RUN_OR_CHECKPOINT`` is a run directory (its ``last.ckpt``, else its newest checkpoint, and the
``config.yaml`` LightningCLI saved in it) or a checkpoint file (the nearest ``config.yaml`` above
it, or ``--config``). Before anything is written, the checkpoint is checked against the run: the
base model (weight-file hashes, or the tensors of the model rebuilt from the config) and the
quantization and LoRA settings must be those it was trained with. Output goes to a temporary
directory beside ``--out`` and is renamed into place at the end: a failure leaves nothing behind
and an existing ``--out`` is replaced only with ``--overwrite``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning_paged.core.atomic import CheckpointReadError, read_checkpoint, staged_directory
from lightning_paged.core.compare import LogitComparison, compare_logits
from lightning_paged.core.errors import SettingError
from lightning_paged.core.export import (
    DEFAULT_MAX_SHARD_SIZE,
    Adapter,
    ExportError,
    MergeReport,
    adapter_from_state_dict,
    merge_adapter,
    save_adapter,
)
from lightning_paged.core.export_4bit import check_quantizes_to, is_prequantized
from lightning_paged.core.fingerprint import BaseFingerprint, Fingerprint, tensors_fingerprint
from lightning_paged.core.qlora import convert_to_qlora, qlora_config_from_init_args, select_target
from lightning_paged.core.run_checks import (
    check_base,
    check_settings,
    files_fingerprint_with_bar,
    find_base_dir,
)
from lightning_paged.core.units import parse_size
from lightning_paged.lightning.run_config import (
    build_module,
    locate_run,
    read_run_config,
    strategy_qlora_settings,
)
from lightning_paged.lightning.strategies.base import SETTING_PREFIX

PROG = "lightning-paged export"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Write a PEFT adapter directory (adapter_config.json, adapter_model.safetensors) from a "
        "QLoRA run, or with --merge a transformers model with the adapter merged onto the original 16-bit "
        "base weights.",
    )
    parser.add_argument(
        "run",
        metavar="RUN_OR_CHECKPOINT",
        help="a run directory (uses last.ckpt, else the newest *.ckpt, and the run's config.yaml) or a .ckpt file",
    )
    parser.add_argument(
        "--out", required=True, type=Path, help="directory to write; must not exist (see --overwrite)"
    )
    parser.add_argument(
        "--merge",
        action="store_true",
        help="merge the adapter onto the base model's 16-bit weights and write a full model directory",
    )
    parser.add_argument(
        "--base",
        type=Path,
        help="the base model directory, when it is no longer where the run loaded it from (same weights); "
        "for a run trained on a pre-quantized 4-bit base, the 16-bit model it was quantized from (checked to "
        "quantize to the same bytes)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.add_argument(
        "--config", type=Path, help="the run's config.yaml, when it is not found beside the checkpoint"
    )
    parser.add_argument(
        "--max-shard-size",
        default="5GB",
        help="largest weight file of a merged model, e.g. 5GB, 500MB (default: %(default)s)",
    )
    parser.add_argument(
        "--no-compare",
        action="store_true",
        help="with --merge: skip comparing the merged model's logits with the 4-bit + adapter model "
        "(the comparison loads both models into host memory)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``lightning-paged export``; returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    try:
        max_shard_size = parse_size(args.max_shard_size, "--max-shard-size")
        result = export_run(
            args.run,
            args.out,
            merge=args.merge,
            base=args.base,
            overwrite=args.overwrite,
            config=args.config,
            max_shard_size=max_shard_size,
            compare=not args.no_compare,
        )
    except (ExportError, CheckpointReadError, SettingError, FileNotFoundError) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    print(result.summary())
    return 0


@dataclass
class ExportResult:
    """What :func:`export_run` wrote and measured."""

    out: Path
    checkpoint: Path
    base_dir: Path | None
    """The base model directory; None when the run built its base from its config."""
    config: Path
    merge: MergeReport | None = None
    comparison: LogitComparison | None = None
    stands_in_for: Path | None = None
    """The pre-quantized base the run was trained on, when a 16-bit ``--base`` was checked to quantize to it."""
    layers_checked: int = 0

    def summary(self) -> str:
        base = str(self.base_dir) if self.base_dir else f"the model built from {self.config}"
        lines = []
        if self.stands_in_for is not None:
            lines.append(
                f"--base {self.base_dir} quantizes to the 4-bit bytes of {self.stands_in_for}, the base the run was "
                f"trained on: {self.layers_checked} layers quantized again with its settings give the same packed "
                "weights and quantization constants, and its other tensors are the same."
            )
        if self.merge is None:
            load = (
                f"AutoModelForCausalLM.from_pretrained('{self.base_dir}')"
                if self.base_dir
                else "<the model built from the run's config>"
            )
            lines.append(f"Wrote the PEFT adapter of {self.checkpoint} to {self.out} (base: {base}).")
            lines.append(f"Load it with: PeftModel.from_pretrained({load}, '{self.out}')")
            return "\n".join(lines)
        files = len(self.merge.files)
        written = f"{files} weight file{'s' if files > 1 else ''} in {self.out}"
        if self.merge.dequantized:
            lines.append(
                f"Merged the adapter of {self.checkpoint} into {self.merge.merged} layers of the weights of {base}, "
                f"dequantized from its bitsandbytes 4-bit ({self.merge.dequantized}) weights: {written}. The "
                "merged weights keep the 4-bit quantization error; to merge onto 16-bit weights, give --base "
                "with the 16-bit model that was quantized (it is checked to quantize to the same bytes)."
            )
        else:
            lines.append(
                f"Merged the adapter of {self.checkpoint} into {self.merge.merged} layers of the 16-bit weights "
                f"of {base}: {written}."
            )
        if self.comparison is not None:
            lines.append(f"Against the 4-bit + adapter model: {self.comparison.summary()}.")
        return "\n".join(lines)


def export_run(
    run: str | os.PathLike,
    out: str | os.PathLike,
    merge: bool = False,
    base: str | os.PathLike | None = None,
    overwrite: bool = False,
    config: str | os.PathLike | None = None,
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
    compare: bool = True,
    progress: bool = True,
) -> ExportResult:
    """Check a run's checkpoint against its base model and settings, then export or merge its adapter."""
    out = Path(out).expanduser()
    if out.exists() and not overwrite:
        raise ExportError(f"--out {out} already exists; choose another directory or add --overwrite")
    checkpoint_path, config_path = locate_run(
        Path(run).expanduser(), Path(config).expanduser() if config else None
    )
    # The run's own file: its hyper-parameters may hold config objects the weights-only loader refuses.
    checkpoint = read_checkpoint(checkpoint_path, weights_only=False)
    meta = checkpoint.get("lightning_paged")
    if not isinstance(meta, dict) or "fingerprint" not in meta or "state_dict" not in checkpoint:
        raise ExportError(
            f"checkpoint {checkpoint_path} was not written by a lightning_paged QLoRA strategy (it carries no "
            "base-model fingerprint); export needs a checkpoint of a paged_qlora, paged_qlora_ddp or paged_qlora_fsdp run"
        )
    run_config = read_run_config(config_path)
    saved = Fingerprint.from_dict(meta["fingerprint"])
    settings = strategy_qlora_settings(run_config)
    if settings is None:
        strategy = (run_config.get("trainer") or {}).get("strategy")
        raise ExportError(
            f"{config_path} is not the config of a QLoRA run (trainer.strategy is {strategy!r}), but "
            f"{checkpoint_path} was written by one: they belong to different runs; give the checkpoint's own run"
        )
    check_settings(saved, settings, checkpoint_path, config_path, SETTING_PREFIX)
    adapter = adapter_from_state_dict(
        checkpoint["state_dict"], meta["peft_config"], prefix=meta["target_prefix"]
    )

    module = None
    stands_in_for, layers_checked = None, 0
    if saved.base.kind == "files":
        configured = ((run_config.get("model") or {}).get("init_args") or {}).get("model_name_or_path")
        base_dir = find_base_dir(saved.base, configured, base)
        current = files_fingerprint_with_bar(base_dir, progress)
        if base is not None and current.sha256 != saved.base.sha256:
            stands_in_for, layers_checked = _check_stand_in(
                saved.base, configured, base_dir, current, checkpoint_path, progress
            )
        else:
            check_base(saved.base, current, checkpoint_path, "here")
    else:
        if base is not None:
            raise ExportError(
                "--base is for runs that load their base model from a directory; this run built it from its "
                f"config ({saved.base.source}) and export rebuilds it from {config_path}"
            )
        base_dir = None
        module = build_module(run_config)
        current = tensors_fingerprint(_target(module, meta))
        check_base(saved.base, current, checkpoint_path, f"rebuilt from {config_path.name}")

    result = ExportResult(
        out=out,
        checkpoint=checkpoint_path,
        base_dir=base_dir,
        config=config_path,
        stands_in_for=stands_in_for,
        layers_checked=layers_checked,
    )
    try:
        with staged_directory(out, overwrite) as staging:
            if not merge:
                base_name = str(base_dir) if base_dir else None
                save_adapter(adapter, staging, base_name, task_type=meta.get("task_type"))
            else:
                result.merge, result.comparison = _merge(
                    adapter,
                    checkpoint,
                    run_config,
                    base_dir,
                    stands_in_for or base_dir,
                    module,
                    staging,
                    max_shard_size,
                    compare,
                    progress,
                )
    except FileExistsError:
        raise ExportError(
            f"--out {out} already exists; choose another directory or add --overwrite"
        ) from None
    return result


def _merge(
    adapter: Adapter,
    checkpoint: dict[str, Any],
    run_config: dict[str, Any],
    base_dir: Path | None,
    trained_base: Path | None,
    module: Any,
    staging: Path,
    max_shard_size: int,
    compare: bool,
    progress: bool,
) -> tuple[MergeReport, LogitComparison | None]:
    meta = checkpoint["lightning_paged"]
    model_dir = staging / "model"
    if base_dir is None:  # built from a config: write its 16-bit weights first, then merge from them
        target = _target(module, meta)
        if not hasattr(target, "save_pretrained"):
            raise ExportError(
                f"--merge needs a transformers model; the run's model is a {type(target).__name__}"
            )
        base_dir = staging / "base"
        target.save_pretrained(str(base_dir), safe_serialization=True, max_shard_size=max_shard_size)
    report = merge_adapter(adapter, base_dir, model_dir, max_shard_size=max_shard_size, progress=progress)
    trained_base = (
        trained_base or base_dir
    )  # the model as trained: a base built from the config was saved there
    comparison = _compare(checkpoint, run_config, trained_base, module, model_dir) if compare else None
    if (staging / "base").exists():
        shutil.rmtree(staging / "base")
    for item in model_dir.iterdir():
        os.replace(item, staging / item.name)
    model_dir.rmdir()
    return report, comparison


def _compare(
    checkpoint: dict[str, Any], run_config: dict[str, Any], base_dir: Path, module: Any, merged_dir: Path
) -> LogitComparison:
    """The merged model against the model as trained: the 4-bit base, quantized as in training, + adapter."""
    import torch
    from transformers import AutoModelForCausalLM

    meta = checkpoint["lightning_paged"]
    if module is None:
        module = build_module(run_config, model_name_or_path=base_dir)
    target = _target(module, meta)
    settings = qlora_config_from_init_args(
        {**meta["qlora"], "gradient_checkpointing": False}, "checkpoint qlora."
    )
    convert_to_qlora(target, settings, device="cpu")
    prefix = meta["target_prefix"]
    state = {k.removeprefix(prefix): v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
    loaded = target.load_state_dict(state, strict=False)
    mismatched = loaded.unexpected_keys + [k for k in loaded.missing_keys if ".lora_" in k]
    if mismatched:
        raise ExportError(
            f"the checkpoint's adapter does not fit the rebuilt model (first mismatch: {mismatched[0]})"
        )
    merged = AutoModelForCausalLM.from_pretrained(str(merged_dir), dtype=torch.float32, local_files_only=True)
    return compare_logits(merged, target, vocab_size=merged.config.vocab_size)


def _check_stand_in(
    saved: BaseFingerprint,
    configured: str | None,
    base_dir: Path,
    current: BaseFingerprint,
    checkpoint: Path,
    progress: bool,
) -> tuple[Path, int]:
    """A ``--base`` other than the trained base: accepted for a pre-quantized base it quantizes to, byte for byte.

    The pre-quantized base the run was trained on must still be where the run loaded it from (its
    files match the checkpoint); otherwise, or when the trained base is not pre-quantized, the
    usual refusal names the difference.
    """
    try:
        trained = find_base_dir(saved, configured, None)
    except ExportError:
        trained = None
    if trained is None or not is_prequantized(trained):
        check_base(saved, current, checkpoint, "here")
    assert trained is not None
    check_base(saved, files_fingerprint_with_bar(trained, progress), checkpoint, "here")
    return trained, check_quantizes_to(base_dir, trained, progress)


def _target(module: Any, meta: dict[str, Any]) -> Any:
    return select_target(module, meta.get("model_attr", "auto"))
