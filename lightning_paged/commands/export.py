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

from lightning_paged.commands.errors import parse_arguments, run_command
from lightning_paged.commands.trained import Trained, read_trained
from lightning_paged.core.atomic import staged_directory
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
from lightning_paged.core.fingerprint import BaseFingerprint, tensors_fingerprint
from lightning_paged.core.loading import empty_model
from lightning_paged.core.run_checks import check_base, files_fingerprint_with_bar, find_base_dir
from lightning_paged.core.tokenizer import save_tokenizer
from lightning_paged.core.units import parse_size

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
    """Entry point of ``lightning-paged export``; returns the exit code (2 for a bad input, told in one line)."""
    return run_command(_export, list(sys.argv[1:] if argv is None else argv), prog=PROG)


def _export(argv: list[str]) -> int:
    args = parse_arguments(build_parser(), argv)
    if isinstance(args, int):
        return args
    result = export_run(
        args.run,
        args.out,
        merge=args.merge,
        base=args.base,
        overwrite=args.overwrite,
        config=args.config,
        max_shard_size=parse_size(args.max_shard_size, "--max-shard-size"),
        compare=not args.no_compare,
    )
    print(result.summary())
    return 0


@dataclass
class ExportResult:
    """What :func:`export_run` wrote and measured."""

    out: Path
    checkpoint: Path
    base_dir: Path | None
    """The base model directory; None when the run built its base from its config."""
    config: Path | None
    """The run's config file; None for a Fabric or Accelerate checkpoint, which has none."""
    merge: MergeReport | None = None
    comparison: LogitComparison | None = None
    stands_in_for: Path | None = None
    """The pre-quantized base the run was trained on, when a 16-bit ``--base`` was checked to quantize to it."""
    layers_checked: int = 0
    tokenizer: str = ""
    """What became of the run's tokenizer files (written beside the weights, or why not)."""

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
            lines.append(
                f"Wrote the PEFT adapter of {self.checkpoint} to {self.out} (base: {base}).{self.tokenizer}"
            )
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
        if self.tokenizer:
            lines.append(self.tokenizer.strip())
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
    """Check a checkpoint against its base model and settings, then export or merge its adapter.

    ``run`` is a LightningCLI run directory or checkpoint, a ``fabric.save`` checkpoint or an
    ``accelerator.save_state`` directory (see :mod:`lightning_paged.commands.trained`).
    """
    out = Path(out).expanduser()
    if out.exists() and not overwrite:
        raise ExportError(f"--out {out} already exists; choose another directory or add --overwrite")
    trained = read_trained(Path(run).expanduser(), Path(config).expanduser() if config else None)
    record, saved = trained.record, trained.record.fingerprint
    if record.peft_config is None:
        raise ExportError(
            f"{trained.path} records no LoRA adapter configuration (peft_config): its model was saved "
            "without adapters, so there is nothing to export"
        )
    adapter = adapter_from_state_dict(trained.weights, record.peft_config, prefix=record.target_prefix)

    module = None
    stands_in_for, layers_checked = None, 0
    base_dir: Path | None
    if saved.base.kind == "files":
        base_dir = find_base_dir(saved.base, trained.configured_base, base)
        current = files_fingerprint_with_bar(base_dir, progress)
        if base is not None and current.sha256 != saved.base.sha256:
            stands_in_for, layers_checked = _check_stand_in(
                saved.base, trained.configured_base, base_dir, current, trained.path, progress
            )
        else:
            check_base(saved.base, current, trained.path, "here")
    elif trained.config_path is not None:  # built from the run's config: rebuilt from it
        if base is not None:
            raise ExportError(
                "--base is for runs that load their base model from a directory; this run built it from its "
                f"config ({saved.base.source}) and export rebuilds it from {trained.config_path}"
            )
        base_dir = None
        module = trained.module()
        current = tensors_fingerprint(trained.target(module))
        check_base(saved.base, current, trained.path, f"rebuilt from {trained.config_path.name}")
    else:  # built in a script: --base is the directory it was saved to, checked to hold the same tensors
        if base is None:
            raise ExportError(
                f"{trained.path} was trained on a model built in a script ({saved.base.source}), which export "
                "cannot rebuild: give --base with the directory that model was saved to (save_pretrained); "
                "it is checked to hold the same weights"
            )
        base_dir = find_base_dir(saved.base, None, base)
        module = load_base(base_dir)
        current = tensors_fingerprint(module)
        check_base(saved.base, current, trained.path, f"loaded from --base {base_dir}")

    result = ExportResult(
        out=out,
        checkpoint=trained.path,
        base_dir=base_dir,
        config=trained.config_path,
        stands_in_for=stands_in_for,
        layers_checked=layers_checked,
    )
    try:
        with staged_directory(out, overwrite) as staging:
            if not merge:
                base_name = str(base_dir) if base_dir else None
                save_adapter(adapter, staging, base_name, task_type=record.task_type)
            else:
                result.merge, result.comparison = _merge(
                    adapter,
                    trained,
                    base_dir,
                    stands_in_for or base_dir,
                    module,
                    staging,
                    max_shard_size,
                    compare,
                    progress,
                )
            result.tokenizer = _save_tokenizer(trained.run_config or {}, staging)
    except FileExistsError:
        raise ExportError(
            f"--out {out} already exists; choose another directory or add --overwrite"
        ) from None
    return result


def _merge(
    adapter: Adapter,
    trained: Trained,
    base_dir: Path | None,
    trained_base: Path | None,
    module: Any,
    staging: Path,
    max_shard_size: int,
    compare: bool,
    progress: bool,
) -> tuple[MergeReport, LogitComparison | None]:
    model_dir = staging / "model"
    if base_dir is None:  # built from a config: write its 16-bit weights first, then merge from them
        target = trained.target(module)
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
    comparison = _compare(trained, trained_base, module, model_dir) if compare else None
    if (staging / "base").exists():
        shutil.rmtree(staging / "base")
    for item in model_dir.iterdir():
        os.replace(item, staging / item.name)
    model_dir.rmdir()
    return report, comparison


def _compare(trained: Trained, base_dir: Path, module: Any, merged_dir: Path) -> LogitComparison:
    """The merged model against the model as trained: the 4-bit base, quantized as in training, + adapter."""
    import torch
    from transformers import AutoModelForCausalLM

    if module is None:
        module = trained.module(model_name_or_path=base_dir) if trained.run_config else empty_model(base_dir)
    target = trained.load_adapter(trained.target(module), device="cpu")
    merged = AutoModelForCausalLM.from_pretrained(str(merged_dir), dtype=torch.float32, local_files_only=True)
    return compare_logits(merged, target, vocab_size=merged.config.vocab_size)


def load_base(directory: Path) -> Any:
    """The causal LM saved in ``directory``, with its weights in the dtype they were saved in."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(directory), dtype="auto", local_files_only=True)


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


def _save_tokenizer(run_config: dict[str, Any], directory: Path) -> str:
    """The run's tokenizer files beside the weights, as transformers' Trainer writes them; what was done."""
    data = (run_config.get("data") or {}).get("init_args") or {}
    spec = data.get("tokenizer") or ((run_config.get("model") or {}).get("init_args") or {}).get("tokenizer")
    try:
        if not isinstance(spec, str) or not save_tokenizer(
            spec, directory, data.get("chat_template") or "auto"
        ):
            return ""
    except SettingError as err:  # the adapter is still worth having
        return f" Its tokenizer files are not beside it: {err}."
    return f" Tokenizer files of {spec} beside it."
