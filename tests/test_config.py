from __future__ import annotations

import time
from pathlib import Path

import pytest

from unet_ray import cli
from unet_ray.config import ConfigError, TrainConfig, coerce, load_yaml, merge


def _yaml(tmp_path, text, name="cfg.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_validate():
    cfg = TrainConfig().validate()
    assert cfg.num_classes == 2
    assert (cfg.optim.optimizer, cfg.optim.lr, cfg.optim.schedule) == ("adamw", 2e-3, "cosine")
    # round trip through a plain dict
    assert TrainConfig.from_dict(cfg.to_dict()).to_dict() == cfg.to_dict()
    assert cfg.run.max_failures > 0  # a killed worker restarts from the latest checkpoint by default


def _run(**run) -> TrainConfig:
    return TrainConfig.from_dict({"run": run}).validate()


def test_workers_leave_room_for_data_tasks_on_2_cpus():
    from unet_ray.train import DATA_RESERVE_CPUS, plan_resources

    plan = plan_resources(_run(workers=2), 2.0)
    # 2 workers share what the data reserve leaves; one torch thread each: no oversubscription
    assert plan.cpus_per_worker * 2 <= 2.0 - DATA_RESERVE_CPUS and plan.torch_threads == 1
    assert plan_resources(_run(workers=1), 16.0).torch_threads == 16  # 15.5 CPUs, rounded
    assert plan_resources(_run(workers=4, gpu=True), 2.0).cpus_per_worker == 1.0  # GPU: at least 1 CPU


def test_workers_that_cannot_fit_are_a_config_error():
    from unet_ray.train import plan_resources

    with pytest.raises(ConfigError, match="3 workers x 1 CPUs do not fit in 2 CPUs"):
        plan_resources(_run(workers=3, cpus_per_worker=1.0), 2.0)


def test_yaml_scientific_notation_becomes_float(tmp_path):
    values = load_yaml(_yaml(tmp_path, "optim:\n  lr: 1e-3\n  weight_decay: 1e-5\n"))
    assert values["optim"]["lr"] == "1e-3"  # PyYAML reads it as a string ...
    cfg = TrainConfig.from_dict(values).validate()
    assert isinstance(cfg.optim.lr, float) and cfg.optim.lr == pytest.approx(0.001)  # ... the config does not
    assert cfg.optim.weight_decay == pytest.approx(1e-5)


def test_merge_does_not_modify_its_input():
    base = TrainConfig()
    merged = merge(base, {"optim": {"lr": 0.5}, "model.depth": 3}, "test")
    assert merged.optim.lr == 0.5 and merged.model.depth == 3
    assert base.optim.lr == TrainConfig().optim.lr and base.model.depth == 4


def _raises(values, *fragments, check_paths=True):
    with pytest.raises(ConfigError) as info:
        TrainConfig.from_dict(values, origin="my.yaml").validate(check_paths=check_paths)
    for fragment in fragments:
        assert fragment in str(info.value), str(info.value)
    return str(info.value)


def test_unknown_section():
    _raises({"optimizer": {"lr": 1}}, "optimizer", "unknown section")


def test_unknown_key():
    _raises({"optim": {"lrr": 0.1}}, "optim.lrr", "my.yaml")
    _raises({"optim.lrr": 0.1}, "optim.lrr")


def test_section_not_a_mapping():
    _raises({"optim": 3}, "my.yaml", "section 'optim' must be a mapping, got 3")


@pytest.mark.parametrize(
    "values,key",
    [
        ({"optim": {"lr": "fast"}}, "optim.lr"),
        ({"optim": {"epochs": 2.5}}, "optim.epochs"),
        ({"model": {"batch_norm": "maybe"}}, "model.batch_norm"),
        ({"data": {"image_size": True}}, "data.image_size"),
        ({"data": {"classes": ["road"]}}, "data.classes"),
    ],
)
def test_wrong_type(values, key):
    (given,) = next(iter(values.values())).values()
    _raises(values, key, "expected", f"got {given!r}")


@pytest.mark.parametrize(
    "values,key",
    [  # the key and the value given, as the config holds it (an int for a float key: 0.0)
        ({"optim": {"lr": -0.1}}, "optim.lr=-0.1"),
        ({"optim": {"lr": 0}}, "optim.lr=0.0"),
        ({"optim": {"epochs": 0}}, "optim.epochs=0: must be >= 1"),
        ({"optim": {"time_budget": 0}}, "optim.time_budget=0.0"),
        ({"optim": {"time_budget": -5}}, "optim.time_budget=-5.0"),
        ({"optim": {"batch_size": 0}}, "optim.batch_size=0"),
        ({"optim": {"dice_weight": -1}}, "optim.dice_weight=-1.0"),
        ({"optim": {"class_weights": "median"}}, "optim.class_weights='median'"),
        ({"run": {"workers": 0}}, "run.workers=0"),
        ({"run": {"name": "a/b"}}, "run.name='a/b'"),
        ({"model": {"depth": 0}}, "model.depth=0"),
        ({"data": {"image_size": 16}}, "data.image_size=16"),
    ],
)
def test_impossible_values(values, key):
    _raises(values, key)


def test_depth_too_deep_for_image_size():
    message = _raises({"data": {"image_size": 64}, "model": {"depth": 6}}, "model.depth", "data.image_size")
    assert "64" in message
    TrainConfig.from_dict({"data": {"image_size": 64}, "model": {"depth": 5}}).validate()  # 64/32 = 2 is fine


def test_image_size_not_multiple_of_2_pow_depth():
    _raises({"data": {"image_size": 100}, "model": {"depth": 3}}, "model.depth", "data.image_size")


def test_missing_data_path(tmp_path):
    missing = str(tmp_path / "no-such-folder")
    _raises({"data": {"path": missing}}, "data.path", missing)
    # not checked when asked not to, nor for URIs
    TrainConfig.from_dict({"data": {"path": missing}}).validate(check_paths=False)
    TrainConfig.from_dict({"data": {"path": "s3://bucket/pairs"}}).validate()


def test_existing_data_path(tmp_path):
    assert TrainConfig.from_dict({"data": {"path": str(tmp_path)}}).validate().data.path == str(tmp_path)


def test_unknown_classes():
    _raises({"data": {"classes": "pascal"}}, "data.classes", "pascal")


def test_coerce():
    assert coerce("3", int, "x") == 3 and coerce("-3", int, "x") == -3
    assert coerce(2, float, "x") == 2.0 and isinstance(coerce(2, float, "x"), float)
    assert coerce("yes", bool, "x") is True and coerce("false", bool, "x") is False
    assert coerce(None, float | None, "x") is None
    assert coerce("0.5", float | None, "x") == 0.5
    with pytest.raises(ConfigError, match="where"):
        coerce(None, int, "where")
    with pytest.raises(ConfigError, match="x: expected int, got True"):  # a bool is no int here
        coerce(True, int, "x")
    for text in ("--3", "²", "1.5", "ten"):  # not ints: a ConfigError naming the key, no bare ValueError
        with pytest.raises(ConfigError, match="optim.epochs"):
            coerce(text, int, "optim.epochs")


def test_load_yaml_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_yaml(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_yaml(_yaml(tmp_path, "optim: [lr: 1\n"))
    with pytest.raises(ConfigError, match="mapping"):
        load_yaml(_yaml(tmp_path, "- a\n- b\n", "list.yaml"))
    assert load_yaml(_yaml(tmp_path, "", "empty.yaml")) == {}


# --- command line ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, message",
    [
        (["prepare", "--src", "{pairs}", "--out", "{tmp}/out", "--image-size", "0"], "--image-size 0: must be between 32 and 2048"),
        (["prepare", "--src", "{pairs}", "--out", "{tmp}/out", "--image-size", "4096"], "--image-size 4096"),
        (["synth", "--out", "{tmp}/s", "--train", "0", "--val", "2"], "--train 0 --val 2: synthetic data needs at least 1"),
    ],
)
def test_cli_prepare_and_synth_check_sizes_before_any_work(argv, message, pairs_folder, tmp_path, capsys, ray_must_not_start):
    argv = [a.format(pairs=pairs_folder, tmp=tmp_path) for a in argv]
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not (tmp_path / "s").exists()
    assert ray_must_not_start.calls == []


def test_cli_bad_lr_fails_fast_before_any_cluster(capsys, ray_must_not_start):
    start = time.perf_counter()
    rc = cli.main(["train", "--lr", "-1"])
    elapsed = time.perf_counter() - start
    assert rc == 2
    err = capsys.readouterr().err
    assert "optim.lr" in err and "error" in err
    assert elapsed < 5
    assert ray_must_not_start.calls == []


def test_cli_yaml_unknown_key_fails(tmp_path, capsys, ray_must_not_start):
    path = _yaml(tmp_path, "optim:\n  lrr: 0.1\n")
    start = time.perf_counter()
    rc = cli.main(["train", "--config", str(path)])
    assert rc == 2
    assert time.perf_counter() - start < 5
    err = capsys.readouterr().err
    assert "optim.lrr" in err and str(path) in err
    assert ray_must_not_start.calls == []


def test_cli_missing_yaml_fails(tmp_path, capsys):
    rc = cli.main(["train", "--config", str(tmp_path / "missing.yaml")])
    assert rc == 2
    assert "missing.yaml" in capsys.readouterr().err


def test_flags_override_yaml(tmp_path):
    path = _yaml(
        tmp_path,
        "data:\n  image_size: 64\n  classes: cityscapes19\nmodel:\n  depth: 2\noptim:\n  lr: 1e-3\n  epochs: 7\n"
        "run:\n  workers: 3\n",
    )
    args = cli.build_parser().parse_args(
        ["train", "--config", str(path), "--lr", "0.01", "--workers", "1", "--no-augment", "--gpu", "--depth", "3"]
    )
    cfg = cli.config_from_args(args)
    assert cfg.optim.lr == 0.01  # flag wins
    assert cfg.run.workers == 1
    assert cfg.model.depth == 3
    assert cfg.data.augment == "none" and cfg.run.gpu is True
    assert cfg.data.image_size == 64 and cfg.data.classes == "cityscapes19"  # YAML kept where no flag
    assert cfg.optim.epochs == 7
    assert cfg.run.name == "unet"  # default kept where neither


def test_flags_not_given_do_not_override():
    args = cli.build_parser().parse_args(["train"])
    assert cli.overrides_from_args(args) == {}
    assert cli.config_from_args(args).to_dict() == TrainConfig().validate(check_paths=False).to_dict()


def test_flag_combination_validated():
    args = cli.build_parser().parse_args(["train", "--image-size", "64", "--depth", "6"])
    with pytest.raises(ConfigError, match="model.depth"):
        cli.config_from_args(args)


def test_example_yaml_documents_every_key_with_its_default():
    """tune_configs/example.yaml is the reference of every key: it must list each one, with the
    default `unet-ray train` uses (the run's name is the example's own)."""
    import yaml

    from unet_ray.config import TrainConfig

    example = yaml.safe_load((Path(__file__).resolve().parents[1] / "tune_configs" / "example.yaml").read_text())
    defaults = TrainConfig().to_dict()
    for section in TrainConfig.SECTIONS:
        assert set(example[section]) == set(defaults[section]), section
        for key, value in defaults[section].items():
            if (section, key) != ("run", "name"):
                assert example[section][key] == value, f"{section}.{key}: example says {example[section][key]!r}, default is {value!r}"


@pytest.mark.parametrize(
    "classes,given,resolved",
    [
        ("cityscapes19", "auto", "inverse_log"),
        ("road", "auto", "none"),
        ("road", "inverse_log", "inverse_log"),
        ("cityscapes19", "none", "none"),
    ],
)
def test_class_weights_auto_weights_the_19_classes_only(classes, given, resolved):
    cfg = TrainConfig.from_dict({"data": {"classes": classes}, "optim": {"class_weights": given}})
    assert cfg.validate(check_paths=False).class_weighting == resolved
    assert TrainConfig().optim.class_weights == "auto"


def test_deep_supervision_is_off_by_default_and_checked():
    assert TrainConfig().model.deep_supervision == 0.0
    args = cli.build_parser().parse_args(["train", "--deep-supervision", "0.25"])
    assert cli.config_from_args(args).model.deep_supervision == 0.25
    _raises({"model": {"deep_supervision": -0.1}}, "model.deep_supervision", "-0.1")
    _raises({"model": {"deep_supervision": 0.4, "depth": 1}}, "model.deep_supervision", "depth >= 2")
    TrainConfig.from_dict({"model": {"deep_supervision": 0, "depth": 1}}).validate(check_paths=False)  # off: fine
