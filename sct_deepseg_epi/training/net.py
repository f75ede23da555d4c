"""A small 2D U-Net for axial EPI slices (torch; imported only by the training package).

The network maps (N, C, H, W) slices to (N, 1, H, W) raw logits, H and W multiples of
``2**levels``. It is deliberately small: the engine runs 3 members x 2 flips on every
slice on a CPU, so each member must cost only a few tens of MFLOP per 128x128 slice.
BatchNorm is folded into the convolutions at export (:func:`fold_batchnorm`), so the ONNX
graph holds only Conv, Relu, MaxPool, ConvTranspose and Concat.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from .._optional import require

torch = require("torch")
nn = torch.nn


@dataclass(frozen=True)
class NetConfig:
    """Architecture hyper-parameters, stored in the manifest's ``training`` section."""

    in_channels: int = 1
    widths: tuple[int, ...] = (8, 16, 24, 32)
    top_convs: int = 1  # 3x3 convolutions per block at full resolution (2 below it)

    @property
    def levels(self) -> int:
        return len(self.widths) - 1

    def as_dict(self) -> dict:
        d = asdict(self)
        d["widths"] = list(self.widths)
        return d


def _block(cin: int, cout: int, n: int = 2) -> nn.Sequential:
    layers: list = []
    for k in range(n):
        layers += [nn.Conv2d(cin if k == 0 else cout, cout, 3, padding=1, bias=False),
                   nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


class UNet(nn.Module):
    """Encoder-decoder with skip connections; ``levels`` poolings; one logit channel."""

    def __init__(self, cfg: NetConfig = NetConfig()):
        super().__init__()
        self.cfg = cfg
        w = list(cfg.widths)
        self.down = nn.ModuleList([_block(cfg.in_channels, w[0], cfg.top_convs)]
                                  + [_block(w[i - 1], w[i]) for i in range(1, len(w))])
        self.pool = nn.MaxPool2d(2)
        self.up = nn.ModuleList([nn.ConvTranspose2d(w[i], w[i - 1], 2, stride=2) for i in range(len(w) - 1, 0, -1)])
        self.dec = nn.ModuleList([_block(2 * w[i - 1], w[i - 1], cfg.top_convs if i == 1 else 2)
                                  for i in range(len(w) - 1, 0, -1)])
        self.head = nn.Conv2d(w[0], 1, 1)

    @property
    def size_multiple(self) -> int:
        return 2 ** self.cfg.levels

    def forward(self, x):
        skips = []
        for i, blk in enumerate(self.down):
            if i:
                x = self.pool(x)
            x = blk(x)
            skips.append(x)
        x = skips.pop()
        for up, dec in zip(self.up, self.dec):
            x = dec(torch.cat([skips.pop(), up(x)], dim=1))
        return self.head(x)


def fold_batchnorm(model: UNet) -> UNet:
    """Return an eval-mode copy of ``model`` with every BatchNorm folded into its convolution."""
    import copy

    from torch.nn.utils.fusion import fuse_conv_bn_eval

    m = copy.deepcopy(model).eval()
    for seq in list(m.down) + list(m.dec):
        layers = list(seq)
        fused = []
        i = 0
        while i < len(layers):
            if isinstance(layers[i], nn.Conv2d) and i + 1 < len(layers) and isinstance(layers[i + 1], nn.BatchNorm2d):
                fused.append(fuse_conv_bn_eval(layers[i], layers[i + 1]))
                i += 2
            else:
                fused.append(layers[i])
                i += 1
        for j in range(len(seq) - 1, -1, -1):
            del seq[j]
        for j, layer in enumerate(fused):
            seq.add_module(str(j), layer)
    return m


def count_parameters(model) -> int:
    return int(sum(p.numel() for p in model.parameters()))


def macs_per_pixel(cfg: NetConfig) -> float:
    """Multiply-accumulates per input pixel (convolutions and transposed convolutions)."""
    w = list(cfg.widths)
    n = [cfg.top_convs] + [2] * cfg.levels
    macs = 0.0
    for i, wi in enumerate(w):
        cin = cfg.in_channels if i == 0 else w[i - 1]
        macs += 9 * (cin * wi + (n[i] - 1) * wi * wi) / 4 ** i
    for i in range(len(w) - 1, 0, -1):
        macs += w[i] * w[i - 1] / 4 ** (i - 1)  # 2x2 stride-2 transposed conv: 1 tap per output pixel
        macs += 9 * (2 * w[i - 1] * w[i - 1] + (n[i - 1] - 1) * w[i - 1] * w[i - 1]) / 4 ** (i - 1)
    return macs + w[0]
