"""An independent PyTorch DiCo, written from the architecture description: the reference of
the parity tests and of the benchmark's PyTorch rows (needs torch).

Module names follow the official parameter names so its state_dict has the official keys.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn


def _channel_layer_norm(x, eps=1e-6):
    # LayerNorm over the channel axis of an NCHW tensor, no affine.
    return F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), eps=eps).permute(0, 3, 1, 2)


def _modulate(x, shift, scale):
    return x * (1 + scale[:, :, None, None]) + shift[:, :, None, None]


class TimeEmbed(nn.Module):
    def __init__(self, width, freq_dim=256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t):
        half = self.freq_dim // 2
        k = torch.arange(half, dtype=torch.float32)
        freqs = torch.exp(-math.log(10000.0) * k / half)
        angles = t.float()[:, None] * freqs[None]
        return self.mlp(torch.cat([torch.cos(angles), torch.sin(angles)], dim=1))


class LabelTables(nn.Module):
    def __init__(self, rows, widths):
        super().__init__()
        for i, w in enumerate(widths):
            setattr(self, f"embedding_table_{i}", nn.Embedding(rows, w))

    def forward(self, y):
        return [getattr(self, f"embedding_table_{i}")(y) for i in range(3)]


class Block(nn.Module):
    def __init__(self, d, ratio):
        super().__init__()
        hidden = int(ratio * d)
        self.conv1 = nn.Conv2d(d, d, 1)
        self.conv2 = nn.Conv2d(d, d, 3, padding=1, groups=d)
        self.conv3 = nn.Conv2d(d, d, 1)
        self.ca = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(d, d, 1), nn.Sigmoid())
        self.conv4 = nn.Conv2d(d, hidden, 1)
        self.conv5 = nn.Conv2d(hidden, d, 1)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))

    def forward(self, x, c):
        s1, sc1, g1, s2, sc2, g2 = self.adaLN_modulation(c).chunk(6, dim=1)
        h = _modulate(_channel_layer_norm(x), s1, sc1)
        h = F.gelu(self.conv2(self.conv1(h)))
        h = self.conv3(h * self.ca(h))
        x = x + g1[:, :, None, None] * h
        m = _modulate(_channel_layer_norm(x), s2, sc2)
        return x + g2[:, :, None, None] * self.conv5(F.gelu(self.conv4(m)))


class Final(nn.Module):
    def __init__(self, d, out):
        super().__init__()
        self.out_proj = nn.Conv2d(d, out, 3, padding=1)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 2 * d))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.out_proj(_modulate(_channel_layer_norm(x), shift, scale))


class Patch(nn.Module):
    def __init__(self, cin, d):
        super().__init__()
        self.proj = nn.Conv2d(cin, d, 3, padding=1)

    def forward(self, x):
        return self.proj(x)


class Resample(nn.Module):
    """3x3 conv (no bias) then PixelShuffle(2) (up) or PixelUnshuffle(2) (down)."""

    def __init__(self, cin, cout, up):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                                  nn.PixelShuffle(2) if up else nn.PixelUnshuffle(2))

    def forward(self, x):
        return self.body(x)


class TorchDiCo(nn.Module):
    def __init__(self, hidden_size, depths, mlp_ratio=2.0, in_channels=4, num_classes=1000,
                 learn_sigma=True):
        super().__init__()
        C = hidden_size
        self.x_embedder = Patch(in_channels, C)
        self.t_embedder_1 = TimeEmbed(C)
        self.y_embedder = LabelTables(num_classes + 1, (C, 2 * C, 4 * C))
        self.t_embedder_2 = TimeEmbed(2 * C)
        self.t_embedder_3 = TimeEmbed(4 * C)
        blocks = lambda d, n: nn.ModuleList([Block(d, mlp_ratio) for _ in range(n)])  # noqa: E731
        self.encoder_level_1 = blocks(C, depths[0])
        self.down1_2 = Resample(C, C // 2, up=False)
        self.encoder_level_2 = blocks(2 * C, depths[1])
        self.down2_3 = Resample(2 * C, C, up=False)
        self.latent = blocks(4 * C, depths[2])
        self.up3_2 = Resample(4 * C, 8 * C, up=True)
        self.reduce_chan_level2 = nn.Conv2d(4 * C, 2 * C, 1)
        self.decoder_level_2 = blocks(2 * C, depths[3])
        self.up2_1 = Resample(2 * C, 4 * C, up=True)
        self.reduce_chan_level1 = nn.Conv2d(2 * C, 2 * C, 1)
        self.decoder_level_1 = blocks(2 * C, depths[4])
        # As the official class: the variance channels only with learn_sigma.
        self.final_layer = Final(2 * C, 2 * in_channels if learn_sigma else in_channels)

    def forward(self, x, t, y):
        e1, e2, e3 = self.y_embedder(y)
        c1 = self.t_embedder_1(t) + e1
        c2 = self.t_embedder_2(t) + e2
        c3 = self.t_embedder_3(t) + e3
        skip1 = self.x_embedder(x)
        for b in self.encoder_level_1:
            skip1 = b(skip1, c1)
        skip2 = self.down1_2(skip1)
        for b in self.encoder_level_2:
            skip2 = b(skip2, c2)
        h = self.down2_3(skip2)
        for b in self.latent:
            h = b(h, c3)
        h = self.reduce_chan_level2(torch.cat([self.up3_2(h), skip2], dim=1))
        for b in self.decoder_level_2:
            h = b(h, c2)
        h = self.reduce_chan_level1(torch.cat([self.up2_1(h), skip1], dim=1))
        for b in self.decoder_level_1:
            h = b(h, c2)
        return self.final_layer(h, c2)


def randomize_(model, seed=0, std=0.1):
    """Fill every parameter (zero-initialized layers included) with random values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model
