"""Judges of generated answers: a callable ``judge(reference, prediction) -> score in [0, 1]``.

Offline defaults, in plain Python (no new dependency): ``rouge_l`` (ROUGE-L F1 on lower-cased word
tokens, longest common subsequence) and ``token_f1`` (SQuAD-style bag-of-words F1). Both are 1.0 for
identical texts, 0.0 when no word is shared, and 1.0 when both are empty.

:class:`LLMJudge` stands in for the paper's GPT-4 scoring: it asks any ``ask(prompt) -> reply``
callable to rate the answer from 1 to 10 and maps the first number of the reply to [0, 1]
(``(n - 1) / 9``; an unreadable reply scores None and is left out of the mean). :func:`http_ask` builds
such a callable for an OpenAI-compatible chat-completions endpoint; the endpoint comes from
``eval.judge_endpoint`` or ``$FLTAC_JUDGE_ENDPOINT``, the key only from ``$FLTAC_JUDGE_API_KEY``.
Nothing is hard-coded.
"""

from __future__ import annotations

import json
import os
import re
import urllib.request
from collections import Counter
from typing import Callable, Optional, Protocol

_WORD = re.compile(r"\w+", re.UNICODE)
JUDGE_PROMPT = ("You are grading an assistant's answer against a reference answer.\n"
                "Question or instruction:\n{prompt}\n\nReference answer:\n{reference}\n\n"
                "Assistant's answer:\n{prediction}\n\n"
                "Rate the assistant's answer for correctness and helpfulness on a scale of 1 to 10. "
                "Reply with the number only.")


class Judge(Protocol):
    def __call__(self, reference: str, prediction: str, prompt: str = "") -> Optional[float]:
        ...


def words(text: str) -> list[str]:
    """Lower-cased word tokens (letters, digits, underscore), punctuation dropped."""
    return _WORD.findall(text.lower())


def lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence of ``a`` and ``b`` (O(len(a) x len(b)), one row kept)."""
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def _f1(overlap: int, n_ref: int, n_pred: int) -> float:
    if n_ref == 0 and n_pred == 0:
        return 1.0
    if overlap == 0:
        return 0.0
    precision, recall = overlap / n_pred, overlap / n_ref
    return 2 * precision * recall / (precision + recall)


def rouge_l(reference: str, prediction: str, prompt: str = "") -> float:
    """ROUGE-L F1 (beta = 1) of ``prediction`` against ``reference`` on word tokens."""
    ref, pred = words(reference), words(prediction)
    return _f1(lcs_length(ref, pred), len(ref), len(pred))


def token_f1(reference: str, prediction: str, prompt: str = "") -> float:
    """Bag-of-words F1 (shared word counts) of ``prediction`` against ``reference``."""
    ref, pred = words(reference), words(prediction)
    return _f1(sum((Counter(ref) & Counter(pred)).values()), len(ref), len(pred))


OFFLINE_JUDGES: dict[str, Judge] = {"rouge_l": rouge_l, "token_f1": token_f1}


class LLMJudge:
    """Scores with a language model behind ``ask(prompt) -> reply`` (any endpoint or local model)."""

    def __init__(self, ask: Callable[[str], str], template: str = JUDGE_PROMPT):
        self.ask = ask
        self.template = template

    def __call__(self, reference: str, prediction: str, prompt: str = "") -> Optional[float]:
        reply = self.ask(self.template.format(prompt=prompt, reference=reference, prediction=prediction))
        return parse_rating(reply)


def parse_rating(reply: str, low: float = 1.0, high: float = 10.0) -> Optional[float]:
    """The first number in ``reply``, clipped to [low, high] and mapped to [0, 1]; None if there is none."""
    match = re.search(r"-?\d+(?:\.\d+)?", reply or "")
    if match is None:
        return None
    value = min(max(float(match.group()), low), high)
    return (value - low) / (high - low)


def http_ask(endpoint: str, model: str | None = None, api_key: str | None = None,
             timeout: float = 60.0) -> Callable[[str], str]:
    """``ask(prompt) -> reply`` posting to an OpenAI-compatible ``/chat/completions`` ``endpoint``."""
    def ask(prompt: str) -> str:
        body = {"messages": [{"role": "user", "content": prompt}], "temperature": 0}
        if model:
            body["model"] = model
        headers = {"Content-Type": "application/json"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        request = urllib.request.Request(endpoint, data=json.dumps(body).encode(), headers=headers)
        with urllib.request.urlopen(request, timeout=timeout) as response:
            reply = json.loads(response.read())
        return reply["choices"][0]["message"]["content"]
    return ask


def make_judge(name: str, endpoint: str | None = None, model: str | None = None) -> Judge:
    """The judge named by ``eval.judge``: an offline metric, or 'llm' (endpoint from config or environment)."""
    if name in OFFLINE_JUDGES:
        return OFFLINE_JUDGES[name]
    if name == "llm":
        endpoint = endpoint or os.environ.get("FLTAC_JUDGE_ENDPOINT")
        if not endpoint:
            raise ValueError("config key 'eval.judge' is 'llm' but no endpoint is set: give eval.judge_endpoint or "
                             "FLTAC_JUDGE_ENDPOINT (an OpenAI-compatible chat-completions URL; the key, if any, in "
                             "FLTAC_JUDGE_API_KEY)")
        return LLMJudge(http_ask(endpoint, model, os.environ.get("FLTAC_JUDGE_API_KEY")))
    raise ValueError(f"config key 'eval.judge': unknown judge '{name}' (known: {sorted(OFFLINE_JUDGES) + ['llm']})")
