"""fltac: federated fine-tuning with per-task LoRA adapters clustered on the server (FL-TAC) and its baselines."""

__version__ = "0.1.0"
