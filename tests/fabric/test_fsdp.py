"""Fabric's paged_qlora_fsdp: settings refused in-process (the two-process runs live in tests/lightning/test_fsdp.py)."""

from __future__ import annotations

import pytest
from lightning.fabric import Fabric

from lightning_paged.core.errors import SettingError
from lightning_paged.core.qlora import QLoRAConfig
from lightning_paged.fabric import PagedQLoRAFabricFSDPStrategy


def test_storage_defaults_to_the_compute_dtype_and_uint8_is_refused():
    assert PagedQLoRAFabricFSDPStrategy(qlora={"compute_dtype": "float32"}).qlora.quant_storage == "float32"
    assert PagedQLoRAFabricFSDPStrategy().qlora.quant_storage == "bfloat16"
    with pytest.raises(SettingError, match=r"qlora\.quant_storage must be a floating type under FSDP"):
        PagedQLoRAFabricFSDPStrategy(qlora={"quant_storage": "uint8"})
    with pytest.raises(SettingError, match=r"qlora\.quant_storage"):
        PagedQLoRAFabricFSDPStrategy(qlora=QLoRAConfig(quant_storage="uint8"))


def test_one_process_is_refused_with_paged_qlora_suggested(launcher_environ):
    fabric = Fabric(accelerator="cpu", devices=1, strategy="paged_qlora_fsdp")
    with pytest.raises(SettingError, match=r"devices is one process.*strategy='paged_qlora'"):
        fabric.launch()


def test_bf16_true_is_refused(launcher_environ):
    fabric = Fabric(accelerator="cpu", devices=1, strategy="paged_qlora_fsdp", precision="bf16-true")
    with pytest.raises(SettingError, match=r"precision .*conflicts with PagedQLoRAFabricFSDPStrategy"):
        fabric.launch()
