"""Peak host memory of loading a saved model into 4-bit, three ways, each in a fresh process.

(a) ``streaming``: lightning_paged's load-and-convert (``empty_model`` + ``convert_to_qlora``: each
    weight read from the safetensors files, cast and quantized in turn);
(b) ``transformers_4bit``: transformers' own 4-bit load of the same directory
    (``from_pretrained(quantization_config=BitsAndBytesConfig(nf4, double quant), device_map="cpu")``);
(c) ``load_then_convert``: the path before streaming (``from_pretrained`` in bfloat16, then
    ``convert_to_qlora``).

The same model saved as PyTorch ``.bin`` shards (zip format, as ``save_pretrained(safe_serialization=
False)`` writes them) is loaded the streaming way too (``streaming_bin``: ``torch.load(mmap=True,
weights_only=True)`` maps each file). Goal: its peak <= 1.1 x the streaming load of the safetensors.

Memory is the peak of ``RssAnon`` (anonymous resident memory, from ``/proc/self/status``, sampled
every millisecond in a thread) above the worker's level after its imports: the file pages of the
memory-mapped safetensors files are the page cache's and do not count. Goals: (a) <= 1.1 x (b), and
(a) <= the loaded 4-bit model + the largest single tensor at 16 bits, + 10 %. The growth study loads
the same model saved with other shard sizes and a model half the size. A small Mixtral (mixture of
experts, saved with per-expert checkpoint keys as transformers saves it) compares (a) with (b): the
streaming load quantizes each expert as it is read, while transformers' 4-bit load keeps the experts,
most of the model, in 16 bits.

Models are generated once (random bfloat16 weights written straight to safetensors shards, never a
whole model in memory) under ``--cache-dir`` and reused:

    python bench/load_memory.py               # ~0.5B Llama in 200 MB shards + growth, a few minutes
    python bench/load_memory.py --only moe    # the ~0.2B Mixtral alone
    python bench/load_memory.py --quick       # smoke test: a ~26M-parameter model in 4 MB shards, a ~15M MoE
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REPO, fmt_bytes, machine_info, markdown_table, run_worker, write_results

NAME = "load_memory"
MB = 1000 * 1000
METHODS = ("streaming", "transformers_4bit", "load_then_convert")
BIN = "streaming_bin"
"""The streaming load of the model's ``.bin`` copy (worker method ``streaming`` on that directory)."""

FULL = {
    "0.5B": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=36, vocab_size=32000),
    "0.25B": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=16, vocab_size=32000),
}
QUICK = {
    "26M": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=6, vocab_size=8192),
}
COMMON = dict(num_attention_heads=16, num_key_value_heads=8, max_position_embeddings=2048)
MOE_FULL = {
    "moe-0.2B": dict(hidden_size=1024, intermediate_size=2048, num_hidden_layers=4, vocab_size=32000),
}
MOE_QUICK = {
    "moe-15M": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, vocab_size=4096),
}
MOE_COMMON = dict(num_local_experts=8, num_experts_per_tok=2)


# --- the saved models ------------------------------------------------------------------------------------


def model_dir(cache: Path, size: str, shard_mb: int) -> Path:
    family = "mixtral" if size.startswith("moe") else "llama"
    return cache / f"{family}-{size}-{shard_mb}MB"


def generate(directory: Path, settings: dict[str, Any], shard_mb: int, seed: int = 0) -> None:
    """A Llama (or, for a ``moe-`` size, Mixtral) directory with random bfloat16 weights, written shard by shard.

    Never the whole model in memory: one block's tensors at a time. A Mixtral's experts are written
    under the per-expert checkpoint keys transformers saves (``block_sparse_moe.experts.N.w1``),
    by transformers' own reverse conversion.
    """
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM
    from transformers.core_model_loading import revert_weight_conversion

    from lightning_paged.core.loading.skeleton import parameters_on_meta

    if (directory / "config.json").is_file():
        return
    staging = directory.with_name(directory.name + ".partial")
    staging.mkdir(parents=True, exist_ok=True)
    moe = "moe" in directory.name
    kind, build = (MixtralConfig, MixtralForCausalLM) if moe else (LlamaConfig, LlamaForCausalLM)
    extra = MOE_COMMON if moe else {}
    config = kind(**settings, **COMMON, **extra, tie_word_embeddings=False, dtype="bfloat16")
    with parameters_on_meta():
        skeleton = build(config)
    generator = torch.Generator().manual_seed(seed)
    written: list[tuple[Path, list[str]]] = []
    shard: dict[str, torch.Tensor] = {}
    size = total = 0

    def flush() -> None:
        path = staging / f"shard-{len(written):05d}.safetensors"
        save_file(shard, path, metadata={"format": "pt"})
        written.append((path, list(shard)))
        shard.clear()

    blocks: dict[str, dict[str, Any]] = {}  # the model's tensors grouped by block, in order
    for name, param in skeleton.state_dict().items():
        block = name.split(".layers.")[1].split(".")[0] if ".layers." in name else name
        blocks.setdefault(block, {})[name] = param
    for params in blocks.values():
        tensors = {}
        for name, param in params.items():
            if name.endswith("norm.weight"):
                tensors[name] = torch.ones(param.shape, dtype=torch.bfloat16)
            else:
                tensors[name] = (torch.randn(param.shape, generator=generator) * 0.02).to(torch.bfloat16)
        for name, tensor in revert_weight_conversion(skeleton, tensors).items():  # checkpoint keys
            nbytes = tensor.numel() * 2
            if shard and size + nbytes > shard_mb * MB:
                flush()
                size = 0
            shard[name] = tensor.contiguous()
            size += nbytes
            total += nbytes
    flush()
    weight_map = {}
    for index, (path, keys) in enumerate(written, start=1):
        file = f"model-{index:05d}-of-{len(written):05d}.safetensors"
        path.rename(staging / file)
        weight_map.update(dict.fromkeys(keys, file))
    index_data = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (staging / "model.safetensors.index.json").write_text(json.dumps(index_data, indent=2))
    config.save_pretrained(staging)
    staging.rename(directory)


