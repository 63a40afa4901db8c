"""Write the small instruction set the examples train on: examples/data/instructions.jsonl and chat.jsonl.

    python examples/make_data.py            # the shipped files (seed 0)
    python examples/make_data.py --count 5000 --out /tmp/data

String tasks a tiny randomly initialised model can learn in a few minutes on a CPU (uppercase,
reverse, sort, add, count), written so that the answer follows from the prompt alone. About one
sample in ten is a long one (a 100-180 character text to uppercase or reorder, 250-420 bytes in
all), so a run has long-sequence steps next to short ones. The same seed always writes the same
files.
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable
from pathlib import Path

_WORD_LIST = """
apple river stone cloud green light table paper music water house bread horse night smile plant
storm chair glass earth heart money ocean sugar tiger train voice watch zebra angle beach candy
dance eagle field grape honey igloo jelly kite lemon mango noble olive piano queen robin salt tulip
uncle vivid wagon yacht amber brave coral daisy ember flint giant hazel ivory jolly karma lunar
maple nylon orbit pearl quilt raven solar tango ultra vapor woven young bloom crisp dwarf fable
gleam harbor inlet jumbo kernel lotus marble nectar oyster pepper quartz ripple silver timber velvet
walnut yellow cobalt dragon falcon garden hollow island jacket ladder meadow nimble orange pillow
rocket saddle turtle violet window basket candle forest hammer lizard mirror parrot
"""
WORDS = _WORD_LIST.split()

LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _text(rng: random.Random, low: int, high: int) -> str:
    """Words joined by spaces, between ``low`` and ``high`` characters long."""
    target = rng.randint(low, high)
    words: list[str] = []
    while len(" ".join(words)) < target:
        words.append(rng.choice(WORDS))
    return " ".join(words)[:high].rstrip()


def upper(rng: random.Random) -> dict[str, str]:
    word = rng.choice(WORDS)
    return {"instruction": f"Uppercase: {word}", "output": word.upper()}


def reverse(rng: random.Random) -> dict[str, str]:
    word = rng.choice(WORDS)
    return {"instruction": f"Reverse: {word}", "output": word[::-1]}


def sort_letters(rng: random.Random) -> dict[str, str]:
    letters = "".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 8)))
    return {"instruction": f"Sort: {letters}", "output": "".join(sorted(letters))}


def add(rng: random.Random) -> dict[str, str]:
    a, b = rng.randint(0, 49), rng.randint(0, 49)
    return {"instruction": f"Add: {a}+{b}", "output": str(a + b)}


def count(rng: random.Random) -> dict[str, str]:
    word = rng.choice(WORDS)
    return {"instruction": "Count the letters.", "input": word, "output": str(len(word))}


def long_upper(rng: random.Random) -> dict[str, str]:
    text = _text(rng, 100, 180)
    return {"instruction": "Uppercase this text.", "input": text, "output": text.upper()}


def long_reorder(rng: random.Random) -> dict[str, str]:
    text = _text(rng, 100, 180)
    return {"instruction": "Reverse the word order.", "input": text, "output": " ".join(text.split()[::-1])}


SHORT: list[Callable[[random.Random], dict[str, str]]] = [upper, reverse, sort_letters, add, count]
LONG: list[Callable[[random.Random], dict[str, str]]] = [long_upper, long_reorder]


def instruction_samples(n: int, seed: int, long_fraction: float = 0.1) -> list[dict[str, str]]:
    rng = random.Random(seed)
    return [rng.choice(LONG if rng.random() < long_fraction else SHORT)(rng) for _ in range(n)]


def chat_samples(n: int, seed: int) -> list[dict[str, list[dict[str, str]]]]:
    """Two or three turns: a word uppercased, then the same word reversed or counted."""
    rng = random.Random(seed)
    chats = []
    for _ in range(n):
        word = rng.choice(WORDS)
        messages = [
            {"role": "user", "content": f"Uppercase: {word}"},
            {"role": "assistant", "content": word.upper()},
        ]
        if rng.random() < 0.5:
            messages.insert(0, {"role": "system", "content": "Answer with the result only."})
        follow_up = rng.choice(
            [("Now reverse it.", word.upper()[::-1]), ("How many letters?", str(len(word)))]
        )
        messages += [
            {"role": "user", "content": follow_up[0]},
            {"role": "assistant", "content": follow_up[1]},
        ]
        chats.append({"messages": messages})
    return chats


def write_jsonl(path: Path, rows: list) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "data", help="output directory")
    parser.add_argument("--count", type=int, default=2000, help="instruction samples")
    parser.add_argument("--chat-count", type=int, default=200, help="chat samples")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    write_jsonl(args.out / "instructions.jsonl", instruction_samples(args.count, args.seed))
    write_jsonl(args.out / "chat.jsonl", chat_samples(args.chat_count, args.seed + 1))
    for name in ("instructions.jsonl", "chat.jsonl"):
        print(f"wrote {args.out / name} ({(args.out / name).stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
