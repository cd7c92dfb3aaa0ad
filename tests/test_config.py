"""Config: defaults, YAML then flags, rejected keys/types named, every shipped config valid."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import pytest
import yaml

from fastkd.config import TrainConfig, config_to_dict, resolve_config, save_config
from fastkd.config_cli import ALIASES, config_flags, parse_train_argv
from fastkd.errors import FastKDError
from fastkd.schedule import lr_at, resolution_at, scaled_lr


def parse(argv: list[str]):
    """(config file, overrides) of a `fastkd train` argv, through the real parser (tyro)."""
    return parse_train_argv(argv)


def shipped_configs() -> list[Path]:
    return sorted(Path(str(resources.files("fastkd").joinpath("configs"))).glob("*.yaml"))


def test_defaults_match_contract():
    cfg = TrainConfig()
    assert cfg.model.students == ["resnet18", "mobilenet_v2"] and cfg.model.teacher == "resnet50"
    assert cfg.loss.method == "uadkd" and cfg.compile.mode == "auto" and cfg.model.fold_teacher_bn
    # the peak lr: neither optim.lr nor optim.lr_per_256 set = 0.5 per 256 images; SGD, no clipping
    assert cfg.optim.lr is None and cfg.optim.lr_per_256 is None and cfg.optim.name == "sgd"
    assert cfg.optim.clip_grad_norm is None and cfg.schedule.min_lr == 0.0 and cfg.ema.decay is None
    assert cfg.augment.mixup == 0.0 and cfg.augment.cutmix == 0.0


def test_yaml_then_flags_and_aliases(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"optim": {"lr_per_256": 0.2, "weight_decay": "5e-5"}, "loss": {"method": "ce"}}))
    args = parse(["--config", str(path), "--optim.lr_per_256", "0.3", "--data", "D", "--students", "resnet18",
                  "--gpus", "2", "--batch-size", "64", "--model.teacher_weights", "null", "--run.live", "false"])
    cfg = resolve_config(args.config, args.overrides)
    assert cfg.optim.lr_per_256 == 0.3 and cfg.optim.lr is None  # flag beats file
    assert cfg.optim.weight_decay == 5e-5  # YAML-1.1 string float accepted
    assert cfg.loss.method == "ce" and cfg.data.dir == "D" and cfg.dist.gpus == 2
    assert cfg.model.students == ["resnet18"] and cfg.data.batch_size == 64
    assert cfg.model.teacher_weights is None and cfg.run.live is False


def test_students_comma_and_list():
    cfg = resolve_config(None, parse(["--students", "resnet18,resnet18", "--teacher-weights", "imagenet"]).overrides)
    assert cfg.model.students == ["resnet18", "resnet18"]
    cfg = resolve_config(None, parse(["--students", "a", "b", "--teacher-weights", "x"]).overrides)
    assert cfg.model.students == ["a", "b"]


@pytest.mark.parametrize(
    "data, key",
    [
        ({"optim": {"lr": "fast"}}, "optim.lr"),
        ({"optim": {"lr": 0.1, "lr_per_256": 0.5}}, "optim.lr_per_256"),
        ({"optim": {"learning_rate": 0.1}}, "optim.learning_rate"),
        ({"optimizer": {"lr": 0.1}}, "optimizer"),
        ({"run": {"seed": 1.5}}, "run.seed"),
        ({"run": {"log_every": True}}, "run.log_every"),
        ({"loss": {"method": "magic"}}, "loss.method"),
        ({"model": {"students": "resnet18"}, "loss": {"method": "uadkd"}}, "model.students"),
        ({"data": {"min_resolution": 128}}, "data.max_resolution"),
    ],
)
def test_rejects_with_key_named(tmp_path, data, key):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(FastKDError, match=key.replace(".", r"\.")):
        resolve_config(path)


def test_run_needs_data_and_teacher_weights():
    from fastkd.config import check_runnable

    with pytest.raises(FastKDError, match="--data"):
        check_runnable(resolve_config(None, {"model.teacher_weights": "t.pt"}))
    with pytest.raises(FastKDError, match="--teacher-weights"):
        check_runnable(resolve_config(None, {"data.dir": "d"}))
    check_runnable(resolve_config(None, {"data.dir": "d", "loss.method": "dml"}))


def test_unknown_flag_value_type_named(capsys):
    with pytest.raises(SystemExit) as exit_:
        parse(["--batch-size", "lots"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "data.batch_size" in err and "lots" in err


def test_missing_config_file_named(tmp_path):
    with pytest.raises(FastKDError, match="nope.yaml"):
        resolve_config(tmp_path / "nope.yaml")


def test_saved_config_round_trips(tmp_path):
    cfg = resolve_config(None, {"optim.lr": "0.25", "model.teacher_weights": "imagenet"})
    save_config(cfg, tmp_path / "config.yaml")
    again = resolve_config(tmp_path / "config.yaml")
    assert config_to_dict(again) == config_to_dict(cfg)


def test_every_field_and_alias_has_help(capsys, monkeypatch):
    """`fastkd train --help` lists every --section.key with its one-line help (the field's
    trailing comment) and every short alias."""
    monkeypatch.setenv("COLUMNS", "100")  # one column of options
    with pytest.raises(SystemExit) as exit_:
        parse(["--help"])
    assert exit_.value.code == 0
    lines = [line.strip("│ ") for line in capsys.readouterr().out.splitlines()]
    for flag in config_flags():
        at = next((i for i, line in enumerate(lines) if line.startswith(flag + " ") or line.startswith(flag + ",")
                   or line == flag), None)
        assert at is not None, flag
        assert lines[at + 1] and not lines[at + 1].startswith("(default"), f"{flag} has no help"
    for alias, key in ALIASES.items():
        assert any(line.split() == [alias, f"--{key}"] for line in lines), alias


@pytest.mark.parametrize(
    "argv, key, value",
    [
        (["--run.live", "false"], "run.live", False),
        (["--run.live=False"], "run.live", False),
        (["--run.no_live"], "run.live", False),
        (["--run.no-live"], "run.live", False),
        (["--overwrite"], "run.overwrite", True),
        (["--overwrite", "true"], "run.overwrite", True),
        (["--model.fold_teacher_bn", "off"], "model.fold_teacher_bn", False),
        (["--lr", "null"], "optim.lr", None),
        (["--teacher-weights", "~"], "model.teacher_weights", None),
        (["--data.num_workers=null"], "data.num_workers", None),
        (["--log", "tensorboard,wandb"], "run.log", ["tensorboard", "wandb"]),
        (["--optim.betas", "0.8", "0.9"], "optim.betas", [0.8, 0.9]),
        (["--epochs=3"], "schedule.epochs", 3),
    ],
)
def test_flag_spellings(argv, key, value):
    args = parse(argv + ["--data", "D"])
    assert args.overrides == {key: value, "data.dir": "D"}  # only the keys given come back


def test_flags_lie_over_a_checkpoint_config_not_the_defaults(tmp_path):
    """A flag not given leaves the layer below alone, even where it equals the default."""
    args = parse(["--epochs", "5"])
    base = {"run": {"live": False}, "schedule": {"epochs": 9}, "optim": {"lr": 0.3}}
    cfg = resolve_config(args.config, args.overrides, base=base)
    assert cfg.schedule.epochs == 5 and cfg.run.live is False and cfg.optim.lr == 0.3


@pytest.mark.parametrize("path", shipped_configs(), ids=lambda p: p.name)
def test_shipped_configs_valid(path):
    raw = yaml.safe_load(path.read_text())
    cfg = resolve_config(path)
    # every key the file sets survives resolution unchanged (no silently ignored keys)
    resolved = config_to_dict(cfg)
    for section, values in raw.items():
        for key, value in (values or {}).items():
            assert resolved[section][key] == value, f"{section}.{key}"


def test_paper_recipe():
    names = [p.name for p in shipped_configs()]
    assert "imagenet100_uadkd.yaml" in names and "imagenet100_teacher.yaml" in names
    cfg = resolve_config(next(p for p in shipped_configs() if p.name == "imagenet100_uadkd.yaml"))
    assert (cfg.model.teacher, cfg.model.students, cfg.loss.method) == ("resnet50", ["resnet18", "mobilenet_v2"], "uadkd")
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.lr_per_256) == ("sgd", None, 0.5)  # 0.5 per 256 images
    teacher = resolve_config(next(p for p in shipped_configs() if p.name == "imagenet100_teacher.yaml"))
    assert teacher.loss.method == "ce" and teacher.model.students == ["resnet50"]


def test_schedule_shapes():
    peak = scaled_lr(0.5, 128, 2)
    assert peak == 0.5
    lrs = [lr_at(s, 100, 10, peak, "cosine") for s in range(100)]
    assert lrs[0] == pytest.approx(0.05) and lrs[9] == pytest.approx(0.5)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:])) and lrs[-1] < 0.001
    lin = [lr_at(s, 100, 0, 1.0, "linear") for s in range(100)]
    assert lin[0] == 1.0 and lin[50] == pytest.approx(0.5)


def test_resolution_ramp():
    res = [resolution_at(e, 16, 160, 192, 224, ramp_end_epoch=13) for e in range(16)]
    assert res[0] == 160 and res[13:] == [192, 192, 192]
    assert res == sorted(res) and all(r % 16 == 0 for r in res)
    assert resolution_at(3, 16, None, None, 176) == 176
