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
import copy
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from lightning_paged.core.atomic import CheckpointReadError, read_checkpoint
from lightning_paged.core.errors import SettingError
from lightning_paged.core.export import (
    DEFAULT_MAX_SHARD_SIZE,
    Adapter,
    ExportError,
    LogitComparison,
    MergeReport,
    adapter_from_state_dict,
    compare_logits,
    merge_adapter,
    progress_bar,
    save_adapter,
)
from lightning_paged.core.fingerprint import (
    BaseFingerprint,
    Fingerprint,
    describe_differences,
    files_fingerprint,
    settings_of,
    tensors_fingerprint,
    weight_files,
)

PROG = "lightning-paged export"
CONFIG_NAME = "config.yaml"
_QLORA_STRATEGIES = ("paged_qlora", "paged_qlora_ddp")


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
        help="the base model directory, when it is no longer where the run loaded it from (same weights)",
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
        max_shard_size = parse_size(args.max_shard_size)
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
        return 1
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

    def summary(self) -> str:
        base = str(self.base_dir) if self.base_dir else f"the model built from {self.config}"
        if self.merge is None:
            load = (
                f"AutoModelForCausalLM.from_pretrained('{self.base_dir}')"
                if self.base_dir
                else "<the model built from the run's config>"
            )
            return (
                f"Wrote the PEFT adapter of {self.checkpoint} to {self.out} (base: {base}).\n"
                f"Load it with: PeftModel.from_pretrained({load}, '{self.out}')"
            )
        files = len(self.merge.files)
        lines = [
            f"Merged the adapter of {self.checkpoint} into {self.merge.merged} layers of the 16-bit weights of "
            f"{base}: {files} weight file{'s' if files > 1 else ''} in {self.out}."
        ]
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
            "base-model fingerprint); export needs a checkpoint of a paged_qlora or paged_qlora_ddp run"
        )
    run_config = read_run_config(config_path)
    saved = Fingerprint.from_dict(meta["fingerprint"])
    _check_settings(saved, run_config, checkpoint_path, config_path)
    adapter = adapter_from_state_dict(
        checkpoint["state_dict"], meta["peft_config"], prefix=meta["target_prefix"]
    )

    module = None
    if saved.base.kind == "files":
        base_dir = _find_base_dir(saved.base, run_config, base)
        current = files_fingerprint_with_bar(base_dir, progress)
        _check_base(saved.base, current, checkpoint_path, "here")
    else:
        if base is not None:
            raise ExportError(
                "--base is for runs that load their base model from a directory; this run built it from its "
                f"config ({saved.base.source}) and export rebuilds it from {config_path}"
            )
        base_dir = None
        module = build_module(run_config)
        current = tensors_fingerprint(_target(module, meta))
        _check_base(saved.base, current, checkpoint_path, f"rebuilt from {config_path.name}")

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    staging.chmod(0o777 & ~_umask())
    try:
        result = ExportResult(out=out, checkpoint=checkpoint_path, base_dir=base_dir, config=config_path)
        if not merge:
            base_name = str(base_dir) if base_dir else None
            save_adapter(adapter, staging, base_name, task_type=meta.get("task_type"))
        else:
            result.merge, result.comparison = _merge(
                adapter, checkpoint, run_config, base_dir, module, staging, max_shard_size, compare, progress
            )
        _publish(staging, out, overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return result


def _merge(
    adapter: Adapter,
    checkpoint: dict[str, Any],
    run_config: dict[str, Any],
    base_dir: Path | None,
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
    comparison = _compare(checkpoint, run_config, base_dir, module, model_dir) if compare else None
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

    from lightning_paged.core.qlora import QLoRAConfig, convert_to_qlora

    meta = checkpoint["lightning_paged"]
    if module is None:
        module = build_module(run_config, model_name_or_path=base_dir)
    target = _target(module, meta)
    settings = {f.name: meta["qlora"][f.name] for f in fields(QLoRAConfig) if f.name in meta["qlora"]}
    convert_to_qlora(target, QLoRAConfig(**{**settings, "gradient_checkpointing": False}), device="cpu")
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


def locate_run(path: Path, config: Path | None) -> tuple[Path, Path]:
    """``(checkpoint, config.yaml)`` of a run directory or a checkpoint file."""
    if not path.exists():
        raise ExportError(f"RUN_OR_CHECKPOINT {path} does not exist")
    if path.is_dir():
        checkpoints = [p for p in path.rglob("*.ckpt") if p.is_file()]
        if not checkpoints:
            raise ExportError(f"run directory {path} holds no checkpoint (*.ckpt)")
        last = [p for p in checkpoints if p.name == "last.ckpt"]
        checkpoint = max(last or checkpoints, key=lambda p: p.stat().st_mtime)
        roots = [path]
    else:
        checkpoint = path
        roots = [path.parent, path.parent.parent, path.parent.parent.parent]
    if config is not None:
        if not config.is_file():
            raise ExportError(f"--config {config} does not exist")
        return checkpoint, config
    for root in roots:
        found = [
            p for pattern in ("", "*/", "*/*/") for p in root.glob(f"{pattern}{CONFIG_NAME}") if p.is_file()
        ]
        if found:
            return checkpoint, max(found, key=lambda p: p.stat().st_mtime)
    raise ExportError(
        f"no {CONFIG_NAME} found near {checkpoint}; give --config (the config.yaml LightningCLI saved in the "
        "run's log directory)"
    )


def read_run_config(path: Path) -> dict[str, Any]:
    """A LightningCLI config (``fit`` subcommand level), with interpolations resolved."""
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ExportError(f"{path} is not valid YAML: {err}") from None
    if isinstance(data, dict) and "model" not in data and isinstance(data.get("fit"), dict):
        data = data["fit"]
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise ExportError(f"{path} is not a run config: it has no model section")
    if "${" in path.read_text():
        from omegaconf import OmegaConf

        data = OmegaConf.to_container(OmegaConf.create(data), resolve=True)  # type: ignore[assignment]
    return data


def build_module(run_config: dict[str, Any], model_name_or_path: Path | None = None) -> Any:
    """The run's LightningModule, built as LightningCLI built it (same class, arguments and seed)."""
    from jsonargparse import ArgumentParser
    from lightning.fabric.utilities.seed import seed_everything
    from lightning.pytorch import LightningModule

    model = copy.deepcopy(run_config["model"])
    init_args = model.setdefault("init_args", {}) or {}
    if model_name_or_path is not None and init_args.get("model_name_or_path"):
        init_args["model_name_or_path"] = str(model_name_or_path)
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(LightningModule, "model", required=True)
    try:
        parsed = parser.parse_object({"model": model})
        seed = run_config.get("seed_everything")
        if isinstance(seed, int) and not isinstance(seed, bool):
            seed_everything(seed, workers=True, verbose=False)
        return parser.instantiate_classes(parsed)["model"]
    except (ValueError, TypeError, ImportError, SettingError) as err:
        raise ExportError(f"could not build the run's model from its config: {err}") from None


def _target(module: Any, meta: dict[str, Any]) -> Any:
    from lightning_paged.core.qlora import select_target

    return select_target(module, meta.get("model_attr", "auto"))


def _check_settings(saved: Fingerprint, run_config: dict[str, Any], checkpoint: Path, config: Path) -> None:
    """The run's strategy settings must be those the checkpoint was written with."""
    from lightning_paged.core.qlora import QLoRAConfig
    from lightning_paged.lightning.strategies.base import SETTING_PREFIX, qlora_config_from

    strategy = (run_config.get("trainer") or {}).get("strategy")
    if isinstance(strategy, str) and strategy in _QLORA_STRATEGIES:
        settings = settings_of(QLoRAConfig())
    elif isinstance(strategy, dict) and isinstance(strategy.get("init_args"), dict):
        settings = settings_of(qlora_config_from(strategy["init_args"]))
    else:
        raise ExportError(
            f"{config} is not the config of a QLoRA run (trainer.strategy is {strategy!r}), but {checkpoint} "
            "was written by one: they belong to different runs; give the checkpoint's own run"
        )
    current = Fingerprint(base=saved.base, settings=settings)
    differences = describe_differences(saved, current, SETTING_PREFIX, now="in the config")
    if differences:
        raise ExportError(
            f"{checkpoint} does not belong to the run of {config}: it was written with "
            + " and ".join(differences)
        )


def _find_base_dir(
    saved: BaseFingerprint, run_config: dict[str, Any], base: str | os.PathLike | None
) -> Path:
    if base is not None:
        base_dir = Path(base).expanduser()
        if not base_dir.is_dir():
            raise ExportError(f"--base {base_dir} does not exist or is not a directory")
        if not weight_files(base_dir):
            raise ExportError(f"--base {base_dir} holds no model weights (*.safetensors or *.bin)")
        return base_dir
    configured = ((run_config.get("model") or {}).get("init_args") or {}).get("model_name_or_path")
    for candidate in (configured, saved.source):
        if candidate and Path(candidate).expanduser().is_dir() and weight_files(Path(candidate).expanduser()):
            return Path(candidate).expanduser()
    raise ExportError(
        f"the base model was loaded from {saved.source}, which holds no model weights here; give --base with "
        "the directory of the same base model"
    )


def files_fingerprint_with_bar(base_dir: Path, progress: bool) -> BaseFingerprint:
    total = sum(p.stat().st_size for p in weight_files(base_dir))
    with progress_bar("checking base weights", total, progress) as advance:
        return files_fingerprint(base_dir, on_bytes=advance)


def _check_base(saved: BaseFingerprint, current: BaseFingerprint, checkpoint: Path, what: str) -> None:
    differences = describe_differences(Fingerprint(saved, {}), Fingerprint(current, {}), now=what)
    if differences:
        raise ExportError(f"{checkpoint} does not fit this base model: it was written with {differences[0]}")


def _publish(staging: Path, out: Path, overwrite: bool) -> None:
    """Move the finished output into place; an existing ``out`` is replaced only with ``overwrite``."""
    if not out.exists() and not out.is_symlink():
        os.replace(staging, out)
        return
    if not overwrite:
        raise ExportError(f"--out {out} already exists; choose another directory or add --overwrite")
    old = out.with_name(f".{out.name}.replaced-{os.getpid()}")
    os.replace(out, old)
    try:
        os.replace(staging, out)
    except BaseException:
        os.replace(old, out)
        raise
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old)
    else:
        old.unlink()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def parse_size(text: str) -> int:
    """``"5GB"``, ``"500MB"``, ``"2GiB"`` or a number of bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", str(text), flags=re.IGNORECASE)
    if not match:
        raise SettingError("--max-shard-size", text, "must be a size such as 5GB, 500MB or 2GiB")
    number, unit = float(match.group(1)), (match.group(2) or "B").upper()
    powers = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
    powers |= {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    size = int(number * powers[unit])
    if size <= 0:
        raise SettingError("--max-shard-size", text, "must be positive")
    return size
