"""The native C++ CPU kernel against the torch backend, bit for bit; its build and selection.

The kernel is built with the machine's C++ compiler; the comparisons skip only where no compiler
exists at all (a compiler that fails to build the kernel is a failure).
"""
from __future__ import annotations

import hashlib
import itertools
import os
import shutil
import warnings

import pytest
import torch

from sj_parallel_conversion import ParallelConversionNode, formulas, kernels
from sj_parallel_conversion.kernels import native_backend, torch_backend

_BITS = {torch.float32: torch.int32, torch.float64: torch.int64}


@pytest.fixture(scope="module")
def native_ready():
    if native_backend.compiler() is None:
        pytest.skip("no C++ compiler ($CXX, c++, g++ or clang++) to build the native kernel")
    assert native_backend.availability() is None, native_backend.availability()


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.stride() == b.stride() and torch.equal(
        a.contiguous().view(_BITS[a.dtype]), b.contiguous().view(_BITS[b.dtype]))


def _params(C, dtype, g):
    if C is None:
        return [torch.tensor(v, dtype=dtype) for v in (0.75, 0.3, -0.05, 1.25)]
    return [(torch.rand(C, generator=g) + 0.25).to(dtype), (torch.rand(C, generator=g) * 0.5).to(dtype),
            (torch.randn(C, generator=g) * 0.1).to(dtype), (torch.rand(C, generator=g) + 0.5).to(dtype)]


def _currents(T_in, step_shape, dtype, g, params, T, channel_dim):
    """Random currents plus, in the first neurons, values on count boundaries and special values."""
    x = (torch.randn((T_in,) + step_shape, generator=g) * 1.5).to(dtype)
    flat = x.view(T_in, -1)
    C = params[0].numel()
    chan = torch.arange(C).reshape([C if d == channel_dim % len(step_shape) else 1 for d in range(len(step_shape))])
    chan = chan.expand(step_shape).reshape(-1) if C > 1 else torch.zeros(flat.shape[1], dtype=torch.long)
    # A constant train whose mean sits exactly where ((m + psi_da) * T + psi) / theta is an integer.
    for j, k in enumerate(range(-1, T + 2)):
        theta, psi, psi_da = (p.reshape(-1)[chan[j]] for p in params[:3])
        flat[:, j] = (k * theta - psi) / T - psi_da
    specials = [float("nan"), float("inf"), -float("inf"), 1e30, -1e30, 0.0, -0.0]
    for j, v in enumerate(specials, start=T + 3):
        flat[:, j] = v
    flat[0, T + 10] = float("inf")  # +inf and -inf in one train: a NaN mean
    flat[-1, T + 10] = -float("inf")
    flat[0, T + 11] = float("nan")  # one NaN step
    return x


# (per-step shape, channel_dim, channels or None for scalar parameters)
CASES = [
    ((3, 5, 4, 4), 1, 5),
    ((3, 5, 4, 4), 1, None),
    ((6, 7, 9), -1, 9),
    ((2, 1100), 1, 1100),
]


@pytest.mark.parametrize("dtype,order", list(itertools.product([torch.float32, torch.float64], ["late", "early"])))
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-cd{c[1]}-C{c[2]}")
@pytest.mark.parametrize("T,T_in", [(1, 1), (4, 4), (8, 3), (5, 1), (13, 13)])
def test_native_equals_torch_bit_for_bit(native_ready, dtype, order, case, T, T_in):
    step_shape, channel_dim, C = case
    g = torch.Generator().manual_seed(T * 100 + T_in)
    params = _params(C, dtype, g)
    x = _currents(T_in, step_shape, dtype, g, params, T, channel_dim)
    want = torch_backend.fire(x, T, params, channel_dim, order == "late")
    got = native_backend.fire(x, T, params, channel_dim, order == "late")
    assert _same_bits(got, want)


@pytest.mark.parametrize("layout", ["channels_last", "time_strided", "step_not_dense"])
def test_native_layouts_match_torch_and_the_fake_strides(native_ready, layout):
    g = torch.Generator().manual_seed(1)
    params = _params(6, torch.float32, g)
    x = torch.randn(8, 2, 6, 5, 7, generator=g)
    if layout == "channels_last":
        x = x.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)
    elif layout == "time_strided":
        x = x[::2]
    else:
        x = x[:, :, :, :, ::2]
    want = torch_backend.fire(x, 5, params, 1, True)
    got = native_backend.fire(x, 5, params, 1, True)
    assert _same_bits(got, want)
    assert got.stride() == kernels._fire_fake(x, 5, *params, 1, True).stride()


