"""The mathematics of parallel conversion (paper Theorem 4.1, Eq. 8, 4.3; docs/theory.rst).

Every test holds one formulation against another that is computed independently: plain Python
floats, the explicit T x T matrix of Eq. 8, a step-by-step loop over the paper's step form, the
binary search of section 4.3, and the QCFS / DA-QCFS activations of the ANN side.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sj_parallel_conversion import ParallelConversionNode, formulas

F64 = torch.float64


# -- independent references in plain Python floats --------------------------------------------
def py_count(m: float, T: int, theta: float, psi: float, psi_da: float = 0.0) -> int:
    """The closed-form spike count, evaluated element by element with Python's float arithmetic."""
    u = math.floor(((m + psi_da) * T + psi) / theta)
    return min(max(u, 0), T)


def py_step_form(m: float, T: int, theta: float, psi: float, psi_da: float = 0.0) -> list[int]:
    """Paper Eq. 8 / Algorithm 1 Stage III, one step at a time (x = 1..T, 1-based)."""
    out = []
    for x in range(1, T + 1):
        d = T - x + 1
        b = psi / d + psi_da * T / d
        v = T / d * m + b
        out.append(1 if v >= theta else 0)
    return out


def node_counts(spikes: torch.Tensor, spike_value: float) -> torch.Tensor:
    """Spike counts from a [T, ...] output: sum of spikes / spike_value (an integer tensor)."""
    k = spikes.sum(0) / spike_value
    k_int = torch.round(k).to(torch.int64)
    torch.testing.assert_close(k, k_int.to(k.dtype), rtol=0, atol=1e-9)  # integer-valued
    assert torch.equal(k_int, (spikes != 0).sum(0))
    return k_int


def _t(v) -> torch.Tensor:
    return torch.tensor(v, dtype=F64)


# -- 1. Theorem 4.1 (i): lossless at T == L ---------------------------------------------------
def test_hand_computed_example():
    # T=4, theta=1, psi=0.5, m=0.6: k = floor((0.6*4 + 0.5)/1) = floor(2.9) = 2 -> fires at 3, 4.
    node = ParallelConversionNode(4, v_threshold=_t(1.0), psi=_t(0.5))
    x = torch.full((1, 1), 0.6, dtype=F64)
    out = node(x)
    assert out.dtype == F64
    assert out[:, 0].tolist() == [0.0, 0.0, 1.0, 1.0]
    # The step form gives the same train: V = [0.725, 0.9667, 1.45, 2.9] against theta = 1.
    assert py_step_form(0.6, 4, 1.0, 0.5) == [0, 0, 1, 1]
    # A few more literal cases at the same parameters: silent, saturated, exactly on a boundary.
    x = _t([[-0.2, 1.5, 0.125, 0.375]])  # u = -0.3, 6.5, 1.0 (boundary, >=), 2.0 (boundary)
    assert node(x).t().tolist() == [[0, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 1], [0, 0, 1, 1]]
    # spike_value scales the output; early order puts the same spikes first.
    early = ParallelConversionNode(4, v_threshold=_t(1.0), spike_value=_t(2.5), psi=_t(0.5),
                                   spike_order="early")
    assert early(torch.full((1, 1), 0.6, dtype=F64))[:, 0].tolist() == [2.5, 2.5, 0.0, 0.0]


