"""The resume rules (``train.resume``): checked on plain data without a model, then one real resume on the
synthetic backend whose changed optimizer settings must reach the restored optimizer."""
import copy

import pytest
import torch

from tests.test_train_distributed import _cfg
from train.checkpoint import CheckpointError
from train.config import Config, to_dict
from train.resume import optimizer_state, plan_resume, scaler_state

PATH = "RUN/last.pt"


def _plan(old, new, step=20, spe=10, saved_ws=1, ws=1):
    return plan_resume(old, new, step=step, steps_per_epoch=spe, saved_world_size=saved_ws, world_size=ws, path=PATH)


def _changed(**keys):
    new = to_dict(Config())
    for key, value in keys.items():
        section, name = key.split("__")
        new[section][name] = value
    return new


def test_resume_rules_on_plain_data():
    old = to_dict(Config())
    plan = _plan(old, _changed(optim__new_lr_mult=10.0, optim__weight_decay=1e-4, train__epochs=14.0,
                               train__init_from="other.pt"))
    assert plan.changes == ["optim.new_lr_mult 1.0 -> 10.0 (set on the restored optimizer)",
                            "optim.weight_decay 0.0 -> 0.0001 (set on the restored optimizer)",
                            "train.epochs 11.5 -> 14.0",
                            "train.init_from None -> 'other.pt' (not read: the run resumes from its checkpoint's weights)"]
    assert plan.same_world and plan.notes == [] and plan.loader_state(["s0"], 0) == "s0"
    assert _plan(old, copy.deepcopy(old)).changes == []
    older = copy.deepcopy(old)  # a checkpoint from before these keys: their defaults
    del older["model"]["aux_levels"], older["optim"]["aux_weight"]
    assert _plan(older, old).changes == []

    # another model: refused, naming the key, before anything is built
    for key, value in (("model__name", "tiny"), ("model__head", "vgg"), ("model__aux_levels", [1])):
        with pytest.raises(CheckpointError, match=rf"{key.replace('__', '.')} .* -> {value!r}".replace("[", r"\[")):
            _plan(old, _changed(**{key: value}))

    # another process count: fresh readers from an epoch end, refused mid-epoch
    plan = _plan(old, old, ws=2)
    assert not plan.same_world and plan.loader_state(["s0"], 1) is None
    assert plan.notes == ["1 -> 2 processes: the next epoch starts with fresh readers"]
    with pytest.raises(CheckpointError, match=r"stopped mid-epoch \(step 25\).*1 -> 2 processes.*--nproc 1"):
        _plan(old, old, step=25, ws=2)

    # a reader position the loader refused: the same rule
    assert "fresh readers" in _plan(old, old).reader_mismatch("data.seed: saved 1, now 2")
    with pytest.raises(CheckpointError, match=r"mid-epoch.*data.seed: saved 1, now 2.*train.init_from=RUN/last.pt"):
        _plan(old, old, step=25).reader_mismatch("data.seed: saved 1, now 2")

    # steps in the new steps per epoch: the same epoch count; the best step scaled; TensorBoard elsewhere
    units = _plan(old, old).units(5, best_step=12, tb_dir="tb")
    assert (units.step, units.best_step, units.scale, units.tb_dir) == (10, 6, 0.5, "tb_from_epoch2_5spe")
    assert "10 -> 5 steps per epoch: step 20 is step 10 now" in units.note
    assert _plan(old, old).units(10, best_step=12, tb_dir="tb") == (20, 12, None, "tb", None)
    assert _plan(old, old).units(5, best_step=-1, tb_dir="tb").best_step == -1


def test_optimizer_and_scaler_state_on_plain_data():
    def groups(mult, wd):
        return [{"name": "pretrained", "params": [0, 1], "lr_mult": 1.0, "weight_decay": wd, "betas": (0.9, 0.999)},
                {"name": "new", "params": [2], "lr_mult": mult, "weight_decay": wd, "betas": (0.9, 0.999)}]

    saved = {"state": {0: {"step": 7}}, "param_groups": groups(1.0, 0.0)}
    fresh = {"state": {}, "param_groups": groups(10.0, 1e-4)}
    got = optimizer_state(saved, fresh, PATH)
    assert got["state"] == {0: {"step": 7}}  # Adam's moments and steps: the checkpoint's
    assert got["param_groups"] == groups(10.0, 1e-4)  # the settings: this run's
    with pytest.raises(CheckpointError, match=r"param groups .*do not match"):
        optimizer_state(saved, {"state": {}, "param_groups": groups(1.0, 0.0)[:1]}, PATH)

    assert scaler_state({}, fp16=True) is None  # fp16 now, not before: a fresh scaler
    assert scaler_state({}, fp16=False) == {} and scaler_state({"scale": 8.0}, fp16=True) == {"scale": 8.0}


def test_a_resumed_run_applies_changed_optimizer_settings(tmp_path):
    from models import param_groups
    from train.distributed import Dist
    from train.train import Trainer

    run = str(tmp_path / "RUN")
    optim = {"lr_schedule": [[0, 1e-3]], "eps": 1e-12, "fused": False}
    tr = Trainer(_cfg(tmp_path, optim=optim, train={"epochs": 3}), run, Dist())
    tr.run_steps(3, housekeeping=False)
    tr.save("running")
    tr.close()

    def one_step(**changed):
        t = Trainer(_cfg(tmp_path, optim=dict(optim, **changed), train={"epochs": 3}), run, Dist())
        before = [p.detach().clone() for p in t.raw.parameters()]
        t.run_steps(1, housekeeping=False)
        moves = {id(p): (p.detach() - b) for p, b in zip(t.raw.parameters(), before)}
        groups = {g["name"]: g for g in t.opt.param_groups}
        line = t._start_line()
        out = {name: torch.cat([moves[id(p)].flatten() for p in ps]) for name, ps in param_groups(t.raw).items()}
        t.close()
        return out, groups, line

    same, _, line = one_step()
    assert "changed since" not in line and "lr 1.00e-03," in line
    changed, groups, line = one_step(new_lr_mult=10.0, weight_decay=1e-2)
    assert groups["new"]["lr_mult"] == 10.0 and groups["pretrained"]["weight_decay"] == 1e-2
    assert "lr 1.00e-03 x10 new" in line
    assert "optim.new_lr_mult 1.0 -> 10.0" in line and "optim.weight_decay 0.0 -> 0.01" in line
    # From the same checkpoint (weights, Adam moments, RNG, batch), one step: the weight decay changes the
    # gradient of every parameter; the head's multiplier scales its update on top.
    assert not torch.allclose(changed["pretrained"], same["pretrained"])
    wd_only, _, _ = one_step(weight_decay=1e-2)
    assert torch.allclose(changed["new"], 10 * wd_only["new"], rtol=1e-2, atol=1e-7)  # float32 differences of weights
    assert torch.equal(changed["pretrained"], wd_only["pretrained"])

    # fp16 now, not before: the scaler starts fresh instead of failing on the empty saved one
    t = Trainer(_cfg(tmp_path, optim=optim, train={"epochs": 3, "amp": "fp16"}), run, Dist())
    assert t.scaler.is_enabled() and t.step == 3
    t.close()
