"""The noise models (backbones). Input: the noisy mask concatenated with the image; output:
the mask-shaped prediction. Every backbone has `forward(x_in, t)`, with x_in (B, in_channels,
H, W) and t (B,) integer timesteps in 0..T-1.

Read top-down: the parts (`TimestepEmbedding`, `ResBlock`, `AttentionBlock`, `Downsample`,
`Upsample`) first, then `UNet2D`, which stacks them, then `EncoderUNet`, a UNet decoder on a
torchvision encoder, and `MODELS`, the registry `--model NAME` picks from. The timestep
enters every residual block as a per-channel scale and shift after its second GroupNorm
(improved-DDPM's "scale-shift").

Bring your own: any nn.Module built as `make(in_channels=..., out_channels=...)` with that
forward, registered as `MODELS["mine"] = make`, then `--model mine`.
"""
import copy
import math
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torch.utils.flop_counter import FlopCounterMode


def _num_groups(channels):
    """The largest of 32, 16, 8, 4, 2, 1 groups that divides `channels`."""
    return next(g for g in (32, 16, 8, 4, 2, 1) if channels % g == 0)


def timestep_embedding(t, dim, max_period=10000):
    """Sinusoidal embedding of integer timesteps (Vaswani et al.), shape (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]                 # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb                                              # (B, dim)


class TimestepEmbedding(nn.Module):
    """Sinusoid of t, then a two-layer MLP to the width every ResBlock reads."""

    def __init__(self, base_channels, emb_channels):
        super().__init__()
        self.base_channels = base_channels
        self.mlp = nn.Sequential(nn.Linear(base_channels, emb_channels), nn.SiLU(),
                                 nn.Linear(emb_channels, emb_channels))

    def forward(self, t):
        return self.mlp(timestep_embedding(t, self.base_channels))


class ResBlock(nn.Module):
    """GN-SiLU-conv, then GN with timestep scale-shift, SiLU, dropout, conv; plus a skip."""

    def __init__(self, in_ch, out_ch, emb_channels, dropout=0.0):
        super().__init__()
        self.norm1 = nn.GroupNorm(_num_groups(in_ch), in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_channels, 2 * out_ch)
        self.norm2 = nn.GroupNorm(_num_groups(out_ch), out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)   # each block starts as the identity
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(F.silu(emb))[:, :, None, None].chunk(2, dim=1)  # (B, C, 1, 1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over all pixels of a (low-resolution) feature map."""

    def __init__(self, channels, head_channels=32):
        super().__init__()
        self.num_heads = max(1, channels // head_channels)
        self.norm = nn.GroupNorm(_num_groups(channels), channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x):
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.num_heads, c // self.num_heads, h * w)
        q, k, v = (qkv[:, i].transpose(-1, -2) for i in range(3))  # (B, heads, HW, C/heads)
        out = F.scaled_dot_product_attention(q, k, v)               # (B, heads, HW, C/heads)
        out = out.transpose(-1, -2).reshape(b, c, h, w)
        return x + self.proj(out)


class Downsample(nn.Module):
    """Halve H and W with a stride-2 conv."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.conv(x)


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour, then a conv."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UNet2D(nn.Module):
    """A DDPM-style UNet: `forward(x_in, t)` with x_in (B, in_channels, H, W), t (B,) long.

    channel_mults gives one level per entry (widths base_channels * mult); the resolution
    halves between levels, so H and W must be divisible by 2 ** (len(channel_mults) - 1).
    attention_resolutions lists downsampling factors (1 = full size, 2 = half, ...) at which
    a self-attention block follows each residual block.
    """

    def __init__(self, in_channels=2, out_channels=1, base_channels=16,
                 channel_mults=(1, 2, 4, 8), num_res_blocks=1, attention_resolutions=(8,),
                 dropout=0.0, head_channels=32):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.num_levels = len(channel_mults)
        emb_channels = 4 * base_channels

        self.time_embed = TimestepEmbedding(base_channels, emb_channels)
        self.stem = nn.Conv2d(in_channels, base_channels, 3, padding=1)

        # encoder: remember every output width, the decoder concatenates them back in order
        self.down = nn.ModuleList()
        skip_widths = [base_channels]
        ch = base_channels
        for level, mult in enumerate(channel_mults):
            factor = 2 ** level
            for _ in range(num_res_blocks):
                blocks = [ResBlock(ch, base_channels * mult, emb_channels, dropout)]
                ch = base_channels * mult
                if factor in attention_resolutions:
                    blocks.append(AttentionBlock(ch, head_channels))
                self.down.append(nn.ModuleList(blocks))
                skip_widths.append(ch)
            if level < self.num_levels - 1:
                self.down.append(nn.ModuleList([Downsample(ch)]))
                skip_widths.append(ch)

        self.middle = nn.ModuleList([ResBlock(ch, ch, emb_channels, dropout),
                                     AttentionBlock(ch, head_channels),
                                     ResBlock(ch, ch, emb_channels, dropout)])

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mults))):
            factor = 2 ** level
            for i in range(num_res_blocks + 1):
                blocks = [ResBlock(ch + skip_widths.pop(), base_channels * mult, emb_channels,
                                   dropout)]
                ch = base_channels * mult
                if factor in attention_resolutions:
                    blocks.append(AttentionBlock(ch, head_channels))
                if level > 0 and i == num_res_blocks:
                    blocks.append(Upsample(ch))
                self.up.append(nn.ModuleList(blocks))

        self.head = nn.Sequential(nn.GroupNorm(_num_groups(ch), ch), nn.SiLU(),
                                  nn.Conv2d(ch, out_channels, 3, padding=1))
        nn.init.zeros_(self.head[-1].weight)
        nn.init.zeros_(self.head[-1].bias)

    def check_size(self, h, w):
        """Raise a clear error unless H and W are divisible by 2 ** (levels - 1)."""
        multiple = 2 ** (self.num_levels - 1)
        if h % multiple or w % multiple or h == 0 or w == 0:
            raise ValueError(
                f"UNet2D with {self.num_levels} levels needs H and W divisible by {multiple} "
                f"(e.g. {multiple * 2}, {multiple * 4}, {multiple * 8}); got {h}x{w}. "
                f"Resize the images (--image-size) or use fewer channel_mults.")

    @staticmethod
    def _run(blocks, h, emb):
        for block in blocks:
            h = block(h, emb) if isinstance(block, ResBlock) else block(h)
        return h

    def forward(self, x_in, t):
        if x_in.shape[1] != self.in_channels:
            raise ValueError(f"UNet2D expects {self.in_channels} input channels "
                             f"(noisy mask + image), got {x_in.shape[1]}")
        self.check_size(*x_in.shape[-2:])
        emb = self.time_embed(t).to(x_in.dtype)                # (B, 4 * base)
        h = self.stem(x_in)                                    # (B, base, H, W)
        skips = [h]
        for blocks in self.down:
            h = self._run(blocks, h, emb)
            skips.append(h)
        h = self._run(self.middle, h, emb)                     # (B, C_max, H/2^L, W/2^L)
        for blocks in self.up:
            h = self._run(blocks, torch.cat([h, skips.pop()], dim=1), emb)
        return self.head(h)                                    # (B, out_channels, H, W)


class PatchDiscriminator(nn.Module):
    """PatchGAN critic (Isola et al. 2017) on (image, mask) pairs: strided 4x4 convolutions,
    one real/fake logit per overlapping patch. Used by the adversarial loss term."""

    def __init__(self, in_channels=2, base_channels=32, num_layers=3):
        super().__init__()
        layers = [nn.Conv2d(in_channels, base_channels, 4, stride=2, padding=1),
                  nn.LeakyReLU(0.2)]
        ch = base_channels
        for _ in range(num_layers - 1):
            layers += [nn.Conv2d(ch, 2 * ch, 4, stride=2, padding=1),
                       nn.GroupNorm(_num_groups(2 * ch), 2 * ch), nn.LeakyReLU(0.2)]
            ch *= 2
        layers.append(nn.Conv2d(ch, 1, 3, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, image, mask):
        """image (B, C, H, W), mask (B, 1, H, W) in [0, 1] -> logits (B, 1, H/2^L, W/2^L)."""
        return self.net(torch.cat([mask * 2 - 1, image], dim=1))


class EncoderUNet(nn.Module):
    """A UNet whose encoder is a torchvision classification network (random init), for
    `forward(x_in, t)` like UNet2D.

    encoder: "convnext_tiny" (Liu et al. 2022; LayerNorm, stride-4 patchify stem; its
        stochastic depth off, so every block trains at every step, as in UNet2D) or
        "resnet18" (He et al. 2016, its BatchNorm replaced by GroupNorm, which neither
        depends on the batch size nor needs syncing across processes).
    The encoder's first convolution is rebuilt for `in_channels`, initialised as
    torchvision initialises the rest of that network. The timestep enters the
    encoder as a per-channel scale and shift after each of its stages (zero-initialised, so
    training starts from the plain encoder) and every decoder block as in UNet2D. The
    decoder climbs back one encoder stage at a time (upsample, concatenate the stage's
    output, ResBlock); a full-resolution stem on the input gives it the last skip, so the
    output keeps the pixel detail the encoder's strided first layer gives up. H and W must
    be divisible by 32.
    """

    ENCODERS = ("convnext_tiny", "resnet18")

    def __init__(self, in_channels=2, out_channels=1, encoder="convnext_tiny",
                 stem_channels=32, emb_channels=256):
        super().__init__()
        if encoder not in self.ENCODERS:
            raise ValueError(f"encoder must be one of {self.ENCODERS}, got {encoder!r}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.time_embed = TimestepEmbedding(64, emb_channels)
        self.stem = nn.Conv2d(in_channels, stem_channels, 3, padding=1)
        self.stem_block = ResBlock(stem_channels, stem_channels, emb_channels)
        self.stages, widths = _encoder_stages(encoder, in_channels)          # coarser each
        self.films = nn.ModuleList(nn.Linear(emb_channels, 2 * w) for w in widths)
        for film in self.films:
            nn.init.zeros_(film.weight)
            nn.init.zeros_(film.bias)
        skips = [stem_channels, *widths[:-1]]                               # fine -> coarse
        self.up = nn.ModuleList()
        ch = widths[-1]
        for skip in reversed(skips):
            self.up.append(ResBlock(ch + skip, skip, emb_channels))
            ch = skip
        self.head = nn.Sequential(nn.GroupNorm(_num_groups(ch), ch), nn.SiLU(),
                                  nn.Conv2d(ch, out_channels, 3, padding=1))
        nn.init.zeros_(self.head[-1].weight)
        nn.init.zeros_(self.head[-1].bias)

    def check_size(self, h, w):
        if h % 32 or w % 32 or h == 0 or w == 0:
            raise ValueError(f"EncoderUNet needs H and W divisible by 32 (e.g. 64, 128, 256); "
                             f"got {h}x{w}. Resize the images (--image-size).")

    def forward(self, x_in, t):
        if x_in.shape[1] != self.in_channels:
            raise ValueError(f"EncoderUNet expects {self.in_channels} input channels "
                             f"(noisy mask + image), got {x_in.shape[1]}")
        self.check_size(*x_in.shape[-2:])
        emb = self.time_embed(t).to(x_in.dtype)                          # (B, emb)
        h = self.stem_block(self.stem(x_in), emb)                         # (B, stem, H, W)
        skips = [h]
        h = x_in
        for stage, film in zip(self.stages, self.films):
            h = stage(h)                                                  # (B, C_i, H/s, W/s)
            scale, shift = film(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
            h = h * (1 + scale) + shift
            skips.append(h)
        skips.pop()                                                       # the deepest is h
        for block in self.up:
            skip = skips.pop()
            h = F.interpolate(h, size=skip.shape[-2:], mode="nearest")
            h = block(torch.cat([h, skip], dim=1), emb)
        return self.head(h)                                               # (B, out, H, W)


def _encoder_stages(name, in_channels):
    """A torchvision network cut into stages that each lower the resolution, its first
    convolution rebuilt for `in_channels`: (ModuleList of stages, output width of each)."""
    if name == "convnext_tiny":
        features = torchvision.models.convnext_tiny(weights=None,
                                                    stochastic_depth_prob=0.0).features
        first = features[0][0]                                        # 4x4 stride-4 patchify
        features[0][0] = nn.Conv2d(in_channels, first.out_channels, first.kernel_size,
                                   first.stride)
        nn.init.trunc_normal_(features[0][0].weight, std=0.02)       # as torchvision's ConvNeXt
        nn.init.zeros_(features[0][0].bias)
        # features: stem, stage 1, downsample, stage 2, ... -> 1/4, 1/8, 1/16, 1/32
        stages = [nn.Sequential(features[i], features[i + 1]) for i in range(0, 8, 2)]
        return nn.ModuleList(stages), [96, 192, 384, 768]
    net = torchvision.models.resnet18(
        weights=None, norm_layer=lambda c: nn.GroupNorm(_num_groups(c), c))
    net.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
    nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")  # as torchvision
    stages = [nn.Sequential(net.conv1, net.bn1, net.relu),           # 1/2
              nn.Sequential(net.maxpool, net.layer1),                # 1/4
              net.layer2, net.layer3, net.layer4]                    # 1/8, 1/16, 1/32
    return nn.ModuleList(stages), [64, 64, 128, 256, 512]


# Backbones by name, for --model NAME. Each entry is called as
# make(in_channels=..., out_channels=...) and builds with its own defaults for the rest;
# register your own with MODELS["mine"] = MyNet (or functools.partial(MyNet, width=64)).
MODELS = {
    "unet2d": UNet2D,
    "convnext_tiny": partial(EncoderUNet, encoder="convnext_tiny"),
    "resnet18": partial(EncoderUNet, encoder="resnet18"),
}


def check_registered(name):
    """A clear error, naming the registered backbones, unless MODELS has `name`."""
    if name not in MODELS:
        raise ValueError(f"no backbone named {name!r} in model.MODELS (registered: "
                         f"{', '.join(sorted(MODELS))}). Add yours to MODELS in model.py, or "
                         f"register it in this process first: model.MODELS[{name!r}] = MyNet")


def build_model(name, in_channels, out_channels, **opts):
    """MODELS[name](in_channels=..., out_channels=..., **opts)."""
    check_registered(name)
    return MODELS[name](in_channels=in_channels, out_channels=out_channels, **opts)


def count_parameters(model):
    return sum(p.numel() for p in model.parameters())


def estimate_flops(model, image_size, batch_size=1, in_channels=None):
    """FLOPs of one forward pass (2 per multiply-add) at `image_size`, counted by
    `torch.utils.flop_counter` on meta tensors (convolutions, linears, attention matmuls;
    norms and activations, a few percent, are not counted). in_channels: default the
    model's `in_channels` attribute."""
    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    meta = _meta_copy(model)
    x = torch.zeros(batch_size, in_channels or model.in_channels, h, w, device="meta")
    t = torch.zeros(batch_size, dtype=torch.long, device="meta")
    with FlopCounterMode(display=False) as counter:
        meta(x, t)
    return counter.get_total_flops()


def _meta_copy(model):
    with torch.device("meta"):
        clone = copy.deepcopy(model).to("meta")
    return clone
