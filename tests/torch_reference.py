"""PyTorch reference for RepMLPNet (CVPR 2022) and the original RepMLP / RepMLP-ResNet (v1).

Ground truth for this project's golden tests (checkpoint import/export) and speed comparisons.
Written from the facts in shared/REFERENCE.md and checked against the authors' code
(DingXiaoH/RepMLP: repmlpnet.py, repmlp.py, repmlp_blocks.py, repmlp_resnet.py) and the
OpenMMLab port (mmpretrain/models/backbones/repmlp.py); none of their code is copied.

What matches the official code exactly (outputs up to float rounding):
- state_dict key names, shapes and order (training and deploy forms): released files load strictly;
- the RepMLPNet block's re-assembly, which is not the inverse of its partition step;
- the deploy conversion (Locality Injection), returned as a state_dict (nothing mutated in place).

Import as `from tests import torch_reference` or, with tests/ on sys.path, `import torch_reference`.
"""
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F

# ---------------------------------------------------------------------------------------------
# Re-parameterization helpers (pure functions).
# ---------------------------------------------------------------------------------------------


def fuse_bn(kernel, bn):
    """Folds an eval-mode BN into the preceding linear op; returns (kernel, bias).

    `bn` may have fewer channels than `kernel` has outputs (RepMLPNet's fc3_bn has S channels
    for S*h*w fc3 outputs): each BN factor then covers a run of consecutive outputs.
    """
    t = bn.weight / (bn.running_var + bn.eps).sqrt()
    bias = bn.bias - bn.running_mean * t
    reps = kernel.shape[0] // t.numel()
    t, bias = t.repeat_interleave(reps), bias.repeat_interleave(reps)
    return kernel * t.reshape(-1, *([1] * (kernel.ndim - 1))), bias


def pad_kernel(kernel, k):
    """Zero-pads a (O, I, kk, kk) kernel to k x k, centred."""
    p = (k - kernel.shape[-1]) // 2
    return F.pad(kernel, [p, p, p, p])


