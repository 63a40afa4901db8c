"""A transformers causal language model as a LightningModule, trained on response tokens only."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from lightning_paged.compat import lightning as lightning_compat
from lightning_paged.core.causal_lm_loss import (
    LossPlan,
    batch_loss,
    fallback_message,
    loss_plan,
)
from lightning_paged.core.encoding import Prompt
from lightning_paged.core.errors import SettingError
from lightning_paged.core.fsdp_optimizer import model_parameters
from lightning_paged.core.generation import Answer, generate_answer
from lightning_paged.core.loading import deferred_directory, load_unquantized
from lightning_paged.core.loss import DEFAULT_CHUNK_SIZE, LOSS_KINDS, LossKind
from lightning_paged.core.models import model_from_config, model_from_directory
from lightning_paged.core.optimizers import OptimizerConfig
from lightning_paged.core.packing import (
    batch_tokens,
    check_packing_support,
    is_packed,
    response_targets,
)
from lightning_paged.core.tokenizer import encode_texts, load_tokenizer
from lightning_paged.lightning.mixin import PagedOptimizerMixin
from lightning_paged.lightning.strategies.base import QLoRAStrategyMixin


class CausalLMModule(PagedOptimizerMixin, LightningModule):
    """A causal LM from a local directory or built from a config, with a paged optimizer.

    The transformers model is ``self.model``: the QLoRA strategy converts that attribute to NF4 +
    LoRA at setup. Batches are those of :class:`~lightning_paged.lightning.data.InstructionDataModule`:
    padded (``input_ids``, ``attention_mask`` and ``labels`` that are -100 off the response) or packed
    (``position_ids`` restarting per sample instead of a mask; the model then runs with
    ``attention_mask=None`` and ``use_cache=False``, and an attention implementation that would let
    packed samples see each other is refused when ``fit`` starts).

    The loss is the mean over the response tokens of the batch, packed or not, computed chunk by chunk
    from the output layer's input (``loss="chunked"``, the default, in training, validation and test):
    the batch's full logits never exist, and the value and gradients are those of transformers' loss.
    A model whose forward changes its logits in a way the chunked loss does not reproduce runs its own
    loss instead, with a warning that says why. With gradient
    accumulation or several processes, each process backpropagates the *sum* of its token losses and
    the gradients are divided by the response tokens of the whole optimizer step (all micro-batches,
    all ranks, summed across ranks) right before the optimizer step, so every response token weighs
    the same however the tokens fall into batches.

    Logged: ``train/loss`` (per optimizer step: the mean over all its response tokens, every
    micro-batch and every rank, as transformers' Trainer logs it), ``train/tokens``
    (real, non-padding tokens in the step's batch), ``train/padding_fraction`` (share of the batch's
    positions that are padding), ``val/loss`` and ``test/loss`` (per epoch, averaged over response
    tokens).
    """

    def __init__(
        self,
        model_name_or_path: str | None = None,
        model_config: dict[str, Any] | None = None,
        tokenizer: str = "byte",
        optimizer: OptimizerConfig | None = None,
        sample_prompt: str | None = None,
        sample_max_new_tokens: int = 32,
        loss: LossKind = "chunked",
        loss_chunk_size: int = DEFAULT_CHUNK_SIZE,
    ) -> None:
        """
        Args:
            model_name_or_path: A local directory holding a transformers causal LM (``config.json`` and
                safetensors or PyTorch ``.bin`` weights, 16-bit or bitsandbytes 4-bit); nothing is
                downloaded. The model is built empty here; a QLoRA strategy reads the weights at setup,
                quantizing each as it is read on the training device (every rank from the files). With
                any other strategy they are loaded in bfloat16 in ``configure_model``.
            model_config: A transformers config as a dict, with ``model_type`` (e.g. ``{"model_type":
                "llama", "hidden_size": 64, ...}``), for a randomly initialised model. ``vocab_size``
                defaults to the tokenizer's size. Give this or ``model_name_or_path``, not both.
            tokenizer: ``"byte"`` or a local tokenizer directory: the data's tokenizer, used to decode
                the generated sample. Give the same value as ``data.tokenizer``.
            optimizer: Optimizer and learning-rate schedule; None takes the defaults.
            sample_prompt: An instruction to answer after each validation, logged on rank zero with the
                prompt as the model received it, so you can watch the model learn. Rendered as the data
                module's training samples are (its chat template's generation prompt, role headers or the
                alpaca prompt); the answer stops at the template's end-of-turn token. None: off.
            sample_max_new_tokens: Most tokens generated for the sample.
            loss: ``"chunked"``: the cross-entropy is computed from the output layer's input,
                ``loss_chunk_size`` response tokens at a time (prompt and padding positions never reach
                the output layer), so the loss needs about ``loss_chunk_size x vocabulary`` logits of
                memory instead of ``tokens x vocabulary``. ``"standard"``: the model's own loss, every
                logit in memory. Both give the same loss and gradients within float tolerance.
            loss_chunk_size: Response tokens per chunk of the chunked loss.
        """
        super().__init__()
        self.save_hyperparameters()
        self.optimizer_config = optimizer
        if sample_max_new_tokens < 1:
            raise SettingError("sample_max_new_tokens", sample_max_new_tokens, "must be a positive integer")
        if loss not in LOSS_KINDS:
            raise SettingError("loss", loss, f"must be one of {', '.join(LOSS_KINDS)}")
        if not isinstance(loss_chunk_size, int) or loss_chunk_size < 1:
            raise SettingError(
                "loss_chunk_size", loss_chunk_size, "must be a positive number of tokens (e.g. 256)"
            )
        self.loss_kind = loss
        self.loss_chunk_size = loss_chunk_size
        self._loss_plan: LossPlan | None = None
        self.sample_prompt = sample_prompt
        self.sample_max_new_tokens = sample_max_new_tokens
        self.tokenizer = load_tokenizer(tokenizer)
        self.last_sample: str | None = None
        self._step_totals: torch.Tensor | None = None
        """Summed token losses and response tokens of the optimizer step so far, over every rank."""
        self._packing_checked = False
        self._warned_unless_qlora = False
        if (model_name_or_path is None) == (model_config is None):
            raise SettingError(
                "model_name_or_path",
                model_name_or_path,
                "and model_config: give exactly one (a local model directory, or a config dict to initialise "
                "a model randomly)",
            )
        if model_config is not None:
            self.model = model_from_config(model_config, self.tokenizer, tokenizer)
        else:
            self.model = model_from_directory(str(model_name_or_path), self.tokenizer, tokenizer)

    @override
    def configure_model(self) -> None:
        super().configure_model()
        directory = deferred_directory(self.model)
        if directory is not None and not isinstance(self.trainer.strategy, QLoRAStrategyMixin):
            load_unquantized(self.model, directory, torch.bfloat16)  # no QLoRA strategy to stream it

    @override
    def setup(self, stage: str) -> None:
        super().setup(stage)
        self._loss_plan = None
        strategy = self._trainer.strategy if self._trainer is not None else None
        if stage == "fit" and strategy is not None:
            self.warn_unless_qlora(strategy)

    def warn_unless_qlora(self, strategy: object) -> None:
        """Warn, once per module, that a strategy that is not a QLoRA one trains every weight at full size.

        ``setup`` calls it. The ``lightning-paged`` command calls it before ``fit`` starts any process:
        under ``ddp_spawn`` the module's hooks run only in the spawned processes, whose output a
        notebook does not show; the flag travels with the module, so they do not warn again.
        """
        if self._warned_unless_qlora or isinstance(strategy, QLoRAStrategyMixin):
            return
        self._warned_unless_qlora = True
        name = type(strategy).__name__
        start_method = lightning_compat.start_method(strategy)
        if start_method not in (None, "popen"):
            name += f" (start_method={start_method!r}: trainer.strategy ddp_{start_method})"
        rank_zero_warn(
            f"CausalLMModule is training under {name}, not a QLoRA strategy: nothing is quantized, no LoRA "
            "adapter is added (the QLoRA settings of a paged_qlora strategy do not apply) and every weight "
            "trains at full size. For NF4 QLoRA set trainer.strategy to paged_qlora (one device) or "
            "paged_qlora_ddp (several processes; it starts them with popen, not spawn)."
        )

    @override
    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any
    ) -> Any:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    @property
    def loss_in_use(self) -> str:
        """``"chunked"`` or ``"standard"``: how the loss is computed (a model the chunked loss falls back on: standard)."""
        plan = self._loss_plan
        return "chunked" if self.loss_kind == "chunked" and (plan is None or plan.chunked) else "standard"

    def _loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean loss over the batch's response tokens (transformers' causal-LM loss, chunked by default)."""
        if (
            self.loss_kind == "chunked" and self._loss_plan is None
        ):  # read once the strategy has converted the model
            self._loss_plan = loss_plan(self.model)
            if self._loss_plan.fallback is not None:
                rank_zero_warn(
                    fallback_message(self._loss_plan.fallback)
                    + " Set model.loss to 'standard' to run it without this warning."
                )
        return batch_loss(self.model, batch, self.loss_kind, self.loss_chunk_size, self._loss_plan)

    @override
    def on_fit_start(self) -> None:
        super().on_fit_start()
        self._step_totals = None
        self._packing_checked = False
        if getattr(getattr(self._trainer, "datamodule", None), "packing", False):
            check_packing_support(self.model)
            self._packing_checked = True

    @override
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        if not self._packing_checked and is_packed(batch):
            check_packing_support(self.model)  # packed batches from a loader of the user's own
            self._packing_checked = True
        loss = self._loss(batch)
        size = batch["input_ids"].shape[0]
        tokens = batch_tokens(batch).float()
        self.log("train/tokens", tokens, batch_size=size)
        self.log("train/padding_fraction", 1 - tokens / batch["input_ids"].numel(), batch_size=size)
        if self.trainer.accumulate_grad_batches * self.trainer.world_size == 1:
            self.log("train/loss", loss, prog_bar=True, batch_size=size)
            return loss  # the mean over this batch is already the mean over the step's tokens
        targets = response_targets(batch["labels"]).float()
        # (sum of token losses, response tokens) of the step so far, summed over every rank (one all-reduce
        # per batch, on every rank): the logged loss is the step's mean over all its tokens, as
        # transformers' Trainer logs it, not rank zero's share.
        totals = self.trainer.strategy.reduce(
            torch.stack([loss.detach() * targets, targets]), reduce_op="sum"
        )
        self._step_totals = totals if self._step_totals is None else self._step_totals + totals
        mean = self._step_totals[0] / self._step_totals[1].clamp_min(1)
        self.log("train/loss", mean, prog_bar=True, batch_size=size)
        return loss * targets  # rescaled in on_before_optimizer_step

    @override
    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        super().on_before_optimizer_step(optimizer)
        if self._step_totals is None:
            return
        # Lightning divided each returned sum by the accumulation count and DDP (or FSDP's
        # reduce-scatter) averaged over ranks: undo both and divide by the response tokens of the whole
        # step instead. Under FSDP the optimizer holds local proxies without gradients at this point;
        # model_parameters gives the sharded parameters, whose gradients are the ones to scale.
        total = float(self._step_totals[1])
        self._step_totals = None
        if total == 0:
            return
        scale = self.trainer.accumulate_grad_batches * self.trainer.world_size / total
        for param in model_parameters(optimizer):
            if param.grad is not None:
                param.grad.mul_(scale)

    @override
    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    @override
    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def _evaluate(self, batch: dict[str, torch.Tensor], prefix: str) -> None:
        # Weighting each batch by its response tokens makes the epoch value a per-token mean.
        targets = int((batch["labels"][:, 1:] != -100).sum())
        self.log(
            f"{prefix}/loss", self._loss(batch), prog_bar=True, sync_dist=True, batch_size=max(targets, 1)
        )

    @override
    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        if self.sample_prompt is None:
            return
        # Every rank generates: under FSDP each forward all-gathers the sharded weights, and a rank that
        # sat it out would leave the others waiting for ever. Greedy decoding of the same weights gives
        # every rank the same text; rank zero reports it.
        prompt, answer = self._answer(self.sample_prompt)
        self.last_sample = answer.text
        if not self.trainer.is_global_zero:
            return
        shown = f"{answer.text!r}" + (f" ({answer.note})" if answer.note else "")
        rank_zero_info(f"Sample at step {self.global_step}: {prompt.text!r} -> {shown}")
        for logger in self.loggers:
            add_text = getattr(getattr(logger, "experiment", None), "add_text", None)
            if callable(add_text):
                add_text("sample", f"{prompt.text} -> {answer.text}", self.global_step)

    def prompt_for(self, text: str) -> tuple[Prompt, list[int]]:
        """The prompt the model continues for ``text``, and the tokens that end its answer.

        Rendered by the data module as its training samples are (a chat template's generation
        prompt, role headers or the alpaca prompt), stopping at the template's end-of-turn token
        and the end-of-sequence token; without such a data module, ``text`` after the
        beginning-of-sequence token, stopping at the end-of-sequence token.
        """
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        if callable(getattr(datamodule, "generation_prompt", None)):
            return datamodule.generation_prompt(text), list(datamodule.stop_ids)  # type: ignore[union-attr]
        bos, eos = getattr(self.tokenizer, "bos_token_id", None), self.tokenizer.eos_token_id
        ids = ([] if bos is None else [bos]) + encode_texts(self.tokenizer, [text])[0]
        return Prompt(ids, self.tokenizer.decode(ids)), [] if eos is None else [eos]

    def generate_sample(self, instruction: str) -> str:
        """Greedy answer to ``instruction``, prompted as :meth:`prompt_for` renders it.

        With several processes every rank must call it (with the same instruction): a sharded model
        gathers its weights in each forward, and the ranks keep generating until all have finished.
        """
        return self._answer(instruction)[1].text

    def _answer(self, text: str) -> tuple[Prompt, Answer]:
        prompt, stop_ids = self.prompt_for(text)
        # with several processes every rank runs every forward until all have finished
        synced = _several_processes()
        answer = generate_answer(
            self.model, self.tokenizer, prompt, stop_ids, self.sample_max_new_tokens, synced_gpus=synced
        )
        return prompt, answer


def _several_processes() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
