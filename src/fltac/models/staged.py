"""A backbone whose trainable set follows the stage: the whole model, or an SVD-form adapter on it frozen.

Used by ``safedlora`` (SA-FedLoRA, arXiv 2405.09394: full fine-tuning in the initiating stage, an
AdaLoRA adapter on the frozen result in the annealing stage) and ``fedavg_full`` (full fine-tuning
throughout). :class:`~fltac.models.adapters.AdapterModel` stays the one-LoRA-slot model of the other
methods; this class is separate rather than a generalisation of it because two things differ in kind:

- the trainable set changes mid-run (backbone + head, then adapter + head), chosen by the keys of the
  state loaded (:meth:`StagedModel.load`);
- the adapter travels *packed*: only the active rank-1 triplets' rows, with their indices.

The adapter is peft's AdaLoRA (``AdaLoraConfig``): per adapted matrix, ``lora_A`` = Q (r x d_in),
``lora_E`` = lambda (r x 1), ``lora_B`` = P (d_out x r), and x -> W0 x + (alpha / r_init) P diag(lambda) Q x.
peft's own RankAllocator is not used (it is per-model, centralized); the federated budget lives in
:mod:`fltac.server.safedlora`. Keys: ``<module>.lora_A`` / ``.lora_E`` / ``.lora_B``, the wire index
``<module>.lora_index`` (int64 positions of the active triplets, ascending), the head ``classifier.*``,
and the backbone's own parameter names (``bert....query.base_layer.weight`` under the adapter wrap).

Everything is float32: a bf16 backbone cannot be trained in place, so the backbone is cast to fp32 masters
once (``dtype`` auto/float32 only; checked in the config).
"""

from __future__ import annotations

import warnings

import torch

from fltac.models.adapters import PEFT_PREFIX, AdapterMismatch, check_state

PARTS = ("lora_A", "lora_E", "lora_B")
INDEX = "lora_index"
HEAD_PREFIX = "classifier."
Mask = dict[str, torch.Tensor]  # matrix (module path) -> bool (r_init,)


def part_of(key: str) -> tuple[str, str] | None:
    """``'m.lora_A'`` -> ``('m', 'lora_A')``; ``'m.lora_index'`` -> ``('m', 'lora_index')``; else None."""
    matrix, _, part = key.rpartition(".")
    return (matrix, part) if part in PARTS + (INDEX,) else None


def matrices_of(state: dict[str, torch.Tensor]) -> list[str]:
    """The adapted matrices of a state (packed or not), sorted: the order of the global triplet index."""
    return sorted({p[0] for k in state if (p := part_of(k)) is not None})


def full_mask(state: dict[str, torch.Tensor]) -> Mask:
    """All triplets of an unpacked adapter state active."""
    return {m: torch.ones(state[f"{m}.lora_E"].shape[0], dtype=torch.bool) for m in matrices_of(state)}


def pack(state: dict[str, torch.Tensor], mask: Mask) -> dict[str, torch.Tensor]:
    """What travels: per matrix only the active triplets (rows of Q and lambda, columns of P) and their
    indices; other tensors (the head, backbone weights) unchanged. Masked triplets are not in the result."""
    out = {k: v for k, v in state.items() if part_of(k) is None}
    for m, keep in mask.items():
        idx = torch.nonzero(keep, as_tuple=False).reshape(-1)
        out[f"{m}.lora_A"] = state[f"{m}.lora_A"][idx].clone()
        out[f"{m}.lora_E"] = state[f"{m}.lora_E"][idx].clone()
        out[f"{m}.lora_B"] = state[f"{m}.lora_B"][:, idx].clone()
        out[f"{m}.{INDEX}"] = idx.to(torch.int64)
    return out