def conv_to_fc(kernel, bias, in_channels, h, w, groups):
    """The grouped FC (1x1 conv over C*h*w) equal to a 'same' k x k conv on an h x w map.

    The FC kernel is the conv applied to an identity: each of the n = C/g*h*w basis inputs,
    replicated into every group, goes through the conv. Returns weight (O*h*w, n, 1, 1), bias.
    """
    n = in_channels // groups * h * w
    eye = torch.eye(n, dtype=kernel.dtype, device=kernel.device)
    eye = eye.reshape(n, in_channels // groups, h, w).repeat(1, groups, 1, 1)  # (n, C, h, w)
    out = F.conv2d(eye, kernel, padding=kernel.shape[-1] // 2, groups=groups)  # (n, O, h, w)
    weight = out.reshape(n, -1).t()  # (O*h*w, n)
    return weight.reshape(*weight.shape, 1, 1), bias.repeat_interleave(h * w)


def _conv_bn(cin, cout, k, stride=1, padding=0, groups=1, relu=False):
    """conv (no bias) -> BN [-> ReLU] as an nn.Sequential with the official child names."""
    layers = [('conv', nn.Conv2d(cin, cout, k, stride, padding, groups=groups, bias=False)),
              ('bn', nn.BatchNorm2d(cout))]
    if relu:
        layers.append(('relu', nn.ReLU()))
    return nn.Sequential(OrderedDict(layers))


def _fused_branches(module, kernels):
    """Sums the BN-fused `repconv{k}` branches of `module`, padded to the largest k."""
    big = max(kernels)
    total_k, total_b = 0, 0
    for k in kernels:
        branch = getattr(module, f'repconv{k}')
        kk, bb = fuse_bn(branch.conv.weight, branch.bn)
        total_k, total_b = total_k + pad_kernel(kk, big), total_b + bb
    return total_k, total_b


# ---------------------------------------------------------------------------------------------
# RepMLPNet (CVPR 2022).
# ---------------------------------------------------------------------------------------------


def make_divisible(value, divisor=8, min_ratio=0.9):
    """mmpretrain/mmcv channel rounding: nearest multiple of divisor, never below 90%."""
    new = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return new + divisor if new < min_ratio * value else new


def mmpretrain_gp_hidden(channels):
    """mmpretrain's Global Perceptron width (official: channels // 4; differs e.g. for C=80)."""
    return make_divisible(channels // 4, 8)


class GlobalPerceptron(nn.Module):
    """Per-channel sigmoid gate from the global average: fc1 -> ReLU -> fc2 -> sigmoid."""

    def __init__(self, channels, hidden):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, hidden, 1, bias=True)
        self.fc2 = nn.Conv2d(hidden, channels, 1, bias=True)

    def forward(self, x):
        v = F.adaptive_avg_pool2d(x, 1)
        return torch.sigmoid(self.fc2(F.relu(self.fc1(v))))  # (N, C, 1, 1)


class RepMLPBlock(nn.Module):
    """RepMLPNet block: gate * reassemble(fc3-BN(partitions) + sum_k convk-BN(partitions))."""

    def __init__(self, channels, h, w, sharesets, reparam_conv_k=(1, 3), gp_hidden=None,
                 deploy=False):
        super().__init__()
        self.C, self.S, self.h, self.w = channels, sharesets, h, w
        self.reparam_conv_k, self.deploy = tuple(reparam_conv_k or ()), deploy
        self.gp = GlobalPerceptron(channels, gp_hidden or channels // 4)  # gp_hidden: int | None
        n = sharesets * h * w
        self.fc3 = nn.Conv2d(n, n, 1, groups=sharesets, bias=deploy)  # weight (S*h*w, h*w, 1, 1)
        if not deploy:
            self.fc3_bn = nn.BatchNorm2d(sharesets)
            for k in self.reparam_conv_k:
                setattr(self, f'repconv{k}', _conv_bn(sharesets, sharesets, k, padding=k // 2,
                                                      groups=sharesets))

    def forward(self, x):
        gate = self.gp(x)
        n, c, hh, ww = x.shape
        hp, wp, S, h, w = hh // self.h, ww // self.w, self.S, self.h, self.w
        parts = x.reshape(n, c, hp, h, wp, w).permute(0, 2, 4, 1, 3, 5)  # (N, hp, wp, C, h, w)
        out = self.fc3(parts.reshape(-1, S * h * w, 1, 1)).reshape(-1, S, h, w)
        if not self.deploy:
            out = self.fc3_bn(out)
            conv_in = parts.reshape(-1, S, h, w)
            for k in self.reparam_conv_k:
                out = out + getattr(self, f'repconv{k}')(conv_in)
        # The official re-assembly: rows ordered (n, i, j, r) are read back as
        # (N*C/S, hp, wp, S, h, w). Not the inverse of the partition when hp*wp > 1 and C/S > 1;
        # the released weights were trained with it, so it is reproduced as is.
        out = out.reshape(-1, hp, wp, S, h, w).permute(0, 3, 1, 4, 2, 5).reshape(n, c, hh, ww)
        return out * gate

    def fused_state_dict(self):
        """This block's deploy-form state: fc3 absorbs fc3_bn and every conv branch."""
        weight, bias = fuse_bn(self.fc3.weight, self.fc3_bn)
        if self.reparam_conv_k:
            ck, cb = _fused_branches(self, self.reparam_conv_k)
            fw, fb = conv_to_fc(ck, cb, self.S, self.h, self.w, groups=self.S)
            weight, bias = weight + fw, bias + fb
        sd = dict(self.gp.state_dict(prefix='gp.'))
        sd.update({'fc3.weight': weight, 'fc3.bias': bias})
        return sd


class FFNBlock(nn.Module):
    """1x1 conv-BN -> exact (erf) GELU -> 1x1 conv-BN."""

    def __init__(self, channels, hidden):
        super().__init__()
        self.ffn_fc1 = _conv_bn(channels, hidden, 1)
        self.ffn_fc2 = _conv_bn(hidden, channels, 1)
        self.act = nn.GELU()  # approximate='none'

    def forward(self, x):
        return self.ffn_fc2(self.act(self.ffn_fc1(x)))


class RepMLPNetUnit(nn.Module):
    """x + block(prebn1(x)), then + ffn(prebn2(.)); children registered in the official order."""

    def __init__(self, channels, h, w, sharesets, reparam_conv_k, gp_hidden, deploy):
        super().__init__()
        self.repmlp_block = RepMLPBlock(channels, h, w, sharesets, reparam_conv_k, gp_hidden,
                                        deploy)
        self.ffn_block = FFNBlock(channels, channels * 4)
        self.prebn1 = nn.BatchNorm2d(channels)
        self.prebn2 = nn.BatchNorm2d(channels)

    def forward(self, x):
        y = x + self.repmlp_block(self.prebn1(x))
        return y + self.ffn_block(self.prebn2(y))


class RepMLPNet(nn.Module):
    """RepMLPNet: conv4x4/4 stem, stages of units, conv2x2/2 embeds, BN -> GAP -> Linear head."""

    def __init__(self, channels, depths, hs, sharesets, reparam_conv_k=(1, 3), num_classes=1000,
                 ws=None, in_channels=3, patch_size=4, gp_hidden=None, deploy=False):
        """gp_hidden: None (official channels // 4) or a function channels -> GP width."""
        super().__init__()
        ws = ws or hs
        self.config = dict(channels=channels, depths=depths, hs=hs, sharesets=sharesets,
                           reparam_conv_k=reparam_conv_k, num_classes=num_classes, ws=ws,
                           in_channels=in_channels, patch_size=patch_size, gp_hidden=gp_hidden,
                           deploy=deploy)
        self.conv_embedding = _conv_bn(in_channels, channels[0], patch_size, patch_size,
                                       relu=True)
        self.stages = nn.ModuleList(
            nn.ModuleList(RepMLPNetUnit(c, h, w, s, reparam_conv_k,
                                        gp_hidden(c) if gp_hidden else None, deploy)
                          for _ in range(d))
            for c, d, h, w, s in zip(channels, depths, hs, ws, sharesets))
        self.embeds = nn.ModuleList(_conv_bn(a, b, 2, 2, relu=True)
                                    for a, b in zip(channels[:-1], channels[1:]))
        self.head_norm = nn.BatchNorm2d(channels[-1])
        self.head = nn.Linear(channels[-1], num_classes)

    def forward_features(self, x):
        """Returns each stage's output (before the following embed), for layer-wise debugging."""
        feats = []
        x = self.conv_embedding(x)
        for i, stage in enumerate(self.stages):
            for unit in stage:
                x = unit(x)
            feats.append(x)
            if i < len(self.embeds):
                x = self.embeds[i](x)
        return feats

    def forward(self, x):
        x = self.head_norm(self.forward_features(x)[-1])
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))

    def deploy_state_dict(self):
        """The official deploy-form state_dict (Locality Injection); `self` is untouched."""
        return deploy_state_dict(self)

    def to_deploy(self):
        """A new deploy-form model (eval mode) holding the converted weights."""
        return to_deploy(self)


# name: (channels, depths, partition h = w per stage, sharesets per stage)
REPMLPNET_ARCHS = {
    'RepMLPNet-T224': ((64, 128, 256, 512), (2, 2, 6, 2), (56, 28, 14, 7), (1, 4, 16, 128)),
    'RepMLPNet-B224': ((96, 192, 384, 768), (2, 2, 12, 2), (56, 28, 14, 7), (1, 4, 32, 128)),
    'RepMLPNet-T256': ((64, 128, 256, 512), (2, 2, 6, 2), (64, 32, 16, 8), (1, 4, 16, 128)),
    'RepMLPNet-B256': ((96, 192, 384, 768), (2, 2, 12, 2), (64, 32, 16, 8), (1, 4, 32, 128)),
    'RepMLPNet-D256': ((80, 160, 320, 640), (2, 2, 18, 2), (64, 32, 16, 8), (1, 4, 16, 128)),
    'RepMLPNet-L256': ((96, 192, 384, 768), (2, 2, 18, 2), (64, 32, 16, 8), (1, 4, 32, 256)),
}
# Training-form parameter counts of the official code (REFERENCE.md section 1).
REPMLPNET_PARAMS = {
    'RepMLPNet-T224': 38_293_608, 'RepMLPNet-B224': 68_242_712, 'RepMLPNet-T256': 58_687_848,
    'RepMLPNet-B256': 96_447_512, 'RepMLPNet-D256': 86_887_648, 'RepMLPNet-L256': 117_641_560,
}


def create_repmlpnet(name, num_classes=1000, deploy=False, gp_hidden=None):
    """Builds a released RepMLPNet variant.

    Args:
      name: a key of REPMLPNET_ARCHS, e.g. 'RepMLPNet-B224'.
      num_classes: classifier width.
      deploy: build the deploy form (fc3 with bias; no fc3_bn, no repconv*).
      gp_hidden: None for the official GP width C//4, or `mmpretrain_gp_hidden`.
    Returns:
      RepMLPNet.
    """
    channels, depths, hs, sharesets = REPMLPNET_ARCHS[name]
    return RepMLPNet(channels, depths, hs, sharesets, (1, 3), num_classes, deploy=deploy,
                     gp_hidden=gp_hidden)


def create_repmlpnet_custom(channels, depths, hs, sharesets, reparam_conv_k=(1, 3),
                            num_classes=1000, deploy=False, gp_hidden=None):
    """Builds any RepMLPNet (tiny test variants); hs are partition sizes h = w per stage."""
    return RepMLPNet(channels, depths, hs, sharesets, reparam_conv_k, num_classes,
                     deploy=deploy, gp_hidden=gp_hidden)


# mmpretrain renames (REFERENCE.md section 2, checked against mmpretrain's RepMLPNet):
# whole-key prefixes first, then infixes inside stage keys. Everything else keeps its name
# under 'backbone.' (repmlp_block, fc3, fc3_bn, repconv{k}.conv/.bn, ffn_block.ffn_fc{1,2}.conv/.bn
# are named as in the official code there).
_MM_PREFIXES = (('conv_embedding.conv.', 'backbone.patch_embed.projection.'),
                ('conv_embedding.bn.', 'backbone.patch_embed.norm.'),
                ('embeds.', 'backbone.downsample_layers.'),
                ('head_norm.', 'backbone.final_norm.'),
                ('head.', 'head.fc.'),
                ('stages.', 'backbone.stages.'))
_MM_INFIXES = (('.prebn1.', '.norm1.'), ('.prebn2.', '.norm2.'),
               ('.gp.fc1.', '.gp.conv1.conv.'), ('.gp.fc2.', '.gp.conv2.conv.'))


def _rename(key, prefixes, infixes):
    for old, new in prefixes:
        if key.startswith(old):
            key = new + key[len(old):]
            break
    else:
        raise KeyError(f'no rename rule for {key!r}')
    for old, new in infixes:
        key = key.replace(old, new)
    return key


def to_mmpretrain_state_dict(sd):
    """Official RepMLPNet state_dict -> mmpretrain ImageClassifier layout (same tensors)."""
    return OrderedDict((_rename(k, _MM_PREFIXES, _MM_INFIXES), v) for k, v in sd.items())


def from_mmpretrain_state_dict(sd):
    """mmpretrain ImageClassifier state_dict -> official RepMLPNet layout."""
    swap = lambda pairs: tuple((b, a) for a, b in pairs)  # noqa: E731
    return OrderedDict((_rename(k, swap(_MM_PREFIXES), swap(_MM_INFIXES)), v)
                       for k, v in sd.items())


# ---------------------------------------------------------------------------------------------
# The original RepMLP (arXiv 2105.01883 v1) and RepMLP-ResNet-50.
# ---------------------------------------------------------------------------------------------


class ConvBN(nn.Module):
    """v1 conv-BN [-ReLU]; the deploy form is one biased conv (the official v1 deploy fuses it)."""

    def __init__(self, cin, cout, k, stride=1, padding=0, groups=1, relu=False, deploy=False):
        super().__init__()
        self.nonlinear = nn.ReLU() if relu else nn.Identity()
        self.conv = nn.Conv2d(cin, cout, k, stride, padding, groups=groups, bias=deploy)
        if not deploy:
            self.bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        x = self.conv(x)
        return self.nonlinear(self.bn(x) if hasattr(self, 'bn') else x)

    def fused_state_dict(self):
        weight, bias = fuse_bn(self.conv.weight, self.bn)
        return {'conv.weight': weight, 'conv.bias': bias}


class RepMLP(nn.Module):
    """v1 RepMLP: [GP added to partitions] -> grouped fc3-BN1d + conv branches -> true inverse."""

    def __init__(self, in_channels, out_channels, H, W, h, w, reparam_conv_k=None,
                 fc1_fc2_reduction=1, fc3_groups=1, deploy=False):
        super().__init__()
        assert H % h == 0 and W % w == 0
        self.C, self.O, self.H, self.W, self.h, self.w = in_channels, out_channels, H, W, h, w
        self.hp, self.wp, self.groups, self.deploy = H // h, W // w, fc3_groups, deploy
        self.reparam_conv_k = tuple(reparam_conv_k or ())
        self.need_global_perceptron = (H != h) or (W != w)
        if self.need_global_perceptron:
            n = in_channels * self.hp * self.wp
            self.fc1_fc2 = nn.Sequential(OrderedDict([
                ('fc1', nn.Linear(n, int(n // fc1_fc2_reduction))), ('relu', nn.ReLU()),
                ('fc2', nn.Linear(int(n // fc1_fc2_reduction), n))]))
            pool = nn.AvgPool2d((h, w))
            self.avg = pool if deploy else nn.Sequential(OrderedDict([
                ('avg', pool), ('bn', nn.BatchNorm2d(in_channels))]))
        self.fc3 = nn.Conv2d(in_channels * h * w, out_channels * h * w, 1, groups=fc3_groups,
                             bias=deploy)
        if not deploy:
            self.fc3_bn = nn.BatchNorm1d(out_channels * h * w)
            for k in self.reparam_conv_k:
                setattr(self, f'repconv{k}', _conv_bn(in_channels, out_channels, k,
                                                      padding=k // 2, groups=fc3_groups))

    def forward(self, x):
        C, hp, wp, h, w = self.C, self.hp, self.wp, self.h, self.w
        if self.need_global_perceptron:
            v = self.fc1_fc2(self.avg(x).reshape(-1, C * hp * wp))
            x = x.reshape(-1, C, hp, h, wp, w) + v.reshape(-1, C, hp, 1, wp, 1)
        else:
            x = x.reshape(-1, C, hp, h, wp, w)
        parts = x.permute(0, 2, 4, 1, 3, 5)  # (N, hp, wp, C, h, w)
        out = self.fc3(parts.reshape(-1, C * h * w, 1, 1)).reshape(-1, self.O * h * w)
        if not self.deploy:
            out = self.fc3_bn(out)
            conv_in = parts.reshape(-1, C, h, w)
            for k in self.reparam_conv_k:
                out = out + getattr(self, f'repconv{k}')(conv_in).reshape(-1, self.O * h * w)
        out = out.reshape(-1, hp, wp, self.O, h, w).permute(0, 3, 1, 4, 2, 5)
        return out.reshape(-1, self.O, self.H, self.W)

    def fused_state_dict(self):
        """Deploy-form state: fc3 absorbs fc3_bn and the branches; fc1 absorbs the avg BN."""
        weight, bias = fuse_bn(self.fc3.weight, self.fc3_bn)
        if self.reparam_conv_k:
            ck, cb = _fused_branches(self, self.reparam_conv_k)
            fw, fb = conv_to_fc(ck, cb, self.C, self.h, self.w, groups=self.groups)
            weight, bias = weight + fw, bias + fb
        sd = {}
        if self.need_global_perceptron:
            sd.update(self.fc1_fc2.state_dict(prefix='fc1_fc2.'))
            bn, fc1 = self.avg.bn, self.fc1_fc2.fc1
            scale = bn.weight / (bn.running_var + bn.eps).sqrt()
            shift = bn.bias - bn.running_mean * scale
            reps = self.hp * self.wp  # fc1's inputs are flattened (c, i, j)
            sd['fc1_fc2.fc1.weight'] = fc1.weight * scale.repeat_interleave(reps)[None, :]
            sd['fc1_fc2.fc1.bias'] = fc1.bias + fc1.weight @ shift.repeat_interleave(reps)
        sd.update({'fc3.weight': weight, 'fc3.bias': bias})
        return sd


class BaseBlock(nn.Module):
    """ResNet-50 bottleneck (stride on the 3x3), official v1 names conv1/conv2/conv3/shortcut."""

    def __init__(self, cin, mid, cout, stride=1, deploy=False):
        super().__init__()
        self.shortcut = (ConvBN(cin, cout, 1, stride, deploy=deploy)
                         if stride != 1 or cin != cout else nn.Identity())
        self.conv1 = ConvBN(cin, mid, 1, relu=True, deploy=deploy)
        self.conv2 = ConvBN(mid, mid, 3, stride, 1, relu=True, deploy=deploy)
        self.conv3 = ConvBN(mid, cout, 1, deploy=deploy)

    def forward(self, x):
        return F.relu(self.conv3(self.conv2(self.conv1(x))) + self.shortcut(x))


class RepMLPLightBlock(nn.Module):
    """1x1 conv-BN-ReLU (-> out/8) -> RepMLP -> ReLU -> 1x1 conv-BN, + shortcut, ReLU."""

    def __init__(self, cin, mid, cout, H, W, h, w, reparam_conv_k, fc1_fc2_reduction,
                 fc3_groups, deploy=False):
        super().__init__()
        self.shortcut = ConvBN(cin, cout, 1, deploy=deploy) if cin != cout else nn.Identity()
        self.light_conv1 = ConvBN(cin, mid, 1, relu=True, deploy=deploy)
        self.light_repmlp = RepMLP(mid, mid, H, W, h, w, reparam_conv_k, fc1_fc2_reduction,
                                   fc3_groups, deploy)
        self.light_conv3 = ConvBN(mid, cout, 1, deploy=deploy)

    def forward(self, x):
        out = self.light_conv3(F.relu(self.light_repmlp(self.light_conv1(x))))
        return F.relu(out + self.shortcut(x))


class RepMLPBottleneckBlock(nn.Module):
    """1x1 (-> mid), 3x3 (-> mid/r), RepMLP, ReLU, 3x3 (-> mid), 1x1 (-> out), + shortcut, ReLU."""

    def __init__(self, cin, mid, cout, r, H, W, h, w, reparam_conv_k, fc1_fc2_reduction,
                 fc3_groups, deploy=False):
        super().__init__()
        self.shortcut = ConvBN(cin, cout, 1, deploy=deploy) if cin != cout else nn.Identity()
        c = mid // r
        self.btnk_conv1 = ConvBN(cin, mid, 1, relu=True, deploy=deploy)
        self.btnk_conv2 = ConvBN(mid, c, 3, padding=1, relu=True, deploy=deploy)
        self.btnk_repmlp = RepMLP(c, c, H, W, h, w, reparam_conv_k, fc1_fc2_reduction,
                                  fc3_groups, deploy)
        self.btnk_conv4 = ConvBN(c, mid, 3, padding=1, relu=True, deploy=deploy)
        self.btnk_conv5 = ConvBN(mid, cout, 1, deploy=deploy)

    def forward(self, x):
        out = F.relu(self.btnk_repmlp(self.btnk_conv2(self.btnk_conv1(x))))
        return F.relu(self.btnk_conv5(self.btnk_conv4(out)) + self.shortcut(x))


class RepMLPResNet(nn.Module):
    """ResNet-50 layout (stage0..stage4, gap, linear); RepMLP blocks in c3/c4 stride-1 blocks."""

    def __init__(self, kind='light', num_blocks=(3, 4, 6, 3), num_classes=1000, img_size=224,
                 h=7, w=7, reparam_conv_k=(1, 3, 5), fc1_fc2_reduction=1, c3_groups=4,
                 c4_groups=4, bottleneck_r=(2, 4), channels=(256, 512, 1024, 2048),
                 stem_channels=64, deploy=False):
        """kind: 'plain' (ResNet-50), 'light' or 'bottleneck'."""
        super().__init__()
        assert kind in ('plain', 'light', 'bottleneck')
        self.config = dict(kind=kind, num_blocks=num_blocks, num_classes=num_classes,
                           img_size=img_size, h=h, w=w, reparam_conv_k=reparam_conv_k,
                           fc1_fc2_reduction=fc1_fc2_reduction, c3_groups=c3_groups,
                           c4_groups=c4_groups, bottleneck_r=bottleneck_r, channels=channels,
                           stem_channels=stem_channels, deploy=deploy)
        self.stage0 = nn.Sequential(ConvBN(3, stem_channels, 7, 2, 3, relu=True, deploy=deploy),
                                    nn.MaxPool2d(3, 2, 1))
        cin = stem_channels
        for n, (cout, nb) in enumerate(zip(channels, num_blocks), start=1):
            ratio = 2 ** (n + 1)  # total downsampling at this stage: 4, 8, 16, 32
            blocks = []
            for i in range(nb):
                stride = 2 if (i == 0 and n > 1) else 1
                size = img_size // ratio
                rep = dict(reparam_conv_k=reparam_conv_k, fc1_fc2_reduction=fc1_fc2_reduction,
                           fc3_groups=c3_groups if ratio == 8 else c4_groups, deploy=deploy)
                if kind == 'plain' or stride != 1 or ratio not in (8, 16):
                    blocks.append(BaseBlock(cin, cout // 4, cout, stride, deploy))
                elif kind == 'light':
                    blocks.append(RepMLPLightBlock(cin, cout // 8, cout, size, size, h, w, **rep))
                else:
                    r = bottleneck_r[0] if ratio == 8 else bottleneck_r[1]
                    blocks.append(RepMLPBottleneckBlock(cin, cout // 4, cout, r, size, size, h, w,
                                                        **rep))
                cin = cout
            setattr(self, f'stage{n}', nn.Sequential(*blocks))
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(channels[-1], num_classes)

    def forward(self, x):
        for n in range(5):
            x = getattr(self, f'stage{n}')(x)
        return self.linear(self.gap(x).flatten(1))

    def deploy_state_dict(self):
        """The official v1 deploy-form state_dict (every conv-BN fused too)."""
        return deploy_state_dict(self)

    def to_deploy(self):
        """A new deploy-form model (eval mode) holding the converted weights."""
        return to_deploy(self)


# Training-form parameter counts of the official code (REFERENCE.md section 4).
RESNET50_PARAMS = {'light': 87_038_248, 'bottleneck': 41_071_144, 'plain': 25_557_032}


def create_repmlp_resnet50(kind='light', num_classes=1000, deploy=False, c3_groups=None,
                           c4_groups=None, img_size=224):
    """Builds RepMLP-Res50 (authors' configs) or plain ResNet-50.

    Args:
      kind: 'light' (fc3 groups 4), 'bottleneck' (fc3 groups 8, r = 2 / 4) or 'plain'.
      num_classes: classifier width.
      deploy: build the deploy form.
      c3_groups, c4_groups: fc3 groups in c3 / c4 (paper's g4/8, g8/16); None: authors' value.
      img_size: training resolution (fixes the RepMLP H, W).
    Returns:
      RepMLPResNet.
    """
    g = 8 if kind == 'bottleneck' else 4
    return RepMLPResNet(kind, num_classes=num_classes, img_size=img_size,
                        c3_groups=c3_groups or g, c4_groups=c4_groups or g, deploy=deploy)


# ---------------------------------------------------------------------------------------------
# Conversion and test utilities.
# ---------------------------------------------------------------------------------------------

_REPARAM_TYPES = (RepMLPBlock, RepMLP, ConvBN)


def deploy_state_dict(model):
    """Deploy-form state_dict of a training-form RepMLPNet or RepMLPResNet (pure).

    Every re-parameterizable module's keys are replaced by its fused_state_dict(); all other
    entries (other BNs, including their num_batches_tracked) are kept, as in the official deploy.
    """
    assert not model.config['deploy'], 'already in deploy form'
    with torch.no_grad():
        sd = OrderedDict((k, v.detach().clone()) for k, v in model.state_dict().items())
        for name, m in model.named_modules():
            if isinstance(m, _REPARAM_TYPES):
                sd = _splice(sd, f'{name}.', m.fused_state_dict())
    return sd


def _splice(sd, prefix, local):
    """Replaces every `prefix` entry of sd by `local` (prefixed), where the first one stood."""
    out, done = OrderedDict(), False
    for k, v in sd.items():
        if not k.startswith(prefix):
            out[k] = v
        elif not done:
            out.update((prefix + lk, lv.detach().clone()) for lk, lv in local.items())
            done = True
    return out


def to_deploy(model):
    """New deploy-form model with `model`'s converted weights, in eval mode, same dtype/device."""
    p = next(model.parameters())
    deployed = type(model)(**{**model.config, 'deploy': True}).to(p.device, p.dtype)
    deployed.load_state_dict(deploy_state_dict(model), strict=True)
    return deployed.eval()


def count_params(model):
    """Number of parameters (BN running statistics are buffers and are not counted)."""
    return sum(p.numel() for p in model.parameters())


def randomize_bn_(model, seed=0):
    """Sets every BN's affine params and running stats far from identity (in place)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n, kw = m.num_features, dict(generator=g, dtype=torch.float64)
                new = dict(weight=torch.rand(n, **kw) + 0.5,
                           bias=torch.randn(n, **kw) * 0.3,
                           running_mean=torch.randn(n, **kw) * 0.3,
                           running_var=torch.rand(n, **kw) * 1.5 + 0.5)
                for attr, val in new.items():
                    getattr(m, attr).copy_(val)
    return model


def max_rel_err(actual, expected):
    """max |actual - expected| / max |expected| (robust to near-zero entries)."""
    return ((actual - expected).abs().max() / expected.abs().max()).item()