def test_native_threads_split_the_work_without_changing_a_bit(native_ready):
    # Enough neurons for several 4096-neuron blocks per thread, and a count that is not a multiple of it.
    g = torch.Generator().manual_seed(2)
    params = _params(3, torch.float32, g)
    x = torch.randn(6, 7, 3, 61, 53, generator=g)
    before = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(native_backend.fire(x, 9, params, 1, False))
    finally:
        torch.set_num_threads(before)
    assert all(_same_bits(r, results[0]) for r in results[1:])
    assert _same_bits(results[0], torch_backend.fire(x, 9, params, 1, False))


@pytest.mark.parametrize("dtype,order", [(torch.float32, "late"), (torch.float64, "early")])
def test_native_large_outputs_written_with_streaming_stores_are_the_same(native_ready, dtype, order):
    # Outputs of 16 MiB and more take the kernel's non-temporal store path; an odd neuron count
    # leaves every output row but the first misaligned, so the unaligned head and tail run too.
    g = torch.Generator().manual_seed(3)
    params = _params(7, dtype, g)
    x = _currents(5, (3, 7, 6247), dtype, g, params, 32, 1)
    assert 32 * x[0].numel() * x.element_size() >= 1 << 24
    want = torch_backend.fire(x, 32, params, 1, order == "late")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(3)  # several threads stream their rows (fenced before the join)
        got = native_backend.fire(x, 32, params, 1, order == "late")
    finally:
        torch.set_num_threads(before)
    assert _same_bits(got, want)


def test_native_nan_check(native_ready):
    x = torch.ones(4, 2, 3)
    x[1, 1, 2] = float("nan")
    p = [torch.tensor(v) for v in (1.0, 0.5, 0.0, 1.0)]
    flag = torch.zeros(1, dtype=torch.int32)
    assert native_backend.fire(x, 4, p, 1, True, flag)[:, 1, 2].eq(0).all()  # the NaN neuron is silent
    assert int(flag) == 1
    flag.zero_()
    native_backend.fire(torch.ones(4, 2, 3), 4, p, 1, True, flag)
    assert int(flag) == 0  # no NaN: the flag stays clear
    for inplace in (False, True):
        with pytest.raises(kernels.NaNMeanError):
            kernels.fire(x.clone(), 4, *p, backend="native", check_nan=True, inplace=inplace)
    with pytest.raises(kernels.NaNMeanError):
        kernels.fire_checked_op(x, 4, *p, 1, True)
    assert torch.equal(kernels.fire_checked_op(x[:, :1], 4, *p, 1, True), kernels.fire_op(x[:, :1], 4, *p, 1, True))
    with pytest.raises(ValueError, match="NaN input currents"):
        ParallelConversionNode(4, backend="native", check_nan=True)(x)


def test_native_empty_input(native_ready):
    x = torch.empty(3, 0, 4)
    got = ParallelConversionNode(5, backend="native")(x)
    assert got.shape == (5, 0, 4)
    assert got.stride() == ParallelConversionNode(5, backend="torch")(x).stride()


def test_native_random_layouts_and_channel_axes(native_ready):
    # Dense steps in any axis order, with storage offsets, odd strides on size-1 axes, expanded
    # and sliced inputs, per-channel parameters along any axis (negative ones too).
    rng = torch.Generator().manual_seed(5)
    pick = lambda seq: seq[int(torch.randint(len(seq), (1,), generator=rng))]  # noqa: E731
    for trial in range(150):
        nd = pick([1, 2, 3, 4])
        shape = [pick([1, 2, 3, 5]) for _ in range(nd)]
        dtype = pick([torch.float32, torch.float64])
        T_in, T = pick([1, 2, 4]), pick([1, 3, 6])
        cd = pick(list(range(-nd, nd)))
        perm = torch.randperm(nd, generator=rng).tolist()
        inv = [0] + [1 + perm.index(i) for i in range(nd)]
        kind = pick(["permuted", "offset", "expanded", "sliced", "size1"])
        if kind == "offset":
            flat = torch.randn(T_in * max(1, torch.Size(shape).numel()) + 3, generator=rng, dtype=dtype)
            x = flat[3:3 + T_in * torch.Size(shape).numel()].view([T_in] + [shape[p] for p in perm]).permute(inv)
        else:
            x = torch.randn([T_in] + [shape[p] for p in perm], generator=rng, dtype=dtype).permute(inv)
        if kind == "expanded":
            x = x[:1].expand(T_in, *shape)
        elif kind == "sliced":
            x = torch.randn([T_in] + shape[:-1] + [2 * shape[-1]], generator=rng, dtype=dtype)[..., ::2]
        elif kind == "size1":
            strides = [s if x.shape[d] != 1 else pick([1, 7, 1000]) for d, s in enumerate(x.stride())]
            x = x.as_strided(x.shape, strides)
        params = _params(shape[cd] if shape[cd] > 1 else None, dtype, rng)
        for order in ("late", "early"):
            want = torch_backend.fire(x, T, params, cd, order == "late")
            got = native_backend.fire(x, T, params, cd, order == "late")
            assert _same_bits(got, want), (trial, kind, tuple(x.shape), x.stride(), cd, order)
            assert got.stride() == kernels._fire_fake(x, T, *params, cd, order == "late").stride()