def bin_copy(directory: Path) -> Path:
    """The model of ``directory`` with its safetensors shards saved as PyTorch ``.bin`` shards, one at a time."""
    import shutil

    import torch
    from safetensors.torch import load_file

    target = directory.with_name(directory.name + "-bin")
    if (target / "config.json").is_file():
        return target
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    names = {}
    for shard in sorted(set(index["weight_map"].values())):
        names[shard] = shard.replace("model-", "pytorch_model-").replace(".safetensors", ".bin")
        torch.save(load_file(directory / shard), staging / names[shard])
    index["weight_map"] = {k: names[v] for k, v in index["weight_map"].items()}
    (staging / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2))
    shutil.copy(directory / "config.json", staging / "config.json")
    staging.rename(target)
    return target


# --- one measurement, in a fresh process -------------------------------------------------------------------


def _status(field: str = "RssAnon") -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}: this benchmark needs Linux")


def _rss_anon() -> int:
    return _status("RssAnon")


class AnonPeak:
    """The peaks of ``RssAnon`` (and, for reference, ``RssFile``) while it runs, sampled in a thread."""

    def __init__(self, interval: float = 0.001) -> None:
        self.interval = interval
        self.peak = _rss_anon()
        self.file_peak = _status("RssFile")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_anon())
            self.file_peak = max(self.file_peak, _status("RssFile"))
            time.sleep(self.interval)

    def __enter__(self) -> AnonPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_anon())


def worker(method: str, directory: Path) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    import accelerate  # noqa: F401  (transformers' 4-bit load needs it: same imports for every method)
    import bitsandbytes  # noqa: F401
    import peft  # noqa: F401
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from lightning_paged.core.experts4bit import ExpertWeights4bit
    from lightning_paged.core.loading import WeightFiles, empty_model
    from lightning_paged.core.qlora import QLoRAConfig, convert_to_qlora, linear4bit_layers

    with WeightFiles(directory) as files:
        largest = max(_numel(e.shape) for e in files.entries.values())
    baseline = _rss_anon()
    started = time.perf_counter()
    with AnonPeak() as peak:
        if method == "streaming":
            model = empty_model(directory)
            convert_to_qlora(model, QLoRAConfig(), device="cpu")
        elif method == "transformers_4bit":
            quant = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.bfloat16,
            )
            model = AutoModelForCausalLM.from_pretrained(
                str(directory), quantization_config=quant, device_map="cpu"
            )
        else:
            model = AutoModelForCausalLM.from_pretrained(
                str(directory), dtype=torch.bfloat16, low_cpu_mem_usage=True
            )
            convert_to_qlora(model, QLoRAConfig(), device="cpu")
    seconds = time.perf_counter() - started
    loaded = sum(_tensor_bytes(t) for t in model.state_dict().values())
    return {
        "method": method,
        "directory": str(directory),
        "baseline_anon_bytes": baseline,
        "peak_anon_bytes": peak.peak,
        "peak_above_baseline_bytes": peak.peak - baseline,
        "peak_file_backed_bytes": peak.file_peak,
        "loaded_model_bytes": loaded,
        "largest_tensor_16bit_bytes": largest * 2,
        "quantized_layers": len(linear4bit_layers(model)),
        "expert_tensors_4bit": sum(isinstance(m, ExpertWeights4bit) for m in model.modules()),
        "seconds": round(seconds, 2),
    }


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def _tensor_bytes(tensor: Any) -> int:
    return int(tensor.numel() * tensor.element_size())


# --- the parent: fresh processes, goals, tables ----------------------------------------------------------------


