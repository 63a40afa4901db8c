"""lightning_paged: NF4 QLoRA, paged optimizers and unified-memory eviction monitoring for Lightning."""

from lightning_paged.core.errors import SettingError
from lightning_paged.core.qlora import ConversionReport, QLoRAConfig, convert_to_qlora
from lightning_paged.lightning.strategies import PagedQLoRADDPStrategy, PagedQLoRAStrategy

__version__ = "0.1.0"

__all__ = [
    "ConversionReport",
    "PagedQLoRADDPStrategy",
    "PagedQLoRAStrategy",
    "QLoRAConfig",
    "SettingError",
    "convert_to_qlora",
]
