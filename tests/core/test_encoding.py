"""The sample encoder: labels per format, train_on_inputs, prompts rendered as training renders, cutting."""

from __future__ import annotations

from transformers import AutoTokenizer

from lightning_paged.core.encoding import SampleEncoder, fit_to_length
from lightning_paged.core.formats import Sample
from lightning_paged.core.packing import IGNORE_INDEX
from lightning_paged.core.tokenizer import ByteTokenizer

BYTE = ByteTokenizer()
CHAT = [{"role": "user", "content": "Uppercase: vivid"}, {"role": "assistant", "content": "VIVID"}]
SAMPLES = [
    Sample("alpaca", prompt="Reverse", input="ab", response="ba"),
    Sample("prompt_completion", prompt="2+2=", response="4"),
    Sample("text", response="Once upon a time"),
    Sample("sharegpt", messages=CHAT),
]


def texts(example: dict) -> tuple[str, str]:
    """The sample's text and the text its labels cover."""
    return BYTE.decode(example["input_ids"]), BYTE.decode([t for t in example["labels"] if t != IGNORE_INDEX])


def test_each_format_puts_the_loss_on_its_response():
    alpaca, completion, text, sharegpt = (texts(e) for e in SampleEncoder(BYTE).encode(SAMPLES))
    assert alpaca == ("<bos>### Instruction:\nReverse\n\n### Input:\nab\n\n### Response:\nba<eos>", "ba<eos>")
    assert completion == ("<bos>2+2=4<eos>", "4<eos>")
    assert text == ("<bos>Once upon a time<eos>", "Once upon a time<eos>")
    assert sharegpt == ("<bos>### user:\nUppercase: vivid\n\n### assistant:\nVIVID<eos>", "VIVID<eos>")


def test_train_on_inputs_puts_the_loss_on_every_token_and_keeps_the_ids(chatml_tokenizer):
    plain, everything = (
        SampleEncoder(BYTE).encode(SAMPLES),
        SampleEncoder(BYTE, train_on_inputs=True).encode(SAMPLES),
    )
    for a, b in zip(plain, everything):
        assert a["input_ids"] == b["input_ids"] == b["labels"]
    tokenizer = AutoTokenizer.from_pretrained(chatml_tokenizer)
    [chat] = SampleEncoder(tokenizer, train_on_inputs=True).encode([Sample("messages", messages=CHAT)])
    assert chat["labels"] == chat["input_ids"] == tokenizer.apply_chat_template(CHAT)["input_ids"]


def test_a_conversational_completion_is_learned_alone(chatml_tokenizer):
    tokenizer = AutoTokenizer.from_pretrained(chatml_tokenizer)
    answer = [{"role": "assistant", "content": "DIVIV"}]
    prompt = [*CHAT, {"role": "user", "content": "Now reverse it."}]
    for encoder in (SampleEncoder(tokenizer), SampleEncoder(tokenizer, chat_template="headers")):
        [example] = encoder.encode([Sample("prompt_completion", messages=prompt + answer, train_from=3)])
        learned = tokenizer.decode([t for t in example["labels"] if t != IGNORE_INDEX])
        assert (
            learned == "DIVIV<|im_end|>"
        )  # the template's end of turn; with headers the eos, the same token


def test_prompts_are_rendered_as_their_formats_training_samples(chatml_tokenizer):
    byte = SampleEncoder(BYTE)
    assert byte.prompt("Reverse", "alpaca").text == "<bos>### Instruction:\nReverse\n\n### Response:\n"
    assert (
        byte.prompt("Uppercase: vivid", "messages").text
        == "<bos>### user:\nUppercase: vivid\n\n### assistant:\n"
    )
    assert byte.prompt("Once", "text").text == "<bos>Once"
    # the prompt is exactly the start of a training sample, up to the response
    [trained] = byte.encode([Sample("alpaca", prompt="Reverse", response="ba")])
    prompt = byte.prompt("Reverse", "alpaca")
    assert trained["input_ids"] == [*prompt.ids, *b"ba", BYTE.eos_token_id]
    so_far = [*CHAT, {"role": "user", "content": "Now reverse it."}]
    [conversation] = byte.encode(
        [Sample("messages", messages=[*so_far, {"role": "assistant", "content": "DIVIV"}])]
    )
    headed = byte.prompt(so_far)
    assert conversation["input_ids"] == [*headed.ids, *b"DIVIV", BYTE.eos_token_id]
    assert headed.text.endswith("VIVID<eos>\n\n### user:\nNow reverse it.\n\n### assistant:\n")
    tokenizer = AutoTokenizer.from_pretrained(chatml_tokenizer)
    chat = SampleEncoder(tokenizer).prompt("Uppercase: vivid", "messages")
    assert chat.ids == tokenizer.apply_chat_template(CHAT[:1], add_generation_prompt=True)["input_ids"]
    assert chat.text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nUppercase: vivid<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    [sample] = SampleEncoder(tokenizer).encode([Sample("messages", messages=CHAT)])
    assert sample["input_ids"][: len(chat.ids)] == chat.ids  # training continues where the prompt stops


def test_cutting_counts_cut_samples_and_leaves_out_those_with_nothing_to_learn():
    examples = [
        {"input_ids": [1, 2, 3], "labels": [IGNORE_INDEX, 2, 3]},
        {"input_ids": [1, 2, 3, 4, 5], "labels": [IGNORE_INDEX, IGNORE_INDEX, 3, 4, 5]},  # cut, keeps 3
        {"input_ids": [1, 2, 3, 4, 5], "labels": [IGNORE_INDEX] * 4 + [5]},  # cut to nothing to learn
    ]
    fitted = fit_to_length(examples, 3)
    assert (fitted.truncated, fitted.dropped, fitted.lengths) == (2, 1, [3, 5, 5])
    assert fitted.examples == [
        examples[0],
        {"input_ids": [1, 2, 3], "labels": [IGNORE_INDEX, IGNORE_INDEX, 3]},
    ]
