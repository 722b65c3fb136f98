"""Every value that ``Config.validate``/``DataConfig.validate`` must refuse is refused, through the same path
as a recipe override (``load_config``), with the key in the message; and the values next to each limit pass.
The backend policy (``resolve_backend``) for a GPU backend without a GPU."""
import pytest
import torch

from dali_pipes.config import require_backend, resolve_backend
from train.config import ConfigError, load_config

REFUSED = [
    ("data.crop=200", "data.crop (200) is larger than data.image_size (180)"),  # image_size 180 by default
    ("data.tiled_k=5", "data.tiled_k must be 0"),
    ("data.tiled_k=-1", "data.tiled_k must be 0"),
    ("data.batch_size=0", "data.batch_size must be >= 1"),
    ("data.crop=0", "data.crop must be >= 1"),
    ("data.backend=gpu", "data.backend must be one of"),
    ("model.head=big", "model.head must be one of"),
    ("train.amp=fp8", "train.amp must be one of"),
    ("train.epochs=0", "train.epochs must be a number > 0"),
    ("train.epochs=.inf", "train.epochs must be a number > 0"),
    ("train.log_every=0", "train.log_every must be >= 1"),
    ("train.ckpt_every_steps=-1", "train.ckpt_every_steps must be >= 0"),
    ("train.max_steps=-5", "train.max_steps must be >= 0"),
    ("early_stop.metric=loss", "early_stop.metric must be one of"),
    ("optim.lr_schedule=[]", "optim.lr_schedule must be a non-empty list"),
    ("optim.lr_schedule=[[1, 1.0e-3]]", "must start at epoch 0"),
    ("optim.lr_schedule=[[0, 1.0e-3], [0, 1.0e-4]]", "epochs must increase"),
    ("optim.lr_schedule=[[0, 1.0e-3, 5]]", "[epoch, lr] pairs"),
    ("optim.betas=[0.9]", "optim.betas must be two numbers"),
    ("optim.warmup_start=0", "optim.warmup_start in (0, 1]"),
    ("optim.warmup_start=1.5", "optim.warmup_start in (0, 1]"),
    ("optim.warmup_epochs=-1", "optim.warmup_epochs must be >= 0"),
]


@pytest.mark.parametrize("override,message", REFUSED, ids=[o for o, _ in REFUSED])
def test_refused(override, message):
    with pytest.raises(ConfigError) as e:
        load_config("demo", ["data.image_size=180", override])
    assert message in str(e.value) and override in str(e.value)


ACCEPTED = ["data.crop=180", "data.tiled_k=0", "data.tiled_k=1", "data.tiled_k=4", "data.batch_size=1", "train.epochs=0.01",
            "train.ckpt_every_steps=0", "optim.warmup_start=1", "optim.lr_schedule=[[0, 1.0e-3], [0.5, 1.0e-4]]"]


@pytest.mark.parametrize("override", ACCEPTED)
def test_accepted_at_the_limit(override):
    load_config("demo", ["data.image_size=180", override])


def test_gpu_backend_without_gpu_one_policy(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    notes = []
    assert resolve_backend("dali-gpu", note=notes.append) == "dali-cpu"
    assert notes and "dali-gpu -> dali-cpu" in notes[0]
    assert resolve_backend(None) == "dali-cpu"
    assert resolve_backend("dali-cpu", note=notes.append) == "dali-cpu" and len(notes) == 1
    assert resolve_backend("synthetic") == "synthetic"
    with pytest.raises(RuntimeError, match="use data.backend=dali-cpu"):
        require_backend("dali-gpu")  # the loader does not switch behind the entry point's back
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_backend(None) == "dali-gpu" and resolve_backend("dali-gpu") == "dali-gpu"
