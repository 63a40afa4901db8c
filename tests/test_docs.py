"""The documentation: every code block of the getting-started page runs or is checked.

- ``python`` blocks run as written, each in a fresh interpreter from a directory that looks like
  the repository root (``examples/`` in it);
- ``bash`` blocks: ``lightning-paged`` commands are run through the console script's entry point,
  a training command with ``--print_config`` added (its config is parsed and checked, nothing is
  trained), and every override it gives must show up in the printed config; ``make`` targets and
  ``pip install`` extras must exist in the Makefile and pyproject.toml;
- ``json`` blocks must be samples the data module reads;
- a block that cannot run here (it needs a GPU, a model directory, a finished run) carries
  ``<!-- skip-test: reason -->`` right above it; the reason must be given. Skipped Python blocks
  must still compile and import only names the package exports.

Across all pages, files named in bash blocks must exist. The API reference must render every name
``lightning_paged`` exports.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
GETTING_STARTED = DOCS / "getting-started.md"
SKIP = re.compile(r"^<!--\s*skip-test:(?P<reason>.*?)-->\s*$")
FENCE = re.compile(r"^(?P<indent>\s*)```(?P<lang>[\w+-]*)\s*$")
CLI_SUBCOMMANDS = ("fit", "validate", "test")
SUBCOMMANDS = (*CLI_SUBCOMMANDS, "report", "export", "generate", "plan")
PYTHON_TIMEOUT_S = 300


@dataclass(frozen=True)
class Block:
    page: str
    line: int
    lang: str
    code: str
    skip: str | None
    """The skip-test reason, or None for a block the test runs."""

    def __str__(self) -> str:
        return f"{self.page}:{self.line} ({self.lang})"


def parse_blocks(path: Path) -> tuple[list[Block], list[str]]:
    """The fenced code blocks of a Markdown page, and the problems with its skip-test markers."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    problems: list[str] = []
    pending: tuple[int, str] | None = None  # a skip marker waiting for its block
    i = 0
    while i < len(lines):
        line = lines[i]
        marker = SKIP.match(line.strip())
        fence = FENCE.match(line)
        if marker:
            if pending:
                problems.append(f"{path.name}:{pending[0]}: skip-test marker not followed by a code block")
            pending = (i + 1, marker.group("reason").strip())
        elif fence:
            end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == "```"), None)
            if end is None:
                problems.append(f"{path.name}:{i + 1}: code block never closed")
                break
            indent = len(fence.group("indent"))
            code = "\n".join(text[indent:] for text in lines[i + 1 : end])
            skip = None
            if pending:
                skip = pending[1]
                if not skip:
                    problems.append(f"{path.name}:{pending[0]}: skip-test marker without a reason")
                pending = None
            blocks.append(Block(path.name, i + 1, fence.group("lang") or "text", code + "\n", skip))
            i = end
        elif line.strip() and pending:
            problems.append(f"{path.name}:{pending[0]}: skip-test marker not right above a code block")
            pending = None
        i += 1
    if pending:
        problems.append(f"{path.name}:{pending[0]}: skip-test marker not followed by a code block")
    return blocks, problems


def shell_commands(code: str) -> list[list[str]]:
    """The commands of a bash block as argument lists: continuations joined, comments dropped."""
    joined = re.sub(r"\\\n", " ", code)
    return [args for args in (shlex.split(line, comments=True) for line in joined.splitlines()) if args]


def cli_args(args: list[str]) -> list[str] | None:
    """The arguments after ``lightning-paged`` (or ``python -m lightning_paged``); None for another program."""
    if args[0] == "lightning-paged":
        return args[1:]
    if args[:3] in (["python", "-m", "lightning_paged"], ["-m", "lightning_paged"]):
        return args[3:]
    return None


def checked_cli_args(args: list[str]) -> list[str] | None:
    """How the test runs a documented command: as written, or with ``--print_config`` added to a
    training command; None when it cannot run here (report and export need a finished run)."""
    if "--help" in args or "-h" in args or any(a.startswith("--print_config") for a in args):
        return args
    if args and args[0] in CLI_SUBCOMMANDS:
        return [*args, "--print_config"]
    return None


def overrides(args: list[str]) -> dict[str, str]:
    """``--key=value`` and ``--key value`` pairs of a command, without ``--config`` and flags."""
    found: dict[str, str] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("--") and arg not in ("--print_config", "--help"):
            if "=" in arg:
                key, value = arg[2:].split("=", 1)
            elif i + 1 < len(args) and not args[i + 1].startswith("--"):
                key, value = arg[2:], args[i + 1]
                i += 1
            else:
                key, value = arg[2:], "true"
            if key not in ("config", "c") and not key.endswith(".help"):
                found[key] = value
        i += 1
    return found


