"""``lightning-paged generate``: a run's model with its adapter answers a file of prompts, as JSON Lines.

::

    lightning-paged generate RUN_OR_CHECKPOINT --prompts FILE --out FILE.jsonl [--max-new-tokens N]
        [--format F] [--device D] [--base PATH] [--config PATH] [--overwrite]

The model is the one the run's sample used: the base model quantized with the checkpoint's QLoRA
settings, plus the checkpoint's adapter (the base is checked against the run's fingerprint, as
``export`` checks it). Each prompt is rendered as the run's training samples were, by the same
:class:`~lightning_paged.core.encoding.SampleEncoder` built from the run's data settings (tokenizer,
chat template or role headers, alpaca prompt), in the format most of its training samples have
(``--format`` chooses another); answers are greedy and stop at the chat template's end-of-turn token
or the end-of-sequence token.

The prompts file is any file the data module reads (JSON Lines, JSON, CSV, Parquet, a
``save_to_disk`` directory). Each record is ``{"messages": [...]}`` (the conversation so far,
answered as the assistant), ``{"prompt": ...}``, ``{"instruction": ..., "input": ...}``, or a
plain string in a JSON list. Each output line is ``{"prompt": <the record's prompt>, "rendered":
<the text the model received>, "completion": <the answer>}``, with ``"note"`` saying why an empty
answer is empty. The file is written when every prompt is answered, atomically.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from lightning_paged.commands.errors import parse_arguments, run_command
from lightning_paged.commands.trained import Trained, read_trained
from lightning_paged.core.atomic import atomic_write
from lightning_paged.core.data_files import read_records
from lightning_paged.core.encoding import ALPACA_INPUT, ALPACA_PROMPT, ROLE_HEADER, Prompt, SampleEncoder
from lightning_paged.core.errors import ExportError, MissingFileError, SettingError
from lightning_paged.core.fingerprint import tensors_fingerprint
from lightning_paged.core.formats import FORMATS, SampleReader
from lightning_paged.core.generation import generate_answer
from lightning_paged.core.run_checks import check_base, files_fingerprint_with_bar, find_base_dir
from lightning_paged.core.tokenizer import load_tokenizer

PROG = "lightning-paged generate"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Answer a file of prompts with a QLoRA run's model and adapter, prompted as the run's "
        "training samples were rendered; write the completions as JSON Lines.",
    )
    parser.add_argument("run", metavar="RUN_OR_CHECKPOINT", help="a run directory or a .ckpt file")
    parser.add_argument("--prompts", required=True, help="JSONL/JSON/CSV/Parquet file of prompts")
    parser.add_argument("--out", required=True, type=Path, help="JSON Lines file to write")
    parser.add_argument(
        "--max-new-tokens", type=int, default=128, help="most tokens per answer (default: %(default)s)"
    )
    parser.add_argument(
        "--format",
        default="auto",
        choices=["auto", *FORMATS],
        help="how a plain prompt is rendered; auto: as most of the run's training samples (default)",
    )
    parser.add_argument(
        "--device", default="auto", help="cpu, cuda, cuda:1, ...; auto: cuda when there is one"
    )
    parser.add_argument("--base", type=Path, help="the base model directory, when it moved since the run")
    parser.add_argument(
        "--config", type=Path, help="the run's config.yaml, when it is not beside the checkpoint"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``lightning-paged generate``; returns the exit code (2 for a bad input, told in one line)."""
    return run_command(_generate, list(sys.argv[1:] if argv is None else argv), prog=PROG)


def _generate(argv: list[str]) -> int:
    args = parse_arguments(build_parser(), argv)
    if isinstance(args, int):
        return args
    written = generate_run(
        args.run,
        args.prompts,
        args.out,
        max_new_tokens=args.max_new_tokens,
        format=args.format,
        device=args.device,
        base=args.base,
        config=args.config,
        overwrite=args.overwrite,
    )
    print(f"Wrote {written} completions to {args.out}.")
    return 0


