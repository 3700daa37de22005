"""Checkpoints as the training config saves them: loading them, and telling them apart."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import nn


def weights_digest(path: Path) -> str:
    """First 12 hex digits of the checkpoint's SHA-256: outputs of other weights get other UIDs."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:12]


def load_checkpoint(network: nn.Module, path: str | Path) -> None:
    """Load a checkpoint saved by the training config (a bare state dict, or one under "model")."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path} (train first, or pass --ckpt_path)")
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("model", state) if isinstance(state, dict) else state
    network.load_state_dict(state)
