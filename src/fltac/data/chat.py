"""Instruction / chat data for causal-LM fine-tuning: tasks of (prompt, response) pairs, and their token store.

Two scenarios:

- ``chat_offline``: the English ChatterBot corpus (``chatterbot-corpus`` package, one YAML file per
  category, 2,393 prompt/response pairs in 21 categories). A conversation ``[u0, u1, ..., un]`` gives
  the pairs ``(u_i, u_{i+1})``. Tasks are the categories with at least :data:`CHAT_MIN_PAIRS` (150)
  pairs: tech_support 1050, trivia 347, emotion 207, coding 184 (the next, conversations and ai, have
  106 and 105; 150 keeps the scenario to four tasks, so it runs in minutes on a 2-core CPU).
  Held-out split: a seeded ``data.test_fraction`` of each category.
- ``dolly``: Databricks-Dolly-15k (``databricks/databricks-dolly-15k``; columns instruction, context,
  response, category), one task per category (8), a seeded ``data.test_fraction`` (0.05 in the paper's
  config) held out per category. ``data.source`` may name a local copy instead of the hub id: a
  ``.jsonl``/``.json``/``.parquet`` file, a folder of them, or a ``datasets.save_to_disk`` folder.

Label masks (:func:`encode_pair`) are built from token counts, never from a tokenizer's padding side:
tokens are ``prompt + response + EOS``, right-padded, and labels are the token ids on the response
(EOS included) and -100 on the prompt and the padding. When ``prompt + response`` exceeds
``max_length``, the response keeps at least ``min(its length, max_length // 2)`` tokens (more when the
prompt is short) and the prompt is cut *from the left* to fit the rest (its end, next to the answer, is
kept; BOS stays in front), so no example is ever all-masked.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache, partial
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from fltac.assets import asset_dir
from fltac.data.batches import cut_to_longest
from fltac.config import ConfigError

IGNORE = -100
#: chat_offline keeps the categories with at least this many prompt/response pairs.
CHAT_MIN_PAIRS = 150
#: The categories that rule selects from chatterbot-corpus 1.3.3, largest first (a test checks the rule).
CHAT_TASKS = ("tech_support", "trivia", "emotion", "coding")
DOLLY_ID = "databricks/databricks-dolly-15k"
DOLLY_CATEGORIES = ("open_qa", "general_qa", "classification", "closed_qa", "brainstorming",
                    "information_extraction", "summarization", "creative_writing")
DOLLY_COLUMNS = ("instruction", "context", "response", "category")
OFFLINE_ALTERNATIVE = "configs/chat_offline.yaml"


def format_prompt(instruction: str, context: str = "") -> str:
    """The prompt a model sees (Alpaca/Dolly style); the response follows it directly."""
    if context and context.strip():
        return f"### Instruction:\n{instruction.strip()}\n\n### Context:\n{context.strip()}\n\n### Response:\n"
    return f"### Instruction:\n{instruction.strip()}\n\n### Response:\n"


@dataclass
class GenerationTask:
    """One task of (prompt, response) pairs. It has the fields the partition and the run read from a
    classification :class:`~fltac.data.tasks.Task` (texts, owners, an empty label list), so both flow
    through the same partition code; ``train_texts``/``test_texts`` are the formatted prompts."""

    name: str
    train_texts: list[str]
    train_responses: list[str]
    test_texts: list[str]
    test_responses: list[str]
    train_owners: list[str] | None = None
    labels: list[str] = field(default_factory=list)  # no classes: the output is text

    def __post_init__(self):
        if len(self.train_texts) != len(self.train_responses) or len(self.test_texts) != len(self.test_responses):
            raise ValueError(f"task '{self.name}': prompts and responses differ in length")
        if not self.train_texts or not self.test_texts:
            raise ValueError(f"task '{self.name}': needs training and held-out pairs "
                             f"(has {len(self.train_texts)} and {len(self.test_texts)})")

    @property
    def train_labels(self) -> np.ndarray:  # one pseudo-class, for partition.kind: label_skew
        return np.zeros(len(self.train_texts), dtype=np.int64)

    @property
    def test_labels(self) -> np.ndarray:
        return np.zeros(len(self.test_texts), dtype=np.int64)

    def take_train(self, keep: np.ndarray) -> "GenerationTask":
        """This task with only the training pairs ``keep`` (the held-out pairs unchanged)."""
        owners = None if self.train_owners is None else [self.train_owners[i] for i in keep]
        return GenerationTask(self.name, [self.train_texts[i] for i in keep],
                              [self.train_responses[i] for i in keep], self.test_texts, self.test_responses, owners)


def held_out_split(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, held-out rows), both sorted: a seeded ``fraction`` of ``n`` (at least one row) held out."""
    n_test = min(n - 1, max(1, int(round(fraction * n))))
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[n_test:]), np.sort(perm[:n_test])


