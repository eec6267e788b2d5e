"""Causal-LM evaluation: token-weighted LM loss of an adapter on a task's held-out pairs, and judged generations.

The loss is the sum of the response tokens' negative log-likelihoods over the *whole* held-out sample
divided by their number (every token weighs the same), never a mean of per-batch means, which would
weigh the tokens of a short last batch more. Generations: greedy decoding from each judged pair's prompt
(left-padded, ``max_new_tokens``), scored by the run's judge (:mod:`fltac.eval.judge`) against the reference.
An answer ends at EOS or where the model starts a new prompt section (``"\n###"``, the template's marker:
a briefly tuned model often answers, then writes the next instruction itself); the rest is dropped.
"""

from __future__ import annotations

import numpy as np
import torch

from fltac.data.batches import eval_rows
from fltac.data.chat import LMStore
from fltac.eval.judge import Judge
from fltac.models.adapters import AdapterModel
from fltac.models.causal_lm import token_nll

#: Where a generated answer stops when the model goes on to write a new prompt section (fltac.data.chat.format_prompt).
SECTION_MARKER = "\n###"


class LMEvaluator:
    """Scores adapter states on each task's fixed held-out sample; ``metric`` names what :meth:`score` returns."""

    metric = "lm_loss"

    def __init__(self, model: AdapterModel, tokenizer, store: LMStore, task_rows: list[np.ndarray], batch_size: int,
                 judge: Judge, judge_samples: int, max_new_tokens: int, seed: int):
        self.model, self.tokenizer, self.store = model, tokenizer, store
        self.judge, self.max_new_tokens = judge, max_new_tokens
        self.batch_size = batch_size
        self.batches = []
        for rows in task_rows:
            ordered = rows[np.argsort(store.lengths[rows], kind="stable")]
            self.batches.append([ordered[i: i + batch_size] for i in range(0, len(ordered), batch_size)])
        #: per task, the held-out rows whose generations are judged: a seeded sample of the eval sample
        self.judged = [rows[eval_rows(len(rows), judge_samples, seed + 7919 + t)] for t, rows in enumerate(task_rows)]

    @torch.inference_mode()
    def score(self, state: dict[str, torch.Tensor], task: int) -> float:
        """Token-weighted mean next-token cross-entropy of ``state`` on ``task``'s held-out responses."""
        self.model.load(state)
        self.model.model.eval()
        total, count = 0.0, 0
        for rows in self.batches[task]:
            batch = self.store.batch(rows)
            nll, n = token_nll(self.model.logits(**batch.model_inputs()), batch.labels)
            total, count = total + float(nll), count + n
        return total / max(count, 1)

    @torch.inference_mode()
    def generate(self, state: dict[str, torch.Tensor], task: int) -> list[dict]:
        """Greedy answers of ``state`` to ``task``'s judged prompts: dicts of prompt, reference, prediction, score."""
        self.model.load(state)
        self.model.model.eval()
        out = []
        for start in range(0, len(self.judged[task]), self.batch_size):
            rows = self.judged[task][start: start + self.batch_size]
            ids, mask = self.left_padded([self.store.prompt_ids(r) for r in rows])
            device = self.model.device
            gen = self.model.model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                            max_new_tokens=self.max_new_tokens, do_sample=False,
                                            pad_token_id=self.store.pad_id, eos_token_id=self.tokenizer.eos_token_id)
            for r, seq in zip(rows, gen[:, ids.shape[1]:].cpu()):
                prediction = answer_only(self.tokenizer.decode(seq, skip_special_tokens=True))
                prompt = self.tokenizer.decode(self.store.prompt_ids(r), skip_special_tokens=True)
                reference = self.store.references[r]
                out.append({"prompt": prompt, "reference": reference, "prediction": prediction,
                            "score": self.judge(reference, prediction, prompt=prompt)})
        return out

    def left_padded(self, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts left-padded to one width (generation continues every row from its last column)."""
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.store.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[i, width - len(p):] = 1
        return ids, mask


def answer_only(text: str) -> str:
    """``text`` up to the first prompt-section marker (``"\n###"``), stripped."""
    return text.split(SECTION_MARKER, 1)[0].strip()


def mean_score(generations: list[dict]) -> float | None:
    """Mean judge score of the generations that got one (an LLM judge may fail to answer with a number)."""
    scores = [g["score"] for g in generations if g["score"] is not None]
    return float(np.mean(scores)) if scores else None


def lm_evaluator(cfg, model: AdapterModel, tokenizer, store: LMStore, task_rows: list[np.ndarray]) -> LMEvaluator:
    """The evaluator a causal-LM run uses, from its config (``eval`` section: batch size, judge, samples)."""
    from fltac.eval.judge import make_judge

    e = cfg.eval
    return LMEvaluator(model, tokenizer, store, task_rows, e.batch_size, make_judge(e.judge, e.judge_endpoint,
                       e.judge_model), e.judge_samples, e.max_new_tokens, cfg.seed)
