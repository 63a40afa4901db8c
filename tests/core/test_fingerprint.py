"""The base-model fingerprint: which weight files differ, and the hash cache."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import tiny_checkpoint_config
from transformers import LlamaForCausalLM

from lightning_paged.core.fingerprint import (
    BaseFingerprint,
    Fingerprint,
    default_cache_file,
    describe_differences,
    files_fingerprint,
    settings_of,
)
from lightning_paged.core.qlora import QLoRAConfig

pytestmark = pytest.mark.usefixtures("private_hash_cache")
tiny_config = tiny_checkpoint_config


def test_base_directory_fingerprint_names_the_files_that_differ_and_is_cached(tmp_path):
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config())
    model.save_pretrained(tmp_path / "a", max_shard_size="40KB")
    shards = sorted(p.name for p in (tmp_path / "a").glob("*.safetensors"))
    assert len(shards) > 1
    saved = files_fingerprint(tmp_path / "a")
    assert saved.kind == "files" and set(saved.files) == set(shards)

    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.add_(1e-3)  # one layer retrained
    model.save_pretrained(tmp_path / "b", max_shard_size="40KB")
    other = files_fingerprint(tmp_path / "b")
    changed = [n for n in shards if saved.files[n] != other.files[n]]
    assert len(changed) == 1
    (difference,) = describe_differences(Fingerprint(saved, {}), Fingerprint(other, {}))
    assert f"in the checkpoint: loaded from {tmp_path / 'a'}" in difference
    assert (
        f"now: loaded from {tmp_path / 'b'}" in difference
        and f"different content: {changed[0]}" in difference
    )

    # Cached by (path, size, mtime): a rewrite that keeps both is not re-read; a touched file is.
    shard = tmp_path / "a" / shards[0]
    stat = shard.stat()
    content = bytearray(shard.read_bytes())
    content[-1] ^= 0xFF
    shard.write_bytes(bytes(content))
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert files_fingerprint(tmp_path / "a").files[shards[0]] == saved.files[shards[0]]
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    assert files_fingerprint(tmp_path / "a").files[shards[0]] != saved.files[shards[0]]
    assert default_cache_file().is_file()


def test_a_setting_added_after_a_checkpoint_was_written_counts_as_its_default():
    base = BaseFingerprint(kind="tensors", sha256="0" * 64, source="x")
    now = settings_of(QLoRAConfig())
    older = {k: v for k, v in now.items() if k not in ("quantize_experts", "lora_on_experts")}
    assert describe_differences(Fingerprint(base, older), Fingerprint(base, now)) == []
    changed = settings_of(QLoRAConfig(quantize_experts=False))
    (difference,) = describe_differences(Fingerprint(base, older), Fingerprint(base, changed))
    assert difference == "another quantize_experts (True in the checkpoint, False now)"