def unpack(wire: dict[str, torch.Tensor], r_init: int, into: dict[str, torch.Tensor] | None = None
           ) -> tuple[dict[str, torch.Tensor], Mask]:
    """(full-rank state, mask) from a packed one. Masked triplets' rows are zero, or, with ``into``, keep the
    values ``into`` has (the server keeps its copy; lambda of a masked triplet is 0 there anyway)."""
    out = {k: v for k, v in wire.items() if part_of(k) is None}
    mask = {}
    for m in matrices_of(wire):
        idx = wire[f"{m}.{INDEX}"].long()
        a, e, b = (wire[f"{m}.{p}"] for p in PARTS)
        if into is not None:
            fa, fe, fb = (into[f"{m}.{p}"].clone() for p in PARTS)
        else:
            fa = a.new_zeros((r_init, a.shape[1]))
            fe = e.new_zeros((r_init, 1))
            fb = b.new_zeros((b.shape[0], r_init))
        fa[idx], fe[idx], fb[:, idx] = a, e, b
        out[f"{m}.lora_A"], out[f"{m}.lora_E"], out[f"{m}.lora_B"] = fa, fe, fb
        keep = torch.zeros(r_init, dtype=torch.bool)
        keep[idx] = True
        mask[m] = keep
    return out, mask


def _canonical(peft_name: str) -> str:
    name = peft_name.removeprefix(PEFT_PREFIX)
    name = name.replace(".modules_to_save.default.", ".")
    return name.removesuffix(".default")


