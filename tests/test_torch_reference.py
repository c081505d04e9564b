"""Tests of the PyTorch reference (tests/torch_reference.py): the ground truth must be right first.

Parameter counts against the official code's numbers, train-form vs deploy-form equivalence with
BN statistics far from identity (float32 and float64), the RepMLPNet re-assembly permutation, and
exact state_dict key names (official and mmpretrain layouts).
"""
import math

import numpy as np
import pytest
import torch

from tests import torch_reference as tr

TINY_NET = dict(channels=(8, 16, 32, 64), depths=(1, 2, 1, 1), hs=(4, 2, 1, 1),
                sharesets=(2, 4, 8, 16))  # at 32x32: maps 8, 4, 2, 1 -> hp = 2, 2, 2, 1; C/S = 4
TINY_RESNET = dict(num_blocks=(1, 2, 2, 1), num_classes=10, img_size=64, h=2, w=2, c3_groups=2,
                   c4_groups=4, channels=(32, 64, 128, 256), stem_channels=16)
TOL = {torch.float32: 1e-5, torch.float64: 1e-12}


def _tiny_net(deploy=False, **kw):
    return tr.create_repmlpnet_custom(**{**TINY_NET, **kw}, num_classes=10, deploy=deploy)


# ------------------------------------------------------------------------ parameter counts


@pytest.mark.parametrize('name', sorted(tr.REPMLPNET_ARCHS))
def test_repmlpnet_param_counts(name):
    with torch.device('meta'):
        model = tr.create_repmlpnet(name)
    assert tr.count_params(model) == tr.REPMLPNET_PARAMS[name]


@pytest.mark.parametrize('kind', ['light', 'bottleneck', 'plain'])
def test_resnet50_param_counts(kind):
    with torch.device('meta'):
        model = tr.create_repmlp_resnet50(kind)
    assert tr.count_params(model) == tr.RESNET50_PARAMS[kind]


def test_make_divisible_and_mmpretrain_gp_width():
    assert [tr.make_divisible(v) for v in (16, 20, 24, 3, 37)] == [16, 24, 24, 8, 40]
    assert tr.mmpretrain_gp_hidden(96) == 96 // 4 and tr.mmpretrain_gp_hidden(80) == 24
    model = tr.create_repmlpnet_custom((80, 96), (1, 1), (2, 1), (4, 8),
                                       gp_hidden=tr.mmpretrain_gp_hidden)
    assert model.stages[0][0].repmlp_block.gp.fc1.weight.shape == (24, 80, 1, 1)
    assert model.stages[1][0].repmlp_block.gp.fc1.weight.shape == (24, 96, 1, 1)


# ------------------------------------------------------------------- deploy equivalence


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_repmlpnet_deploy_matches_training_form(dtype):
    torch.manual_seed(0)
    model = tr.randomize_bn_(_tiny_net(), seed=1).to(dtype).eval()
    deployed = model.to_deploy()
    x = torch.randn(2, 3, 32, 32, dtype=dtype)
    with torch.no_grad():
        assert tr.max_rel_err(deployed(x), model(x)) <= TOL[dtype]


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
@pytest.mark.parametrize('kernels', [(1, 3), (3, 5, 1), ()])
def test_repmlp_block_deploy_matches_training_form(dtype, kernels):
    torch.manual_seed(0)
    block = tr.RepMLPBlock(16, 3, 2, 4, kernels)  # H=W=6, w=2: 2x3 partitions, C/S = 4
    tr.randomize_bn_(block, seed=2).to(dtype).eval()
    deployed = tr.RepMLPBlock(16, 3, 2, 4, kernels, deploy=True).to(dtype).eval()
    deployed.load_state_dict(block.fused_state_dict(), strict=True)
    x = torch.randn(3, 16, 6, 6, dtype=dtype)
    with torch.no_grad():
        assert tr.max_rel_err(deployed(x), block(x)) <= TOL[dtype]


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
@pytest.mark.parametrize('cin,cout,H,h,groups', [(8, 8, 8, 4, 2), (8, 4, 8, 2, 4),
                                                 (4, 8, 6, 3, 1), (8, 8, 4, 4, 2)])