def test_native_silent_steps_hold_zero_times_the_spike_value(native_ready):
    # The node only accepts positive finite spike values; the operator itself takes any, and a
    # silent step then holds 0 * value (-0.0, NaN), as the torch backend's multiply gives.
    x = torch.randn(3, 2, 4, 40000)  # large enough for the streamed path as well as the plain one
    for value in (-1.5, float("inf"), float("nan")):
        params = [torch.tensor(1.0), torch.tensor(0.5), torch.tensor(0.0), torch.tensor(value)]
        for T in (2, 64):
            assert _same_bits(native_backend.fire(x, T, params, 1, True), torch_backend.fire(x, T, params, 1, True))


def test_native_refuses_parameters_it_would_misread(native_ready):
    x = torch.randn(2, 3, 5, 2)
    p = [torch.ones(3), torch.full((3,), 0.5), torch.zeros(3), torch.ones(3)]
    with pytest.raises(ValueError, match="3 per-channel parameters but the input has 5 channels"):
        native_backend.fire(x, 4, p, 1, True)
    with pytest.raises(ValueError, match="disagree on the channel count"):
        native_backend.fire(x, 4, p[:3] + [torch.ones(2)], 0, True)
    with pytest.raises(ValueError, match="channel_dim=4 is out of range"):
        native_backend.fire(x, 4, p, 4, True)
    with pytest.raises(ValueError, match="channel_dim=-4 is out of range"):
        native_backend.fire(x, 4, p, -4, True)
    with pytest.raises(ValueError, match="T and T_in from 1 to"):
        native_backend.fire(x, native_backend.MAX_T + 1, [torch.tensor(1.0)] * 4, 1, True)