def generate_run(
    run: str | os.PathLike,
    prompts: str,
    out: str | os.PathLike,
    max_new_tokens: int = 128,
    format: str = "auto",
    device: str = "auto",
    base: str | os.PathLike | None = None,
    config: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> int:
    """Answer every prompt of ``prompts`` with the run's model and write ``out``; returns the count."""
    out = Path(out).expanduser()
    if out.exists() and not overwrite:
        raise ExportError(f"--out {out} already exists; choose another file or add --overwrite")
    if max_new_tokens < 1:
        raise SettingError("--max-new-tokens", max_new_tokens, "must be a positive integer")
    if not Path(prompts).expanduser().exists():
        raise MissingFileError(f"--prompts {prompts} does not exist")
    records = read_records(prompts, "--prompts")
    trained = read_trained(Path(run).expanduser(), Path(config).expanduser() if config else None)
    if trained.run_config is None:
        raise ExportError(
            f"{trained.path} has no run config: generate renders prompts with the tokenizer and data settings "
            "of a LightningCLI run; give --config with that run's config.yaml"
        )
    run_config = trained.run_config
    data = (run_config.get("data") or {}).get("init_args") or {}
    encoder = _encoder(run_config, data)
    style = format if format != "auto" else _training_format(data)
    rendered = [_prompt(encoder, record, where, style, prompts) for record, where in records]
    model = _trained_model(trained, base, _device(device))
    lines = []
    for shown, prompt in _progress(rendered):
        answer = generate_answer(model, encoder.tokenizer, prompt, encoder.stop_ids, max_new_tokens)
        line = {"prompt": shown, "rendered": prompt.text, "completion": answer.text}
        lines.append(json.dumps({**line, "note": answer.note} if answer.note else line, ensure_ascii=False))
    atomic_write(out, lambda f: f.write(("\n".join(lines) + "\n").encode("utf-8")))
    return len(lines)


def _encoder(run_config: dict[str, Any], data: dict[str, Any]) -> SampleEncoder:
    model = (run_config.get("model") or {}).get("init_args") or {}
    spec = data.get("tokenizer") or model.get("tokenizer") or "byte"
    return SampleEncoder(
        load_tokenizer(spec),
        data.get("chat_template") or "auto",
        data.get("prompt_template") or ALPACA_PROMPT,
        data.get("input_template") or ALPACA_INPUT,
        data.get("role_header") or ROLE_HEADER,
    )


def _training_format(data: dict[str, Any]) -> str:
    """The format most of the run's training samples have, read from its data file."""
    path = data.get("data_path")
    if not path or not Path(path).expanduser().exists():
        raise SettingError(
            "--format",
            "auto",
            f"cannot tell how the run's samples were rendered: its data_path {path!r} is not here; give "
            f"--format ({', '.join(FORMATS)})",
        )
    reader = SampleReader(path, data.get("format") or "auto", data.get("columns"), need_response=False)
    counts = Counter(reader.read(record, where).format for record, where in read_records(path))
    return counts.most_common(1)[0][0]


def _prompt(encoder: SampleEncoder, record: Any, where: str, style: str, source: str) -> tuple[Any, Prompt]:
    """``(the record's prompt as written, what the model receives)``."""
    if isinstance(record, str):
        return record, encoder.prompt(record, style)
    if isinstance(record, dict):
        messages = record.get("messages")
        if messages is not None:
            reader = SampleReader(source, "messages", setting="--prompts", need_response=False)
            return messages, encoder.prompt(reader.read(record, where).messages or [])
        if isinstance(record.get("prompt"), str):
            return record["prompt"], encoder.prompt(record["prompt"], style)
        if isinstance(record.get("instruction"), str):
            extra = record.get("input") or ""
            return record["instruction"], encoder.prompt(record["instruction"], style, input=str(extra))
    raise SettingError(
        "--prompts",
        source,
        f"has a record at {where} that is no prompt: give a string, or an object with 'messages', 'prompt' "
        "or 'instruction'",
    )


def _trained_model(trained: Trained, base: Any, device: str) -> Any:
    """The run's base, checked against the checkpoint and quantized as in training, with its adapter, in eval mode."""
    saved = trained.record.fingerprint
    base_dir = None
    if saved.base.kind == "files":
        base_dir = find_base_dir(saved.base, trained.configured_base, base)
        check_base(saved.base, files_fingerprint_with_bar(base_dir, True), trained.path, "here")
    target = trained.target(trained.module(model_name_or_path=base_dir))
    if base_dir is None:
        assert trained.config_path is not None
        rebuilt = f"rebuilt from {trained.config_path.name}"
        check_base(saved.base, tensors_fingerprint(target), trained.path, rebuilt)
    return trained.load_adapter(target, device).eval()


def _device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _progress(items: list[Any]) -> Any:
    """``items`` with a progress bar on a terminal."""
    if not sys.stderr.isatty() or len(items) < 2:
        return items
    from rich.progress import track

    return track(items, description="Generating", console=None, transient=True)
