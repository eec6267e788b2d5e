"""Run files: safetensors round trip and its errors, atomic JSON writes, jsonl truncation for resume."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open

from fltac import io
from fltac.io import AdapterFileError


def sample_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "slot0/enc.lora_A.weight": torch.randn(4, 8, generator=g),
        "slot0/classifier.weight": torch.randn(3, 8, generator=g, dtype=torch.float64),
        "half": torch.randn(5, generator=g).half(),
        "bf16": torch.randn(2, 3, generator=g).bfloat16(),
        "ints": torch.arange(-3, 9, dtype=torch.int64).reshape(3, 4),
        "flags": torch.tensor([True, False, True]),
        "transposed": torch.randn(3, 5, generator=g).t(),   # non-contiguous view
        "scalar": torch.tensor(2.5),
    }


def test_save_load_round_trip_exact(tmp_path):
    tensors = sample_tensors()
    path = tmp_path / "sub" / "adapters.safetensors"   # parent folder does not exist yet
    io.save_tensors(path, tensors)
    loaded = io.load_tensors(path)
    assert set(loaded) == set(tensors)
    for k, v in tensors.items():
        assert loaded[k].dtype == v.dtype, k
        assert loaded[k].shape == v.shape, k
        assert torch.equal(loaded[k], v), k
    with safe_open(str(path), "pt") as f:
        assert set(f.keys()) == set(tensors)
    # the save did not alter the caller's tensors
    assert not tensors["transposed"].is_contiguous()


def test_save_tensors_overwrites_and_leaves_no_temp_files(tmp_path):
    path = tmp_path / "a.safetensors"
    io.save_tensors(path, {"x": torch.zeros(3)})
    io.save_tensors(path, {"x": torch.ones(2), "y": torch.full((1,), 7.0)})
    loaded = io.load_tensors(path)
    assert set(loaded) == {"x", "y"} and torch.equal(loaded["x"], torch.ones(2))
    assert sorted(os.listdir(tmp_path)) == ["a.safetensors"]


def test_save_tensors_is_byte_deterministic(tmp_path):
    tensors = {"slot0/x": torch.arange(6.0).reshape(2, 3), "slot1/x": torch.ones(2, 3)}
    blobs = set()
    for i in range(20):
        io.save_tensors(tmp_path / f"{i}.safetensors", tensors)
        blobs.add((tmp_path / f"{i}.safetensors").read_bytes())
    assert len(blobs) == 1


def test_truncated_file_raises_adapter_file_error_naming_it(tmp_path):
    path = tmp_path / "round_1.safetensors"
    io.save_tensors(path, sample_tensors())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(AdapterFileError) as err:
        io.load_tensors(path)
    assert str(path) in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("content", [b"this is not a safetensors file, just some words", b"", b"\x01\x02",
                                     b"\x08\x00\x00\x00\x00\x00\x00\x00{bad json"])
def test_garbage_file_raises_adapter_file_error_naming_it(tmp_path, content):
    path = tmp_path / "garbage.safetensors"
    path.write_bytes(content)
    with pytest.raises(AdapterFileError) as err:
        io.load_tensors(path)
    assert str(path) in str(err.value)


def test_missing_file_raises_adapter_file_error(tmp_path):
    path = tmp_path / "nope.safetensors"
    with pytest.raises(AdapterFileError) as err:
        io.load_tensors(path)
    assert str(path) in str(err.value)


def test_adapter_file_error_is_a_cli_user_error():
    from fltac.cli import user_errors

    assert issubclass(AdapterFileError, user_errors())


def test_write_json_content_and_no_leftovers(tmp_path):
    path = tmp_path / "deep" / "summary.json"
    obj = {"b": [1, 2.5, None], "a": {"nested": "x"}, "c": True}
    io.write_json(path, obj)
    assert json.loads(path.read_text()) == obj
    assert io.read_json(path) == obj
    io.write_json(path, {"replaced": 1})
    assert json.loads(path.read_text()) == {"replaced": 1}
    assert os.listdir(path.parent) == ["summary.json"]


def test_write_json_failed_replace_keeps_old_file_and_cleans_temp(tmp_path, monkeypatch):
    path = tmp_path / "latest.json"
    io.write_json(path, {"round": 1})

    def boom(src, dst):
        raise OSError("disk went away")

    monkeypatch.setattr(io.os, "replace", boom)
    with pytest.raises(OSError):
        io.write_json(path, {"round": 2})
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"round": 1}
    assert os.listdir(tmp_path) == ["latest.json"]
    assert not any(name.endswith(".tmp") for name in os.listdir(tmp_path))


def _records(n):
    return [{"i": i, "phase": "local" if i % 2 else "eval", "loss": i / 3} for i in range(n)]


@pytest.mark.parametrize("keep", [0, 1, 3, 5, 9])
def test_truncate_jsonl_keeps_first_records(tmp_path, keep):
    path = tmp_path / "metrics.jsonl"
    recs = _records(5)
    io.append_jsonl(path, recs[:2])
    io.append_jsonl(path, [])            # appending nothing changes nothing
    io.append_jsonl(path, recs[2:])
    assert io.read_jsonl(path) == recs
    io.truncate_jsonl(path, keep)
    assert io.read_jsonl(path) == recs[:keep]
    text = path.read_text()
    assert text == "".join(json.dumps(r, sort_keys=True) + "\n" for r in recs[:keep])
    assert os.listdir(tmp_path) == ["metrics.jsonl"]


def test_truncate_jsonl_ignores_blank_lines_and_missing_file(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"a": 1}\n\n{"a": 2}\n   \n{"a": 3}\n')
    io.truncate_jsonl(path, 2)
    assert io.read_jsonl(path) == [{"a": 1}, {"a": 2}]
    missing = tmp_path / "missing.jsonl"
    io.truncate_jsonl(missing, 3)
    assert not missing.exists()
    assert io.read_jsonl(missing) == []
