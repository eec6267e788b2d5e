"""Causal-LM scenarios without network: the Dolly loader on tiny data in the hub's schema, label masks,
token-weighted eval loss, LoRA targets on LLaMA, the offline judge, and tiny FL-TAC / FedIT runs on a
random 2-layer Llama with a word-level tokenizer built here."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from fltac.config import DataConfig, LoraConfig, load_config
from fltac.data import load_tasks, modality_of
from fltac.data.chat import (CHAT_MIN_PAIRS, CHAT_TASKS, DOLLY_CATEGORIES, IGNORE, GenerationTask, LMStore,
                             build_lm_store, chat_categories, encode_pair, format_prompt)
from fltac.eval.judge import LLMJudge, make_judge, parse_rating, rouge_l, token_f1
from fltac.eval.lm_eval import LMEvaluator
from fltac.models.adapters import AdapterMismatch, AdapterModel
from fltac.models.causal_lm import lm_loss, token_nll

WORDS = ("what is the best way to learn python read code write small programs every day tell me a joke why did "
         "the chicken cross road summarize this text it is short classify colour red blue green sky sea grass "
         "name three fruits apple pear plum who wrote hamlet shakespeare did").split()


def dolly_rows(per_category: int = 12) -> list[dict]:
    """Rows in the hub's schema (instruction, context, response, category), every category present."""
    rng = np.random.default_rng(0)
    rows = []
    for c, category in enumerate(DOLLY_CATEGORIES):
        for i in range(per_category):
            words = rng.choice(WORDS, size=6 + (i % 4))
            rows.append({"instruction": f"{category} {' '.join(words[:4])} {i}",
                         "context": " ".join(words[2:]) if c % 2 else "",
                         "response": " ".join(rng.choice(WORDS, size=3 + (i % 5))), "category": category})
    return rows


