"""The training config (strict YAML + overrides), the recipes, and the stepped lr schedule."""
import math

import pytest
import yaml

from models import list_models
from train.config import (ConfigError, apply_override, dump_yaml, from_dict, list_recipes, load_config,
                          to_dict)
from train.schedule import StepSchedule

RECIPES = ["resnet34", "resnet50", "resnet101", "resnet152", "inception_resnet_v2", "inception_v4",
           "densenet161", "densenet169", "dpn92", "finetune_k2", "finetune_k3", "finetune_k4", "finetune_k1_224", "finetune_k1_299", "demo"]


def write(tmp_path, text, name="r.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def test_every_recipe_loads_and_names_a_registered_model():
    assert set(RECIPES) <= set(list_recipes())
    for name in RECIPES:
        cfg = load_config(name)
        assert cfg.model.name in list_models(), name
        assert from_dict(to_dict(cfg)) == cfg  # plain-dict round trip (what checkpoints store)
    for k in (2, 3, 4):
        cfg = load_config(f"finetune_k{k}")
        assert cfg.data.tiled_k == k and cfg.train.init_from
    for size, crop in ((224, 200), (299, 266)):  # upsized: the single-image products, crops at the 160/180 ratio
        cfg = load_config(f"finetune_k1_{size}")
        assert (cfg.data.tiled_k, cfg.data.image_size, cfg.data.crop) == (1, size, crop) and cfg.train.init_from
        assert abs(size * 160 / 180 - crop) < 1  # 199.1 and 265.8, rounded as the issue gives them


def test_unknown_key_is_an_error_naming_it(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.epohcs.*did you mean 'epochs'"):
        load_config(write(tmp_path, "train: {epohcs: 3}\n"))
    with pytest.raises(ConfigError, match=r"unknown config key 'optimizer'"):
        load_config(write(tmp_path, "optimizer: {lr: 1}\n"))
    with pytest.raises(ConfigError, match=r"data\.batchsize"):
        load_config("demo", ["data.batchsize=4"])


def test_wrong_type_is_an_error_naming_the_key(tmp_path):
    cases = {
        "data: {batch_size: 3.5}\n": r"data\.batch_size: expected int, got float",
        "train: {epochs: many}\n": r"train\.epochs: expected float",
        "train: {deterministic: 1}\n": r"train\.deterministic: expected bool, got int",
        "data: {batch_size: true}\n": r"data\.batch_size: expected int, got bool",
        "optim: {lr_schedule: [[0, x]]}\n": r"optim\.lr_schedule\[0\]\[1\]: expected float",
        "train: {amp: off}\n": r"train\.amp: expected str, got the YAML boolean False; quote",
        "model: resnet50\n": r"model: expected a mapping",
    }
    for text, pattern in cases.items():
        with pytest.raises(ConfigError, match=pattern):
            load_config(write(tmp_path, text))
    with pytest.raises(ConfigError, match=r"override 'data.crop=big': data\.crop: expected int"):
        load_config("demo", ["data.crop=big"])
    with pytest.raises(ConfigError, match=r"train\.amp must be one of"):
        load_config("demo", ["train.amp=fp8"])


def test_override_parsing():
    cfg = load_config("resnet50", [
        "train.amp=off",  # a string field takes the text as it is (YAML would read a boolean)
        "train.epochs=2",  # int for a float field
        "optim.lr_schedule=[[0, 1e-3], [1.5, 1e-4]]",  # YAML 1.1 reads 1e-3 as a string: still a float
        "model.pretrained=null",
        "train.init_from=/a/b=c.pt",  # only the first '=' splits
        "model.channels_last=false",
        "early_stop.after_epoch=null",
        "optim.betas=[0.8, 1]",
    ])
    assert cfg.train.amp == "off"
    assert cfg.train.epochs == 2.0 and isinstance(cfg.train.epochs, float)
    assert cfg.optim.lr_schedule == [[0.0, 1e-3], [1.5, 1e-4]]
    assert cfg.model.pretrained is None and cfg.train.init_from == "/a/b=c.pt"
    assert cfg.model.channels_last is False and cfg.early_stop.after_epoch is None
    assert cfg.optim.betas == [0.8, 1.0]
    for gone in ("data.dtype=float16", "data.channels_last=true", "data.mean=[1, 2, 3]", "data.std=[1, 2, 3]"):
        with pytest.raises(ConfigError, match="unknown config key"):  # the model normalizes its input now
            load_config("resnet50", [gone])
    for bad, pattern in [("train", "expected section.key=value"), ("train.epochs", "expected section.key=value"),
                         ("train=1", "expected section.key=value"), ("data=1", "expected section.key=value"),
                         ("train.epochs=[1", "not valid YAML"), ("optim.lr_schedule=[[1, 1e-3]]", "start at epoch 0"),
                         ("optim.lr_schedule=[[0, 1e-3], [0, 1e-4]]", "must increase")]:
        with pytest.raises(ConfigError, match=pattern):
            load_config("resnet50", [bad])
    with pytest.raises(ConfigError, match=r"unknown config key 'optim.x'"):
        apply_override(load_config("demo"), "optim.x.y=1")


def test_resolved_config_round_trips_through_yaml():
    cfg = load_config("resnet50", ["train.epochs=11.5", "optim.warmup_epochs=0.5"])
    again = from_dict(yaml.safe_load(dump_yaml(cfg)))
    assert again == cfg


def test_fractional_epochs():
    cfg = load_config("resnet50", ["train.epochs=11.5"])
    assert cfg.train.epochs == 11.5
    s = StepSchedule(cfg.optim.lr_schedule, steps_per_epoch=1000)
    assert s.total_steps(cfg.train.epochs) == 11500
    assert StepSchedule([[0, 1.0]], steps_per_epoch=7).total_steps(2.5) == round(17.5)


def test_seed_schedule_matches_the_1st_place_table():
    """3e-4, then 1e-4 after epoch 7, 5e-5 after 9, 1e-5 after 11 (the recipe's own table)."""
    spe = 1000
    s = StepSchedule(load_config("resnet50").optim.lr_schedule, steps_per_epoch=spe)
    table = {0: 3e-4, 1: 3e-4, 7 * spe - 1: 3e-4, 7 * spe: 1e-4, 9 * spe - 1: 1e-4, 9 * spe: 5e-5,
             11 * spe - 1: 5e-5, 11 * spe: 1e-5, 11500 - 1: 1e-5}
    for step, lr in table.items():
        assert s.lr_at(step) == lr, step
    # every recipe of the seed family carries the same table
    for name in ["resnet34", "resnet101", "resnet152", "inception_resnet_v2", "inception_v4", "densenet161",
                 "densenet169", "dpn92"]:
        assert load_config(name).optim.lr_schedule == load_config("resnet50").optim.lr_schedule, name


def test_fractional_schedule_boundaries_and_warmup():
    s = StepSchedule([[0, 1e-3], [1.5, 1e-4]], steps_per_epoch=10, warmup_epochs=0.5, warmup_start=0.2)
    assert s.warmup_steps == 5
    assert s.lr_at(0) == pytest.approx(0.2e-3)
    assert [s.lr_at(i) for i in range(5)] == sorted(s.lr_at(i) for i in range(5))
    assert s.lr_at(5) == 1e-3 and s.lr_at(14) == 1e-3 and s.lr_at(15) == 1e-4
    assert all(math.isfinite(s.lr_at(i)) for i in range(100))


def test_readme_recipe_log_states_the_demo_schedule():
    """train/README.md's row of the demo recipe says the recipe's schedule (the recipe is the truth)."""
    import os

    readme = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "train",
                               "README.md")).read()
    row = next(line for line in readme.splitlines() if line.startswith("| `demo` |"))

    def num(x):  # 6e-4, 2e-3: how the recipe log writes an lr
        return f"{x:.0e}".replace("e-0", "e-")

    cfg = load_config("demo")
    (_, first), *later = cfg.optim.lr_schedule
    want = [f"warm-up {cfg.optim.warmup_epochs:g}", num(first), *(f"{num(lr)} after {e:g}" for e, lr in later),
            f"{cfg.train.epochs:g} epochs", f"resized to {cfg.data.image_size}", f"{cfg.data.crop} crops"]
    for text in want:
        assert text in row, (text, row)
