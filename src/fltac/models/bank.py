"""Several adapters trained in ONE forward pass of the shared frozen backbone (the fast path of local training).

The backbone is frozen and shared, and LoRA is additive: for a wrapped linear layer,
``y = W x + s B_g A_g x``, where only ``A_g, B_g`` depend on the adapter ``g`` that example ``x``
belongs to. So micro-batches of G different jobs (clients, tasks) go through the backbone together: the
big ``W x`` matmuls see all G x b rows at once (large enough to run near the machine's matmul peak) and
only the rank-r terms are per example, gathered from adapters stacked along a leading axis
(``[G, r, d]``). The head likewise runs per group. The loss is the sum over groups of each group's mean
loss, so adapter g's gradient is exactly the gradient of its own loss; AdamW is elementwise, so one
optimizer over the stacked tensors steps every adapter as its own optimizer would.

Same numbers as one by one (:func:`fltac.client.train.train_job`), up to rounding: each group's
rows, its LoRA dropout masks (drawn from the group's own generator, in the same order and shapes as a
lone run draws them from the global one) and its AdamW steps are those of its lone run. What differs is
padding (a group's rows are padded to the widest row of its micro-batch; padded keys are masked out of
attention) and matmul blocking. ``tests/test_speed.py`` checks the equality.

Precision: the rank-r products run in the backbone's dtype (fp32 masters cast down per pass, products
accumulated in fp32 inside the matmul, gradients summed into the fp32 masters), as ``torch.autocast``
would, where peft's one-by-one layer casts activations up to fp32 first. On an fp32 backbone the two are the
same computation; on a bf16 one they agree within bf16 rounding, and skipping the fp32 copies of every
LoRA input and output is worth about 10% of a step here.

The bank patches the peft LoRA layers' and the head's ``forward`` while it is installed
(:meth:`AdapterBank.installed`), and restores them after; outside it the model is the plain peft model.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from peft.tuners.lora import Linear as LoraLinear
from peft.utils.other import ModulesToSaveWrapper

from fltac.eval.phases import phase
from fltac.models.adapters import AdapterModel, canonical_key
from fltac.models.dropout import MaskDropout, apply_mask, keep_mask


@dataclass
class Group:
    """The rows ``rows[start:end]`` of a pass that train adapter ``adapter`` (contiguous)."""

    adapter: int
    start: int
    end: int


@dataclass
class Block:
    """The rows ``rows[start:end]`` of a pass that draw their LoRA dropout from generator ``stream``, at the
    shape their lone run draws it: ``[rows, width, d]``, ``width`` being the block's own batch width (tokens
    of its longest row; a batch whose inputs are not padded token rows, such as images, spans the whole
    sequence axis whatever ``width`` says). A block is one adapter's batch (per-adapter layout: the block is
    the adapter's one group) or one client's routed step (several groups, one per adapter with rows in it)."""

    stream: int
    start: int
    end: int
    width: int


class AdapterBank:
    """G adapter states stacked as float32 leaf tensors ``[G, *shape]`` on the model's device, and one
    dropout generator per stream (``seeds``: per adapter in the per-adapter layout, per client in the routed one)."""

    def __init__(self, model: AdapterModel, states: list[dict[str, torch.Tensor]], seeds: list[int]):
        self.model = model
        with phase("adapter_state"):
            self.params = {k: torch.nn.Parameter(torch.stack([s[k] for s in states]).to(model.device, torch.float32),
                                                 requires_grad=p.requires_grad)  # frozen tensors (FFA-LoRA's A): none
                           for k, p in model.params.items()}
        self.size = len(states)
        #: Each stream's dropout generator, seeded as its lone run seeds the global generator.
        self.generators = [torch.Generator().manual_seed(seed) for seed in seeds]
        self.groups: list[Group] = []
        self.blocks: list[Block] = []
        self.widest = 0
        self.index: torch.Tensor | None = None  # [n] adapter of each row of the current micro-batch

    def __len__(self) -> int:
        return self.size

    @property
    def trained(self) -> dict[str, torch.nn.Parameter]:
        """The stacked tensors local training steps (the model's ``trained`` ones)."""
        return {k: p for k, p in self.params.items() if p.requires_grad}

    def states(self) -> list[dict[str, torch.Tensor]]:
        """Float32 CPU copies of every adapter, in bank order."""
        with phase("adapter_state"):
            return [{k: p[g].detach().to("cpu", torch.float32, copy=True) for k, p in self.params.items()}
                    for g in range(len(self))]

    def set_layout(self, groups: list[Group], blocks: list[Block]) -> None:
        """Declare the layout of the next forward pass: contiguous rows per adapter (``groups``) and per
        dropout stream (``blocks``); together they cover the pass's rows."""
        self.groups, self.blocks = groups, blocks
        self.widest = max(b.width for b in blocks)
        self.index = torch.cat([torch.full((g.end - g.start,), g.adapter, dtype=torch.long) for g in groups]
                               ).to(self.model.device)

    def _dropout(self, x: torch.Tensor, drop: torch.nn.Module) -> torch.Tensor:
        """LoRA-input dropout, each block's mask drawn from its own generator at its lone-run shape
        ``[rows, width, d]``, as the layer's own dropout module ``drop`` draws it in a lone run: torch's
        Bernoulli pattern (``torch.nn.Dropout``) and :func:`~fltac.models.dropout.keep_mask` (``MaskDropout``)
        depend on the generator, the shape and ``p`` only (not on the dtype or the slice being strided), so a
        bool mask reproduces the lone draw; kept entries are scaled as there, in x's dtype. Padding past a
        block's width is kept (never attended). No dropout in eval mode or with p = 0."""
        bits = isinstance(drop, MaskDropout)
        p = float(drop.p) if bits or isinstance(drop, torch.nn.Dropout) else 0.0
        if p == 0.0 or not drop.training:
            return x
        keep = torch.ones(x.shape, dtype=torch.bool, device=x.device)
        padded = x.dim() == 3 and x.shape[1] == self.widest  # a token axis cut to the widest group's width
        for b in self.blocks:
            rows = keep[b.start:b.end, :b.width] if padded else keep[b.start:b.end]  # images, pooled: whole
            if bits:
                rows.copy_(keep_mask(tuple(rows.shape), p, self.generators[b.stream]))
            else:
                rows.bernoulli_(1 - p, generator=self.generators[b.stream])
        return apply_mask(x, keep, p) if bits else x * keep * (torch.ones((), dtype=x.dtype) / (1 - p))

    def _lora_forward(self, layer: LoraLinear, key: str):
        a_key, b_key = f"{key}.lora_A.weight", f"{key}.lora_B.weight"
        drop = layer.lora_dropout["default"]
        scaling = layer.scaling["default"]

        def forward(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            result = layer.base_layer(x, *args, **kwargs)
            h = self._dropout(x, drop)  # in the backbone's dtype: see "Precision" in the module docstring
            a = self.params[a_key].index_select(0, self.index).to(h.dtype)  # [n, r, d_in]
            b = (self.params[b_key].index_select(0, self.index) * scaling).to(h.dtype)  # [n, d_out, r]
            flat = h.reshape(h.shape[0], -1, h.shape[-1])
            delta = torch.bmm(torch.bmm(flat, a.transpose(1, 2)), b.transpose(1, 2))
            return result + delta.reshape(*result.shape)

        return forward

    def _head_forward(self, wrapper: ModulesToSaveWrapper, prefix: str):
        module = wrapper.modules_to_save["default"]
        names = [n for n, _ in module.named_parameters()]

        def forward(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            x = x.to(torch.float32)
            outs = [torch.func.functional_call(module, {n: self.params[f"{prefix}{n}"][g.adapter] for n in names},
                                               (x[g.start:g.end], *args), kwargs) for g in self.groups]
            return torch.cat(outs)

        return forward

    @contextmanager
    def installed(self):
        """Route the model's LoRA layers and head through the bank for the duration of the block."""
        patched = []
        for name, module in self.model.model.named_modules():
            if isinstance(module, LoraLinear):
                key = canonical_key(f"{name}.lora_A.default.weight").removesuffix(".lora_A.weight")
                patched.append(module)
                module.forward = self._lora_forward(module, key)
            elif isinstance(module, ModulesToSaveWrapper):
                prefix = canonical_key(f"{name}.modules_to_save.default.x").removesuffix("x")
                patched.append(module)
                module.forward = self._head_forward(module, prefix)
        try:
            yield self
        finally:
            for module in patched:
                del module.forward  # back to the class's own forward