@pytest.fixture(scope="module")
def dolly_jsonl(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("dolly") / "databricks-dolly-15k.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in dolly_rows()))
    return str(path)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> str:
    """A random 2-layer, 32-wide LlamaForCausalLM and a word-level tokenizer (BOS added, like LLaMA's)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny_llama")
    texts = [format_prompt(r["instruction"], r["context"]) + r["response"] for r in dolly_rows()] + WORDS
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=["<pad>", "<unk>", "<s>", "</s>"]))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                        unk_token="<unk>")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=2, eos_token_id=3, pad_token_id=0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


# ---- data -----------------------------------------------------------------------------------------------------

def test_dolly_loader_reads_the_hub_schema_from_jsonl_parquet_and_save_to_disk(dolly_jsonl, tmp_path):
    cfg = DataConfig(scenario="dolly", source=dolly_jsonl, test_fraction=0.25)
    tasks = load_tasks(cfg)
    assert modality_of(cfg) == "causal_lm"
    assert [t.name for t in tasks] == list(DOLLY_CATEGORIES)
    assert all(len(t.train_texts) == 9 and len(t.test_texts) == 3 for t in tasks)
    assert all(isinstance(t, GenerationTask) and t.labels == [] for t in tasks)
    with_context = tasks[1]  # odd categories carry a context
    assert "### Context:" in with_context.train_texts[0] and with_context.train_texts[0].endswith("### Response:\n")
    assert "### Context:" not in tasks[0].train_texts[0]

    import datasets

    frame = pd.DataFrame(dolly_rows())
    frame.to_parquet(tmp_path / "train.parquet")
    datasets.Dataset.from_pandas(frame).save_to_disk(str(tmp_path / "saved"))
    for source in (str(tmp_path / "train.parquet"), str(tmp_path / "saved")):
        again = load_tasks(DataConfig(scenario="dolly", source=source, test_fraction=0.25))
        assert [t.train_texts for t in again] == [t.train_texts for t in tasks]  # same rows, same seeded split
        assert [t.test_responses for t in again] == [t.test_responses for t in tasks]


def test_dolly_without_hub_stops_at_once_naming_the_offline_config(monkeypatch):
    from fltac.data.hub import HubUnavailable

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    with pytest.raises(HubUnavailable, match="configs/chat_offline.yaml"):
        load_tasks(DataConfig(scenario="dolly"))
    from fltac.models.causal_lm import load_causal_lm

    with pytest.raises(HubUnavailable, match="huggyllama/llama-7b.*configs/chat_offline.yaml"):
        load_causal_lm("huggyllama/llama-7b", torch.float32, "sdpa", 0)


def test_chat_offline_takes_the_categories_with_enough_pairs():
    assert chat_categories(CHAT_MIN_PAIRS) == list(CHAT_TASKS)
    tasks = load_tasks(DataConfig(scenario="chat_offline", max_train_per_task=50))
    assert [t.name for t in tasks] == list(CHAT_TASKS)
    assert all(len(t.train_texts) == 50 and len(t.train_responses) == 50 for t in tasks)


# ---- label masks and the loss ---------------------------------------------------------------------------------

def test_encode_pair_masks_the_prompt_and_keeps_the_response():
    ids, n_prompt = encode_pair([10, 11, 12], [20, 21, 3], max_length=16, bos=[2])
    assert ids == [2, 10, 11, 12, 20, 21, 3] and n_prompt == 4


def test_a_long_prompt_is_cut_from_the_left_and_never_masks_everything():
    prompt, response = list(range(100, 160)), [20, 21, 22, 23, 24, 25, 3]
    ids, n_prompt = encode_pair(prompt, response, max_length=16, bos=[2])
    assert len(ids) == 16 and ids[0] == 2
    assert ids[1:n_prompt] == prompt[-(n_prompt - 1):]  # the prompt's end, next to the answer, is kept
    assert len(ids) - n_prompt == 7  # the whole response fits in the room left for it
    ids, n_prompt = encode_pair(prompt, list(range(20, 60)), max_length=16)
    assert len(ids) == 16 and len(ids) - n_prompt == 16 // 2  # long prompt and response: half each
    ids, n_prompt = encode_pair([100, 101, 102], list(range(20, 60)), max_length=16)
    assert (len(ids), n_prompt) == (16, 3)  # a short prompt leaves the response the rest


def test_store_batches_are_right_padded_with_prompt_and_padding_labelled_ignore():
    ids = np.zeros((2, 8), dtype=np.int32)
    ids[0, :5] = [2, 10, 11, 20, 3]       # prompt 3 tokens (BOS + 2), response 2
    ids[1, :7] = [2, 12, 21, 22, 23, 24, 3]  # prompt 2 tokens, response 5
    store = LMStore(ids, np.array([5, 7], dtype=np.int32), np.array([3, 2], dtype=np.int32),
                    np.array([0, 0]), 0, ["a", "b"])
    batch = store.batch(np.array([0, 1]))
    assert batch.input_ids.shape == (2, 7)
    assert batch.labels[0].tolist() == [IGNORE, IGNORE, IGNORE, 20, 3, IGNORE, IGNORE]
    assert batch.labels[1].tolist() == [IGNORE, IGNORE, 21, 22, 23, 24, 3]
    assert batch.attention_mask[0].tolist() == [1, 1, 1, 1, 1, 0, 0]
    assert batch.n_tokens == 12
    assert store.prompt_ids(0) == [2, 10, 11]


def test_token_nll_on_a_hand_checked_example():
    logits = torch.zeros(1, 3, 4)        # uniform: every labelled token costs ln 4
    labels = torch.tensor([[IGNORE, 1, 2]])
    total, count = token_nll(logits, labels)
    assert count == 2 and total.item() == pytest.approx(2 * math.log(4))
    assert lm_loss(logits, labels).item() == pytest.approx(math.log(4))


class _PeekingModel:
    """Stands in for AdapterModel: a row starting with token 5 predicts its next token with logit 10,
    any other row predicts uniformly (loss ln V per token)."""

    def __init__(self, vocab: int):
        self.vocab, self.model = vocab, torch.nn.Identity()

    def load(self, state):
        pass

    def logits(self, input_ids, attention_mask):
        logits = torch.zeros(*input_ids.shape, self.vocab)
        nxt = torch.nn.functional.one_hot(input_ids.roll(-1, dims=1), self.vocab).float() * 10.0
        good = (input_ids[:, :1] == 5).float()[:, :, None]
        return logits + good * nxt


def test_eval_loss_is_token_weighted_over_the_whole_sample_not_a_mean_of_batch_means():
    V = 6
    ids = np.zeros((2, 6), dtype=np.int32)
    ids[0, :3] = [1, 2, 3]              # prompt 2, response 1 token: loss ln 6
    ids[1, :6] = [5, 1, 2, 3, 1, 2]     # prompt 2, response 4 tokens: loss log(1 + 5 e^-10) each
    store = LMStore(ids, np.array([3, 6], dtype=np.int32), np.array([2, 2], dtype=np.int32),
                    np.array([0, 0]), 0, ["x", "y"])
    ev = LMEvaluator(_PeekingModel(V), None, store, [np.array([0, 1])], batch_size=1, judge=rouge_l,
                     judge_samples=0, max_new_tokens=1, seed=0)
    good = math.log(1 + (V - 1) * math.exp(-10))
    expected = (math.log(V) + 4 * good) / 5
    assert ev.score({}, 0) == pytest.approx(expected, rel=1e-5)
    assert abs(expected - (math.log(V) + good) / 2) > 0.3  # the mean of batch means would differ


# ---- model ----------------------------------------------------------------------------------------------------

def test_lora_targets_resolve_on_a_tiny_llama_and_the_adapter_has_no_head(tiny_llama):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    model = AdapterModel(base, LoraConfig(rank=4, target_modules=["q_proj", "v_proj"]), 4, torch.device("cpu"),
                         task_type="CAUSAL_LM")
    assert model.head_keys == []
    assert "model.layers.0.self_attn.q_proj.lora_A.weight" in model.lora_keys
    assert "model.layers.1.self_attn.v_proj.lora_B.weight" in model.lora_keys
    assert len(model.lora_keys) == 2 * 2 * 2  # 2 layers x (q, v) x (A, B)
    with pytest.raises(AdapterMismatch, match="lora.target_modules"):
        AdapterModel(AutoModelForCausalLM.from_pretrained(tiny_llama), LoraConfig(target_modules=["query", "value"]),
                     4, torch.device("cpu"), task_type="CAUSAL_LM")


def test_the_tiny_tokenizer_store_masks_prompts(tiny_llama, dolly_jsonl):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    tasks = load_tasks(DataConfig(scenario="dolly", source=dolly_jsonl, test_fraction=0.25))[:2]
    store, index = build_lm_store(tokenizer, tasks, 12, "train")
    assert len(index[0]) == 9 and len(store) == 18
    batch = store.batch(index[1])
    response = (batch.labels != IGNORE).sum(1)
    assert (response >= 1).all()  # long prompts (with context) are cut, responses survive
    assert (batch.input_ids[:, 0] == tokenizer.bos_token_id).all()  # BOS kept in front


# ---- judge ----------------------------------------------------------------------------------------------------

def test_offline_judges_on_known_strings():
    assert rouge_l("the cat sat on the mat", "The cat on the mat!") == pytest.approx(10 / 11)
    assert token_f1("a b c", "a b d") == pytest.approx(2 / 3)
    assert rouge_l("", "") == 1.0 and token_f1("x", "") == 0.0 and rouge_l("one two", "three") == 0.0
    assert make_judge("rouge_l") is rouge_l


def test_a_generated_answer_ends_where_the_model_starts_a_new_prompt_section():
    from fltac.eval.lm_eval import answer_only

    assert answer_only(" Arizona and Hawaii\n\n### Instruction:\nWhich") == "Arizona and Hawaii"
    assert answer_only("no marker ## here") == "no marker ## here"


def test_llm_judge_takes_any_callable_and_maps_ratings_to_unit_range(monkeypatch):
    asked = []
    judge = LLMJudge(lambda prompt: asked.append(prompt) or "Rating: 10")
    assert judge("Paris", "Paris, France", prompt="capital of France?") == 1.0
    assert "capital of France?" in asked[0] and "Paris, France" in asked[0]
    assert parse_rating("8/10") == pytest.approx(7 / 9) and parse_rating("no idea") is None
    monkeypatch.delenv("FLTAC_JUDGE_ENDPOINT", raising=False)
    with pytest.raises(ValueError, match="judge_endpoint"):
        make_judge("llm")


# ---- end to end -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["fltac", "fedit"])
def test_tiny_runs_on_dolly_record_lm_loss_judge_scores_and_generations(tiny_llama, dolly_jsonl, tmp_path, method):
    from fltac.engines.inprocess import run

    overrides = {"method": method, "model_name": tiny_llama, "output_dir": str(tmp_path / method), "dtype": "float32",
                 "data.scenario": "dolly", "data.source": dolly_jsonl,
                 "data.tasks": ["open_qa", "closed_qa", "brainstorming"],
                 "data.test_fraction": 0.25, "data.max_length": 24, "partition.n_clients": 2, "partition.min_frac": 0.0,
                 "lora.target_modules": ["q_proj", "v_proj"], "train.rounds": 2, "train.local_steps": 2,
                 "train.batch_size": 4, "eval.eval_size": 3, "eval.batch_size": 2, "eval.judge_samples": 2,
                 "eval.max_new_tokens": 4, "seed": 3}
    summary = run(load_config(None, overrides), quiet=True)
    assert set(summary["per_task_lm_loss"]) == {"open_qa", "closed_qa", "brainstorming"}
    assert all(np.isfinite(v) and v > 0 for v in summary["per_task_lm_loss"].values())
    assert all(0.0 <= v <= 1.0 for v in summary["per_task_judge_score"].values())
    assert "per_task_accuracy" not in summary
    assert (summary["clustering_accuracy"] is not None) == (method == "fltac")
    lines = [json.loads(x) for x in (tmp_path / method / "generations.jsonl").read_text().splitlines()]
    assert len(lines) == 3 * 2 and {"prompt", "reference", "prediction", "score", "task", "slot"} <= set(lines[0])
    evals = [json.loads(x) for x in (tmp_path / method / "metrics.jsonl").read_text().splitlines()
             if json.loads(x)["phase"] == "eval"]
    assert {"lm_loss", "personalized_lm_loss"} <= set(evals[-1])


def test_causal_lm_adapters_trained_together_equal_one_by_one(tiny_llama, dolly_jsonl, tmp_path):
    """The fast path on a causal LM: each adapter's loss is the mean over its own response tokens, its dropout
    draws its own; same losses and adapters as training one by one (fp32)."""
    from dataclasses import replace

    from fltac.experiment import build_experiment
    from tests.conftest import assert_same_training, train_alone_and_together

    overrides = {"model_name": tiny_llama, "output_dir": str(tmp_path), "dtype": "float32",
                 "data.scenario": "dolly", "data.source": dolly_jsonl, "data.tasks": ["open_qa", "closed_qa"],
                 "data.test_fraction": 0.25, "data.max_length": 24, "partition.n_clients": 2,
                 "partition.min_frac": 0.0, "lora.target_modules": ["q_proj", "v_proj"], "train.batch_size": 3,
                 "eval.eval_size": 3, "seed": 3}
    exp = build_experiment(load_config(None, overrides))
    assert exp.model.peft_config.lora_dropout > 0
    start, alone, together = train_alone_and_together(exp, [replace(j, steps=3) for j in exp.jobs[:3]], 5)
    assert_same_training(start, alone, together)
