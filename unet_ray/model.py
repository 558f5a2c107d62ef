"""The UNet of the tutorial, with depth, width, block and upsampling as parameters.

Down path: two 3x3 convs with LeakyReLU per level (optionally with an identity shortcut: a
residual block), then 2x max-pool. Up path: 2x upsampling (transposed conv, or bilinear + 1x1
conv), concatenate the skip connection of the same level, two 3x3 convs. A 1x1 conv head gives one
logit per pixel for the binary road task or C logits for C classes.

Deep supervision (optional, training only): a 1x1 head on each coarser decoder level as well, whose
loss (losses.deep_supervision_loss) gives the lower levels a direct training signal. The heads are
never used for predictions; a model for inference is built without them (`aux_heads=False`).
"""

from __future__ import annotations

import torch
from torch import nn


class DoubleConv(nn.Sequential):
    """(N, in, H, W) -> (N, out, H, W): two 3x3 convs, each with optional BatchNorm and LeakyReLU."""

    def __init__(self, in_ch: int, out_ch: int, batch_norm: bool):
        layers: list[nn.Module] = []
        for c_in in (in_ch, out_ch):
            layers.append(nn.Conv2d(c_in, out_ch, 3, padding=1, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm2d(out_ch))
            layers.append(nn.LeakyReLU(0.1, inplace=True))
        super().__init__(*layers)


class ResidualDoubleConv(nn.Module):
    """(N, in, H, W) -> (N, out, H, W): DoubleConv plus a shortcut (identity, or a 1x1 conv when
    the width changes), as in ResNet: gradients reach early layers through the sum."""

    def __init__(self, in_ch: int, out_ch: int, batch_norm: bool):
        super().__init__()
        self.body = DoubleConv(in_ch, out_ch, batch_norm)
        self.shortcut = nn.Identity() if in_ch == out_ch else nn.Conv2d(in_ch, out_ch, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + self.shortcut(x)


BLOCKS = {"plain": DoubleConv, "residual": ResidualDoubleConv}


class Down(nn.Sequential):
    """(N, in, H, W) -> (N, out, H/2, W/2): max-pool, then the level's conv block."""

    def __init__(self, in_ch: int, out_ch: int, batch_norm: bool, block: type[nn.Module] = DoubleConv):
        super().__init__(nn.MaxPool2d(2), block(in_ch, out_ch, batch_norm))


def upsampler(in_ch: int, kind: str) -> nn.Module:
    """(N, in, H, W) -> (N, in/2, 2H, 2W): a learned 2x2 transposed conv, or bilinear 2x then a
    1x1 conv (no checkerboard pattern, fewer weights)."""
    if kind == "transpose":
        return nn.ConvTranspose2d(in_ch, in_ch // 2, kernel_size=2, stride=2)
    if kind == "bilinear":
        return nn.Sequential(
            nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False), nn.Conv2d(in_ch, in_ch // 2, 1)
        )
    raise ValueError(f"unknown upsampling {kind!r}; choose transpose or bilinear")


class Up(nn.Module):
    """(N, in, H, W) + skip (N, in/2, 2H, 2W) -> (N, out, 2H, 2W): upsample, concat, conv block."""

    def __init__(
        self, in_ch: int, out_ch: int, batch_norm: bool, block: type[nn.Module] = DoubleConv, upsample: str = "transpose"
    ):
        super().__init__()
        self.up = upsampler(in_ch, upsample)
        self.conv = block(in_ch // 2 + out_ch, out_ch, batch_norm)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([skip, self.up(x)], dim=1))


class UNet(nn.Module):
    """(N, 3, H, W) float image -> (N, K, H, W) logits; K = 1 for road, else the number of classes."""

    def __init__(
        self,
        num_classes: int = 2,
        depth: int = 4,
        base_channels: int = 16,
        batch_norm: bool = True,
        block: str = "plain",
        upsample: str = "transpose",
        aux_heads: bool = False,
    ):
        super().__init__()
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        if block not in BLOCKS:
            raise ValueError(f"unknown block {block!r}; choose one of {', '.join(BLOCKS)}")
        conv = BLOCKS[block]
        widths = [base_channels * 2**i for i in range(depth + 1)]
        self.depth = depth
        self.stem = conv(3, widths[0], batch_norm)
        self.downs = nn.ModuleList(Down(widths[i], widths[i + 1], batch_norm, conv) for i in range(depth))
        self.ups = nn.ModuleList(
            Up(widths[i + 1], widths[i], batch_norm, conv, upsample) for i in reversed(range(depth))
        )
        self.head = nn.Conv2d(widths[0], out_channels(num_classes), kernel_size=1)
        # one per decoder level but the last (whose head is `head`), coarsest first
        self.aux_heads = (
            nn.ModuleList(nn.Conv2d(widths[i], out_channels(num_classes), kernel_size=1) for i in reversed(range(1, depth)))
            if aux_heads
            else None
        )

    def forward(self, x: torch.Tensor, with_aux: bool = False) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """Logits (N, K, H, W); with_aux: (logits, [the aux heads' logits, coarsest first])."""
        if x.shape[-1] % 2**self.depth or x.shape[-2] % 2**self.depth:
            raise ValueError(f"input {tuple(x.shape[-2:])} is not a multiple of 2**depth={2**self.depth}")
        if with_aux and self.aux_heads is None:
            raise ValueError("with_aux=True needs a model built with aux_heads=True")
        skips = [self.stem(x)]
        for down in self.downs:
            skips.append(down(skips[-1]))
        x = skips.pop()
        aux = []
        for level, up in enumerate(self.ups):
            x = up(x, skips.pop())
            if with_aux and level < len(self.aux_heads):
                aux.append(self.aux_heads[level](x))
        logits = self.head(x)
        return (logits, aux) if with_aux else logits


def out_channels(num_classes: int) -> int:
    """Binary tasks use a single logit (BCE, as in the tutorial); more classes one logit each."""
    return 1 if num_classes == 2 else num_classes


def build_model(model_cfg, num_classes: int, aux_heads: bool = False) -> UNet:
    """UNet from a config.ModelSection; aux_heads for training with deep supervision."""
    return UNet(
        num_classes, model_cfg.depth, model_cfg.base_channels, model_cfg.batch_norm, model_cfg.block,
        model_cfg.upsample, aux_heads,
    )  # fmt: skip


def inference_weights(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A saved state dict without the deep-supervision heads, for a model built without them."""
    return {k: v for k, v in state_dict.items() if not k.startswith("aux_heads.")}


def predict_classes(logits: torch.Tensor) -> torch.Tensor:
    """(N, K, H, W) logits -> (N, H, W) class ids: sigmoid > 0.5 for one logit, argmax otherwise."""
    if logits.shape[1] == 1:
        return (logits[:, 0] > 0).long()
    return logits.argmax(1)