def task_from_pairs(name: str, prompts: list[str], responses: list[str], test_fraction: float,
                    seed: int) -> GenerationTask:
    train, test = held_out_split(len(prompts), test_fraction, seed)
    return GenerationTask(name, [prompts[i] for i in train], [responses[i] for i in train],
                          [prompts[i] for i in test], [responses[i] for i in test])


# ---- chat_offline: the ChatterBot corpus ---------------------------------------------------------------

def chatterbot_folder() -> Path:
    return asset_dir("chatterbot_corpus", "data", "english")


@lru_cache(maxsize=4)
def chatterbot_pairs(folder: str) -> dict[str, tuple[tuple[str, str], ...]]:
    """{category (file stem) -> (prompt, response) pairs}: consecutive utterances of every conversation."""
    import yaml

    out = {}
    for path in sorted(Path(folder).glob("*.yml")):
        convs = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("conversations") or []
        out[path.stem] = tuple((str(c[i]), str(c[i + 1])) for c in convs for i in range(len(c) - 1))
    return out


def chat_categories(min_pairs: int = CHAT_MIN_PAIRS, folder: Path | None = None) -> list[str]:
    """Categories with at least ``min_pairs`` pairs, largest first (ties by name): chat_offline's task rule."""
    pairs = chatterbot_pairs(str(folder or chatterbot_folder()))
    big = [c for c, p in pairs.items() if len(p) >= min_pairs]
    return sorted(big, key=lambda c: (-len(pairs[c]), c))


def load_chat_task(category: str, test_fraction: float = 0.2, split_seed: int = 0) -> GenerationTask:
    pairs = chatterbot_pairs(str(chatterbot_folder()))[category]
    seed = split_seed + CHAT_TASKS.index(category) if category in CHAT_TASKS else split_seed
    return task_from_pairs(category, [format_prompt(p) for p, _ in pairs], [r for _, r in pairs], test_fraction, seed)


#: Scenario chat_offline: {task -> loader(test_fraction, split_seed)}.
CHAT_OFFLINE = {c: partial(load_chat_task, c) for c in CHAT_TASKS}


# ---- dolly: Databricks-Dolly-15k -------------------------------------------------------------------------

def read_dolly(source: str):
    """Dolly's rows as a pandas DataFrame with its four columns, from the hub id or a local copy."""
    import pandas as pd

    path = Path(source)
    if path.is_file() or (path.is_dir() and not (path / "dataset_info.json").exists()
                          and not (path / "dataset_dict.json").exists()):
        files = [path] if path.is_file() else sorted(p for p in path.iterdir()
                                                     if p.suffix in (".jsonl", ".json", ".parquet"))
        if not files:
            raise ConfigError(f"config key 'data.source' = '{source}' holds no .jsonl/.json/.parquet file")
        frame = pd.concat([pd.read_parquet(f) if f.suffix == ".parquet" else pd.read_json(f, lines=f.suffix == ".jsonl")
                           for f in files], ignore_index=True)
    else:
        import datasets

        if path.is_dir():  # a datasets.save_to_disk folder (a Dataset or a DatasetDict with 'train')
            ds = datasets.load_from_disk(str(path))
            ds = ds["train"] if isinstance(ds, datasets.DatasetDict) else ds
        else:
            from fltac.data.hub import HubUnavailable, unavailable_message

            try:
                ds = datasets.load_dataset(source, split="train")
            except OSError as exc:  # datasets' not-found and connection errors (e.g. HF_HUB_OFFLINE=1, no cache)
                raise HubUnavailable(unavailable_message("dolly", [source], OFFLINE_ALTERNATIVE, "loading it failed "
                                                         f"({str(exc).splitlines()[0][:200]})")) from None
        frame = ds.to_pandas()
    missing = [c for c in DOLLY_COLUMNS if c not in frame.columns]
    if missing:
        raise ConfigError(f"config key 'data.source' = '{source}' lacks Dolly column(s) {missing} "
                          f"(has {list(frame.columns)})")
    return frame.fillna("")


@lru_cache(maxsize=2)
def _dolly_frame(source: str):
    return read_dolly(source)


def load_dolly_task(category: str, source: str, test_fraction: float = 0.05, split_seed: int = 0) -> GenerationTask:
    frame = _dolly_frame(source)
    rows = frame[frame["category"] == category]
    if rows.empty:
        raise ConfigError(f"config key 'data.source' = '{source}' has no row of Dolly category '{category}'")
    prompts = [format_prompt(i, c) for i, c in zip(rows["instruction"], rows["context"])]
    return task_from_pairs(category, prompts, [str(r) for r in rows["response"]], test_fraction,
                           split_seed + DOLLY_CATEGORIES.index(category))


def dolly_loaders(source: str | None) -> dict[str, Callable[..., GenerationTask]]:
    """{category -> loader(test_fraction, split_seed)} reading ``source`` (default: the hub's Dolly-15k).

    Checks the hub first (before any download) when ``source`` is not a local path.
    """
    from fltac.data.hub import require_hub

    source = source or DOLLY_ID
    require_hub("dolly", [source], OFFLINE_ALTERNATIVE)
    return {c: partial(load_dolly_task, c, source) for c in DOLLY_CATEGORIES}