def measure(directory: Path, methods: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    return {
        m: run_worker(Path(__file__), ["--method", m, "--dir", str(directory)], threads=1) for m in methods
    }


def goals(runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    ours = runs["streaming"]
    bound = (ours["loaded_model_bytes"] + ours["largest_tensor_16bit_bytes"]) * 1.1
    result: dict[str, Any] = {
        "bound_bytes": bound,
        "streaming_within_bound": ours["peak_above_baseline_bytes"] <= bound,
    }
    if "transformers_4bit" in runs:
        ratio = ours["peak_above_baseline_bytes"] / runs["transformers_4bit"]["peak_above_baseline_bytes"]
        result["streaming_over_transformers"] = round(ratio, 3)
        result["streaming_within_1.1x_transformers"] = ratio <= 1.1
    if "load_then_convert" in runs:
        ratio = ours["peak_above_baseline_bytes"] / runs["load_then_convert"]["peak_above_baseline_bytes"]
        result["streaming_over_load_then_convert"] = round(ratio, 3)
    if BIN in runs:
        ratio = runs[BIN]["peak_above_baseline_bytes"] / ours["peak_above_baseline_bytes"]
        result["bin_over_safetensors"] = round(ratio, 3)
        result["bin_within_1.1x_safetensors"] = ratio <= 1.1
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a ~26M-parameter model in 4 MB shards")
    parser.add_argument("--cache-dir", type=Path, default=Path("/tmp/lightning_paged_bench"))
    parser.add_argument("--out-dir", type=Path, default=None)
    parser.add_argument(
        "--only", choices=("main", "growth", "moe"), action="append", help="run only these cases (repeatable)"
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--method", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    if args.worker:
        from common import emit_result

        emit_result(worker(args.method, args.dir))
        return

    if args.quick:
        cache = args.out_dir or args.cache_dir
        plan = [
            ("26M", 4, ("streaming", BIN, "load_then_convert"), "main"),
            ("moe-15M", 4, ("streaming", "transformers_4bit"), "moe"),
        ]
        models = {**QUICK, **MOE_QUICK}
    else:
        cache = args.cache_dir
        models = {**FULL, **MOE_FULL}
        plan = [
            ("moe-0.2B", 100, ("streaming", "transformers_4bit"), "moe"),
            ("0.5B", 200, (*METHODS, BIN), "main"),
            ("0.5B", 100, ("streaming", "transformers_4bit"), "growth"),
            ("0.5B", 400, ("streaming", "transformers_4bit"), "growth"),
            ("0.25B", 200, ("streaming", "transformers_4bit"), "growth"),
        ]
    cases = []
    plan = [case for case in plan if not args.only or case[3] in args.only]
    for size, shard_mb, methods, role in plan:
        directory = model_dir(cache, size, shard_mb)
        generate(directory, models[size], shard_mb)
        runs = measure(directory, tuple(m for m in methods if m != BIN))
        if BIN in methods:
            runs[BIN] = measure(bin_copy(directory), ("streaming",))["streaming"]
        shards = len(list(directory.glob("*.safetensors")))
        cases.append(
            {
                "model": size,
                "shard_mb": shard_mb,
                "shards": shards,
                "role": role,
                "runs": runs,
                "goals": goals(runs),
            }
        )
        print(f"{size} in {shards} shards of {shard_mb} MB: " + json.dumps(cases[-1]["goals"]), flush=True)
    report = {"machine": machine_info(threads=1, device="cpu"), "cases": cases}
    name = NAME if not args.only else "_".join([NAME, *sorted(set(args.only))])
    write_results(name, report, render(cases), args.quick, args.out_dir)


def render(cases: list[dict[str, Any]]) -> str:
    rows = []
    for case in cases:
        for method, run in case["runs"].items():
            rows.append(
                [
                    case["model"],
                    f"{case['shards']} x {case['shard_mb']} MB",
                    method,
                    fmt_bytes(run["peak_above_baseline_bytes"]),
                    fmt_bytes(run["loaded_model_bytes"]),
                    fmt_bytes(run["largest_tensor_16bit_bytes"]),
                    f"{run['quantized_layers']} + {run.get('expert_tensors_4bit', 0)}",
                    f"{run['seconds']:.1f}",
                ]
            )
    table = markdown_table(
        [
            "model",
            "shards",
            "method",
            "peak RssAnon above imports",
            "loaded 4-bit model",
            "largest tensor (16-bit)",
            "4-bit layers + expert tensors",
            "s",
        ],
        rows,
    )
    lines = ["# Peak host memory of loading into 4-bit", "", table, ""]
    for case in cases:
        g = case["goals"]
        parts = [
            f"bound (4-bit model + largest 16-bit tensor, +10 %) {fmt_bytes(g['bound_bytes'])}: "
            + ("met" if g["streaming_within_bound"] else "missed")
        ]
        if "streaming_over_transformers" in g:
            parts.append(
                f"streaming / transformers 4-bit = {g['streaming_over_transformers']:.2f} (goal <= 1.1)"
            )
        if "streaming_over_load_then_convert" in g:
            parts.append(f"streaming / load-then-convert = {g['streaming_over_load_then_convert']:.2f}")
        if "bin_over_safetensors" in g:
            parts.append(
                f"streaming .bin / streaming safetensors = {g['bin_over_safetensors']:.2f} (goal <= 1.1)"
            )
        lines.append(f"- {case['model']}, {case['shards']} x {case['shard_mb']} MB: " + "; ".join(parts))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