@settings(max_examples=40, deadline=None)
@given(
    T=st.integers(1, 40),
    theta=st.floats(0.05, 8.0),
    psi_frac=st.floats(0.0, 1.0),
    T_in=st.sampled_from([1, 3, 4]),
    seed=st.integers(0, 2**31 - 1),
)
def test_theorem_4_1_i_counts_and_rate_equal_qcfs(T, theta, psi_frac, T_in, seed):
    L = T
    # theta and psi with few mantissa bits, so that boundary inputs below are exact in float64.
    theta = float(torch.tensor(theta).to(torch.float16))
    psi = float(torch.tensor(psi_frac * theta).to(torch.float16))
    g = torch.Generator().manual_seed(seed)
    N = 64
    m = (torch.rand(N, generator=g, dtype=F64) * 3 - 1) * theta  # U(-theta, 2 theta)
    if L & (L - 1) == 0:
        # Half of the neurons sit exactly on a quantisation boundary, (m*L + psi)/theta = j, where
        # ">=" versus ">" matters (exact in float64 because L is a power of two).
        # A quarter more sit one ulp below a boundary, where any perturbation of the arithmetic
        # that rounds up flips the count.
        j = torch.randint(-2, L + 3, (N // 2,), generator=g).to(F64)
        m[: N // 2] = (j * theta - psi) / L
        m[N // 4: N // 2] = torch.nextafter(m[N // 4: N // 2], torch.tensor(-math.inf, dtype=F64))
    # Spread the input over T_in steps (a zero-sum perturbation for T_in = 4). The node sums the
    # steps one after another (torch_backend.time_mean); the reference reads that same mean.
    x_seq = m.expand(T_in, N).clone()
    if T_in == 4:
        x_seq = x_seq + torch.tensor([0.25, -0.25, 0.5, -0.5], dtype=F64)[:, None] * theta
    acc = x_seq[0].clone()
    for t in range(1, T_in):
        acc = acc + x_seq[t]
    m = acc / T_in

    node = ParallelConversionNode(T, v_threshold=_t(theta), psi=_t(psi))
    out = node(x_seq)
    assert out.shape == (T, N)
    k = node_counts(out, theta)
    # Exact integer equality with the Python reference and the QCFS level count.
    ref = torch.tensor([py_count(v, T, theta, psi) for v in m.tolist()])
    assert torch.equal(k, ref)
    q_levels = torch.clamp(torch.floor((m * L + psi) / theta), 0, L).to(torch.int64)
    assert torch.equal(k, q_levels)
    # Every spike carries exactly theta (spike_value defaults to v_threshold).
    assert set(out.unique().tolist()) <= {0.0, theta}
    # Firing rate equals the QCFS activation.
    rate = out.mean(0)
    torch.testing.assert_close(rate, formulas.qcfs(m, theta, L, psi), rtol=0, atol=1e-12)


@settings(max_examples=30, deadline=None)
@given(
    T=st.integers(1, 33),
    theta=st.floats(0.1, 5.0),
    psi_frac=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_theorem_4_1_i_da_qcfs(T, theta, psi_frac, seed):
    g = torch.Generator().manual_seed(seed)
    N = 48
    psi = psi_frac * theta
    psi_da = float((torch.rand((), generator=g, dtype=F64) - 0.5) * theta)
    phi_da = float((torch.rand((), generator=g, dtype=F64) * 1.5 - 0.5) * theta)  # theta+phi > 0
    m = (torch.rand(N, generator=g, dtype=F64) * 3 - 1) * theta
    node = ParallelConversionNode(T, v_threshold=_t(theta), spike_value=_t(theta + phi_da),
                                  psi=_t(psi), psi_da=_t(psi_da))
    out = node(m[None])
    k = node_counts(out, theta + phi_da)
    ref = torch.tensor([py_count(v, T, theta, psi, psi_da) for v in m.tolist()])
    assert torch.equal(k, ref)
    da = formulas.da_qcfs(m, theta, T, psi_da, phi_da, psi)
    assert torch.equal(torch.round(da * T / (theta + phi_da)).to(torch.int64), ref)
    torch.testing.assert_close(out.mean(0), da, rtol=0, atol=1e-12)
    assert set(out.unique().tolist()) <= {0.0, theta + phi_da}


@pytest.mark.parametrize("channel_dim", [1, -1, 2])
def test_per_channel_parameters_match_scalar_nodes(channel_dim):
    # [T_in, N, C, H] with C = 3 channels; the per-channel node equals three scalar nodes.
    T, C = 6, 3
    g = torch.Generator().manual_seed(1)
    shape = [2, 5, 4, 4]  # time, N, dims...
    cd_abs = channel_dim % 3
    shape[1 + cd_abs] = C
    x = torch.randn(shape, generator=g, dtype=F64)
    theta = _t([0.5, 1.0, 2.0])
    sv = _t([0.7, 1.1, 1.9])
    psi = _t([0.1, 0.5, 1.5])
    bias = _t([-0.2, 0.0, 0.3])
    node = ParallelConversionNode(T, v_threshold=theta, spike_value=sv, psi=psi, psi_da=bias,
                                  channel_dim=channel_dim)
    out = node(x)
    for c in range(C):
        ref_node = ParallelConversionNode(T, v_threshold=theta[c], spike_value=sv[c], psi=psi[c],
                                          psi_da=bias[c])
        xc = x.select(1 + cd_abs, c)
        assert torch.equal(out.select(1 + cd_abs, c), ref_node(xc))
    # and the count-domain helpers agree with the spikes
    m = (x[0] + x[1]) / 2
    assert torch.equal(node.count(m), (out != 0).sum(0).to(F64))


# -- 2. matrix form == closed form == binary search; sorting; first spike time ----------------
def test_parallel_conversion_matrix_and_shift_vector_literals():
    lam = formulas.parallel_conversion_matrix(3)
    assert torch.equal(lam, _t([[1 / 3] * 3, [1 / 2] * 3, [1.0] * 3]))
    # Theorem 4.1 shift vector: [psi/T, psi/(T-1), ..., psi]
    b = formulas.shift_vector(4, 0.5)
    assert torch.equal(b, _t([0.5 / 4, 0.5 / 3, 0.5 / 2, 0.5]))
    b = formulas.shift_vector(4, 0.5, psi_da=0.25)
    assert torch.allclose(b, _t([(0.5 + 1) / 4, (0.5 + 1) / 3, (0.5 + 1) / 2, 1.5]), rtol=0, atol=1e-15)


@pytest.mark.parametrize("T", [1, 2, 5, 8, 13, 32])
@pytest.mark.parametrize("psi_da", [0.0, 0.17])
def test_matrix_closed_binary_search_agree(T, psi_da):
    g = torch.Generator().manual_seed(T)
    N, C = 40, 3
    theta, psi = 1.3, 0.65
    x = torch.randn(T, N, C, generator=g, dtype=F64) * 1.2 + 0.5
    node = ParallelConversionNode(T, v_threshold=_t(theta), psi=_t(psi), psi_da=_t(psi_da))
    closed = node(x)
    s_closed = (closed != 0).to(F64)
    s_matrix = formulas.matrix_form_spikes(x, theta, psi, psi_da)
    assert torch.equal(s_matrix, s_closed)
    # Independent matrix product: Lambda_PC built here from its definition, b from Theorem 4.1.
    lam = torch.tensor([[1.0 / (T - r)] * T for r in range(T)], dtype=F64)
    b = torch.tensor([psi / (T - r) + psi_da * T / (T - r) for r in range(T)], dtype=F64)
    v = torch.einsum("xt,tnc->xnc", lam, x) + b[:, None, None]
    assert torch.equal((v >= theta).to(F64), s_closed)
    # Sorted: every train is non-decreasing in time (0...0 1...1).
    assert bool((s_closed[1:] >= s_closed[:-1]).all())
    k = s_closed.sum(0).to(torch.int64)
    # First-spike time by the paper's binary search (4.3) equals T - k + 1 (T + 1 when silent).
    m = (x.sum(0) / T)
    fst = formulas.first_spike_time(m, T, theta, psi, psi_da)
    assert torch.equal(fst, T - k + 1)
    # and it indexes the first 1 of the closed-form train
    idx = torch.where(k > 0, s_closed.argmax(0) + 1, torch.full_like(k, T + 1))
    assert torch.equal(fst, idx)
    # Early order (the authors' code): same counts, trains 1...1 0...0.
    early = ParallelConversionNode(T, v_threshold=_t(theta), psi=_t(psi), psi_da=_t(psi_da),
                                   spike_order="early")(x)
    s_early = (early != 0).to(F64)
    assert torch.equal(s_early.sum(0), s_closed.sum(0))
    assert bool((s_early[1:] <= s_early[:-1]).all())
    assert torch.equal(s_early, s_closed.flip(0))


def test_step_form_python_loop_small_case():
    T, theta, psi, psi_da = 5, 0.9, 0.45, 0.05
    g = torch.Generator().manual_seed(7)
    x = torch.rand(T, 30, generator=g, dtype=F64) * 2 - 0.4
    out = ParallelConversionNode(T, v_threshold=_t(theta), psi=_t(psi), psi_da=_t(psi_da))(x)
    m = x.sum(0) / T
    seen = set()
    for n in range(x.shape[1]):
        ref = py_step_form(float(m[n]), T, theta, psi, psi_da)
        assert (out[:, n] != 0).to(torch.int64).tolist() == ref
        seen.add(sum(ref))
        # b[x] of formulas.shift_vector, 1-based x
        for xi in range(1, T + 1):
            d = T - xi + 1
            assert formulas.shift_vector(T, psi, psi_da)[xi - 1].item() == pytest.approx(
                psi / d + psi_da * T / d, abs=1e-15)
    assert len(seen) >= 4  # the case is not degenerate: several different counts occur


def test_first_spike_time_edges():
    T = 7
    m = _t([-5.0, 0.0, 100.0])
    fst = formulas.first_spike_time(m, T, 1.0, 0.5)
    assert fst.tolist() == [T + 1, T + 1, 1]
    # Exactly on the threshold V[x] == theta fires (">="): T=4, theta=1, psi=0.5,
    # m=0.125: V[4] = 4*0.125 + 0.5 = 1.0 -> first spike 4; m=0.375: V[3] = 0.75 + 0.25 -> 3.
    fst = formulas.first_spike_time(_t([0.125, 0.375, 0.124]), 4, 1.0, 0.5)
    assert fst.tolist() == [4, 3, 5]


def test_spikes_from_count_literal():
    k = _t([0, 1, 3])
    assert formulas.spikes_from_count(k, 3).t().tolist() == [[0, 0, 0], [0, 0, 1], [1, 1, 1]]
    assert formulas.spikes_from_count(k, 3, order="early").t().tolist() == [[0, 0, 0], [1, 0, 0], [1, 1, 1]]
    with pytest.raises(ValueError, match="order must be"):
        formulas.spikes_from_count(k, 3, order="middle")


@pytest.mark.parametrize("order", ["late", "early"])
def test_spikes_from_count_matches_where_definition(order):
    # Definition: spike_value where fired (late: step >= T - k; early: step < k), 0 elsewhere.
    T = 6
    g = torch.Generator().manual_seed(5)
    k = torch.randint(0, T + 1, (4, 3, 2), generator=g).to(torch.float32)
    k[0, 0, 0] = float("nan")  # a NaN count never fires
    sv = torch.tensor([0.5, 1.0, 2.5]).view(1, 3, 1)
    steps = torch.arange(T, dtype=k.dtype).view(T, 1, 1, 1)
    fired = steps >= (T - k) if order == "late" else steps < k
    ref = torch.where(fired, sv.expand(4, 3, 2), torch.zeros(()))
    assert torch.equal(formulas.spikes_from_count(k, T, sv, order), ref)
    assert formulas.spikes_from_count(k, T, sv, order)[:, 0, 0, 0].tolist() == [0.0] * T
    # a spike value that broadcasts beyond k's shape
    out = formulas.spikes_from_count(_t([1.0, 3.0]).view(2, 1), 3, _t([1.0, 2.0]).view(1, 2), order)
    assert out.shape == (3, 2, 2) and out.sum().item() == 4 * 3.0


# -- 3. Theorem 4.1 (ii): expected error 0 when T != L ----------------------------------------
#
# With psi = theta/2 the QCFS at any level n is f_n(x) = theta/n * clip(round_half_up(x n/theta), 0, n),
# and the SNN rate at T is f_T (test above). Let h(x) = clip(x, 0, theta). Over the real line,
# f_n - h integrates to exactly 0:
#   * each interior cell [(j-1/2) theta/n, (j+1/2) theta/n), j = 1..n-1, has error j theta/n - x,
#     symmetric about the cell centre, integral 0;
#   * [0, theta/(2n)) has error -x (integral -(theta/2n)^2/2), [theta - theta/(2n), theta) has
#     error theta - x (integral +(theta/2n)^2/2): the two clip boundaries cancel;
#   * outside [0, theta] both f_n and h are constant and equal (0 or theta).
# So for x ~ U(a, b) with a <= 0, b >= theta, E[f_T(x) - f_L(x)] = 0 exactly for all T, L.
# We take U(-theta, 2 theta). The test statistic is the sample mean of d = f_T - f_L; its
# standard error is std(d)/sqrt(N) (from the sample variance). We accept |mean| <= 6 SE (false
# alarm probability ~2e-9 under normality of the mean at N = 10^6) plus 1e-12 for rounding of the
# rates. With the wrong shift psi = 0 the SNN floors instead of rounding:
# E[f^0_T - h] = (1/3) * (-theta/(2T)) = -theta/(6T), i.e. more than 10 tolerances away for the pairs below.
def _snn_rate(x: torch.Tensor, T: int, theta: float, psi: float, chunk: int = 1 << 17) -> torch.Tensor:
    node = ParallelConversionNode(T, v_threshold=_t(theta), psi=_t(psi))
    return torch.cat([node(c[None]).mean(0) for c in x.split(chunk)])


@pytest.mark.parametrize("T,L", [(4, 8), (8, 4), (16, 8), (5, 16), (32, 3)])
def test_theorem_4_1_ii_expected_error_zero(T, L):
    theta = 1.7
    N = 1_000_000
    g = torch.Generator().manual_seed(1000 * T + L)
    x = (torch.rand(N, generator=g, dtype=F64) * 3 - 1) * theta
    ann = formulas.qcfs(x, theta, L, theta / 2)

    d = _snn_rate(x, T, theta, theta / 2) - ann
    se = d.std().item() / math.sqrt(N)
    tol = 6 * se + 1e-12
    assert se > 0
    assert abs(d.mean().item()) <= tol, (d.mean().item(), tol)

    # Power: with psi = 0 the mean difference is -theta/(6T), far outside the tolerance.
    d0 = _snn_rate(x, T, theta, 0.0) - ann
    se0 = d0.std().item() / math.sqrt(N)
    assert abs(d0.mean().item()) > 10 * tol
    assert abs(d0.mean().item() - (-theta / (6 * T))) <= 6 * se0 + 1e-12


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_spike_count_chunked_in_place_path_equals_the_formula(inplace, layout):
    # Large CPU tensors take the chunked in-place path (the passes run slice by slice over the
    # batch); each element must see the same operations as the plain formula.
    g = torch.Generator().manual_seed(11)
    rows = 3 * formulas._CHUNK_BYTES // (6 * 40 * 40 * 4) + 1  # three slices and a bit
    m = torch.randn(rows, 6, 40, 40, generator=g) * 3
    if layout == "channels_last":
        m = m.contiguous(memory_format=torch.channels_last)
    theta = (torch.rand(6, generator=g) + 0.5).view(1, 6, 1, 1)
    psi, psi_da, scale = theta / 2, torch.tensor(0.1), theta / 8
    want = torch.clamp(torch.floor(((m + psi_da) * 8 + psi) / theta), 0, 8)
    assert m.numel() * 4 > 2 * formulas._CHUNK_BYTES and formulas._rows_per_chunk(m, [theta]) < m.shape[0]
    src = m.clone()
    got = formulas.spike_count(src, 8, theta, psi, psi_da, inplace=inplace)
    assert torch.equal(got, want) and (got.data_ptr() == src.data_ptr()) == inplace
    assert torch.equal(formulas.spike_count(m.clone(), 8, theta, psi, psi_da, inplace=inplace, scale=scale),
                       want * scale)
    # a parameter that varies along the batch axis cannot be sliced with it: unchunked, same values
    full = torch.rand(m.shape, generator=g)
    assert formulas._rows_per_chunk(m, [full]) is None
    assert torch.equal(formulas.spike_count(m.clone(), 8, theta, full, psi_da, inplace=inplace),
                       torch.clamp(torch.floor(((m + psi_da) * 8 + full) / theta), 0, 8))


def test_the_in_place_broadcast_check_agrees_with_torch():
    """spike_count works in place only where every parameter broadcasts into the input without
    enlarging it; its shortcut for that check must agree with torch.broadcast_shapes."""
    import itertools

    from sj_parallel_conversion.formulas import _broadcasts_into

    shapes = [(), (1,), (3,), (4,), (1, 3), (3, 1), (2, 3, 4), (1, 3, 1), (3, 4), (2, 1, 4), (5, 3, 4), (1, 1, 1, 1)]
    for a, b in itertools.product(shapes, repeat=2):
        try:
            expected = torch.broadcast_shapes(b, a) == torch.Size(b)
        except RuntimeError:
            expected = False
        assert _broadcasts_into(torch.Size(a), torch.Size(b)) == expected, (a, b)
