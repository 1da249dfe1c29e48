"""ANN-side activations: QCFS (trainable), ClipReLU and DA-QCFS, and the chain to the neuron."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from sj_parallel_conversion import DAQCFS, QCFS, ClipReLU, ParallelConversionNode, formulas

F64 = torch.float64


def _t(v) -> torch.Tensor:
    return torch.tensor(v, dtype=F64)


def py_qcfs(x: float, theta: float, L: int, psi: float) -> float:
    return theta / L * min(max(math.floor((x * L + psi) / theta), 0), L)


# -- QCFS ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("L", [1, 4, 7, 16])
def test_qcfs_forward_matches_formula_and_python(L):
    g = torch.Generator().manual_seed(L)
    x = torch.randn(200, generator=g, dtype=F64) * 2
    theta = 1.25
    act = QCFS(L, theta=_t(theta))
    y = act(x)
    assert torch.equal(y, formulas.qcfs(x, theta, L, theta / 2))
    ref = torch.tensor([py_qcfs(v, theta, L, theta / 2) for v in x.tolist()], dtype=F64)
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-15)
    # literal: L=4, theta=1, x=0.6 -> floor(2.4 + 0.5) = 2 -> 0.5
    assert QCFS(4, theta=1.0)(torch.tensor([0.6, -1.0, 0.1, 3.0])).tolist() == [0.5, 0.0, 0.0, 1.0]


def test_qcfs_custom_shift():
    x = torch.linspace(-1, 3, 101, dtype=F64)
    act = QCFS(5, theta=_t(2.0), shift=0.25)
    assert torch.equal(act(x), formulas.qcfs(x, 2.0, 5, 0.5))
    assert not torch.equal(act(x), formulas.qcfs(x, 2.0, 5, 1.0))


def test_qcfs_gradients_straight_through():
    torch.manual_seed(0)
    lin = nn.Linear(4, 6)
    act = QCFS(4, theta=2.0)
    x = torch.randn(32, 4)
    y = act(lin(x))
    y.sum().backward()
    assert act.theta.grad is not None and act.theta.grad.abs().item() > 0
    assert lin.weight.grad.abs().sum() > 0 and lin.bias.grad.abs().sum() > 0
    # Straight-through: inside (0, theta) d qcfs / dx = 1 (the floor passes gradient 1).
    z = torch.tensor([0.3, 0.9, 1.4], requires_grad=True)
    QCFS(4, theta=2.0)(z).sum().backward()
    assert z.grad.tolist() == [1.0, 1.0, 1.0]
    # Outside the clip range no gradient reaches the input.
    z = torch.tensor([-3.0, 5.0], requires_grad=True)
    QCFS(4, theta=2.0)(z).sum().backward()
    assert z.grad.tolist() == [0.0, 0.0]


def test_qcfs_sgd_reduces_loss():
    torch.manual_seed(0)
    x = torch.randn(256, 3)
    w_true = torch.tensor([[1.0], [-0.5], [0.8]])
    target = torch.clamp(x @ w_true, 0, 1.5)
    model = nn.Sequential(nn.Linear(3, 1), QCFS(8, theta=0.5))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    theta0 = model[1].theta.item()
    for _ in range(60):
        opt.zero_grad()
        loss = ((model(x) - target) ** 2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0]
    assert model[1].theta.item() > theta0 + 0.3  # theta grows toward the target's range of 1.5


def test_qcfs_per_channel_theta():
    theta = _t([0.5, 1.0, 2.0])
    act = QCFS(4, theta=theta)
    x = torch.randn(8, 3, 5, dtype=F64) * 2
    y = act(x)
    for c in range(3):
        assert torch.equal(y[:, c], formulas.qcfs(x[:, c], theta[c].item(), 4, theta[c].item() / 2))
    y.sum().backward()
    assert act.theta.grad.shape == (3,) and bool((act.theta.grad != 0).all())
    last = QCFS(4, theta=theta, channel_dim=-1)
    xl = x.transpose(1, 2)
    assert torch.equal(last(xl), y.transpose(1, 2))
    with pytest.raises(ValueError, match="3 per-channel parameters"):
        act(torch.randn(8, 4, 5))


QCFS_NO_GRAD_CASES = {
    # name: (input dtype, theta, channel_dim, input shape, L, largest random magnitude)
    "float32": (torch.float32, [0.37, 1.0, 2.5, 1e-3], 1, (146, 4), 8, 1e6),
    "float64 L=7": (F64, [0.37, 1.0, 2.5, 1e-3], 1, (146, 4), 7, 1e6),
    "cache-sized slices": (torch.float32, [0.3 + 0.1 * c for c in range(16)], 1, (80, 16, 32, 32), 4, 1e3),
    "channels last": (torch.float32, [0.37, 1.0, 2.5, 1e-3], -1, (30, 5, 4), 5, 1e6),
    "scalar theta, 1-D": (torch.float32, 0.61, 0, (700,), 3, 1e6),
    "float16": (torch.float16, [0.37, 1.0, 2.5], 1, (300, 3), 7, 1e2),
    "bfloat16 with a float32 scalar theta": (torch.bfloat16, 0.37, 1, (300, 3), 3, 1e6),
}


@pytest.mark.parametrize("case", sorted(QCFS_NO_GRAD_CASES))
def test_qcfs_without_gradients_gives_the_recorded_values_and_saturates_at_infinity(case):
    """Without autograd QCFS skips the straight-through bookkeeping: bit for bit the values of the
    recorded (trainable) forward, level boundaries included, the input left untouched, and +-inf
    saturate at the top level and 0, as the converted neuron does, instead of NaN."""
    dtype, theta_values, channel_dim, shape, L, magnitude = QCFS_NO_GRAD_CASES[case]
    theta = torch.tensor(theta_values, dtype=torch.float32 if dtype == torch.bfloat16 else dtype)
    act = QCFS(L, theta=theta, channel_dim=channel_dim)
    th = formulas.channel_view(theta, len(shape), channel_dim)
    g = torch.Generator().manual_seed(L)
    levels = torch.randint(-3, L + 4, shape, generator=g).to(theta.dtype)
    boundary = ((levels * th - th / 2) / L).to(dtype)  # exactly on a level boundary of its channel
    scale = 10 ** (torch.rand(shape, generator=g) * 2 * math.log10(magnitude) - math.log10(magnitude))
    wide = (torch.randn(shape, generator=g) * scale).to(dtype)
    pick = torch.randint(0, 3, shape, generator=g)
    x = torch.where(pick == 0, boundary, torch.where(pick == 1, wide, torch.nextafter(boundary, wide)))
    assert torch.isfinite(x).all()
    recorded = act(x)  # autograd on: the straight-through form
    assert recorded.requires_grad
    before = x.clone()
    with torch.no_grad():
        plain = act(x)
    assert torch.equal(x, before)
    assert plain.dtype == recorded.dtype and torch.equal(plain, recorded.detach())
    inf = torch.full(shape, math.inf, dtype=dtype)
    with torch.no_grad():
        top, bottom = act(inf), act(-inf)
    assert torch.equal(top, formulas.qcfs(inf, th, L, th / 2).expand(shape))  # theta / L * L
    assert not top.isnan().any() and torch.equal(bottom, torch.zeros_like(bottom))
    assert torch.isnan(act(inf)).all()  # the recorded form: why no_grad takes the plain floor


def test_qcfs_without_gradients_saturates_like_the_neuron():
    L, theta = 8, torch.tensor([0.37, 1.0, 2.5, 1e-3])
    act = QCFS(L, theta=theta)
    # infinite inputs, and finite ones whose scaled value overflows float32
    x = torch.tensor([[math.inf] * 4, [-math.inf] * 4, [3e38] * 4, [-3e38] * 4])
    with torch.no_grad():
        out = act(x)
        node = ParallelConversionNode(L, v_threshold=theta, psi=theta / 2, step_mode="m")
        rate = node(x.unsqueeze(0).expand(L, *x.shape).contiguous()).mean(0)
    assert torch.equal(out, torch.stack([theta, torch.zeros_like(theta)] * 2))
    torch.testing.assert_close(rate, out)  # the neuron's firing rate over L steps


def test_qcfs_bad_arguments():
    with pytest.raises(ValueError, match="L must be an integer >= 1"):
        QCFS(0)
    with pytest.raises(ValueError, match="L must be an integer >= 1"):
        QCFS(2.5)
    with pytest.raises(ValueError, match="theta must be positive"):
        QCFS(4, theta=-1.0)


# -- ClipReLU -----------------------------------------------------------------------------------
def test_clip_relu():
    x = torch.tensor([-1.0, 0.0, 0.4, 0.7, 3.0])
    assert ClipReLU(0.7)(x).tolist() == pytest.approx([0.0, 0.0, 0.4, 0.7, 0.7])
    theta = torch.tensor([0.5, 1.0, 2.0])
    xc = torch.randn(6, 3, 4) * 3
    y = ClipReLU(theta)(xc)
    for c in range(3):
        assert torch.equal(y[:, c], xc[:, c].clamp(0, theta[c].item()))
    assert torch.equal(y, formulas.clip_relu(xc, theta.view(1, 3, 1)))
    assert ClipReLU(theta).theta.requires_grad is False  # a buffer, not a parameter
    with pytest.raises(ValueError, match="3 per-channel parameters"):
        ClipReLU(theta)(torch.randn(6, 2, 4))
    # ClipReLU -> DA-QCFS: uncalibrated, T levels, rounding with shift theta/2
    da = ClipReLU(theta).to_daqcfs(8)
    assert torch.equal(da(xc), formulas.da_qcfs(xc, theta.view(1, 3, 1), 8, 0.0, 0.0, theta.view(1, 3, 1) / 2))


# -- DA-QCFS ------------------------------------------------------------------------------------
def _daqcfs(C=4, T=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    theta = torch.rand(C, generator=g, dtype=F64) + 0.5
    psi_da = (torch.rand(C, generator=g, dtype=F64) - 0.5) * 0.4
    phi_da = (torch.rand(C, generator=g, dtype=F64) - 0.5) * 0.4
    return DAQCFS(T, theta, psi_da=psi_da, phi_da=phi_da), theta, psi_da, phi_da


def test_daqcfs_matches_formula_and_python():
    T = 6
    act, theta, psi_da, phi_da = _daqcfs(T=T)
    x = torch.randn(50, 4, dtype=F64)
    y = act(x)
    v = lambda p: p.view(1, 4)  # noqa: E731
    assert torch.equal(y, formulas.da_qcfs(x, v(theta), T, v(psi_da), v(phi_da), v(theta) / 2))
    for n in range(0, 50, 7):
        for c in range(4):
            th, pd, fd = theta[c].item(), psi_da[c].item(), phi_da[c].item()
            k = min(max(math.floor(((x[n, c].item() + pd) * T + th / 2) / th), 0), T)
            assert y[n, c].item() == pytest.approx((th + fd) / T * k, abs=1e-15)


@pytest.mark.parametrize("T_in", [1, 4])
def test_daqcfs_to_node_rate_equals_activation(T_in):
    T = 6
    act, theta, psi_da, phi_da = _daqcfs(T=T, seed=T_in)
    node = act.to_node()
    assert isinstance(node, ParallelConversionNode) and node.T == T
    g = torch.Generator().manual_seed(11)
    x_seq = torch.randn(T_in, 30, 4, 3, generator=g, dtype=F64)
    acc = x_seq[0].clone()
    for t in range(1, T_in):
        acc = acc + x_seq[t]
    m = acc / T_in  # the time mean the node sees (sequential sum)
    out = node(x_seq)
    y = act(m)
    sv = (theta + phi_da).view(1, 4, 1)
    k_node = (out != 0).sum(0)
    k_act = torch.round(y / sv * T).to(torch.int64)
    assert torch.equal(k_node, k_act)
    assert 0 < k_node.float().mean() < T  # non-trivial
    torch.testing.assert_close(out.mean(0), y, rtol=0, atol=1e-12)
    torch.testing.assert_close(node.rate(m), y, rtol=0, atol=1e-12)  # count-domain form


def test_daqcfs_to_node_rejects_nonpositive_theta_post():
    act = DAQCFS(4, theta=1.0, phi_da=-1.0)
    with pytest.raises(ValueError, match="non-positive theta"):
        act.to_node()


@pytest.mark.parametrize("L", [2, 8])
def test_qcfs_to_daqcfs_at_T_equals_L(L):
    theta = _t([0.7, 1.3])
    q = QCFS(L, theta=theta, shift=0.5)
    x = torch.randn(40, 2, 3, dtype=F64) * 1.5
    da = q.to_daqcfs(L)
    with torch.no_grad():
        assert torch.equal(da(x), q(x))
        # a different T gives a different quantiser (the test above can fail)
        assert not torch.equal(q.to_daqcfs(L + 1)(x), q(x))
    # and the node built from it is lossless against the QCFS (Theorem 4.1 (i))
    node = da.to_node()
    with torch.no_grad():
        torch.testing.assert_close(node(x[None]).mean(0), q(x), rtol=0, atol=1e-12)
