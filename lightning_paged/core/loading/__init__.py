"""Loading a model directory's weights while quantizing them, without the 16-bit model in memory.

:func:`empty_model` builds a directory's model with no weights (parameters on the meta device);
:func:`~lightning_paged.core.qlora.convert_to_qlora` then fills it from the weight files (safetensors,
or zip-format PyTorch ``.bin`` files, memory-mapped) as it converts (:func:`load_and_convert`), on
every rank from the same files. Pre-quantized bitsandbytes 4-bit directories are loaded as stored.
"""

from lightning_paged.core.deferred import deferred_directory
from lightning_paged.core.loading.files import WeightFiles, WeightLoadError, find_weight_files
from lightning_paged.core.loading.skeleton import directory_config, empty_model
from lightning_paged.core.loading.stream import LoadReport, load_and_convert, load_unquantized

__all__ = [
    "LoadReport",
    "WeightFiles",
    "WeightLoadError",
    "deferred_directory",
    "directory_config",
    "empty_model",
    "find_weight_files",
    "load_and_convert",
    "load_unquantized",
]