def makefile_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text(encoding="utf-8")
    return set(re.findall(r"^([A-Za-z][\w.-]*)\s*:(?!=)", text, flags=re.MULTILINE))


def pyproject_extras() -> set[str]:
    """Names under ``[project.optional-dependencies]`` (read by hand: tomllib is Python 3.11+)."""
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    section = re.search(r"^\[project\.optional-dependencies\]\s*$(.*?)(?=^\[)", text + "\n[", re.M | re.S)
    return set(re.findall(r"^([\w-]+)\s*=", section.group(1), flags=re.M)) if section else set()


def static_problems(block: Block) -> list[str]:
    """What is wrong with a bash block whether or not it runs: unknown targets, extras, files, subcommands."""
    problems = []
    for args in shell_commands(block.code):
        if args[0] == "make":
            problems += [f"{block}: no make target {t!r}" for t in args[1:] if t not in makefile_targets()]
        if args[:2] == ["pip", "install"]:
            for extras in re.findall(r"\[([\w,-]+)\]", " ".join(args)):
                missing = set(extras.split(",")) - pyproject_extras()
                problems += [f"{block}: pyproject.toml has no extra {e!r}" for e in sorted(missing)]
        for arg in args:
            value = arg.split("=", 1)[-1]
            named = re.match(r"^(examples|bench|tests|docs)/[\w./-]+\.(py|yaml|yml|json|jsonl)$", value)
            if named and not (ROOT / value).exists():
                problems.append(f"{block}: names {value}, which does not exist")
        rest = cli_args(args)
        if rest is not None and rest and not rest[0].startswith("-") and rest[0] not in SUBCOMMANDS:
            problems.append(f"{block}: lightning-paged has no subcommand {rest[0]!r}")
    return problems


def runnable_problems(block: Block) -> list[str]:
    """Why a block without a skip-test marker cannot be run or checked here, if it cannot."""
    if block.lang == "python" or block.lang == "json":
        return []
    if block.lang != "bash":
        return [f"{block}: getting-started blocks are python, bash or json, or carry a skip-test reason"]
    problems = []
    for args in shell_commands(block.code):
        rest = cli_args(args)
        if args[0] == "make" or args[:2] == ["pip", "install"]:
            continue  # checked statically: running them installs or trains for minutes
        if rest is None or checked_cli_args(rest) is None:
            problems.append(f"{block}: cannot run {' '.join(args)!r} here; add a skip-test reason above it")
    return problems


def getting_started_blocks() -> list[Block]:
    return parse_blocks(GETTING_STARTED)[0]


def documented_cli_commands() -> list[list[str]]:
    """Distinct commands of the getting-started page's runnable bash blocks, as the test runs them."""
    commands: list[list[str]] = []
    for block in getting_started_blocks():
        if block.lang != "bash" or block.skip is not None:
            continue
        for args in shell_commands(block.code):
            rest = cli_args(args)
            checked = checked_cli_args(rest) if rest is not None else None
            if checked is not None and checked not in commands:
                commands.append(checked)
    return commands


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="2")
    return env


