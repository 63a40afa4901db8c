"""InstructionDataModule and the byte tokenizer: formats, labels, truncation, grouping, splits, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.utils.data import BatchSampler
from torch.utils.data.distributed import DistributedSampler

from lightning_paged.core.errors import SettingError
from lightning_paged.core.tokenizer import ByteTokenizer, load_tokenizer
from lightning_paged.lightning.data import IGNORE_INDEX, InstructionDataModule

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def write_jsonl(path: Path, rows: list) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def labelled_text(tokenizer: ByteTokenizer, labels: torch.Tensor) -> str:
    return tokenizer.decode([t for t in labels.tolist() if t != IGNORE_INDEX])


def test_byte_tokenizer_round_trips_any_text():
    tok = ByteTokenizer()
    text = "Grüße, 世界! <eos> \n\t"
    ids = tok.encode(text)
    assert max(ids) < 256 and len(ids) == len(text.encode())
    assert tok.decode(ids) == text
    with_bos = tok.encode(text, add_special_tokens=True)
    assert with_bos[0] == tok.bos_token_id
    assert tok.decode([*with_bos, tok.eos_token_id], skip_special_tokens=True) == text
    assert tok.decode([tok.bos_token_id, 104, 105, tok.eos_token_id]) == "<bos>hi<eos>"
    batch = tok(["ab", "abcd"], return_tensors="pt")
    assert batch["input_ids"].tolist() == [[97, 98, tok.pad_token_id, tok.pad_token_id], [97, 98, 99, 100]]
    assert batch["attention_mask"].sum().item() == 6
    assert len(tok) == 259 and load_tokenizer("byte").eos_token_id == 258


def test_alpaca_labels_cover_the_response_only(tmp_path):
    path = write_jsonl(
        tmp_path / "a.jsonl",
        [
            {"instruction": "Reverse: abc", "output": "cba"},
            {"instruction": "Uppercase", "input": "xy", "output": "XY"},
        ],
    )
    dm = InstructionDataModule(path, val_split=0, batch_size=2)
    dm.setup("fit")
    batch = next(iter(dm._loader(dm.train_data, batch_size=2)))  # file order, unshuffled
    tok = dm.tokenizer
    texts = [tok.decode(row, skip_special_tokens=True) for row in batch["input_ids"]]
    assert texts[0] == "### Instruction:\nReverse: abc\n\n### Response:\ncba"
    assert texts[1] == "### Instruction:\nUppercase\n\n### Input:\nxy\n\n### Response:\nXY"
    assert [labelled_text(tok, row) for row in batch["labels"]] == ["cba<eos>", "XY<eos>"]
    # padding: the shorter row ends in pad tokens that are masked in the labels and the attention mask
    short = int(batch["attention_mask"][0].sum())
    assert short < batch["input_ids"].shape[1]
    assert (batch["input_ids"][0, short:] == tok.pad_token_id).all()
    assert (batch["labels"][0, short:] == IGNORE_INDEX).all()
    assert (
        batch["input_ids"][0, 0].item() == tok.bos_token_id and batch["labels"][0, 0].item() == IGNORE_INDEX
    )


def test_chat_labels_cover_assistant_turns_only(tmp_path):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Uppercase: dog"},
        {"role": "assistant", "content": "DOG"},
        {"role": "user", "content": "Reverse it."},
        {"role": "assistant", "content": "GOD"},
    ]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": messages}])
    dm = InstructionDataModule(path, val_split=0, batch_size=1, role_header="<{role}>")
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    tok = dm.tokenizer
    assert tok.decode(batch["input_ids"][0]) == (
        "<bos><system>Be brief.\n\n<user>Uppercase: dog\n\n<assistant>DOG<eos>\n\n<user>Reverse it.\n\n<assistant>GOD<eos>"
    )
    assert labelled_text(tok, batch["labels"][0]) == "DOG<eos>GOD<eos>"


def test_shipped_examples_load_in_both_formats():
    for name, expected_min in (("instructions.jsonl", 1000), ("chat.jsonl", 100)):
        dm = InstructionDataModule(str(EXAMPLES / "data" / name), max_length=512, val_split=0.1)
        dm.setup("fit")
        total = len(dm.train_data) + len(dm.val_data)
        assert total >= expected_min and dm.num_truncated == 0
        assert len(dm.val_data) == round(0.1 * total)
    sizes = sum(p.stat().st_size for p in (EXAMPLES / "data").iterdir())
    assert sizes < 500 * 1024


def test_truncation_counts_cut_samples_and_drops_those_without_a_response(tmp_path):
    rows = [
        {"instruction": "short", "output": "ok"},
        {"instruction": "x" * 30, "output": "y" * 40},  # prompt fits, response is cut
        {"instruction": "z" * 200, "output": "never seen"},  # the prompt alone is too long
    ]
    dm = InstructionDataModule(write_jsonl(tmp_path / "t.jsonl", rows), max_length=80, val_split=0)
    with pytest.warns(UserWarning, match=r"2 of 3 samples are longer than max_length=80 .*1 of them lost"):
        dm.setup("fit")
    assert dm.num_truncated == 2 and dm.num_dropped == 1
    assert len(dm.train_data) == 2
    assert max(len(s["input_ids"]) for s in dm.train_data) == 80
    cut = next(s for s in dm.train_data if len(s["input_ids"]) == 80)
    assert cut["labels"][-1] == ord("y")  # cut mid-response: no end-of-sequence token


def test_batches_are_padded_to_their_own_longest_sample(tmp_path):
    rows = [{"instruction": "i", "output": "o" * n} for n in [1, 2, 3, 100, 101, 102]]
    dm = InstructionDataModule(
        write_jsonl(tmp_path / "p.jsonl", rows), val_split=0, batch_size=3, group_by_length=True
    )
    dm.setup("fit")
    widths = sorted(batch["input_ids"].shape[1] for batch in dm.train_dataloader())
    shortest = min(len(s["input_ids"]) for s in dm.train_data)  # the sample with n = 1
    assert widths == [shortest + 2, shortest + 101]


def test_length_grouping_puts_similar_lengths_together(tmp_path):
    gen = torch.Generator().manual_seed(0)
    sizes = torch.randint(1, 300, (400,), generator=gen).tolist()
    rows = [{"instruction": "i", "output": "o" * n} for n in sizes]
    path = write_jsonl(tmp_path / "g.jsonl", rows)

    def batches(group: bool) -> list[list[int]]:
        dm = InstructionDataModule(path, val_split=0, batch_size=8, group_by_length=group, max_length=1024)
        dm.setup("fit")
        loader = dm.train_dataloader()
        return [(b["attention_mask"].sum(1)).tolist() for b in loader]

    def spread(bs: list[list[int]]) -> float:
        return sum(max(b) - min(b) for b in bs) / len(bs)

    grouped, plain = batches(True), batches(False)
    assert sorted(x for b in grouped for x in b) == sorted(x for b in plain for x in b)  # every sample once
    assert len(grouped) == len(plain) == 50
    assert spread(grouped) < 0.25 * spread(plain)
    first = [max(b) for b in grouped]
    assert first != sorted(first, reverse=True)  # batch order is shuffled, not longest first


def test_length_grouping_splits_samples_across_ddp_ranks(tmp_path):
    """Lightning rebuilds the batch sampler around each rank's DistributedSampler; check that seam."""
    from lightning.fabric.utilities.data import _replace_dunder_methods
    from lightning.pytorch.utilities.data import _update_dataloader

    rows = [{"instruction": "i", "output": "o" * n} for n in range(1, 101)]
    dm = InstructionDataModule(
        write_jsonl(tmp_path / "d.jsonl", rows), val_split=0, batch_size=5, group_by_length=True
    )
    dm.setup("fit")
    with _replace_dunder_methods(BatchSampler):
        loader = dm.train_dataloader()
    seen = []
    for rank in range(2):
        sampler = DistributedSampler(dm.train_data, num_replicas=2, rank=rank, shuffle=True, seed=0)
        rank_loader = _update_dataloader(loader, sampler)
        lengths = [b["attention_mask"].sum(1).tolist() for b in rank_loader]
        assert len(lengths) == 10 and all(max(b) - min(b) < 15 for b in lengths)
        seen += [x for b in lengths for x in b]
    assert sorted(seen) == sorted(len(s["input_ids"]) for s in dm.train_data)