# -- selection -----------------------------------------------------------------------------------
def test_auto_on_cpu_picks_native_for_float_and_torch_for_half(native_ready, monkeypatch):
    calls = []
    for name in ("torch", "native"):
        real = kernels._IMPL[name]
        monkeypatch.setitem(kernels._IMPL, name, lambda *a, _n=name, _r=real, **k: calls.append(_n) or _r(*a, **k))
    x = torch.randn(4, 6, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = ParallelConversionNode(4, backend="auto")(x)
        y_grad_path = ParallelConversionNode(4, backend="auto")(x.clone().requires_grad_())
        ParallelConversionNode(4, backend="auto")(x.to(torch.float16))
        ParallelConversionNode(4, backend="auto")(x.to(torch.bfloat16))
    assert calls == ["native", "native", "torch", "torch"]
    assert torch.equal(y, ParallelConversionNode(4, backend="torch")(x))
    assert torch.equal(y_grad_path.detach(), y)


def test_native_refuses_what_it_cannot_run(native_ready):
    with pytest.raises(TypeError, match="backend='native' supports"):
        ParallelConversionNode(4, backend="native")(torch.randn(2, 3, dtype=torch.float16))
    with pytest.raises(ValueError, match="needs a CPU tensor"):
        kernels.resolve_backend("native", torch.randn(2, 3, device="meta"))


@pytest.fixture
def no_compiler(monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("SJPC_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(kernels, "_warned", set())
    native_backend._load.cache_clear()
    yield
    native_backend._load.cache_clear()


def test_without_a_compiler_auto_warns_once_and_native_says_why(no_compiler):
    reason = native_backend.availability()
    assert "no-such-compiler" in reason
    x = torch.randn(4, 6, 3)
    with pytest.warns(RuntimeWarning, match="native CPU kernel cannot be built.*no-such-compiler"):
        y = ParallelConversionNode(4, backend="auto")(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process, not at every layer
        ParallelConversionNode(4, backend="auto")(x)
    assert torch.equal(y, ParallelConversionNode(4, backend="torch")(x))
    with pytest.raises(RuntimeError, match="backend='native' is unavailable.*no-such-compiler"):
        ParallelConversionNode(4, backend="native")(x)


def test_build_library_caches_and_reports_compiler_errors(native_ready, monkeypatch, tmp_path):
    monkeypatch.setenv("SJPC_CACHE_DIR", str(tmp_path))
    src = 'extern "C" int sjpc_probe(void) { return 41 + 1; }\n'
    lib = native_backend.build_library("probe", {"probe.cpp": src}, "probe.cpp", native_backend.FLAGS)
    assert lib.parent == tmp_path and lib.is_file()
    stamp = lib.stat().st_mtime_ns
    assert native_backend.build_library("probe", {"probe.cpp": src}, "probe.cpp", native_backend.FLAGS) == lib
    assert lib.stat().st_mtime_ns == stamp  # reused, not rebuilt
    # No build folder left behind; the library's SHA-256 recorded next to it.
    assert sorted(p.name for p in tmp_path.iterdir()) == [lib.name, lib.name + ".sha256"]
    with pytest.raises(RuntimeError, match="(?s)failed to build probe.*error"):
        native_backend.build_library("probe", {"probe.cpp": src + "not C++ at all;\n"}, "probe.cpp",
                                     native_backend.FLAGS)


# -- the count domain's quantiser -----------------------------------------------------------------
@pytest.fixture()
def count_ready(native_ready):
    if not native_backend.count_available():
        pytest.skip("the native count kernel needs an x86-64 CPU with AVX2")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape,channel_dim,C,layout", [
    ((6, 5, 7, 9), 1, None, "contiguous"),
    ((6, 5, 7, 9), 1, 5, "contiguous"),
    ((6, 5, 7, 9), 1, 5, "channels_last"),
    ((9, 16, 3, 5), 1, 16, "channels_last"),  # two vectors per row of channels, and tails
    ((4, 3, 11), -1, 11, "contiguous"),
    ((3, 10), 0, 3, "contiguous"),
    ((2, 3, 4), 1, 3, "permuted"),  # dense in another axis order
])
@pytest.mark.parametrize("T", [1, 4, 32])
def test_native_count_matches_the_torch_operations(count_ready, dtype, shape, channel_dim, C, layout, T):
    g = torch.Generator().manual_seed(T * 7 + (C or 1))
    params = _params(C, dtype, g)
    x = (torch.randn(shape, generator=g) * 2).to(dtype)
    flat = x.view(-1)
    flat[:7] = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e30, -1e30], dtype=dtype)
    theta, psi, psi_da, sv = params
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "permuted":
        x = x.permute(2, 0, 1).contiguous().permute(1, 2, 0)
    assert native_backend.dense(x)
    nd = x.dim()
    for scale in (None, sv / T):
        for inplace in (False, True):
            src = x.clone(memory_format=torch.preserve_format)
            got = kernels.count(src, T, theta, psi, psi_da, scale=scale, channel_dim=channel_dim, backend="native",
                                inplace=inplace)
            cv = [formulas.channel_view(p, nd, channel_dim) for p in (theta, psi, psi_da)]
            want = formulas.spike_count(x.clone(memory_format=torch.preserve_format), T, *cv,
                                        scale=None if scale is None else formulas.channel_view(scale, nd, channel_dim))
            assert (got is src) == inplace
            assert _same_bits(got, want)


def test_native_count_boundaries_are_exact(count_ready):
    # Means that land exactly on count boundaries, for every channel: the rounding of each step matters.
    T, C = 8, 4
    g = torch.Generator().manual_seed(5)
    theta, psi, psi_da, _ = _params(C, torch.float32, g)
    k = torch.arange(-1, T + 2, dtype=torch.float32)
    x = ((k[:, None] * theta - psi) / T - psi_da).reshape(-1, C, 1).expand(-1, C, 3).contiguous()
    got = kernels.count(x.clone(), T, theta, psi, psi_da, channel_dim=1, backend="native")
    cv = [formulas.channel_view(p, 3, 1) for p in (theta, psi, psi_da)]
    assert _same_bits(got, formulas.spike_count(x.clone(), T, *cv))