def test_v1_repmlp_deploy_matches_training_form(dtype, cin, cout, H, h, groups):
    # (8, 4, ...) and (4, 8, ...): C != O, which the official conversion does not handle.
    torch.manual_seed(0)
    args = (cin, cout, H, H, h, h, (1, 3, 5), 2, groups)
    block = tr.randomize_bn_(tr.RepMLP(*args), seed=3).to(dtype).eval()
    deployed = tr.RepMLP(*args, deploy=True).to(dtype).eval()
    deployed.load_state_dict(block.fused_state_dict(), strict=True)
    x = torch.randn(2, cin, H, H, dtype=dtype)
    with torch.no_grad():
        assert tr.max_rel_err(deployed(x), block(x)) <= TOL[dtype]


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
@pytest.mark.parametrize('kind', ['light', 'bottleneck', 'plain'])
def test_v1_resnet_deploy_matches_training_form(dtype, kind):
    torch.manual_seed(0)
    model = tr.RepMLPResNet(kind, **TINY_RESNET)
    tr.randomize_bn_(model, seed=4).to(dtype).eval()
    x = torch.randn(2, 3, 64, 64, dtype=dtype)
    with torch.no_grad():
        assert tr.max_rel_err(model.to_deploy()(x), model(x)) <= TOL[dtype]


def test_deploy_state_dict_leaves_model_untouched():
    model = tr.randomize_bn_(_tiny_net(), seed=5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tr.deploy_state_dict(model)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_randomize_bn_is_far_from_identity():
    bn = tr.randomize_bn_(torch.nn.BatchNorm2d(256), seed=0)
    assert (bn.weight - 1).abs().mean() > 0.1 and bn.bias.abs().mean() > 0.1
    assert bn.running_mean.abs().mean() > 0.1 and (bn.running_var - 1).abs().mean() > 0.1
    assert bn.running_var.min() >= 0.5 and bn.weight.min() >= 0.5


def test_ffn_gelu_is_exact_erf():
    x = torch.linspace(-4, 4, 101, dtype=torch.float64)
    exact = 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))
    torch.testing.assert_close(tr.FFNBlock(4, 16).act(x), exact, rtol=0, atol=1e-15)


# ------------------------------------------------------------- re-assembly permutation


def _identity_block(C, S, h, w):
    """Deploy block whose fc3 is the identity and whose gate is exactly 1."""
    block = tr.RepMLPBlock(C, h, w, S, reparam_conv_k=(), gp_hidden=2, deploy=True)
    block = block.double().eval()
    with torch.no_grad():
        block.fc3.weight.copy_(torch.eye(h * w).repeat(S, 1).reshape(S * h * w, h * w, 1, 1))
        block.fc3.bias.zero_()
        block.gp.fc2.weight.zero_()
        block.gp.fc2.bias.fill_(100.0)  # sigmoid(100) == 1.0 in floating point
    return block


def _reassembly_by_indices(x, S, h, w):
    """REFERENCE.md's description, index by index: buffer (n,i,j,r)x(s,y,x) read back as
    (N*C/S, hp, wp, S, h, w), then laid out as (N*C/S, S, hp, h, wp, w) -> (N, C, H, W)."""
    N, C, H, W = x.shape
    hp, wp, R = H // h, W // w, C // S
    out = np.empty_like(x)
    for n2, c2, y2, x2 in np.ndindex(*x.shape):
        m, s2 = divmod(n2 * C + c2, S)
        (i2, yy2), (j2, xx2) = divmod(y2, h), divmod(x2, w)
        f = np.ravel_multi_index((m, i2, j2, s2, yy2, xx2), (N * R, hp, wp, S, h, w))
        n, i, j, r, s, yy, xx = np.unravel_index(f, (N, hp, wp, R, S, h, w))
        out[n2, c2, y2, x2] = x[n, r * S + s, i * h + yy, j * w + xx]
    return out


@pytest.mark.parametrize('C,S,H,W,h,w,is_identity', [
    (8, 2, 4, 4, 2, 2, False),   # hp*wp = 4, C/S = 4
    (6, 3, 4, 6, 2, 3, False),   # non-square partitions
    (8, 2, 2, 2, 2, 2, True),    # hp*wp == 1
    (4, 4, 4, 4, 2, 2, True),    # C == S
])
def test_reassembly_permutation(C, S, H, W, h, w, is_identity):
    x = torch.randn(2, C, H, W, dtype=torch.float64)
    with torch.no_grad():
        y = _identity_block(C, S, h, w)(x)
    assert torch.equal(y, x) == is_identity
    np.testing.assert_array_equal(y.numpy(), _reassembly_by_indices(x.numpy(), S, h, w))


