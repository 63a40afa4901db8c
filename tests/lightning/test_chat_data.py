"""InstructionDataModule with chat templates, a separate validation file and packing of conversations."""

from __future__ import annotations

import itertools
import json
import logging
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from lightning_paged.core.errors import SettingError
from lightning_paged.lightning.data import IGNORE_INDEX, InstructionDataModule

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def conversations(n: int) -> list[list[dict]]:
    words = ["vivid", "tiger", "amber", "ocean", "cedar", "lemon", "maple", "orbit"]
    return [
        [
            {"role": "user", "content": f"Uppercase: {w}"},
            {"role": "assistant", "content": w.upper()},
            *(
                [
                    {"role": "user", "content": "Now reverse it."},
                    {"role": "assistant", "content": w.upper()[::-1]},
                ]
                * (i % 2)
            ),
        ]
        for i, w in enumerate((words * n)[:n])
    ]


def write_jsonl(path: Path, rows: list) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def test_packed_conversations_stay_apart_and_keep_the_templates_ids(tmp_path, chatml_tokenizer):
    tokenizer = AutoTokenizer.from_pretrained(chatml_tokenizer)
    chats = conversations(12)
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": c} for c in chats])
    dm = InstructionDataModule(
        path, tokenizer=chatml_tokenizer, val_split=0, packing=True, max_length=256, batch_size=2
    )
    dm.setup("fit")
    expected = {tuple(tokenizer.apply_chat_template(c)["input_ids"]) for c in chats}
    seen = []
    for batch in dm.train_dataloader():
        for ids, labels, positions in zip(batch["input_ids"], batch["labels"], batch["position_ids"]):
            starts = [*(positions == 0).nonzero().view(-1).tolist(), len(ids)]
            for a, b in itertools.pairwise(starts):
                if ids[a] == tokenizer.pad_token_id:
                    continue  # padding: one-token blocks of their own
                example = tuple(ids[a:b].tolist())
                assert example in expected  # each example whole, as the template renders it
                assert labels[a] == IGNORE_INDEX  # nothing before it in the row predicts its first token
                learned = tokenizer.decode([t for t in labels[a:b].tolist() if t != IGNORE_INDEX])
                assert learned and set(learned.split("<|im_end|>")[:-1]) <= {
                    w for c in chats for w in (m["content"] for m in c)
                }
                seen.append(example)
    assert sorted(seen) == sorted(tuple(tokenizer.apply_chat_template(c)["input_ids"]) for c in chats)


def test_a_separate_validation_file_and_the_rendering_logged_once(tmp_path, chatml_tokenizer, caplog):
    import datasets

    train = write_jsonl(tmp_path / "train.jsonl", [{"messages": c} for c in conversations(6)])
    datasets.Dataset.from_list([{"messages": c} for c in conversations(3)]).to_parquet(
        str(tmp_path / "val.parquet")
    )
    dm = InstructionDataModule(
        train, tokenizer=chatml_tokenizer, val_path=str(tmp_path / "val.parquet"), batch_size=2
    )
    with caplog.at_level(logging.INFO):
        dm.setup("fit")
    assert (len(dm.train_data), len(dm.val_data)) == (6, 3)  # no split taken from the training file
    logged = [r.getMessage() for r in caplog.records if "rendered with" in r.getMessage()]
    assert logged == [
        "Conversations rendered with the tokenizer's chat template; the assistant's tokens are found by rendering "
        "each conversation turn by turn; assistant turns end with '<|im_end|>'"
    ]
    assert dm.sample_format == "messages"
    assert dm.generation_prompt("Uppercase: vivid").text.endswith("<|im_start|>assistant\n")
    with pytest.raises(
        SettingError, match=r"^val_split and val_path .* are two validation sets: give one; got 0.1"
    ):
        InstructionDataModule(train, val_path=str(tmp_path / "val.parquet"), val_split=0.1)
    with pytest.raises(SettingError, match=r"^val_path does not exist"):
        InstructionDataModule(train, val_path=str(tmp_path / "missing.jsonl"))


def test_a_sample_the_template_refuses_is_named_before_training(tmp_path, chatml_tokenizer):
    template = (
        "{% for m in messages %}{% if m['role'] == 'tool' %}{{ raise_exception('tool turns need a tool call') }}"
        "{% endif %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    rows = [{"messages": c} for c in conversations(2)]
    rows.append(
        {"messages": [{"role": "tool", "content": "42"}, {"role": "assistant", "content": "It is 42."}]}
    )
    dm = InstructionDataModule(
        write_jsonl(tmp_path / "d.jsonl", rows), tokenizer=chatml_tokenizer, chat_template=template
    )
    expected = r"^data_path has a sample at line 3 that the chat template cannot render: TemplateError: tool turns need a tool call"
    with pytest.raises(SettingError, match=expected):
        dm.check_data()
    with pytest.raises(SettingError, match=expected):
        dm.setup("fit")


def test_without_a_template_conversations_keep_the_role_headers(tmp_path, chatml_tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": c} for c in conversations(2)])
    dm = InstructionDataModule(path, tokenizer=chatml_tokenizer, chat_template="headers", val_split=0)
    dm.setup("fit")
    text = dm.tokenizer.decode(dm.train_data[0]["input_ids"])
    assert text == "### user:\nUppercase: vivid\n\n### assistant:\nVIVID<|im_end|>"
    shipped = InstructionDataModule(str(EXAMPLES / "data" / "chat.jsonl"), val_split=0)  # byte: no template
    assert shipped.encoder.chat is None and shipped.encoder.rendering.startswith(
        "role headers (the tokenizer has no chat template)"
    )
