"""One frozen backbone, one LoRA slot; every client's adapter is a dict of tensors swapped into it.

LoRA is injected with peft (``LoraConfig(task_type="SEQ_CLS")``), so the classification head trains
through peft's ``modules_to_save`` exactly as a peft user's would, and exported adapters load with
``PeftModel.from_pretrained``. An *adapter state* is ``{key: float32 CPU tensor}`` with peft's saved
key names minus the ``base_model.model.`` prefix, e.g. ``bert.encoder.layer.0.attention.self.query.lora_A.weight``
and ``classifier.weight``. The backbone may run in bf16; LoRA matrices and the head are float32
masters (their inputs are cast up), so optimizer updates never round to bf16.
"""

from __future__ import annotations

import warnings

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model
from peft.tuners.lora import LoraLayer

from fltac.config import LoraConfig
from fltac.eval.phases import phase
from fltac.models.dropout import MaskDropout
from fltac.wire import frozen_keys, is_lora_key

PEFT_PREFIX = "base_model.model."
HEAD_PREFIX = "classifier."


class AdapterMismatch(ValueError):
    """An adapter state whose keys or shapes do not fit this model."""


def canonical_key(peft_name: str) -> str:
    """peft's parameter name -> the adapter-state key (no wrapper prefix, no adapter name)."""
    name = peft_name.removeprefix(PEFT_PREFIX)
    return name.replace(".modules_to_save.default.", ".").replace(".default.", ".")


def _cast_input_to(dtype: torch.dtype):
    def hook(module, args):
        return tuple(a.to(dtype) if torch.is_tensor(a) and a.is_floating_point() else a for a in args)
    return hook


class AdapterModel:
    """A peft-wrapped backbone whose trainable tensors (LoRA + head) are loaded and read as adapter states."""

    def __init__(self, base_model, lora: LoraConfig, rank: int, device: torch.device, task_type: str = "SEQ_CLS"):
        """``task_type``: 'SEQ_CLS' (LoRA + the trained ``classifier`` head) or 'CAUSAL_LM' (LoRA only: the
        LM head stays frozen, ``head_keys`` is empty). A backbone placed by ``device_map`` is not moved."""
        config = PeftLoraConfig(task_type=task_type, r=rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                target_modules=list(lora.target_modules))
        try:
            with warnings.catch_warnings():  # peft 0.21 calls a transformers method deprecated in 5.x
                warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
                self.model = get_peft_model(base_model, config)
                if not getattr(base_model, "hf_device_map", None):
                    self.model = self.model.to(device)
        except ValueError as exc:
            raise AdapterMismatch(f"config key 'lora.target_modules' {list(lora.target_modules)} does not fit this "
                                  f"backbone: {exc}") from None
        if lora.dropout_draw == "bits":
            use_bit_masks(self.model)
        self.device = device
        self.rank = rank
        self.peft_config = config
        if task_type == "SEQ_CLS":
            head = self.model.base_model.model.classifier
            head.float()
            head.register_forward_pre_hook(_cast_input_to(torch.float32))
        self.params: dict[str, torch.nn.Parameter] = {}
        for name, p in self.model.named_parameters():
            if p.requires_grad:
                p.data = p.data.float()
                self.params[canonical_key(name)] = p
        self.lora_keys = [k for k in self.params if is_lora_key(k)]
        self.head_keys = [k for k in self.params if k.startswith(HEAD_PREFIX)]
        extra = set(self.params) - set(self.lora_keys) - set(self.head_keys)
        if extra or not self.lora_keys or (task_type == "SEQ_CLS" and not self.head_keys):
            raise AdapterMismatch(f"unexpected trainable set: lora {len(self.lora_keys)}, head {self.head_keys}, "
                                  f"other {sorted(extra)}")
        #: Tensors of the adapter state that never train (FFA-LoRA's lora_A, ``lora.freeze_A``): no gradient, so
        #: no optimizer step; they stay what the client was sent.
        self.frozen_keys = frozen_keys(self.lora_keys, lora.freeze_A)
        for k in self.frozen_keys:
            self.params[k].requires_grad_(False)

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(p.shape) for k, p in self.params.items()}

    def n_trainable(self) -> int:
        """Parameters local training steps (FFA-LoRA: B and the head; the frozen A is not counted)."""
        return sum(p.numel() for p in self.trained.values())

    @property
    def trained(self) -> dict[str, torch.nn.Parameter]:
        """The tensors local training steps: every one of ``params`` but the ``frozen_keys``."""
        return {k: p for k, p in self.params.items() if k not in self.frozen_keys}

    def param_groups(self) -> list[dict]:
        """AdamW parameter groups: one, at the optimizer's learning rate, over the trained tensors."""
        return [{"params": list(self.trained.values())}]

    def state(self) -> dict[str, torch.Tensor]:
        """A float32 CPU copy of the adapter now in the model."""
        with phase("adapter_state"):
            return {k: p.detach().to("cpu", torch.float32, copy=True) for k, p in self.params.items()}

    def load(self, state: dict[str, torch.Tensor]) -> None:
        """Copy ``state`` into the model's adapter slot; keys and shapes must match exactly."""
        check_state(state, self.shapes)
        with phase("adapter_state"), torch.no_grad():
            for k, p in self.params.items():
                p.copy_(state[k])

    def logits(self, **inputs: torch.Tensor) -> torch.Tensor:
        """float32 logits for a batch's ``model_inputs()`` (token ids and mask, or pixel values)."""
        out = self.model(**{k: v.to(self.device) for k, v in inputs.items()})
        return out.logits.float()


def use_bit_masks(model: torch.nn.Module) -> None:
    """Replace peft's ``torch.nn.Dropout`` on every LoRA input by :class:`~fltac.models.dropout.MaskDropout`
    (same ``p``; ``lora.dropout_draw: bits``)."""
    for module in model.modules():
        if isinstance(module, LoraLayer):
            for name, drop in module.lora_dropout.items():
                if isinstance(drop, torch.nn.Dropout):
                    module.lora_dropout[name] = MaskDropout(drop.p)


def check_state(state: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]]) -> None:
    missing = sorted(set(shapes) - set(state))
    unexpected = sorted(set(state) - set(shapes))
    if missing or unexpected:
        raise AdapterMismatch(f"adapter keys differ: missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
                              f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}")
    for k, shape in shapes.items():
        if tuple(state[k].shape) != shape:
            raise AdapterMismatch(f"adapter tensor '{k}' has shape {tuple(state[k].shape)}, expected {shape}")


def state_bytes(state: dict[str, torch.Tensor]) -> int:
    """Bytes of an adapter on the wire (its tensors as stored)."""
    return sum(t.numel() * t.element_size() for t in state.values())