@pytest.fixture(scope="module")
def python_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, subprocess.Popen]:
    """Starts every runnable Python block of the page, each in its own process, at once.

    They run while the other tests check the commands; ``test_python_blocks_run`` collects them.
    """
    runs = {}
    for block in getting_started_blocks():
        if block.lang != "python" or block.skip is not None:
            continue
        workdir = tmp_path_factory.mktemp(f"block{block.line}")
        (workdir / "examples").symlink_to(ROOT / "examples", target_is_directory=True)
        script = workdir / "block.py"
        script.write_text(block.code, encoding="utf-8")
        runs[str(block)] = subprocess.Popen(
            [sys.executable, str(script)],
            cwd=workdir,
            env=_child_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
    yield runs
    for process in runs.values():
        if process.poll() is None:
            process.kill()
            process.communicate()


def test_every_getting_started_block_runs_or_says_why_not(python_runs):
    blocks, problems = parse_blocks(GETTING_STARTED)
    assert blocks, "the getting-started page has no code blocks"
    for block in blocks:
        if block.skip is None:
            problems += runnable_problems(block)
    assert not problems, "\n".join(problems)
    assert python_runs, "the getting-started page should run at least one Python block"
    assert documented_cli_commands(), (
        "the getting-started page should run at least one lightning-paged command"
    )


def test_skip_markers_carry_reasons_on_every_page():
    problems = []
    for page in sorted(DOCS.glob("*.md")):
        problems += parse_blocks(page)[1]
    assert not problems, "\n".join(problems)


def test_commands_name_existing_targets_extras_and_files_on_every_page():
    problems = []
    for page in sorted(DOCS.glob("*.md")):
        for block in parse_blocks(page)[0]:
            if block.lang == "bash":
                problems += static_problems(block)
    assert not problems, "\n".join(problems)


def test_skipped_python_blocks_compile_and_import_exported_names():
    import lightning_paged

    for block in getting_started_blocks():
        if block.lang != "python" or block.skip is None:
            continue
        tree = ast.parse(block.code, filename=str(block))
        compile(tree, str(block), "exec")
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "lightning_paged":
                missing = [a.name for a in node.names if not hasattr(lightning_paged, a.name)]
                assert not missing, f"{block} imports {missing}, which lightning_paged does not export"


def _find(config: Any, value: Any, skip_top: str) -> bool:
    if isinstance(config, dict):
        return any(_find(v, value, "") for k, v in config.items() if k != skip_top)
    if isinstance(config, list):
        return any(_find(v, value, "") for v in config)
    return config == value


def _lookup(config: dict[str, Any], dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        assert isinstance(node, dict) and part in node, f"{dotted} is not in the printed config"
        node = node[part]
    return node


@pytest.mark.parametrize("args", documented_cli_commands(), ids=" ".join)
def test_documented_command_runs(args, python_runs, capsys, monkeypatch):
    from lightning_paged.commands.main import main

    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(
        sys, "argv", ["lightning-paged"]
    )  # the arguments go to main(), as the console script's
    try:
        code = main(args)
    except SystemExit as exit:  # --help and --print_config end the parser this way
        code = exit.code
    out = capsys.readouterr().out
    assert code in (0, None), f"lightning-paged {' '.join(args)} failed:\n{out}"
    if "--help" in args or "-h" in args:
        assert "usage:" in out
        return
    config = yaml.safe_load(out)
    assert isinstance(config, dict) and "trainer" in config and "model" in config, out[:2000]
    for key, text in overrides(args).items():
        value = yaml.safe_load(text)
        assert _lookup(config, key) == value, f"--{key} {text} did not reach the config"
        if key.startswith("vars."):  # the point of vars: interpolated into the settings that use it
            assert _find(config, value, skip_top="vars"), f"--{key} {text} is used nowhere in the config"


def test_json_blocks_are_samples_the_data_module_reads(tmp_path):
    from lightning_paged import InstructionDataModule

    blocks = [b for b in getting_started_blocks() if b.lang == "json"]
    for block in blocks:
        lines = [line for line in block.code.splitlines() if line.strip()]
        for line in lines:
            json.loads(line)
        path = tmp_path / f"block{block.line}.jsonl"
        path.write_text(block.code, encoding="utf-8")
        data = InstructionDataModule(str(path), val_split=0, max_length=256)
        data.setup("fit")
        assert data.train_data is not None and len(data.train_data) == len(lines)
        for sample in data.train_data:  # the loss covers the response only, and some of it
            assert any(label != -100 for label in sample["labels"])
            assert sample["labels"][0] == -100


def test_the_data_page_shows_one_example_of_every_format_and_each_trains(tmp_path):
    from lightning_paged import InstructionDataModule
    from lightning_paged.core.formats import FORMATS

    shown = []
    for block in parse_blocks(DOCS / "data.md")[0]:
        if block.lang != "json":
            continue
        path = tmp_path / f"block{block.line}.jsonl"
        path.write_text(block.code, encoding="utf-8")
        data = InstructionDataModule(str(path), val_split=0, max_length=256)
        data.setup("fit")
        assert data.train_data is not None and len(data.train_data) == 1
        assert any(label != -100 for label in data.train_data[0]["labels"])
        shown.append(data.sample_format)
    assert sorted(shown) == sorted(FORMATS)


def test_python_blocks_run(python_runs):
    failures = []
    for name, process in python_runs.items():
        try:
            output, _ = process.communicate(timeout=PYTHON_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            output, _ = process.communicate()
            failures.append(f"{name} did not finish in {PYTHON_TIMEOUT_S} s:\n{output[-3000:]}")
            continue
        if process.returncode != 0:
            failures.append(f"{name} exited with {process.returncode}:\n{output[-3000:]}")
    assert not failures, "\n\n".join(failures)


def test_reference_covers_every_exported_name():
    import lightning_paged

    text = (DOCS / "reference.md").read_text(encoding="utf-8")
    rendered = set(re.findall(r"^:::\s+([\w.]+)\s*$", text, flags=re.MULTILINE))
    missing = []
    for name in lightning_paged.__all__:
        obj = getattr(lightning_paged, name)
        # rendered where it is defined, so that cross-references have one primary target
        if (
            f"{obj.__module__}.{obj.__qualname__}" not in rendered
            and f"lightning_paged.{name}" not in rendered
        ):
            missing.append(f"{name} ({obj.__module__}.{obj.__qualname__})")
    assert not missing, f"docs/reference.md renders no ':::' entry for {missing}"
