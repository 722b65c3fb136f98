"""Models: one registry of timm trunks with the 1st-place heads, and local pretrained weights.

    from models import create_model, list_models, load_pretrained, param_groups
    model = create_model("resnet50", num_classes=5270, pretrained="resnet50_imagenet.pth")
"""
from .heads import AUX_HEADS, HEADS, OPTIONAL_PREFIXES, TEXT_BRANCH, Net, without_aux, without_optional
from .pretrained import load_pretrained, param_groups, read_state_dict
from .registry import create_model, list_models, register_model
from . import zoo  # noqa: F401  (registers the models)

__all__ = ["create_model", "list_models", "load_pretrained", "param_groups", "read_state_dict",
           "register_model", "Net", "HEADS", "AUX_HEADS", "OPTIONAL_PREFIXES", "TEXT_BRANCH", "without_aux",
           "without_optional"]
