"""lightning_paged: NF4 QLoRA, paged optimizers and unified-memory eviction monitoring for Lightning."""

from lightning_paged.commands.resume_check import last_checkpoint
from lightning_paged.core.atomic import CheckpointReadError
from lightning_paged.core.causal_lm_loss import causal_lm_loss
from lightning_paged.core.errors import SettingError
from lightning_paged.core.eviction.recorder import EvictionRecorder
from lightning_paged.core.export import adapter_from_model, merge_adapter, save_adapter
from lightning_paged.core.fingerprint import CheckpointMismatchError
from lightning_paged.core.loading import LoadReport, WeightLoadError, empty_model, load_and_convert
from lightning_paged.core.loss import LogitTransform, chunked_cross_entropy
from lightning_paged.core.offload import ActivationOffload, enable_activation_offload
from lightning_paged.core.optimizers import OptimizerConfig, build_optimizer
from lightning_paged.core.packing import PackCollator, PackedDataset, check_packing_support, model_inputs
from lightning_paged.core.paging import PagingCoverage, paging_coverage, repage_optimizer_state
from lightning_paged.core.plan import MemoryPlan, plan_memory
from lightning_paged.core.qlora import ConversionReport, QLoRAConfig, convert_to_qlora
from lightning_paged.core.sampling import ResumableSampler
from lightning_paged.core.schedule import build_scheduler
from lightning_paged.core.tokenizer import ByteTokenizer, load_tokenizer
from lightning_paged.lightning.checkpoint_io import AtomicCheckpointIO
from lightning_paged.lightning.csv_logger import ResumableCSVLogger
from lightning_paged.lightning.data import InstructionDataModule
from lightning_paged.lightning.mixin import PagedOptimizerMixin
from lightning_paged.lightning.module import CausalLMModule
from lightning_paged.lightning.monitor import EvictionMonitor
from lightning_paged.lightning.strategies import (
    PagedQLoRADDPStrategy,
    PagedQLoRAFSDPStrategy,
    PagedQLoRAStrategy,
)

__version__ = "0.1.0"

__all__ = [
    "ActivationOffload",
    "AtomicCheckpointIO",
    "ByteTokenizer",
    "CausalLMModule",
    "CheckpointMismatchError",
    "CheckpointReadError",
    "ConversionReport",
    "EvictionMonitor",
    "EvictionRecorder",
    "InstructionDataModule",
    "LoadReport",
    "LogitTransform",
    "MemoryPlan",
    "OptimizerConfig",
    "PackCollator",
    "PackedDataset",
    "PagedOptimizerMixin",
    "PagedQLoRADDPStrategy",
    "PagedQLoRAFSDPStrategy",
    "PagedQLoRAStrategy",
    "PagingCoverage",
    "QLoRAConfig",
    "ResumableCSVLogger",
    "ResumableSampler",
    "SettingError",
    "WeightLoadError",
    "adapter_from_model",
    "build_optimizer",
    "build_scheduler",
    "causal_lm_loss",
    "check_packing_support",
    "chunked_cross_entropy",
    "convert_to_qlora",
    "empty_model",
    "enable_activation_offload",
    "last_checkpoint",
    "load_and_convert",
    "load_tokenizer",
    "merge_adapter",
    "model_inputs",
    "paging_coverage",
    "plan_memory",
    "repage_optimizer_state",
    "save_adapter",
]
