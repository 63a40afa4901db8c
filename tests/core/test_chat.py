"""Chat templates: token ids exactly as the tokenizer's, labels on exactly the assistant turns, both ways of
finding them agreeing, other model families' templates, end-of-turn tokens, and refusals with the reason."""

from __future__ import annotations

import pytest
from conftest import CHATML, CHATML_GENERATION, PHI3
from transformers import AutoTokenizer

from lightning_paged.core.chat import ChatTemplate, resolve_template
from lightning_paged.core.encoding import SampleEncoder
from lightning_paged.core.errors import SettingError
from lightning_paged.core.formats import Sample
from lightning_paged.core.packing import IGNORE_INDEX

CONVERSATION = [
    {"role": "system", "content": "Answer with the result only."},
    {"role": "user", "content": "Uppercase: vivid"},
    {"role": "assistant", "content": "VIVID"},
    {"role": "user", "content": "Now reverse it."},
    {"role": "assistant", "content": "DIVIV"},
]
CONVERSATIONS = [
    CONVERSATION,
    CONVERSATION[1:],  # no system message: the template adds its default one
    [
        *CONVERSATION[1:3],
        {"role": "user", "content": "And?"},
        {"role": "assistant", "content": "two words\n\n"},
    ],
    [{"role": "user", "content": "Say nothing."}, {"role": "assistant", "content": ""}],
]
MISTRAL = (  # [INST] turns, each answer closed by the tokenizer's eos
    "{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
)
LLAMA3 = (  # Meta-Llama-3-Instruct's: contents trimmed, each turn closed by <|eot_id|>
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
GEMMA = (  # the assistant is 'model', contents trimmed
    "{% for message in messages %}{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer(chatml_tokenizer):
    return AutoTokenizer.from_pretrained(chatml_tokenizer)


def chat(tokenizer, template: str | None = None, setting: str = "auto") -> ChatTemplate:
    source = template or tokenizer.chat_template
    return ChatTemplate(tokenizer, source, "a test template", setting)


def assistant_runs(ids: list[int], labels: list[int]) -> list[list[int]]:
    """The labelled stretches of a sample, each a list of token ids."""
    runs: list[list[int]] = []
    for position, (token, label) in enumerate(zip(ids, labels)):
        if label == IGNORE_INDEX:
            continue
        assert label == token
        if position and labels[position - 1] != IGNORE_INDEX:
            runs[-1].append(token)
        else:
            runs.append([token])
    return runs


def test_a_chat_sample_is_the_tokenizers_own_ids_with_labels_on_exactly_the_assistant_turns(tokenizer):
    encoder = SampleEncoder(tokenizer)  # chat_template: auto, and the tokenizer has one
    assert encoder.chat is not None and encoder.chat.marking == "turns"
    [example] = encoder.encode([Sample("messages", messages=CONVERSATION)])
    ids, labels = example["input_ids"], example["labels"]
    assert ids == tokenizer.apply_chat_template(CONVERSATION, tokenize=True)["input_ids"]
    runs = assistant_runs(ids, labels)
    # each run is an assistant message's content and its end-of-turn token, right after the assistant header
    assert runs == [tokenizer.encode(f"{m}<|im_end|>", add_special_tokens=False) for m in ("VIVID", "DIVIV")]
    for run in runs:
        start = next(i for i in range(len(ids)) if ids[i : i + len(run)] == run)
        assert tokenizer.decode(ids[:start]).endswith("<|im_start|>assistant\n")
        assert tokenizer.decode(ids[start + len(run) :]).startswith("\n")  # the newline after is not learned


def test_the_generation_mask_and_turn_by_turn_rendering_agree(tokenizer):
    with_block = chat(tokenizer, CHATML_GENERATION)
    without = chat(tokenizer, CHATML)
    assert (with_block.marking, without.marking) == ("generation", "turns")
    for conversation in CONVERSATIONS:
        by_mask = with_block.encode(conversation)
        assert any(by_mask[1]) or conversation[-1]["content"] == ""
        assert with_block.encode(conversation, marking="turns") == by_mask
        assert without.encode(conversation) == by_mask  # the same text, so the same ids and labels
        assert by_mask[0] == tokenizer.apply_chat_template(conversation, chat_template=CHATML)["input_ids"]


@pytest.mark.parametrize(
    ("template", "learned"),
    [
        (PHI3, "VIVID<|end|>DIVIV<|end|>"),  # the conversation's closing eos is not an assistant token
        (MISTRAL, "VIVID<|im_end|>DIVIV<|im_end|>"),
        (GEMMA, "VIVID<end_of_turn>DIVIV<end_of_turn>"),
        (LLAMA3, "VIVID<|eot_id|>DIVIV<|eot_id|>"),
    ],
    ids=["phi3", "mistral", "gemma", "llama3"],
)
def test_other_families_templates_are_marked_turn_by_turn(chatml_tokenizer, template, learned):
    tokenizer = AutoTokenizer.from_pretrained(
        chatml_tokenizer, bos_token="<|endoftext|>"
    )  # Llama 3's opens with it
    template_chat = chat(tokenizer, template)
    ids, mask = template_chat.encode(CONVERSATION[1:])
    assert ids == tokenizer.apply_chat_template(CONVERSATION[1:], chat_template=template)["input_ids"]
    assert tokenizer.decode([t for t, m in zip(ids, mask) if m]) == learned


def test_the_end_of_turn_token_is_the_templates_not_always_eos(tokenizer, phi3_tokenizer):
    assert tokenizer.convert_ids_to_tokens(chat(tokenizer).end_of_turn_id) == "<|im_end|>"
    phi3 = AutoTokenizer.from_pretrained(phi3_tokenizer)
    encoder = SampleEncoder(phi3)
    assert phi3.eos_token == "<|endoftext|>"
    assert phi3.convert_ids_to_tokens(encoder.stop_ids) == ["<|end|>", "<|endoftext|>"]
    assert "assistant turns end with '<|end|>'" in encoder.rendering
    assert chat(tokenizer, GEMMA).end_of_turn_id is None  # <end_of_turn> is plain text to this tokenizer


def test_a_template_that_cannot_mark_assistant_tokens_is_refused_with_the_reason(tokenizer):
    other_header = CHATML.replace("{{ '<|im_start|>assistant\n' }}", "{{ '<|im_start|>bot\n' }}")
    assert other_header != CHATML
    with pytest.raises(SettingError) as info:
        chat(tokenizer, other_header, setting="mine.jinja")
    message = str(info.value)
    assert message.startswith("chat_template (a test template) has no {% generation %} block")
    assert "does not begin with the generation prompt" in message and "'mine.jinja'" in message
    # earlier answers rewritten once a later turn follows (as templates that drop old reasoning do)
    rewriting = CHATML.replace(
        "message['content'] + '<|im_end|>'",
        "(message['content'] if loop.last or message['role'] != 'assistant' else '...') + '<|im_end|>'",
    )
    with pytest.raises(SettingError, match="do not render as the start of the whole conversation"):
        chat(tokenizer, rewriting)
    # the same template with {% generation %} needs no turn-by-turn rendering
    marked = CHATML_GENERATION.replace(
        "message['content'] + '<|im_end|>' }}{% endgeneration",
        "(message['content'] if loop.last else '...') + '<|im_end|>' }}{% endgeneration",
    )
    assert marked != CHATML_GENERATION
    ids, mask = chat(tokenizer, marked).encode(CONVERSATION)
    assert tokenizer.decode([t for t, m in zip(ids, mask) if m]) == "...<|im_end|>DIVIV<|im_end|>"
    empty = CHATML_GENERATION.replace("{% generation %}", "{% generation %}{% if false %}").replace(
        "{% endgeneration %}", "{% endif %}{% endgeneration %}"
    )
    with pytest.raises(SettingError, match="marks no token of a user/assistant conversation"):
        chat(tokenizer, empty)
    with pytest.raises(SettingError, match="cannot render a user/assistant conversation: .*alternate"):
        chat(tokenizer, "{% generation %}{{ raise_exception('Roles must alternate') }}{% endgeneration %}")


def test_the_setting_chooses_the_rendering(tokenizer, tmp_path):
    assert resolve_template("auto", tokenizer) == (CHATML, "the tokenizer's chat template")
    assert resolve_template("headers", tokenizer)[0] is None
    assert resolve_template(CHATML_GENERATION, tokenizer)[0] == CHATML_GENERATION
    (tmp_path / "t.jinja").write_text(PHI3)
    assert resolve_template(str(tmp_path / "t.jinja"), tokenizer) == (
        PHI3,
        f"the chat template in {tmp_path / 't.jinja'}",
    )
    with pytest.raises(SettingError, match=r"^chat_template must be auto, tokenizer, headers, a Jinja"):
        resolve_template("chatml", tokenizer)
    from lightning_paged.core.tokenizer import ByteTokenizer

    assert resolve_template("auto", ByteTokenizer()) == (
        None,
        "role headers (the tokenizer has no chat template)",
    )
    with pytest.raises(
        SettingError, match=r"^chat_template asks for the tokenizer's chat template, but byte has none"
    ):
        resolve_template("tokenizer", ByteTokenizer())
    with pytest.raises(SettingError, match=r"needs a transformers fast tokenizer"):
        SampleEncoder(ByteTokenizer(), chat_template=CHATML)
