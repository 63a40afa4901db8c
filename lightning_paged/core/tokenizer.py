"""Tokenizers for training data: a built-in byte-level one for demos, or a local transformers tokenizer.

Framework-free. :func:`load_tokenizer` turns the ``tokenizer`` setting (``"byte"`` or a local
directory) into an object with the small interface the data module and the model module use:
``__call__``/``encode``/``decode``, ``pad_token_id``, ``bos_token_id``, ``eos_token_id`` and
``len(tokenizer)``. Nothing is ever downloaded.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning_paged.core.errors import SettingError

BYTE = "byte"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")
"""Files a saved transformers tokenizer directory holds at least one of."""


class ByteTokenizer:
    """UTF-8 bytes as tokens: ids 0-255 are the byte values, then ``<pad>``, ``<bos>`` and ``<eos>``.

    Any text round-trips exactly and the vocabulary is 259 entries, so a model a few hundred
    kilobytes in size can use it. It mirrors the part of a transformers tokenizer the project uses.
    """

    pad_token_id = 256
    bos_token_id = 257
    eos_token_id = 258
    vocab_size = 259
    special_tokens = {"<pad>": pad_token_id, "<bos>": bos_token_id, "<eos>": eos_token_id}
    pad_token = "<pad>"
    bos_token = "<bos>"
    eos_token = "<eos>"
    padding_side = "right"
    name_or_path = BYTE

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"ByteTokenizer(vocab_size={self.vocab_size})"

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text``; with ``add_special_tokens``, ``<bos>`` in front (as Llama tokenizers do)."""
        ids = list(text.encode("utf-8"))
        return [self.bos_token_id, *ids] if add_special_tokens else ids

    def decode(self, ids: Sequence[int] | Any, skip_special_tokens: bool = False) -> str:
        """Text of ``ids`` (a list or a 1-d tensor); bytes that are not valid UTF-8 become U+FFFD."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        out = bytearray()
        names = {v: k for k, v in self.special_tokens.items()}
        for i in ids:
            i = int(i)
            if i < 256:
                out.append(i)
            elif not skip_special_tokens:
                out.extend(names.get(i, "<unk>").encode())
        return out.decode("utf-8", errors="replace")

    def batch_decode(
        self, sequences: Sequence[Sequence[int]] | Any, skip_special_tokens: bool = False
    ) -> list[str]:
        return [self.decode(s, skip_special_tokens=skip_special_tokens) for s in sequences]

    def __call__(
        self, text: str | Sequence[str], add_special_tokens: bool = False, return_tensors: str | None = None
    ) -> dict[str, Any]:
        """``{"input_ids", "attention_mask"}`` for one text or a list; ``return_tensors="pt"`` pads on the right."""
        single = isinstance(text, str)
        texts: Sequence[str] = [text] if single else text  # type: ignore[list-item]
        ids = [self.encode(t, add_special_tokens=add_special_tokens) for t in texts]
        if return_tensors is None:
            masks = [[1] * len(i) for i in ids]
            if single:
                return {"input_ids": ids[0], "attention_mask": masks[0]}
            return {"input_ids": ids, "attention_mask": masks}
        if return_tensors != "pt":
            raise ValueError(
                f"ByteTokenizer returns only 'pt' tensors; got return_tensors={return_tensors!r}"
            )
        import torch

        width = max((len(i) for i in ids), default=0)
        input_ids = torch.full((len(ids), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(ids), width), dtype=torch.long)
        for row, seq in enumerate(ids):
            input_ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            attention_mask[row, : len(seq)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask}


def load_tokenizer(spec: str, setting: str = "tokenizer") -> Any:
    """The tokenizer the ``tokenizer`` setting names: ``"byte"`` or a local transformers tokenizer directory.

    A transformers tokenizer without a pad token pads with its end-of-sequence token. Raises
    :class:`SettingError` (naming ``setting``) for a path that is not a tokenizer directory.
    """
    if spec == BYTE:
        return ByteTokenizer()
    path = Path(spec).expanduser()
    if not path.is_dir():
        raise SettingError(
            setting,
            spec,
            "is not a local directory; give 'byte' for the built-in byte tokenizer or the path of a "
            "directory holding a transformers tokenizer (tokenizer.json / tokenizer_config.json); "
            "nothing is downloaded",
        )
    if not any((path / name).is_file() for name in _TOKENIZER_FILES):
        raise SettingError(
            setting,
            spec,
            f"holds no tokenizer files (one of {', '.join(_TOKENIZER_FILES)}); give the directory a "
            "transformers tokenizer was saved to (tokenizer.save_pretrained), or 'byte'",
        )
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, TypeError) as err:
        raise SettingError(
            setting, spec, f"holds no tokenizer transformers can load ({type(err).__name__}: {err})"
        ) from err
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise SettingError(
                setting, spec, "has neither a pad token nor an end-of-sequence token to pad with"
            )
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def encode_texts(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text, without special tokens, in one batched call (fast tokenizers use threads)."""
    if not texts:
        return []
    return list(tokenizer(list(texts), add_special_tokens=False)["input_ids"])


def save_tokenizer(spec: str, directory: str | Path, chat_template: str = "auto") -> bool:
    """Write the files of the tokenizer the ``tokenizer`` setting names into ``directory``.

    As transformers' ``Trainer`` saves its tokenizer beside the model it writes
    (``trainer.py:4219``), so the directory loads with ``AutoTokenizer`` and prompts with
    ``apply_chat_template`` as in training. A ``chat_template`` setting that is a template or a
    template file is saved as the tokenizer's chat template. Returns False for the byte tokenizer
    (nothing to save).
    """
    if spec == BYTE:
        return False
    from lightning_paged.core.chat import CHOICES, resolve_template

    tokenizer = load_tokenizer(spec)
    if chat_template not in CHOICES:
        tokenizer.chat_template = resolve_template(chat_template, tokenizer)[0]
    tokenizer.save_pretrained(str(directory))
    return True
