"""Config validation: unknown keys, types, ranges and choices are rejected by dotted name, before any work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from fltac.config import ConfigError, RunConfig, from_dict, load_config, parse_override, resolve_key

ROOT = Path(__file__).resolve().parents[1]
TEXT5_YAML = ROOT / "configs" / "text5.yaml"


def _raises_naming(key: str, fn, *args):
    with pytest.raises(ConfigError) as err:
        fn(*args)
    assert f"'{key}'" in str(err.value), str(err.value)
    return str(err.value)


# ---- unknown keys ------------------------------------------------------------------------------------

def test_unknown_top_level_key():
    _raises_naming("foo", from_dict, {"foo": 1})
    _raises_naming("foo", load_config, None, {"foo": 1})


def test_unknown_nested_key_names_the_dotted_path():
    _raises_naming("train.lrr", from_dict, {"train": {"lrr": 1}})
    _raises_naming("train.lrr", load_config, None, {"train.lrr": 1})
    _raises_naming("data.nope", from_dict, {"data": {"max_length": 32, "nope": True}})


def test_unknown_key_in_yaml_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("method: fltac\ntrain:\n  rounds: 2\n  lrr: 0.1\n")
    _raises_naming("train.lrr", load_config, path)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError):
        load_config(tmp_path / "absent.yaml")


# ---- types, ranges, choices --------------------------------------------------------------------------

@pytest.mark.parametrize("key, value", [
    ("train.rounds", "abc"),
    ("train.rounds", 2.5),
    ("train.rounds", True),
    ("partition.n_clients", "10"),
    ("train.lr", "fast"),
    ("train.lr", True),
    ("model_name", 3),
    ("data.tasks", "election"),
    ("lora.target_modules", [1, 2]),
])
def test_bad_type_names_the_key(key, value):
    msg = _raises_naming(key if key != "lora.target_modules" else "lora.target_modules[0]", load_config, None,
                         {key: value})
    assert "type" in msg or "list" in msg


@pytest.mark.parametrize("key, value", [
    ("partition.alpha", -1),
    ("partition.alpha", 0),
    ("train.fraction_fit", 0),
    ("train.fraction_fit", 1.5),
    ("train.rounds", 0),
    ("train.lr", -1e-3),
    ("lora.rank", 0),
    ("lora.dropout", 1.0),
    ("data.max_length", 4),
    ("data.test_fraction", 1.0),
    ("eval.eval_size", 0),
    ("num_threads", 0),
    ("partition.min_frac", 0.5),     # n_clients=10 by default: must be < 1/10
])
def test_out_of_range_names_the_key(key, value):
    _raises_naming(key, load_config, None, {key: value})


def _float_keys(cls=RunConfig, prefix: str = "") -> list[str]:
    """Every float (or optional float) key of the config, dotted."""
    import dataclasses
    import typing

    keys = []
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            keys += _float_keys(tp, f"{prefix}{f.name}.")
        elif tp is float or float in typing.get_args(tp):
            keys.append(f"{prefix}{f.name}")
    return keys


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf", "inf"])
@pytest.mark.parametrize("key", _float_keys())
def test_every_float_key_rejects_nan_and_infinity(key, value):
    msg = _raises_naming(key, load_config, None, {key: yaml.safe_load(value)})
    assert "finite" in msg


def test_float_keys_are_found():
    assert {"partition.alpha", "train.lr", "reliability.client_timeout_s", "backbone_dropout"} <= set(_float_keys())


def test_infinite_alpha_points_at_the_iid_kind():
    msg = _raises_naming("partition.alpha", load_config, None, {"partition.alpha": float("inf")})
    assert "partition.kind: iid" in msg
    assert load_config(None, {"partition.kind": "iid"}).partition.kind == "iid"


def test_min_frac_bound_depends_on_n_clients():
    assert load_config(None, {"partition.n_clients": 2, "partition.min_frac": 0.4}).partition.min_frac == 0.4
    _raises_naming("partition.min_frac", load_config, None, {"partition.n_clients": 3, "partition.min_frac": 0.4})


@pytest.mark.parametrize("key, value", [("method", "foo"), ("dtype", "float16"), ("attn_implementation", "flash"),
                                        ("server.cluster_on", "gradients"), ("server.cluster_features", "head")])
def test_bad_literal_names_the_key_and_choices(key, value):
    msg = _raises_naming(key, load_config, None, {key: value})
    assert value in msg


def test_section_must_be_a_mapping():
    _raises_naming("train", from_dict, {"train": 5})


# ---- overrides ---------------------------------------------------------------------------------------

def test_parse_override_resolves_bare_unique_leaf_and_reads_yaml():
    key, value = parse_override("lr=1e-3")
    assert key == "train.lr"
    cfg = load_config(None, {key: value})
    assert isinstance(cfg.train.lr, float) and cfg.train.lr == pytest.approx(0.001)
    assert parse_override("train.rounds=7") == ("train.rounds", 7)
    assert parse_override("rounds=7") == ("train.rounds", 7)
    assert parse_override("n_clients = 3") == ("partition.n_clients", 3)
    assert parse_override("lora.target_modules=[query,key]") == ("lora.target_modules", ["query", "key"])
    assert parse_override("data.tasks=null") == ("data.tasks", None)
    assert parse_override("model_name=a=b") == ("model_name", "a=b")


def test_yaml_exponent_strings_coerce_to_float():
    # YAML 1.1 reads 1e-3 (no dot) as a string; a float field still takes it
    assert yaml.safe_load("1e-3") == "1e-3"
    cfg = load_config(None, {"train.lr": "1e-3", "partition.alpha": "2e-1", "train.weight_decay": 0})
    assert cfg.train.lr == pytest.approx(1e-3)
    assert cfg.partition.alpha == pytest.approx(0.2)
    assert isinstance(cfg.train.weight_decay, float)


def test_parse_override_errors():
    with pytest.raises(ConfigError):
        parse_override("no_equals_sign")
    _raises_naming("lrr", parse_override, "lrr=1")
    msg = _raises_naming("alpha", parse_override, "alpha=0.1")            # partition.alpha and lora.alpha
    assert "partition.alpha" in msg and "lora.alpha" in msg
    msg = _raises_naming("batch_size", parse_override, "batch_size=8")    # train and eval
    assert "train.batch_size" in msg and "eval.batch_size" in msg


def test_resolve_key_dotted_and_sections():
    assert resolve_key("partition.alpha") == "partition.alpha"
    assert resolve_key("seed") == "seed"
    with pytest.raises(ConfigError):
        resolve_key("train")          # a section, not a leaf


def test_cli_flags_and_overrides_build_the_config():
    from fltac.cli import build_parser, config_from_args

    args = build_parser().parse_args(["run", "--config", str(TEXT5_YAML), "--rounds", "3", "--method", "fedit",
                                      "--override", "lr=1e-3", "--override", "lora.target_modules=[query]"])
    cfg = config_from_args(args)
    assert cfg.train.rounds == 3
    assert cfg.method == "fedit" and cfg.rank == 16
    assert cfg.train.lr == pytest.approx(1e-3)
    assert cfg.lora.target_modules == ["query"]
    assert cfg.partition.n_clients == yaml.safe_load(TEXT5_YAML.read_text())["partition"]["n_clients"]


def _forbid_work(monkeypatch):
    """Make any data or model loading fail loudly (an AssertionError is not a user error: it propagates)."""
    import fltac.data
    import fltac.engines.inprocess as engine
    import fltac.experiment
    import fltac.models.backbone

    def forbidden(*a, **k):
        raise AssertionError("a config error must be reported before any data or model is loaded")

    monkeypatch.setattr(fltac.data, "load_tasks", forbidden)
    monkeypatch.setattr(fltac.experiment, "load_tasks", forbidden)
    monkeypatch.setattr(fltac.experiment, "load_backbone", forbidden)
    monkeypatch.setattr(fltac.models.backbone, "load_backbone", forbidden)
    monkeypatch.setattr(engine, "build_experiment", forbidden)


@pytest.mark.parametrize("argv, key", [
    (["--override", "train.lrr=1"], "train.lrr"),
    (["--override", "train.rounds=abc"], "train.rounds"),
    (["--method", "foo"], "method"),
    (["--alpha", "-1"], "partition.alpha"),
    (["--fraction_fit", "0"], "train.fraction_fit"),
])
def test_cli_run_config_error_exit_2_one_line(monkeypatch, capsys, tmp_path, argv, key):
    from fltac.cli import main

    _forbid_work(monkeypatch)
    rc = main(["run", "--config", str(TEXT5_YAML), "--output_dir", str(tmp_path / "out"), *argv])
    captured = capsys.readouterr()
    assert rc == 2
    err = captured.err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("fltac: error:")
    assert f"'{key}'" in err
    assert "Traceback" not in captured.err
    assert not (tmp_path / "out").exists()


def test_cli_partition_config_error_exit_2(monkeypatch, capsys):
    from fltac.cli import main

    _forbid_work(monkeypatch)
    rc = main(["partition", "--override", "partition.alphaa=1"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "'partition.alphaa'" in err


# ---- the shipped config and defaults -----------------------------------------------------------------

def test_text5_yaml_validates_and_matches_the_file():
    cfg = load_config(TEXT5_YAML)
    assert isinstance(cfg, RunConfig)
    raw = yaml.safe_load(TEXT5_YAML.read_text())
    as_dict = cfg.to_dict()

    def check(node, got, prefix=""):
        for k, v in node.items():
            if isinstance(v, dict):
                check(v, got[k], f"{prefix}{k}.")
            else:
                assert got[k] == v, f"{prefix}{k}"

    check(raw, as_dict)
    assert cfg.rank == ((raw.get("lora") or {}).get("rank") or {"fltac": 4, "fedit": 16, "centralized": 4}[cfg.method])
    assert RunConfig().to_dict().keys() == as_dict.keys()
    # the JSON snapshot round-trips to the same config
    assert from_dict(json.loads(cfg.to_json())) == cfg


def test_method_default_rank():
    assert RunConfig(method="fedit").rank == 16
    assert RunConfig(method="fltac").rank == 4
    assert RunConfig(method="centralized").rank == 4
    assert load_config(None, {"method": "fedit", "lora.rank": 8}).rank == 8
    assert load_config(None, {"method": "fedit"}).rank == 16


def test_a_snapshot_from_before_spectral_clustering_reads_as_kmeans():
    """server.clustering's default became 'spectral'; a run's config.json written before the key existed was
    clustered with K-means, and reading it back must say so (resume, report and export rely on it)."""
    snapshot = load_config(None, {}).to_dict()
    assert snapshot["server"]["clustering"] == "spectral"
    del snapshot["server"]["clustering"]
    assert from_dict(snapshot).server.clustering == "kmeans"
    snapshot["server"]["clustering"] = "spectral"
    assert from_dict(snapshot).server.clustering == "spectral"


def test_a_snapshot_from_before_bit_dropout_reads_as_bernoulli():
    """lora.dropout_draw came with default 'bits'; a run made before it drew torch's Bernoulli masks, and resuming
    it must keep drawing so (a resume with other masks would not give the uninterrupted run's bytes)."""
    snapshot = load_config(None, {}).to_dict()
    assert snapshot["lora"]["dropout_draw"] == "bits"
    del snapshot["lora"]["dropout_draw"]
    assert from_dict(snapshot).lora.dropout_draw == "bernoulli"