@pytest.mark.parametrize(("split", "n_val"), [(0.25, 5), (3, 3), (0, 0)])
def test_validation_split_sizes(tmp_path, split, n_val):
    rows = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(20)]
    dm = InstructionDataModule(write_jsonl(tmp_path / "s.jsonl", rows), val_split=split, seed=1)
    dm.setup("fit")
    assert len(dm.val_data) == n_val and len(dm.train_data) == 20 - n_val
    train = {tuple(s["input_ids"]) for s in dm.train_data}
    assert not train & {tuple(s["input_ids"]) for s in dm.val_data}
    again = InstructionDataModule(write_jsonl(tmp_path / "s.jsonl", rows), val_split=split, seed=1)
    again.setup("fit")
    assert [s["input_ids"] for s in again.val_data] == [s["input_ids"] for s in dm.val_data]
    if n_val == 0:
        assert dm.val_dataloader() == []


def test_json_array_and_saved_dataset_load(tmp_path):
    import datasets

    rows = [{"instruction": "a", "output": "b"}, {"instruction": "c", "input": "d", "output": "e"}]
    (tmp_path / "a.json").write_text(json.dumps(rows, indent=2))
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    for path in (tmp_path / "a.json", tmp_path / "saved"):
        dm = InstructionDataModule(str(path), val_split=0)
        dm.setup("fit")
        assert [labelled_text(dm.tokenizer, torch.tensor(s["labels"])) for s in dm.train_data] == [
            "b<eos>",
            "e<eos>",
        ]