def test_reassembly_hand_computed():
    # C=2, S=1, H=2, W=1, h=w=1: partitions (i, c) = [0, 2, 1, 3] are read back as (c, i).
    x = torch.tensor([[0., 1.], [2., 3.]], dtype=torch.float64).reshape(1, 2, 2, 1)
    with torch.no_grad():
        y = _identity_block(2, 1, 1, 1)(x)
    assert y.reshape(2, 2).tolist() == [[0., 2.], [1., 3.]]


def test_gate_multiplies_the_result():
    block = _identity_block(4, 4, 2, 2)
    with torch.no_grad():
        block.gp.fc2.bias.fill_(0.0)  # gate = sigmoid(0) = 0.5 everywhere
        x = torch.randn(1, 4, 4, 4, dtype=torch.float64)
        torch.testing.assert_close(block(x), 0.5 * x, rtol=0, atol=0)


# -------------------------------------------------------------------------- key names


def _expected_official_keys(channels, depths, kernels, deploy):
    """The official RepMLPNet state_dict key set, written out from REFERENCE.md section 1."""
    bn = ('weight', 'bias', 'running_mean', 'running_var', 'num_batches_tracked')
    keys = {'conv_embedding.conv.weight', 'head.weight', 'head.bias'}
    keys |= {f'conv_embedding.bn.{b}' for b in bn} | {f'head_norm.{b}' for b in bn}
    for i in range(len(channels) - 1):
        keys |= {f'embeds.{i}.conv.weight'} | {f'embeds.{i}.bn.{b}' for b in bn}
    for s, d in enumerate(depths):
        for u in range(d):
            p = f'stages.{s}.{u}.'
            keys |= {p + f'{n}.{b}' for n in ('prebn1', 'prebn2') for b in bn}
            keys |= {p + f'ffn_block.ffn_fc{i}.conv.weight' for i in (1, 2)}
            keys |= {p + f'ffn_block.ffn_fc{i}.bn.{b}' for i in (1, 2) for b in bn}
            keys |= {p + f'repmlp_block.gp.fc{i}.{t}' for i in (1, 2) for t in ('weight', 'bias')}
            keys |= {p + 'repmlp_block.fc3.weight'}
            if deploy:
                keys |= {p + 'repmlp_block.fc3.bias'}
            else:
                keys |= {p + f'repmlp_block.fc3_bn.{b}' for b in bn}
                keys |= {p + f'repmlp_block.repconv{k}.conv.weight' for k in kernels}
                keys |= {p + f'repmlp_block.repconv{k}.{b}' for k in kernels
                         for b in [f'bn.{x}' for x in bn]}
    return keys


@pytest.mark.parametrize('deploy', [False, True])
def test_repmlpnet_keys(deploy):
    sd = _tiny_net(deploy=deploy).state_dict()
    assert set(sd) == _expected_official_keys(TINY_NET['channels'], TINY_NET['depths'],
                                              (1, 3), deploy)
    p = 'stages.1.1.repmlp_block.'  # C=16, S=4, h=w=2
    assert sd[p + 'fc3.weight'].shape == (4 * 2 * 2, 2 * 2, 1, 1)
    assert sd[p + 'gp.fc1.weight'].shape == (4, 16, 1, 1)
    assert sd['stages.1.1.ffn_block.ffn_fc1.conv.weight'].shape == (64, 16, 1, 1)
    if deploy:
        assert sd[p + 'fc3.bias'].shape == (16,)
        assert not any('fc3_bn' in k or 'repconv' in k for k in sd)
    else:
        assert sd[p + 'fc3_bn.running_var'].shape == (4,)
        assert sd[p + 'repconv3.conv.weight'].shape == (4, 1, 3, 3)
        assert sd[p + 'repconv1.conv.weight'].shape == (4, 1, 1, 1)


def test_deploy_state_dict_has_deploy_keys():
    model = _tiny_net()
    converted = model.deploy_state_dict()
    expected = _tiny_net(deploy=True).state_dict()
    assert set(converted) == set(expected)
    assert all(converted[k].shape == v.shape for k, v in expected.items())