def test_count_uses_torch_where_the_native_kernel_does_not_apply(count_ready, monkeypatch):
    T = 4
    theta, psi, psi_da = (torch.tensor(v) for v in (0.7, 0.3, 0.02))
    x = torch.randn(6, 5, 4)
    calls = []
    real = native_backend.count
    monkeypatch.setattr(native_backend, "count", lambda *a, **k: calls.append(1) or real(*a, **k))
    want = formulas.spike_count(x.clone(), T, theta, psi, psi_da)
    # a gradient to keep: the torch operations, differentiable
    leaf = x.clone().requires_grad_()
    assert kernels.count(leaf, T, theta, psi, psi_da, backend="native").requires_grad and not calls
    # not dense (a strided slice): the torch operations, same bits
    wide = torch.randn(6, 10, 4)
    wide[:, ::2] = x
    assert _same_bits(kernels.count(wide[:, ::2], T, theta, psi, psi_da, backend="native"), want) and not calls
    # backend torch
    assert _same_bits(kernels.count(x.clone(), T, theta, psi, psi_da, backend="torch"), want) and not calls
    # the native kernel for the plain case
    assert _same_bits(kernels.count(x.clone(), T, theta, psi, psi_da, backend="auto"), want) and calls
    # no AVX2: the torch operations
    calls.clear()
    monkeypatch.setattr(native_backend, "count_available", lambda: False)
    assert _same_bits(kernels.count(x.clone(), T, theta, psi, psi_da, backend="auto"), want) and not calls


def test_native_count_refuses_what_it_would_misread(count_ready):
    p = [torch.ones(3), torch.full((3,), 0.5), torch.zeros(3)]
    with pytest.raises(ValueError, match="3 per-channel parameters but the input has 5 channels"):
        native_backend.count(torch.randn(2, 5, 4), 4, p, None, 1)
    with pytest.raises(ValueError, match="dense float32/float64 CPU tensor"):
        native_backend.count(torch.randn(2, 6, 4)[:, ::2], 4, p, None, 1)
    with pytest.raises(ValueError, match="dense float32/float64 CPU tensor"):
        native_backend.count(torch.randn(2, 3, 4).half(), 4, p, None, 1)
    with pytest.raises(ValueError, match="T from 1 to"):
        native_backend.count(torch.randn(2, 3, 4), 0, p, None, 1)


def test_native_count_in_place_bumps_the_version_autograd_checks(count_ready):
    # Another operation saved x for its backward; counting over x in place must make backward
    # raise, as torch's own in-place operations do, never feed it the counts.
    w = torch.randn(5, 3, 4, requires_grad=True)
    x = torch.randn(5, 3, 4)
    loss = (w * x).sum()
    theta, psi, psi_da = (torch.tensor(v) for v in (0.7, 0.3, 0.0))
    assert kernels.count(x, 8, theta, psi, psi_da, backend="native", inplace=True) is x
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


# -- the kernel cache: private, hashed, rebuilt when damaged --------------------------------------
PROBE = {"probe.cpp": 'extern "C" int sjpc_probe(void) { return 41 + 1; }\n'}


def _planted_library(tmp_path, marker):
    """A library whose constructor creates ``marker``: loading it would run that code."""
    src = ('#include <cstdio>\n'
           f'__attribute__((constructor)) static void planted() {{ std::fopen("{marker}", "w"); }}\n'
           'extern "C" int sjpc_probe(void) { return 666; }\n')
    lib = native_backend.build_library("planted", {"probe.cpp": src}, "probe.cpp", native_backend.FLAGS)
    return lib.read_bytes()


def _mode(path):
    return os.stat(path).st_mode & 0o777


def test_cache_folder_is_private_whatever_the_umask(native_ready, monkeypatch, tmp_path):
    folder = tmp_path / "made" / "cache"
    monkeypatch.setenv("SJPC_CACHE_DIR", str(folder))
    old = os.umask(0)
    try:
        lib = native_backend.build_library("probe", PROBE, "probe.cpp", native_backend.FLAGS)
    finally:
        os.umask(old)
    assert _mode(folder) == 0o700 and _mode(folder.parent) == 0o700
    assert _mode(lib) & 0o077 == 0 and _mode(str(lib) + ".sha256") & 0o077 == 0
    recorded = open(str(lib) + ".sha256").read().strip()
    assert recorded == hashlib.sha256(lib.read_bytes()).hexdigest()


@pytest.mark.parametrize("how", ["world-writable", "group-writable", "symlink", "other-owner"])
def test_cache_folder_others_could_write_is_refused(native_ready, monkeypatch, tmp_path, how):
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    folder = real
    if how == "world-writable":
        os.chmod(real, 0o777)
    elif how == "group-writable":
        os.chmod(real, 0o770)
    elif how == "symlink":
        folder = tmp_path / "link"
        folder.symlink_to(real)
    else:
        if os.geteuid() != 0:
            pytest.skip("giving a folder to another user needs root")
        os.chown(real, 4242, 4242)
    monkeypatch.setenv("SJPC_CACHE_DIR", str(folder))
    pattern = {"world-writable": "writable by other users", "group-writable": "writable by other users",
               "symlink": "symbolic link", "other-owner": "belongs to user id 4242"}[how]
    with pytest.raises(native_backend.CacheError, match=pattern):
        native_backend.load_library("probe", PROBE, "probe.cpp", native_backend.FLAGS)
    assert [p.name for p in real.iterdir()] == []  # nothing built or loaded there