def setup_error(path: Path, **kwargs) -> str:
    with pytest.raises(SettingError) as info:
        InstructionDataModule(str(path), **kwargs).setup("fit")
    return str(info.value)


def test_a_file_that_is_not_json_names_the_file_and_the_line(tmp_path):
    text = tmp_path / "data.txt"
    text.write_text("instruction,output\nhi,there\n")
    message = setup_error(text)
    assert message.startswith("data_path is not valid JSON or JSON Lines") and "line 1, column 1" in message
    assert str(text) in message
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"instruction": "a", "output": "b"}\n\n{"instruction": "c", "output": }\n')
    assert "at line 3, column" in setup_error(broken)
    binary = tmp_path / "model.bin"
    binary.write_bytes(b"\x80\x81\xff\x00")
    assert "not UTF-8" in setup_error(binary)


def test_empty_data_and_bad_samples_are_clear_errors(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    assert "is empty" in setup_error(empty)
    (tmp_path / "empty.json").write_text("[]")
    assert "empty list" in setup_error(tmp_path / "empty.json")
    missing = write_jsonl(
        tmp_path / "m.jsonl", [{"instruction": "a", "output": "b"}, {"prompt": "a", "answer": "b"}]
    )
    message = setup_error(Path(missing))
    assert "sample at line 2" in message and "'instruction' and 'output'" in message and "'prompt'" in message
    no_assistant = write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    assert "no 'assistant' message" in setup_error(Path(no_assistant))
    wrong_type = write_jsonl(tmp_path / "w.jsonl", [{"instruction": "a", "output": 3}])
    assert "int as 'output'" in setup_error(Path(wrong_type))
    too_many_val = write_jsonl(tmp_path / "v.jsonl", [{"instruction": "a", "output": "b"}] * 3)
    assert setup_error(Path(too_many_val), val_split=3).startswith("val_split leaves no training samples")


def test_bad_settings_fail_at_construction(tmp_path):
    good = write_jsonl(tmp_path / "ok.jsonl", [{"instruction": "a", "output": "b"}])
    with pytest.raises(SettingError, match=r"^data_path does not exist"):
        InstructionDataModule(str(tmp_path / "nope.jsonl"))
    with pytest.raises(SettingError, match=r"^tokenizer is not a local directory.*'byte'"):
        InstructionDataModule(good, tokenizer=str(tmp_path / "no-tokenizer"))
    with pytest.raises(SettingError, match=r"^tokenizer holds no tokenizer"):
        InstructionDataModule(good, tokenizer=str(tmp_path))
    with pytest.raises(SettingError, match=r"^val_split as a fraction must be below 1"):
        InstructionDataModule(good, val_split=1.5)
    with pytest.raises(
        SettingError, match=r"^prompt_template must use exactly the fields \{input\}, \{instruction\}"
    ):
        InstructionDataModule(good, prompt_template="Q: {question}\nA: ")
    with pytest.raises(SettingError, match=r"^max_length must be a positive integer"):
        InstructionDataModule(good, max_length=0)


def test_local_transformers_tokenizer_directory(tmp_path):
    """A tokenizer saved to a directory loads offline and pads with its end-of-sequence token."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "<s>": 1, "</s>": 2, "hello": 3, "world": 4, "say": 5, ":": 6}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", unk_token="[UNK]")
    fast.save_pretrained(tmp_path / "tok")
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "say hello", "output": "world"}])
    dm = InstructionDataModule(
        path, tokenizer=str(tmp_path / "tok"), val_split=0, prompt_template="{instruction} :{input}"
    )
    dm.setup("fit")
    assert dm.tokenizer.pad_token_id == 2
    assert dm.train_data[0]["input_ids"] == [1, 5, 3, 6, 4, 2]
    assert dm.train_data[0]["labels"] == [IGNORE_INDEX] * 4 + [4, 2]
