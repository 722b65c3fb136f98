"""models/: registry, 1st-place heads on timm trunks, local pretrained loading. CPU only, small C."""
import pickle

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from timm.models.resnet import ResNet

from models import create_model, list_models, load_pretrained, param_groups, register_model
from models.trunks import TINY_ARGS

C = 8  # small class count: the heads' cost grows with C^2
FIRST_PLACE = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "inception_resnet_v2",
               "inception_v4", "densenet161", "densenet169", "dpn92"]
HEAD_KEYS = ("layer5", "fc_p1", "fc_p1_bn", "fc")
CL = torch.channels_last


def _count(model):
    return sum(p.numel() for p in model.parameters())


def _randomize_bn(model, seed=0):
    """Non-trivial BatchNorm statistics and affine values, so eval-mode comparisons mean something."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.1)


def _timm_reference(name):
    """The timm classifier (ImageNet-shaped, 1,000 classes) that the trunk of `name` comes from."""
    if name == "tiny":
        return ResNet(num_classes=1000, **TINY_ARGS)
    return timm.create_model(name, pretrained=False, num_classes=1000)


# --- registry ---------------------------------------------------------------------------------------------

def test_registry_lists_the_solution_models():
    assert set(FIRST_PLACE + ["tiny", "resnet10t"]) <= set(list_models())
    assert list_models() == sorted(list_models())


def test_duplicate_name_is_an_error():
    with pytest.raises(ValueError, match="already registered"):
        @register_model
        def tiny(num_classes, head="first", **kw):
            raise AssertionError("never built")
    assert create_model("tiny", C).fc.out_features == C  # the original entry survives


def test_unknown_name_lists_known_ones():
    with pytest.raises(ValueError) as err:
        create_model("resnet51", C)
    assert "resnet51" in str(err.value) and "resnet50" in str(err.value) and "dpn92" in str(err.value)


def test_unknown_head_and_wrong_keywords_are_errors():
    with pytest.raises(ValueError, match="unknown head"):
        create_model("tiny", C, head="mlp")
    with pytest.raises(TypeError):
        create_model("tiny", C, vgg_width=64)  # a vgg keyword for the first-place head
    with pytest.raises(ValueError, match="num_classes"):
        create_model("tiny", 0)
    with pytest.raises(TypeError, match="local checkpoint"):
        create_model("tiny", C, pretrained=True)  # no hub downloads, only paths


# --- every registered model: trunk == timm's forward_features, ImageNet weights load, train step ---------

@pytest.mark.parametrize("name", list_models())
def test_model_trunk_imagenet_load_and_train_step(name, tmp_path, capsys):
    torch.manual_seed(0)
    model = create_model(name, C)
    assert model.default_cfg["head"] == "first" and model.num_classes == C
    assert tuple(model.state_dict())[-1].startswith("fc.")  # the head comes last, after the trunk

    # An ImageNet-shaped checkpoint of the timm trunk: the trunk loads whole, the head is reported.
    ref = _timm_reference(name).eval()
    _randomize_bn(ref)
    path = tmp_path / "imagenet.safetensors"
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    report = load_pretrained(model, path)
    trunk_keys = [k for k in model.state_dict() if k.split(".")[0] in model.trunk_names]
    assert sorted(report["loaded"]) == sorted(trunk_keys)
    left = [k for k in model.state_dict() if k not in report["loaded"] and not k.endswith("num_batches_tracked")]
    assert {k.split(".")[0] for k in left} == set(HEAD_KEYS)  # the whole head, nothing of the trunk
    assert set(left) == set(report["missing"]) | {s.split(":")[0] for s in report["shape_mismatch"]}
    assert {k.split(":")[0] for k in report["shape_mismatch"] + report["unexpected"]} == \
        {k for k in ref.state_dict() if k not in trunk_keys}  # the ImageNet classifier, nothing else
    assert "missing" in capsys.readouterr().out

    # The trunk's modules, applied in order, are timm's forward_features (inception trunks need >= 75 px).
    model.eval()
    with torch.no_grad():
        x = torch.randn(1, 3, 80, 96)
        torch.testing.assert_close(model.forward_features(x), ref.forward_features(x), rtol=1e-4, atol=1e-4)
    del ref

    # Train step at 160x160 in channels_last, then a tiled 320x320 product in eval mode.
    model.train().to(memory_format=CL)
    x = torch.randn(2, 3, 160, 160).contiguous(memory_format=CL)
    out = model(x)
    assert out.shape == (2, C) and torch.isfinite(out).all()
    F.cross_entropy(out, torch.tensor([1, 5])).backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not no_grad, f"parameters without a finite gradient: {no_grad[:5]}"
    assert model.fc.weight.grad.abs().sum() > 0
    first = next(p for n, p in model.named_parameters() if n.split(".")[0] == model.trunk_names[0])
    assert first.grad.abs().sum() > 0  # the gradient reaches the stem
    model.eval()
    with torch.inference_mode():
        tiled = model(torch.randn(1, 3, 320, 320).contiguous(memory_format=CL))
    assert tiled.shape == (1, C) and torch.isfinite(tiled).all()


@pytest.mark.parametrize("h, w", [(180, 180), (160, 320), (160, 480), (320, 320), (96, 96)])
def test_any_input_size(h, w):
    model = create_model("tiny", C).eval()
    with torch.inference_mode():
        assert model(torch.randn(2, 3, h, w)).shape == (2, C)


# --- resnet50 with the competition's 5,270 classes ----------------------------------------------------------

@pytest.fixture(scope="module")
def resnet50_5270():
    torch.manual_seed(0)
    return create_model("resnet50", 5270)


def test_resnet50_parameter_count_and_keys(resnet50_5270):
    sd = resnet50_5270.state_dict()
    assert _count(resnet50_5270) == 89_878_412
    tv = torchvision.models.resnet50(weights=None).state_dict()
    trunk = {k: tuple(v.shape) for k, v in tv.items() if not k.startswith("fc.")}
    head = {
        "layer5.0.weight": (5270, 2048, 1, 1),  # the 1x1 conv, no bias
        "layer5.1.weight": (5270,), "layer5.1.bias": (5270,), "layer5.1.running_mean": (5270,),
        "layer5.1.running_var": (5270,), "layer5.1.num_batches_tracked": (),
        "fc_p1.weight": (5270, 5270), "fc_p1.bias": (5270,),
        "fc_p1_bn.weight": (5270,), "fc_p1_bn.bias": (5270,), "fc_p1_bn.running_mean": (5270,),
        "fc_p1_bn.running_var": (5270,), "fc_p1_bn.num_batches_tracked": (),
        "fc.weight": (5270, 5270), "fc.bias": (5270,),
    }
    assert {k: tuple(v.shape) for k, v in sd.items()} == {**trunk, **head}
    assert list(sd)[:2] == ["conv1.weight", "bn1.weight"] and list(sd)[-2:] == ["fc.weight", "fc.bias"]
    assert resnet50_5270.trunk_channels == 2048


class TorchvisionFirstPlace(torchvision.models.ResNet):
    """An independent 1st-place ResNet-50: torchvision's trunk and the head written out by hand."""

    def __init__(self, num_classes):
        super().__init__(torchvision.models.resnet.Bottleneck, [3, 4, 6, 3])
        self.layer5 = nn.Sequential(nn.Conv2d(2048, num_classes, kernel_size=1, bias=False),
                                    nn.BatchNorm2d(num_classes), nn.ReLU())
        self.fc_p1 = nn.Linear(num_classes, num_classes)
        self.fc_p1_bn = nn.BatchNorm1d(num_classes)
        self.fc = nn.Linear(num_classes, num_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.layer5(x)
        x = self.avgpool(x).view(x.size(0), -1)
        x = F.relu(self.fc_p1_bn(self.fc_p1(x)))
        return self.fc(x)


def test_independent_first_place_checkpoint_loads_strictly(resnet50_5270, tmp_path, capsys):
    torch.manual_seed(1)
    ref = TorchvisionFirstPlace(5270).eval()
    _randomize_bn(ref)
    path = tmp_path / "first_place.pth"
    torch.save({"epoch": 11, "state_dict": ref.state_dict()}, path)

    model = resnet50_5270.eval()
    model.load_state_dict(torch.load(path, weights_only=True)["state_dict"], strict=True)
    x = torch.randn(2, 3, 160, 160)
    with torch.inference_mode():
        expected, got = ref(x), model(x)
    assert (expected - got).abs().max() < 1e-4
    assert expected.std() > 0.01  # not a trivially flat output

    report = load_pretrained(model, path)  # the same file through load_pretrained: everything fits
    assert len(report["loaded"]) == len(model.state_dict())
    assert not (report["missing"] or report["unexpected"] or report["shape_mismatch"] or report["skipped"])
    out = capsys.readouterr().out
    assert "loaded 333/333 tensors; missing 0, unexpected 0, shape mismatch 0, skipped 0" in out


# --- load_pretrained ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def torchvision_imagenet(tmp_path_factory):
    """An ImageNet-shaped torchvision resnet50 state_dict (random values, no download)."""
    torch.manual_seed(2)
    sd = torchvision.models.resnet50(weights=None).state_dict()
    path = tmp_path_factory.mktemp("tv") / "resnet50_imagenet.pth"
    torch.save(sd, path)
    return path, sd


def test_load_pretrained_torchvision_imagenet(torchvision_imagenet, capsys):
    path, tv = torchvision_imagenet
    torch.manual_seed(3)
    model = create_model("resnet50", C)
    head_before = {k: v.clone() for k, v in model.state_dict().items() if k.split(".")[0] in HEAD_KEYS}
    report = load_pretrained(model, path)
    sd = model.state_dict()

    trunk_keys = [k for k in tv if not k.startswith("fc.")]
    assert sorted(report["loaded"]) == sorted(trunk_keys)
    assert all(torch.equal(sd[k], tv[k]) for k in trunk_keys)
    assert sorted(report["shape_mismatch"]) == ["fc.bias: checkpoint (1000,), model (8,)",
                                                "fc.weight: checkpoint (1000, 2048), model (8, 8)"]
    assert sorted(report["missing"]) == sorted(k for k in head_before if not k.startswith("fc.")
                                               and not k.endswith("num_batches_tracked"))
    assert report["unexpected"] == [] and report["skipped"] == []
    assert all(torch.equal(sd[k], v) for k, v in head_before.items())  # the new head keeps its init
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert f"loaded {len(trunk_keys)}/{len(sd)} tensors; missing 11, unexpected 0, shape mismatch 2" in line
    assert "fc, fc_p1, fc_p1_bn, layer5" in line


def test_create_model_pretrained_loads_trunk_and_skips_head(torchvision_imagenet, capsys):
    path, tv = torchvision_imagenet
    torch.manual_seed(4)
    fresh = create_model("resnet50", C).state_dict()
    torch.manual_seed(4)
    sd = create_model("resnet50", C, pretrained=str(path)).state_dict()
    assert all(torch.equal(sd[k], tv[k]) for k in tv if not k.startswith("fc."))
    assert all(torch.equal(sd[k], fresh[k]) for k in sd if k.split(".")[0] in HEAD_KEYS)
    # the head is skipped by name (the ImageNet fc.weight/bias and the model's 11 new head tensors, BN
    # counters aside), not by luck of shape
    out = capsys.readouterr().out
    assert "loaded 318/333 tensors; missing 0, unexpected 0, shape mismatch 0, skipped 13" in out


@pytest.fixture(scope="module")
def tiny_state(tmp_path_factory):
    torch.manual_seed(5)
    return create_model("tiny", C).state_dict(), tmp_path_factory.mktemp("ckpt")


@pytest.mark.parametrize("fmt", ["plain.pth", "state_dict.pt", "model.pth", "ddp.pth", "compiled.pt",
                                 "plain.safetensors"])
def test_load_pretrained_formats(tiny_state, fmt):
    sd, folder = tiny_state
    path = folder / fmt
    wrapped = {
        "plain.pth": sd, "state_dict.pt": {"state_dict": sd, "epoch": 3}, "model.pth": {"model": sd, "step": 7},
        "ddp.pth": {"module." + k: v for k, v in sd.items()},
        "compiled.pt": {"model": {"_orig_mod." + k: v for k, v in sd.items()}},
    }
    if fmt.endswith(".safetensors"):
        from safetensors.torch import save_file
        save_file(sd, str(path))
    else:
        torch.save(wrapped[fmt], path)
    torch.manual_seed(6)
    model = create_model("tiny", C)
    report = load_pretrained(model, path)
    assert len(report["loaded"]) == len(sd) and not report["missing"]
    assert all(torch.equal(model.state_dict()[k], v) for k, v in sd.items())


class NotAWeight:
    """An arbitrary pickled object: what weights_only=True must refuse to unpickle."""


def test_load_pretrained_skip_and_errors(tiny_state, tmp_path):
    sd, _ = tiny_state
    path = tmp_path / "tiny.pth"
    torch.save(sd, path)
    model = create_model("tiny", C)
    report = load_pretrained(model, path, skip=("fc",))  # "fc" is fc.*, not fc_p1.*
    assert sorted(report["skipped"]) == ["fc.bias", "fc.weight"]
    assert "fc_p1.weight" in report["loaded"]

    with pytest.raises(FileNotFoundError, match="local files only"):
        load_pretrained(model, tmp_path / "absent.pth")
    torch.save({"conv9.weight": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="none of its 1 tensors"):
        load_pretrained(model, tmp_path / "other.pth")
    (tmp_path / "w.h5").write_bytes(b"")
    with pytest.raises(ValueError, match="unknown checkpoint type"):
        load_pretrained(model, tmp_path / "w.h5")
    torch.save({"state_dict": sd, "extra": NotAWeight()}, tmp_path / "pickled.pth")
    with pytest.raises(pickle.UnpicklingError):  # weights_only=True refuses arbitrary objects
        load_pretrained(model, tmp_path / "pickled.pth")


# --- heads, parameter groups, channels_last + compile --------------------------------------------------

@pytest.mark.parametrize("name", ["tiny", "resnet18"])
@pytest.mark.parametrize("head, keys", [("vgg", ("fc6", "fc7", "head_drop", "fc")), ("linear", ("fc",))])
def test_other_heads(name, head, keys):
    model = create_model(name, C, head=head, vgg_width=32) if head == "vgg" else create_model(name, C, head=head)
    assert model.head_names == keys
    out = model.to(memory_format=CL)(torch.randn(2, 3, 160, 160).contiguous(memory_format=CL))
    assert out.shape == (2, C)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    if head == "vgg":
        assert model.fc6.out_features == 32 and model.fc.in_features == 32
        assert create_model("tiny", C, head="vgg").fc7.weight.shape == (4096, 4096)  # the default, as VGG


def test_param_groups_split_trunk_and_head():
    model = create_model("tiny", C)
    groups = param_groups(model)
    new = {id(p) for p in groups["new"]}
    pre = {id(p) for p in groups["pretrained"]}
    assert not new & pre and new | pre == {id(p) for p in model.parameters()}
    assert new == {id(p) for n, p in model.named_parameters() if n.split(".")[0] in HEAD_KEYS}
    assert len(groups["pretrained"]) > 0
    torch.optim.Adam([{"params": groups["pretrained"], "lr": 1e-4}, {"params": groups["new"], "lr": 3e-4}])


def test_inception_resnet_v2_wide():
    model = create_model("inception_resnet_v2", C, wide=True)
    assert model.trunk_channels == 4096 and model.conv2d_7b.conv.weight.shape == (4096, 2080, 1, 1)
    assert model.layer5[0].weight.shape == (C, 4096, 1, 1)
    assert "conv2d_7b" in model.new_names  # not pretrained: its ImageNet weights have 1536 channels
    new = {id(p) for p in param_groups(model)["new"]}
    assert id(model.conv2d_7b.conv.weight) in new
    model.eval()
    with torch.inference_mode():
        assert model(torch.randn(1, 3, 96, 96)).shape == (1, C)


# --- input: uint8 NHWC pixels, normalized inside the model with the trunk's own mean and std -------------------

def _normalized(pixels: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W), written out independently of models/."""
    x = pixels.double().permute(0, 3, 1, 2) / 255.0
    return ((x - torch.tensor(mean, dtype=torch.float64).view(1, 3, 1, 1))
            / torch.tensor(std, dtype=torch.float64).view(1, 3, 1, 1)).float()


@pytest.mark.parametrize("name", ["tiny", "inception_v4", "dpn92", "densenet169"])
def test_input_normalized_with_the_trunks_pretrained_mean_and_std(name):
    model = create_model(name, C)
    if name == "tiny":  # no ImageNet weights: the usual ImageNet values
        mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    else:  # what timm says its ImageNet weights were trained with (Inception: 0.5, DPN: its own)
        cfg = timm.create_model(name, pretrained=False).pretrained_cfg
        mean, std = cfg["mean"], cfg["std"]
    assert model.default_cfg["mean"] == tuple(mean) and model.default_cfg["std"] == tuple(std)
    pixels = torch.randint(0, 256, (2, 40, 56, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    x = model.prepare_input(pixels)
    assert x.shape == (2, 3, 40, 56) and x.dtype == torch.float32 and x.is_contiguous()
    torch.testing.assert_close(x, _normalized(pixels, mean, std), rtol=1e-5, atol=1e-5)
    model.to(memory_format=CL)  # the input follows the stem's memory format: a view of the NHWC pixels
    assert model.prepare_input(pixels).is_contiguous(memory_format=CL)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast's dtype, cast once in the same step
        assert model.prepare_input(pixels).dtype == torch.bfloat16
    floats = torch.randn(2, 3, 8, 8)
    assert model.prepare_input(floats) is floats  # already normalized: passed through
    with pytest.raises(ValueError, match="uint8"):
        model.prepare_input(pixels.permute(0, 3, 1, 2).contiguous())  # uint8 NCHW is not the contract
    assert not [k for k in model.state_dict() if k.startswith("input_")]  # checkpoint keys unchanged


def test_uint8_forward_equals_normalized_forward_and_old_checkpoints_load():
    torch.manual_seed(8)
    model = create_model("tiny", C)
    _randomize_bn(model)
    model.eval()
    pixels = torch.randint(0, 256, (2, 64, 64, 3), dtype=torch.uint8)
    with torch.no_grad():
        got = model(pixels)
        want = model.forward_head(model.forward_features(_normalized(pixels, (0.485, 0.456, 0.406),
                                                                         (0.229, 0.224, 0.225))))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    other = create_model("tiny", C)  # a state dict without the normalization buffers loads strictly
    other.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(other.eval()(pixels), got)


def test_channels_last_and_compile_match_eager(tmp_path):
    torch.manual_seed(7)
    model = create_model("tiny", C)
    _randomize_bn(model)
    model.eval()
    x = torch.randint(0, 256, (2, 96, 96, 3), dtype=torch.uint8)  # the loader's pixels
    with torch.no_grad():
        expected = model(x)
        model.to(memory_format=CL)
        torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-4)
    # aot_eager traces forward and backward like inductor does, without the C++ build time; fullgraph: the
    # normalization is in the graph, without a break
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), expected, rtol=1e-4, atol=1e-4)
    compiled.train()
    compiled(x).sum().backward()
    assert model.fc.weight.grad is not None
    # a compiled model still loads and groups as the plain one (its keys carry _orig_mod.)
    torch.save(model.state_dict(), tmp_path / "tiny.pth")
    assert not load_pretrained(compiled, tmp_path / "tiny.pth")["missing"]
    assert len(param_groups(compiled)["new"]) == len(param_groups(model)["new"])


# --- GPU: torch.compile (inductor) + channels_last + bf16 autocast ----------------------------------------------

def _compile_check(name):
    """One compiled bf16 channels_last training step on uint8 pixels (finite loss and gradients), then the
    compiled forward against the eager one in eval mode, both under autocast. Eval mode: in train mode the
    head's BatchNorm1d normalizes 8 near-identical features of a freshly initialized trunk, which turns bf16
    rounding into differences of order one (seen on inception_v4, 1.16 relative L2), whatever the compiler."""
    torch.manual_seed(0)
    model = create_model(name, C).cuda().to(memory_format=CL)
    compiled = torch.compile(model)
    x = torch.randint(0, 256, (8, 160, 160, 3), dtype=torch.uint8, device="cuda")
    y = torch.arange(8, device="cuda") % C
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = F.cross_entropy(compiled(x).float(), y)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters())
    model.eval()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        out, ref = compiled(x), model(x)
    rel = float((out.float() - ref.float()).norm() / ref.float().norm())
    assert rel < 0.05, f"{name}: compiled vs eager logits differ by {rel:.3f} (relative L2)"


@pytest.mark.gpu  # skipped without CUDA by tests/conftest.py; resnet50 and one trunk of another family
@pytest.mark.gpu_timeout(240)  # inductor compiles forward and backward
@pytest.mark.parametrize("name", ["resnet50", "inception_v4"])
def test_compile_channels_last_bf16_on_gpu(name):
    _compile_check(name)


@pytest.mark.gpu_slow  # every registered model: minutes of inductor compilation; run with -m gpu_slow
@pytest.mark.gpu_timeout(900)
@pytest.mark.parametrize("name", list_models())
def test_compile_every_model_on_gpu(name):
    _compile_check(name)