@pytest.mark.parametrize("how", ["symlink", "replaced", "other-owner", "group-writable"])
def test_planted_library_is_never_loaded(native_ready, monkeypatch, tmp_path, how):
    """A library at the expected (predictable) name that is not the one built here is not loaded:
    its constructor never runs, and a fresh build takes its place."""
    marker = tmp_path / "PLANTED_RAN"
    monkeypatch.setenv("SJPC_CACHE_DIR", str(tmp_path / "evil"))
    planted = tmp_path / "planted.so"
    planted.write_bytes(_planted_library(tmp_path, marker))
    monkeypatch.setenv("SJPC_CACHE_DIR", str(tmp_path / "cache"))
    lib = native_backend.build_library("probe", PROBE, "probe.cpp", native_backend.FLAGS)
    lib.unlink()
    if how == "symlink":
        lib.symlink_to(planted)
    else:
        shutil.copyfile(planted, lib)
        if how == "other-owner":
            if os.geteuid() != 0:
                pytest.skip("giving a file to another user needs root")
            os.chown(lib, 4242, 4242)
        elif how == "group-writable":
            os.chmod(lib, 0o770)
            # Even with the planted library's own hash recorded: others could have written it.
            (tmp_path / "cache" / (lib.name + ".sha256")).write_text(hashlib.sha256(planted.read_bytes()).hexdigest())
    loaded = native_backend.load_library("probe", PROBE, "probe.cpp", native_backend.FLAGS)
    assert loaded.sjpc_probe() == 42 and not marker.exists()
    assert not lib.is_symlink() and _mode(lib) & 0o077 == 0 and lib.stat().st_uid == os.geteuid()


def test_library_that_fails_to_load_is_rebuilt(native_ready, monkeypatch, tmp_path):
    monkeypatch.setenv("SJPC_CACHE_DIR", str(tmp_path))
    lib = native_backend.build_library("probe", PROBE, "probe.cpp", native_backend.FLAGS)
    garbage = b"\x7fELF but not a library" * 8
    lib.write_bytes(garbage)
    # Its hash recorded too: the hash passes, loading fails, and the library is built again.
    (tmp_path / (lib.name + ".sha256")).write_text(hashlib.sha256(garbage).hexdigest())
    assert native_backend.load_library("probe", PROBE, "probe.cpp", native_backend.FLAGS).sjpc_probe() == 42
    assert lib.read_bytes() != garbage


@pytest.fixture
def fresh_load(monkeypatch):
    monkeypatch.setattr(kernels, "_warned", set())
    native_backend._load.cache_clear()
    native_backend.count_available.cache_clear()
    yield
    native_backend._load.cache_clear()
    native_backend.count_available.cache_clear()