# ---- tokens and label masks ---------------------------------------------------------------------------------

def encode_pair(prompt_ids: list[int], response_ids: list[int], max_length: int,
                bos: list[int] = ()) -> tuple[list[int], int]:
    """(tokens ``bos + prompt + response`` cut to ``max_length``, number of leading prompt tokens to mask).

    ``response_ids`` already end with EOS. When too long, the response keeps ``min(len, max_length // 2)``
    tokens or more, the prompt keeps its *last* tokens (left truncation), and ``bos`` is always kept.
    """
    bos = list(bos)
    room = max_length - len(bos)
    keep_response = min(len(response_ids), max(room - len(prompt_ids), max_length // 2, 1))
    keep_prompt = min(len(prompt_ids), room - keep_response)
    prompt = prompt_ids[len(prompt_ids) - keep_prompt:] if keep_prompt > 0 else []
    return bos + prompt + response_ids[:keep_response], len(bos) + len(prompt)


def _adds_bos(tokenizer) -> list[int]:
    """``[bos]`` when the tokenizer puts BOS in front of a text (LLaMA), else ``[]`` (SmolLM2, GPT-2)."""
    bos = tokenizer.bos_token_id
    ids = tokenizer("a")["input_ids"]
    return [bos] if bos is not None and ids and ids[0] == bos else []


@dataclass
class LMBatch:
    input_ids: torch.Tensor       # [B, T] int64, right-padded
    attention_mask: torch.Tensor  # [B, T] int64
    labels: torch.Tensor          # [B, T] int64: token ids on response tokens, -100 on prompt and padding

    @property
    def n_tokens(self) -> int:
        return int(self.attention_mask.sum())

    def model_inputs(self) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask}


@dataclass
class LMStore:
    """Tokenised (prompt, response) rows of every task; ``task`` and ``__len__`` as in TokenStore."""

    ids: np.ndarray            # [N, max_length] int32, right-padded with pad_id
    lengths: np.ndarray        # [N] int32: prompt + response tokens
    prompt_lengths: np.ndarray  # [N] int32: leading tokens that are prompt (masked in the labels)
    task: np.ndarray           # [N] int64
    pad_id: int
    references: list[str]      # [N] the response text, for judging generations

    def __len__(self) -> int:
        return len(self.lengths)

    def batch(self, rows: np.ndarray) -> LMBatch:
        rows = np.asarray(rows)
        ids, mask = cut_to_longest(self.ids, self.lengths, rows)
        pos = torch.arange(ids.shape[1])[None, :]
        response = mask & (pos >= torch.from_numpy(self.prompt_lengths[rows].astype(np.int64))[:, None])
        return LMBatch(ids, mask.long(), ids.masked_fill(~response, IGNORE))

    def prompt_ids(self, row: int) -> list[int]:
        """The (possibly left-truncated) prompt tokens of ``row``: what generation starts from."""
        return self.ids[row, : self.prompt_lengths[row]].astype(np.int64).tolist()


def build_lm_store(tokenizer, tasks: list[GenerationTask], max_length: int, split: str,
                   rows_per_task: list[np.ndarray] | None = None) -> tuple[LMStore, list[np.ndarray]]:
    """Tokenise ``split`` ('train' or 'test') of every task into one store; (store, store rows per task),
    as :func:`fltac.data.batches.build_store` returns for classification."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    bos = _adds_bos(tokenizer)
    ids, lengths, prompt_lengths, task_of, refs, index = [], [], [], [], [], []
    start = 0
    for t, task in enumerate(tasks):
        prompts = task.train_texts if split == "train" else task.test_texts
        responses = task.train_responses if split == "train" else task.test_responses
        rows = np.arange(len(prompts)) if rows_per_task is None else np.asarray(rows_per_task[t])
        p_ids = tokenizer([prompts[i] for i in rows], add_special_tokens=False)["input_ids"] if len(rows) else []
        r_ids = tokenizer([responses[i] for i in rows], add_special_tokens=False)["input_ids"] if len(rows) else []
        for i, p, r in zip(rows, p_ids, r_ids):
            seq, n_prompt = encode_pair(p, r + eos, max_length, bos)
            ids.append(seq + [pad] * (max_length - len(seq)))
            lengths.append(len(seq))
            prompt_lengths.append(n_prompt)
            refs.append(responses[i])
        task_of.extend([t] * len(rows))
        index.append(np.arange(start, start + len(rows)))
        start += len(rows)
    store = LMStore(np.asarray(ids, dtype=np.int32).reshape(-1, max_length), np.asarray(lengths, dtype=np.int32),
                    np.asarray(prompt_lengths, dtype=np.int32), np.asarray(task_of, dtype=np.int64), pad, refs)
    return store, index
