"""Stream a run's metrics to TensorBoard (``fltac run --log tensorboard``); the jsonl files stay the source of truth.

:func:`scalars` turns the records a run writes to ``metrics.jsonl`` into ``(tag, value, step)`` with the
round as the step.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from fltac.config import ConfigError

INSTALL_HINT = "pip install 'fltac[tensorboard]' (or: pip install tensorboard)"
#: Per-round record keys written as ``round/<key>``.
ROUND_KEYS = ("mean_local_loss", "uplink_bytes", "downlink_bytes", "train_tokens", "seconds", "clustering_accuracy",
              "ari", "nmi")


def require_tensorboard() -> None:
    """Raise a ConfigError naming the install command unless the tensorboard package is importable."""
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        raise ConfigError(f"--log tensorboard needs the tensorboard package: {INSTALL_HINT}") from None


def scalars(records: Iterable[dict]) -> list[tuple[str, float, int]]:
    """TensorBoard scalars of metrics.jsonl records: per-task and mean accuracy, and the round's figures."""
    out, evals = [], {}
    for rec in records:
        phase, r = rec.get("phase"), rec.get("round")
        if phase == "eval":
            metric = "accuracy" if "accuracy" in rec else "lm_loss"  # a causal-LM run records its LM loss
            if rec[metric] is None:  # a task that has not started yet (data.task_start_round)
                continue
            out.append((f"{metric}/{rec['task']}", float(rec[metric]), r))
            if rec.get(f"personalized_{metric}") is not None:
                out.append((f"personalized_{metric}/{rec['task']}", float(rec[f"personalized_{metric}"]), r))
            evals.setdefault((metric, r), []).append(float(rec[metric]))
        elif phase == "round":
            out.extend((f"round/{k}", float(rec[k]), r) for k in ROUND_KEYS if rec.get(k) is not None)
    out.extend((f"{metric}/mean", sum(v) / len(v), r) for (metric, r), v in evals.items())
    return out


class TensorBoardSink:
    """A SummaryWriter under ``folder`` that takes metrics.jsonl records as the engine appends them."""

    def __init__(self, folder: str | Path):
        require_tensorboard()
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(folder), flush_secs=10)

    def write(self, records: Iterable[dict]) -> None:
        for tag, value, step in scalars(records):
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()

