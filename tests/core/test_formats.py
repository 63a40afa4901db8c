"""Sample formats: each told by its fields, the columns mapping, ShareGPT roles, and one-line errors."""

from __future__ import annotations

import pytest

from lightning_paged.core.errors import SettingError
from lightning_paged.core.formats import Sample, SampleReader

CHAT = [{"role": "user", "content": "Uppercase: vivid"}, {"role": "assistant", "content": "VIVID"}]


def read(record, **settings) -> Sample:
    return SampleReader("data.jsonl", **settings).read(record, "line 7")


def error(record, **settings) -> str:
    with pytest.raises(SettingError) as info:
        read(record, **settings)
    return str(info.value)


def test_each_format_is_told_by_its_fields():
    assert read({"messages": CHAT}) == Sample("messages", messages=CHAT)
    sharegpt = read(
        {
            "conversations": [
                {"from": "system", "value": "Be brief."},
                {"from": "human", "value": "Hi"},
                {"from": "gpt", "value": "Hello"},
            ]
        }
    )
    assert sharegpt.format == "sharegpt" and sharegpt.messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
    ]
    assert read({"instruction": "Reverse", "input": "abc", "output": "cba"}) == Sample(
        "alpaca", prompt="Reverse", input="abc", response="cba"
    )
    assert read({"instruction": "Reverse", "input": None, "output": "x"}).input == ""  # CSV's empty cell
    assert read({"prompt": "2+2=", "completion": "4"}) == Sample(
        "prompt_completion", prompt="2+2=", response="4"
    )
    assert read({"text": "Once upon a time"}) == Sample("text", response="Once upon a time")
    # alpaca datasets often carry a pre-formatted 'text' too: the alpaca fields win
    assert read({"instruction": "a", "output": "b", "text": "### a b"}).format == "alpaca"
    assert read({"instruction": "a", "output": "b", "text": "### a b"}, format="text").response == "### a b"


def test_conversational_prompt_and_completion_train_on_the_completion():
    sample = read({"prompt": CHAT, "completion": [{"role": "assistant", "content": "Done."}]})
    assert sample.messages == [*CHAT, {"role": "assistant", "content": "Done."}] and sample.train_from == 2
    assert "no 'assistant' message in its completion" in error(
        {"prompt": CHAT, "completion": [{"role": "user", "content": "?"}]}
    )


def test_columns_map_the_files_own_field_names():
    columns = {"instruction": "question", "output": "answer", "input": "context"}
    sample = read({"question": "Reverse", "context": "ab", "answer": "ba"}, columns=columns)
    assert sample == Sample("alpaca", prompt="Reverse", input="ab", response="ba")
    assert read({"dialog": CHAT}, columns={"messages": "dialog"}).messages == CHAT
    message = error({"question": "Reverse"}, columns=columns)
    assert message.startswith("data_path has a sample at line 7 that fits no format (with columns")
    assert "columns: {prompt: question, completion: answer}" in message
    message = error({"question": "Reverse"}, columns=columns, format="alpaca")
    assert (
        "has no 'answer', which the alpaca format needs (columns maps 'output' to 'answer'; its keys: 'question')"
        in message
    )


def test_a_sample_that_fits_no_format_names_the_columns_setting():
    message = error({"question": "2+2?", "answer": "4"})
    assert message.startswith(
        "data_path has a sample at line 7 that fits no format: its keys are 'question', 'answer'"
    )
    assert "Map other field names with the columns setting" in message and "\n" not in message
    message = error({"body": "..."}, format="text")
    assert (
        "has no 'text', which the text format needs (map the field that holds it with the columns setting, e.g. columns: {text: <field>}"
        in message
    )


def test_unknown_roles_name_the_accepted_ones():
    message = error(
        {"messages": [{"role": "human", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    )
    assert (
        "message 0 with role 'human'; the accepted role values of messages samples are system, user, assistant, tool"
        in message
    )
    message = error({"conversations": [{"from": "user", "value": "hi"}, {"from": "gpt", "value": "yo"}]})
    assert (
        "message 0 with from 'user'; the accepted from values of sharegpt samples are human, gpt, system"
        in message
    )
    assert "has no 'gpt' message to learn from" in error(
        {"conversations": [{"from": "human", "value": "hi"}]}
    )
    # with train_on_inputs a conversation without an answer still teaches its text
    reader = SampleReader("data.jsonl", need_response=False)
    assert reader.read({"messages": [{"role": "user", "content": "hi"}]}, "line 1").format == "messages"


def test_bad_values_and_settings_are_one_line_errors():
    assert "has message 1 without a 'content' string" in error({"messages": [CHAT[0], {"role": "assistant"}]})
    assert "has a int as 'output', not a string" in error({"instruction": "a", "output": 3})
    assert "is a list, not an object" in error([1, 2])
    with pytest.raises(SettingError, match=r"^columns.ouput maps no known field; did you mean 'output'\?"):
        SampleReader("d.jsonl", columns={"ouput": "answer"})
    with pytest.raises(SettingError, match=r"^format must be one of auto, messages, sharegpt, alpaca"):
        SampleReader("d.jsonl", format="chatml")
    with pytest.raises(SettingError, match=r"^val_path has a sample at line 7"):
        SampleReader("v.jsonl", setting="val_path").read({"x": 1}, "line 7")