class StagedModel:
    """One fp32 backbone (optionally with an AdaLoRA adapter) whose trainable set is set by what is loaded.

    Parameters
    ----------
    base_model
        The sequence-classification backbone (any dtype; cast to float32 here).
    device : torch.device
    rank_init : int or None
        None: no adapter (fedavg_full). Else the rank of the AdaLoRA adapter on ``target_modules``.
    alpha, dropout, target_modules
        AdaLoRA scaling alpha / r_init, dropout on the adapter input, and the adapted modules (``lora`` section).
    backbone_lr : float
        Learning rate of the backbone's own weights in full mode (:meth:`param_groups`); the head and the
        adapter use the optimizer's default (``train.lr``).
    """

    def __init__(self, base_model, device: torch.device, rank_init: int | None = None, alpha: float = 16.0,
                 dropout: float = 0.0, target_modules: tuple[str, ...] = ("query", "value"),
                 backbone_lr: float = 5e-5):
        model = base_model.float()
        if rank_init is not None:
            from peft import AdaLoraConfig, get_peft_model

            config = AdaLoraConfig(task_type="SEQ_CLS", init_r=rank_init, target_r=rank_init, lora_alpha=alpha,
                                   lora_dropout=dropout, target_modules=list(target_modules), total_step=1,
                                   orth_reg_weight=0.0)
            try:
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
                    model = get_peft_model(model, config)
            except ValueError as exc:
                raise AdapterMismatch(f"config key 'lora.target_modules' {list(target_modules)} does not fit this "
                                      f"backbone: {exc}") from None
        self.model = model.to(device)
        self.device = device
        self.rank_init = rank_init
        self.backbone_lr = backbone_lr
        self.all_params: dict[str, torch.nn.Parameter] = {}
        for name, p in self.model.named_parameters():
            if ".ranknum." in name or ".original_module." in name:
                continue  # AdaLoRA's constant rank and peft's untouched copy of the head
            self.all_params[_canonical(name)] = p
        self.adapter_keys = [k for k in self.all_params if part_of(k) is not None]
        self.head_keys = [k for k in self.all_params if k.startswith(HEAD_PREFIX)]
        self.base_keys = [k for k in self.all_params if k not in self.adapter_keys and k not in self.head_keys]
        self.lora_keys = list(self.adapter_keys)  # what make_strategy's callers expect; unused by these methods
        if not self.head_keys or (rank_init is not None and not self.adapter_keys):
            raise AdapterMismatch(f"unexpected parameter set: head {self.head_keys}, adapter {len(self.adapter_keys)}")
        self.matrices = sorted({part_of(k)[0] for k in self.adapter_keys})
        self.mask: Mask = {m: torch.ones(rank_init, dtype=torch.bool) for m in self.matrices}
        for k in self.adapter_keys:  # masked triplets are not trained: their gradient is zeroed where it appears
            matrix, part = part_of(k)
            self.all_params[k].register_hook(self._grad_mask(matrix, part))
        self._set_mode("full" if rank_init is None else "adapter")

    # ---- trainable set ------------------------------------------------------------------------------
    def _grad_mask(self, matrix: str, part: str):
        def hook(grad: torch.Tensor) -> torch.Tensor:
            keep = self.mask[matrix].to(grad.device, grad.dtype)
            return grad * (keep[None, :] if part == "lora_B" else keep[:, None])
        return hook

    def _set_mode(self, mode: str) -> None:
        self.mode = mode
        trained = set(self.base_keys if mode == "full" else self.adapter_keys) | set(self.head_keys)
        for k, p in self.all_params.items():
            p.requires_grad_(k in trained)
        self.params = {k: p for k, p in self.all_params.items() if k in trained}

    def param_groups(self) -> list[dict]:
        """AdamW groups: the backbone's weights at ``backbone_lr``, the rest at the optimizer's default lr."""
        rest = [p for k, p in self.params.items() if k not in self.base_keys]
        base = [p for k, p in self.params.items() if k in self.base_keys]
        return [g for g in ({"params": rest}, {"params": base, "lr": self.backbone_lr}) if g["params"]]

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(p.shape) for k, p in self.params.items()}

    def n_trainable(self) -> int:
        return sum(p.numel() for p in self.params.values())

    # ---- states ---------------------------------------------------------------------------------------
    def _copy(self, keys) -> dict[str, torch.Tensor]:
        return {k: self.all_params[k].detach().to("cpu", torch.float32, copy=True) for k in keys}

    def everything(self) -> dict[str, torch.Tensor]:
        """Every parameter (backbone, head, full-rank adapter): what a strategy is built from."""
        return self._copy(self.all_params)

    def state(self) -> dict[str, torch.Tensor]:
        """What the client sends: backbone + head (full mode), or the packed active triplets + head."""
        if self.mode == "full":
            return self._copy(self.base_keys + self.head_keys)
        return pack(self._copy(self.adapter_keys + self.head_keys), self.mask)

    def load(self, state: dict[str, torch.Tensor]) -> None:
        """Load a state and set the trainable set from its keys.

        - backbone + head: full mode (all of them trained, the adapter frozen);
        - packed adapter + head, optionally with the backbone (delivered once when it was last trained):
          adapter mode, with the mask given by the indices.
        """
        keys = set(state)
        has_adapter = any(part_of(k) is not None for k in keys)
        base = keys & set(self.base_keys)
        if base and base != set(self.base_keys):
            raise AdapterMismatch(f"state holds {len(base)} of the {len(self.base_keys)} backbone tensors")
        if not has_adapter:
            check_state(state, {k: tuple(self.all_params[k].shape) for k in self.base_keys + self.head_keys})
            flat, mode = state, "full"
        else:
            flat, mask = unpack({k: v for k, v in state.items() if k not in base}, self.rank_init)
            check_state(flat, {k: tuple(self.all_params[k].shape) for k in self.adapter_keys + self.head_keys})
            if base:
                check_state({k: state[k] for k in base}, {k: tuple(self.all_params[k].shape) for k in base})
                flat = {**flat, **{k: state[k] for k in base}}
            self.mask, mode = mask, "adapter"
        with torch.no_grad():
            for k, v in flat.items():
                self.all_params[k].copy_(v)
        self._set_mode(mode)

    def logits(self, **inputs: torch.Tensor) -> torch.Tensor:
        """float32 logits for a batch's ``model_inputs()``."""
        out = self.model(**{k: v.to(self.device) for k, v in inputs.items()})
        return out.logits.float()
