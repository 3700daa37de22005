"""Make the number of image channels match what the network takes."""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform

# ITU-R BT.601 luma weights, the usual RGB -> grey conversion for medical RGB captures.
_LUMA = (0.299, 0.587, 0.114)


class MatchChannelsd(MapTransform):
    """Channel-first images (C, H, W[, D]) to ``channels`` channels.

    RGB -> 1 channel by luma; 1 channel -> N by repetition; anything else is an error naming the
    file. Run after ``EnsureChannelFirstd``.
    """

    def __init__(self, keys: KeysCollection, channels: int = 1, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.channels = channels

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            have = img.shape[0]
            if have == self.channels:
                continue
            if have == 3 and self.channels == 1:
                weights = torch.tensor(_LUMA, dtype=torch.float32).view(3, *([1] * (img.ndim - 1)))
                d[key] = (img.float() * weights).sum(dim=0, keepdim=True)
            elif have == 1:
                d[key] = img.repeat(self.channels, *([1] * (img.ndim - 1)))
            else:
                source = getattr(img, "meta", {}).get("filename_or_obj", key)
                raise ValueError(f"{source}: cannot turn {have} image channels into {self.channels}")
        return d