def test_mmpretrain_renames():
    sd = _tiny_net().state_dict()
    mm = tr.to_mmpretrain_state_dict(sd)
    for key in ['backbone.patch_embed.projection.weight', 'backbone.patch_embed.norm.running_var',
                'backbone.stages.0.0.norm1.weight', 'backbone.stages.1.1.norm2.num_batches_tracked',
                'backbone.stages.0.0.repmlp_block.gp.conv1.conv.weight',
                'backbone.stages.0.0.repmlp_block.gp.conv2.conv.bias',
                'backbone.stages.0.0.repmlp_block.fc3.weight',
                'backbone.stages.0.0.repmlp_block.fc3_bn.running_mean',
                'backbone.stages.0.0.repmlp_block.repconv3.conv.weight',
                'backbone.stages.0.0.repmlp_block.repconv1.bn.bias',
                'backbone.stages.2.0.ffn_block.ffn_fc1.conv.weight',
                'backbone.stages.2.0.ffn_block.ffn_fc2.bn.weight',
                'backbone.downsample_layers.2.conv.weight', 'backbone.downsample_layers.0.bn.bias',
                'backbone.final_norm.running_mean', 'head.fc.weight', 'head.fc.bias']:
        assert key in mm, key
    assert len(mm) == len(sd)
    assert all(k.startswith(('backbone.', 'head.fc.')) for k in mm)
    assert not any(s in k for k in mm for s in ('prebn', 'conv_embedding', 'embeds', 'head_norm',
                                               'gp.fc'))
    assert mm['head.fc.weight'] is sd['head.weight']
    back = tr.from_mmpretrain_state_dict(mm)
    assert list(back) == list(sd)
    deploy_mm = tr.to_mmpretrain_state_dict(_tiny_net(deploy=True).state_dict())
    assert 'backbone.stages.0.0.repmlp_block.fc3.bias' in deploy_mm
    with pytest.raises(KeyError):
        tr.to_mmpretrain_state_dict({'module.head.weight': sd['head.weight']})


def test_v1_keys():
    light = tr.RepMLPResNet('light', **TINY_RESNET).state_dict()
    btnk = tr.RepMLPResNet('bottleneck', **TINY_RESNET).state_dict()
    for key in ['stage0.0.conv.weight', 'stage0.0.bn.running_var',
                'stage1.0.shortcut.conv.weight', 'stage1.0.conv1.conv.weight',
                'stage2.0.conv2.bn.weight', 'stage2.0.conv3.conv.weight',
                'stage2.1.light_conv1.conv.weight', 'stage2.1.light_conv3.bn.bias',
                'stage2.1.light_repmlp.fc1_fc2.fc1.weight',
                'stage2.1.light_repmlp.fc1_fc2.fc2.bias',
                'stage2.1.light_repmlp.avg.bn.running_mean', 'stage2.1.light_repmlp.fc3.weight',
                'stage2.1.light_repmlp.fc3_bn.weight',
                'stage3.1.light_repmlp.repconv5.conv.weight',
                'stage3.1.light_repmlp.repconv1.bn.weight', 'linear.weight', 'linear.bias']:
        assert key in light, key
    for key in ['stage2.1.btnk_conv1.conv.weight', 'stage2.1.btnk_conv2.bn.weight',
                'stage2.1.btnk_repmlp.fc3.weight', 'stage3.1.btnk_repmlp.fc1_fc2.fc1.weight',
                'stage3.1.btnk_conv4.conv.weight', 'stage3.1.btnk_conv5.bn.running_var']:
        assert key in btnk, key
    assert not any('light_repmlp' in k for k in light if k.startswith(('stage1', 'stage4')))
    assert 'stage2.1.shortcut.conv.weight' not in light  # stride-1 RepMLP blocks: identity
    # c3 RepMLP: C = 64 // 8 = 8, 4x4 partitions of 2x2, groups 2.
    assert light['stage2.1.light_repmlp.fc3.weight'].shape == (8 * 4, 8 * 4 // 2, 1, 1)
    assert light['stage2.1.light_repmlp.fc3_bn.weight'].shape == (8 * 4,)
    assert light['stage2.1.light_repmlp.fc1_fc2.fc1.weight'].shape == (8 * 16, 8 * 16)
    deployed = tr.RepMLPResNet('light', **TINY_RESNET, deploy=True).state_dict()
    assert not any('.bn.' in k or 'fc3_bn' in k or 'repconv' in k for k in deployed)
    assert 'stage0.0.conv.bias' in deployed and 'stage2.1.light_repmlp.fc3.bias' in deployed
