"""The record a converted model's checkpoint carries besides its adapter weights, and the checks it allows.

One owner for what used to be string keys in several places: :class:`AdapterCheckpoint` says which
base model and settings the adapters were trained on (the :class:`~lightning_paged.core.fingerprint.
Fingerprint`), the QLoRA settings, where the adapters sit in the model (``model_attr``,
``target_prefix``) and in the checkpoint (``weights``), the PEFT config ``export`` writes, and,
for a Lightning run, what an exact resume needs. Every front door writes it:

- Lightning strategies and Fabric strategies: under ``checkpoint["lightning_paged"]``
  (:data:`CHECKPOINT_KEY`) of the checkpoint file; ``weights`` is the key of the adapter weights
  (``"state_dict"`` for Lightning, the ``fabric.save`` state key for Fabric);
- Accelerate: as ``lightning_paged.json`` (:data:`RECORD_FILE`) in the ``save_state`` directory;
  ``weights`` is the stem of the model's weight file (``"model"``: ``model.safetensors``).

A resume and ``lightning-paged export`` read it back and refuse a checkpoint of another base model
or settings with :meth:`AdapterCheckpoint.check`, one phrasing everywhere.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from lightning_paged.core.atomic import CheckpointReadError, atomic_write
from lightning_paged.core.errors import MissingFileError
from lightning_paged.core.fingerprint import Fingerprint, describe_differences, mismatch_error
from lightning_paged.core.qlora_config import QLoRAConfig, qlora_config_from_init_args

CHECKPOINT_KEY = "lightning_paged"
"""Where the record sits in a checkpoint dict (Lightning's and Fabric's checkpoint files)."""
RECORD_FILE = "lightning_paged.json"
"""Where it sits in a checkpoint directory (Accelerate's ``save_state``)."""
FORMAT = 1


@dataclass
class AdapterCheckpoint:
    """What a converted model's checkpoint says about its adapter weights (see the module)."""

    fingerprint: Fingerprint
    """The base model and the settings that change what the adapter weights mean."""
    qlora: dict[str, Any]
    """Every QLoRA setting of the run, as :class:`QLoRAConfig`'s fields."""
    model_attr: str | None
    """Which submodule was converted (``select_target``'s rule), as the front door was told."""
    target_prefix: str
    """The converted module's name within the checkpointed module, with a trailing dot (or ``""``)."""
    peft_config: dict[str, Any] | None
    """The adapters' PEFT ``LoraConfig``, as a dict."""
    task_type: str | None = None
    """PEFT's task type of the exported adapter (``"CAUSAL_LM"`` for a causal LM)."""
    weights: str = "state_dict"
    """Where the adapter weights are: a key of the checkpoint dict, or the stem of a weight file."""
    resume: dict[str, Any] | None = None
    """What an exact Lightning resume needs (data position, generator states); None elsewhere."""
    format: int = FORMAT
    extra: dict[str, Any] = field(default_factory=dict)
    """Keys of a newer format this one does not know, kept as they were."""

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["fingerprint"] = self.fingerprint.to_dict()
        data.update(data.pop("extra"))
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: object = "the checkpoint") -> AdapterCheckpoint:
        """The record from :meth:`to_dict`'s form (older checkpoints lack ``weights``, ``task_type``, ...)."""
        known = {"fingerprint", "qlora", "model_attr", "target_prefix", "peft_config", "task_type"}
        known |= {"weights", "resume", "format"}
        try:
            return cls(
                fingerprint=Fingerprint.from_dict(data["fingerprint"]),
                qlora=dict(data.get("qlora") or {}),
                model_attr=data.get("model_attr", "auto"),
                target_prefix=str(data.get("target_prefix") or ""),
                peft_config=data.get("peft_config"),
                task_type=data.get("task_type"),
                weights=str(data.get("weights") or "state_dict"),
                resume=data.get("resume"),
                format=int(data.get("format", FORMAT)),
                extra={k: v for k, v in data.items() if k not in known},
            )
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointReadError(
                f"{source} has a {CHECKPOINT_KEY} record that cannot be read ({type(err).__name__}: {err}); "
                "it was damaged or written by another program"
            ) from None

    @classmethod
    def read(
        cls, checkpoint: Mapping[str, Any], source: object = "the checkpoint"
    ) -> AdapterCheckpoint | None:
        """The record of a checkpoint dict; None when it has none (not written by a lightning_paged front door)."""
        data = checkpoint.get(CHECKPOINT_KEY)
        if not isinstance(data, Mapping) or "fingerprint" not in data:
            return None
        return cls.from_dict(data, source)

    def write_file(self, directory: str | Path, name: str = RECORD_FILE) -> Path:
        """Write the record as ``name`` in a checkpoint directory (atomically); returns its path."""
        path = Path(directory) / name
        text = json.dumps(self.to_dict(), indent=1, sort_keys=True)
        atomic_write(path, lambda file: file.write(text.encode("utf-8")))
        return path

    @classmethod
    def read_file(cls, directory: str | Path, name: str = RECORD_FILE) -> AdapterCheckpoint | None:
        """The record ``name`` of a checkpoint directory; None when it has none."""
        path = Path(directory) / name
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise CheckpointReadError(f"{path} cannot be read as JSON ({err}); it is damaged") from None
        if not isinstance(data, dict):
            raise CheckpointReadError(f"{path} holds a {type(data).__name__}, not a record")
        return cls.from_dict(data, path)

    def adapter_weights(self, checkpoint: Mapping[str, Any] | Path) -> Mapping[str, Any]:
        """The adapter weights of a checkpoint dict (``checkpoint[weights]``) or a checkpoint directory."""
        if isinstance(checkpoint, Path):
            return read_directory_weights(checkpoint, self.weights)
        weights = checkpoint.get(self.weights)
        if not isinstance(weights, Mapping):
            raise CheckpointReadError(
                f"the checkpoint holds no adapter weights under {self.weights!r}, where its record says they are"
            )
        return weights

    def settings(self) -> QLoRAConfig:
        """The run's QLoRA settings (an invalid value names ``checkpoint qlora.<setting>``)."""
        return qlora_config_from_init_args(self.qlora, "checkpoint qlora.")

    def differences(self, current: Fingerprint, where: str = "", now: str = "now") -> list[str]:
        """What differs between the recorded fingerprint and ``current``, one phrase each.

        ``where`` prefixes setting names with their place in the user's config
        (``--trainer.strategy.init_args.``, ``qlora.``); ``now`` says where the current values come from.
        """
        return describe_differences(self.fingerprint, current, where, now)

    def check(self, current: Fingerprint, advice: str, where: str = "", now: str = "now") -> None:
        """Refuse (:class:`~lightning_paged.core.fingerprint.CheckpointMismatchError`) when anything differs."""
        differences = self.differences(current, where, now)
        if differences:
            raise mismatch_error(differences, advice)


def read_directory_weights(
    directory: Path, stem: str, device: str | torch.device = "cpu"
) -> dict[str, torch.Tensor]:
    """The tensors of ``<stem>.safetensors``, else ``pytorch_<stem>.bin``, of a checkpoint directory.

    Accelerate's ``save_state`` names a model's weights so (``model.safetensors``, ``model_1.safetensors``;
    ``pytorch_model.bin`` without safe serialization).
    """
    safe = directory / f"{stem}.safetensors"
    if safe.exists():
        from safetensors.torch import load_file

        return load_file(safe, device=str(device))
    pickled = directory / f"pytorch_{stem}.bin"
    if not pickled.exists():
        raise MissingFileError(f"{directory} holds no weights {safe.name} or {pickled.name}")
    return torch.load(pickled, map_location=device, weights_only=True)
