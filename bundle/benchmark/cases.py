"""What is measured: a network at an input size, precision and memory format (``Setting``), and one callable
per measured thing (``Case``): SoftCAM's or the black box's forward pass, an evidence map, a training step."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from monai.bundle import ConfigParser

from bundle.explain.methods import make_explainer
from bundle.networks import classifier

ROOT = Path(__file__).resolve().parents[2]
TRAIN_CONFIG = ROOT / "configs" / "train.json"
HEADS = ("linear", "softcam")  # the black box, the reference, first
POST_HOC = {"gradcam": "Grad-CAM", "gradcampp": "Grad-CAM++", "layercam": "LayerCAM", "scorecam": "Score-CAM"}
WARM_UP_SIZE = 32  # a first call on an input this small pays the process's one-off costs (library set-up, thread pools)


@dataclass
class Setting:
    """One network and input: what every case of a setting shares. ``backbone_kwargs`` go to the MONAI
    backbone's constructor (``{"widen_factor": 0.25}``, ``{"conv1_t_stride": 2}``)."""

    backbone: str
    spatial_dims: int
    size: int
    batch_size: int = 1
    device: str = "cpu"
    amp_dtype: str | None = None  # "bfloat16" / "float16": autocast as the training config does on CUDA
    memory_format: str | None = None  # "channels_last" / "channels_last_3d"
    backbone_kwargs: dict = field(default_factory=dict)
    gpu_target: bool = False  # one of the settings the GPU targets are set for

    @property
    def label(self) -> str:
        options = "".join(f", {k} {v}" for k, v in self.backbone_kwargs.items())
        return f"{self.backbone}{options}, {self.size}^{self.spatial_dims}"

    @property
    def precision(self) -> str:
        return f"{self.amp_dtype} autocast" if self.amp_dtype else "float32"


def train_config(**overrides) -> ConfigParser:
    """configs/train.json with ``overrides`` (objects such as a network or a device are taken as they are)."""
    parser = ConfigParser()
    parser.read_config(str(TRAIN_CONFIG))
    for key, value in overrides.items():
        parser[key] = value
    return parser


def config_defaults(device: str, spatial_dims: int) -> dict:
    """What ``configs/train.json`` picks for ``device``: autocast dtype and memory format (None on CPU)."""
    parser = train_config(device=torch.device(device), spatial_dims=spatial_dims)
    dtype, memory_format = parser.get_parsed_content("amp_dtype"), parser.get_parsed_content("memory_format")
    return {"amp_dtype": str(dtype).removeprefix("torch.") if dtype else None,
            "memory_format": str(memory_format).removeprefix("torch.") if memory_format else None}


def network(setting: Setting, head: str) -> torch.nn.Module:
    """The classifier with ``head``, on the device in the memory format; the same seed gives both heads the
    same backbone weights."""
    torch.manual_seed(0)
    net = classifier(setting.backbone, spatial_dims=setting.spatial_dims, head=head, backbone_kwargs=setting.backbone_kwargs)
    return net.to(setting.device, **_memory_format(setting))


def _memory_format(setting: Setting) -> dict:
    return {"memory_format": getattr(torch, setting.memory_format)} if setting.memory_format else {}


def images(setting: Setting, count: int, size: int | None = None) -> torch.Tensor:
    """``count`` random one-channel images (count, 1, S, S[, S]) in [0, 1] on the setting's device and layout."""
    generator = torch.Generator().manual_seed(1)
    x = torch.rand((count, 1) + (size or setting.size,) * setting.spatial_dims, generator=generator)
    return x.to(setting.device).contiguous(**_memory_format(setting))


def autocast(setting: Setting):
    if not setting.amp_dtype:
        return nullcontext()
    return torch.autocast(torch.device(setting.device).type, dtype=getattr(torch, setting.amp_dtype))


@dataclass
class Case:
    """One measured thing: ``call(images)`` on ``images``; ``warm_up`` a cheap first call on a small input."""

    call: Callable[[torch.Tensor], object]
    images: torch.Tensor
    warm_up: Callable[[], object]
    network: torch.nn.Module

    @property
    def feature_channels(self) -> int:
        return self.network.features.num_features


def build_case(setting: Setting, kind: str, name: str, scorecam_images: int = 1) -> Case:
    """``kind`` "forward" / "maps" / "train"; ``name`` a head ("linear", "softcam") or an explanation method
    ("softcam", "gradcam", "gradcampp", "layercam", "scorecam"), whose maps are of the black box but for "softcam"."""
    small = images(setting, 2 if kind == "train" else 1, WARM_UP_SIZE)  # batch norm trains on 2+ values per channel
    if kind == "forward":
        net = network(setting, name).eval()
        run = net.forward_with_maps if name == "softcam" else net  # SoftCAM: logits and evidence maps; black box: logits

        def forward(x):
            with torch.inference_mode(), autocast(setting):
                return run(x)

        return Case(forward, images(setting, setting.batch_size), lambda: forward(small), net)
    if kind == "maps":
        net = network(setting, "softcam" if name == "softcam" else "linear")
        explainer = make_explainer(name, net)

        def explain(x):
            with autocast(setting):
                return explainer(x, torch.zeros(len(x), dtype=torch.long))  # a given class: the prediction is not in the cost

        # Score-CAM's warm-up is a plain forward pass: on the small input it would still run D of them
        warm_up = (lambda: net.eval()(small)) if name == "scorecam" else (lambda: explain(small))
        count = scorecam_images if name == "scorecam" else setting.batch_size
        return Case(explain, images(setting, count), warm_up, net)
    if kind == "train":
        return _training_case(setting, name, small)
    raise ValueError(f"unknown case kind {kind!r}")


def _training_case(setting: Setting, head: str, small: torch.Tensor) -> Case:
    """Forward, the training config's loss, backward and its optimiser's step (AdamW), on a batch in memory."""
    net = network(setting, head).train()
    parser = train_config(network_def=net, network=net, head=head, device=torch.device(setting.device))
    loss_function, optimizer = parser.get_parsed_content("loss"), parser.get_parsed_content("optimizer")
    scaler = torch.amp.GradScaler(torch.device(setting.device).type, enabled=setting.amp_dtype == "float16")

    def step(x):
        optimizer.zero_grad(set_to_none=True)
        with autocast(setting):
            loss = loss_function(net(x), (torch.arange(len(x)) % 2).to(x.device))
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    return Case(step, images(setting, setting.batch_size), lambda: step(small), net)


def model_flops(setting: Setting) -> dict:
    """Floating-point operations per image of SoftCAM's forward pass (logits and evidence maps), of a training
    step's forward and backward passes and of the SoftCAM head alone, and the feature map's size (torch's
    ``FlopCounterMode`` on the meta device: shapes only, nothing computed; two images, as batch norm needs
    two values per channel to train, the counts halved)."""
    from torch.utils.flop_counter import FlopCounterMode

    net = classifier(setting.backbone, spatial_dims=setting.spatial_dims, backbone_kwargs=setting.backbone_kwargs)
    net = net.to("meta")
    x = torch.empty((2, 1) + (setting.size,) * setting.spatial_dims, device="meta")
    with FlopCounterMode(display=False) as forward:
        net.eval().forward_with_maps(x)
    with FlopCounterMode(display=False) as train:
        net.train()(x).sum().backward()
    with torch.no_grad():
        features = net.eval().features(x)
    with FlopCounterMode(display=False) as head:
        net.head(features)
    return {"forward": forward.get_total_flops() / 2, "train": train.get_total_flops() / 2,
            "head": head.get_total_flops() / 2, "feature_map": list(features.shape[2:])}