def test_relative_cache_dir_is_refused_with_one_short_warning(fresh_load, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SJPC_CACHE_DIR", "relative/cache")
    with pytest.raises(native_backend.CacheError, match="must be an absolute path"):
        native_backend.cache_dir()
    assert "absolute path" in native_backend.availability()
    x = torch.randn(4, 6, 3)
    with pytest.warns(RuntimeWarning) as record:
        y = ParallelConversionNode(4, backend="auto")(x)
    (warning,) = [w for w in record if "native CPU kernel" in str(w.message)]
    assert "\n" not in str(warning.message) and len(str(warning.message)) < 400
    assert torch.equal(y, ParallelConversionNode(4, backend="torch")(x))
    assert not (tmp_path / "relative").exists()


def test_compiler_errors_give_a_short_reason(fresh_load, monkeypatch, tmp_path):
    """A failing compiler's whole output stays out of the fallback warning (one line)."""
    fake = tmp_path / "fake-cxx"
    fake.write_text("#!/bin/sh\n" + "echo 'error: line' >&2\n" * 50 + "exit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CXX", str(fake))
    monkeypatch.setenv("SJPC_CACHE_DIR", str(tmp_path / "cache"))
    reason = native_backend.availability()
    assert "failed to build" in reason and "\n" not in reason and len(reason) <= 200


# -- the ctypes boundary: every tensor is checked before the kernel sees a pointer ----------------
def _launch_case(dtype=torch.float32):
    """A valid launch: currents [3, 2, 4, 5], 4 output steps, 4 channels along axis 1 (inner 5)."""
    g = torch.Generator().manual_seed(9)
    x = torch.randn(3, 2, 4, 5, generator=g).to(dtype)
    out = torch.empty(4, 2, 4, 5, dtype=dtype)
    params = [(torch.rand(4, generator=g) + 0.5).to(dtype), torch.full((4,), 0.3, dtype=dtype),
              torch.zeros(4, dtype=dtype), torch.full((4,), 1.5, dtype=dtype)]
    return x, out, params


def test_kernel_wrapper_runs_a_valid_launch(native_ready):
    x, out, params = _launch_case()
    assert native_backend.launch_fire(x, out, params, T=4, inner=5, C=4, late=True, threads=2) is False
    assert _same_bits(out, torch_backend.fire(x, 4, params, 1, True))


def _wrong_launches():
    x, out, params = _launch_case()
    p = params
    wide = torch.randn(3, 2, 4, 10)
    shared = torch.empty(8 * 40)
    return [
        # (what, exception, message, x, out, params, T)
        ("half input", TypeError, "x must be a float32 or float64 tensor", x.half(), out.half(), p, 4),
        ("float64 parameter", TypeError, "theta_pre is torch.float64 but the kernel reads torch.float32",
         x, out, [p[0].double()] + p[1:], 4),
        ("float64 output", TypeError, "out is torch.float64", x, out.double(), p, 4),
        ("a number as parameter", TypeError, "psi_da must be a tensor", x, out, p[:2] + [0.0, p[3]], 4),
        ("strided parameter", ValueError, "psi must be 4 contiguous values", x, out,
         [p[0], torch.full((8,), 0.3)[::2]] + p[2:], 4),
        ("parameter of another size", ValueError, "spike_value must be 4 contiguous values", x, out,
         p[:3] + [torch.ones(3)], 4),
        ("input steps not dense", ValueError, "x must be .* dense steps", wide[..., ::2], out, p, 4),
        ("input steps apart in time", ValueError, "x must be .* dense steps", torch.randn(6, 2, 4, 5)[::2], out, p, 4),
        ("output of another shape", ValueError, "out must be", x, torch.empty(5, 2, 4, 5), p, 4),
        ("output in another layout", ValueError, "out must be", x, torch.empty(4, 2, 5, 4).transpose(2, 3), p, 4),
        ("meta input", ValueError, "strided CPU tensor", x.to("meta"), out, p, 4),
        ("output partly over the input", ValueError, "partly overlaps",
         shared[:120].view(3, 2, 4, 5), shared[40:200].view(4, 2, 4, 5), p, 4),
        ("no output steps", ValueError, "T and T_in must lie in", x, out[:0], p, 0),
    ]


@pytest.mark.parametrize("case", _wrong_launches(), ids=lambda c: c[0])
def test_kernel_wrapper_refuses_what_it_would_misread(native_ready, case):
    _, exc, message, x, out, params, T = case
    before = out.clone() if out.device.type == "cpu" else None
    with pytest.raises(exc, match=message):
        native_backend.launch_fire(x, out, params, T=T, inner=5, C=4, late=True, threads=1)
    if before is not None and out.numel():
        assert torch.equal(out.nan_to_num(), before.nan_to_num())  # nothing written


def test_kernel_checks_its_own_arguments_and_says_why(native_ready):
    """What the wrapper cannot know (the channel run length) the C++ side checks: its
    std::invalid_argument arrives as a ValueError with the kernel's message."""
    x, out, params = _launch_case()
    with pytest.raises(ValueError, match="native kernel: M=40 is not a multiple of inner . C = 3 . 4"):
        native_backend.launch_fire(x, out, params, T=4, inner=3, C=4, late=True, threads=1)
    with pytest.raises(ValueError, match="threads must be an int >= 1"):
        native_backend.launch_fire(x, out, params, T=4, inner=5, C=4, late=True, threads=0)


def test_count_wrapper_refuses_what_it_would_misread(count_ready):
    m = torch.randn(2, 4, 5)
    p = [torch.ones(4), torch.full((4,), 0.5), torch.zeros(4)]
    native_backend.launch_count(m, torch.empty_like(m), p, None, T=4, inner=5, C=4, threads=1)
    with pytest.raises(TypeError, match="m must be a float32 or float64 tensor"):
        native_backend.launch_count(m.bfloat16(), torch.empty_like(m), p, None, T=4, inner=5, C=4, threads=1)
    with pytest.raises(TypeError, match="scale is torch.float64"):
        native_backend.launch_count(m, torch.empty_like(m), p, torch.ones(4, dtype=torch.float64), T=4, inner=5, C=4,
                                    threads=1)
    with pytest.raises(ValueError, match="dense with one layout"):
        native_backend.launch_count(torch.randn(2, 4, 10)[..., ::2], torch.empty_like(m), p, None, T=4, inner=5, C=4,
                                    threads=1)
    with pytest.raises(ValueError, match="dense with one layout"):
        native_backend.launch_count(m, torch.empty(2, 5, 4).transpose(1, 2), p, None, T=4, inner=5, C=4, threads=1)
    with pytest.raises(ValueError, match="theta_pre must be 4 contiguous values"):
        native_backend.launch_count(m, torch.empty_like(m), [torch.ones(2)] + p[1:], None, T=4, inner=5, C=4,
                                    threads=1)


@pytest.mark.parametrize("kind,exc,message", [
    (0, MemoryError, "out of memory"),
    (1, ValueError, "an invalid argument"),
    (2, RuntimeError, "a runtime error"),
    (3, RuntimeError, "unknown C\\+\\+ exception"),
])
def test_cpp_exceptions_become_their_python_errors(native_ready, kind, exc, message):
    with pytest.raises(exc, match=f"native kernel: {message}") as info:
        native_backend._call(native_backend._load()[0].sjpc_native_raise, kind)
    assert type(info.value) is exc


# -- threads: torch's count, workers kept for the process ------------------------------------------
def _big_launch():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(4, 8, 64, 32, 32, generator=g)  # 2^19 neurons per step: many blocks per part
    return x, [torch.tensor(0.9), torch.tensor(0.45), torch.tensor(0.0), torch.tensor(1.0)]


def _worker_threads():
    """Ids of the native library's worker threads (named ``sjpc_native``), or ``None`` off Linux."""
    if not os.path.isdir("/proc/self/task"):
        return None
    ids = set()
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                if f.read().strip() == "sjpc_native":
                    ids.add(tid)
        except OSError:  # a thread that ended meanwhile
            pass
    return ids


def test_native_workers_are_started_once_and_reused(native_ready):
    x, params = _big_launch()
    want = torch_backend.fire(x, 4, params, 1, True)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        x.sum()  # let torch's own pool settle at 3 threads before the threads are listed
        assert _same_bits(native_backend.fire(x, 4, params, 1, True), want)
        workers = native_backend.workers()
        assert workers >= 2  # 3 parts: this thread and two workers
        named = _worker_threads()
        if named is not None:
            assert len(named) == workers
        for threads in (3, 2, 1, 3):
            torch.set_num_threads(threads)
            assert _same_bits(native_backend.fire(x, 4, params, 1, True), want)
        assert native_backend.workers() == workers  # no thread started per call
        assert _worker_threads() == named  # the same threads, not new ones of the same number
    finally:
        torch.set_num_threads(before)


def test_native_calls_from_two_threads_at_once(native_ready):
    """One parallel call at a time uses the workers; a call meanwhile runs its parts itself."""
    import threading

    x, params = _big_launch()
    vectors = native_backend._per_channel(x[0], 1, params, "test")[0]
    want = torch_backend.fire(x, 4, params, 1, False)
    results, errors = [], []

    def run():
        try:
            for _ in range(3):
                out = torch.empty_like(want)
                native_backend.launch_fire(x, out, vectors, 4, x[0].numel(), 1, False, 3)
                results.append(out)
        except BaseException as exc:  # reported below, not lost in the thread
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and len(results) == 6
    assert all(_same_bits(r, want) for r in results)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_native_kernel_runs_in_a_forked_child(native_ready):
    """The child of a fork has none of the parent's workers; its pool starts empty instead of
    waiting forever on threads that do not exist there."""
    import time

    x, params = _big_launch()
    vectors = native_backend._per_channel(x[0], 1, params, "test")[0]
    want = torch.empty(4, *x.shape[1:])
    native_backend.launch_fire(x, want, vectors, 4, x[0].numel(), 1, True, 3)  # the parent's workers exist
    digest = hashlib.sha256(want.numpy().tobytes()).hexdigest()
    pid = os.fork()
    if pid == 0:  # the child: only the kernel, then leave without running the parent's cleanup
        code = 2
        try:
            out = torch.empty(4, *x.shape[1:])
            native_backend.launch_fire(x, out, vectors, 4, x[0].numel(), 1, True, 3)
            code = 0 if hashlib.sha256(out.numpy().tobytes()).hexdigest() == digest else 1
        finally:
            os._exit(code)
    deadline = time.monotonic() + 120
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            pytest.fail("the kernel hung in a forked child")
        time.sleep(0.05)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
