"""Lightning strategies that turn the model into NF4 QLoRA at setup."""

from lightning.pytorch.strategies import StrategyRegistry

from lightning_paged.lightning.strategies.ddp import PagedQLoRADDPStrategy
from lightning_paged.lightning.strategies.fsdp import PagedQLoRAFSDPStrategy
from lightning_paged.lightning.strategies.single_device import PagedQLoRAStrategy

for _strategy in (PagedQLoRAStrategy, PagedQLoRADDPStrategy, PagedQLoRAFSDPStrategy):
    if _strategy.strategy_name not in StrategyRegistry:
        _strategy.register_strategies(StrategyRegistry)

__all__ = ["PagedQLoRADDPStrategy", "PagedQLoRAFSDPStrategy", "PagedQLoRAStrategy"]
