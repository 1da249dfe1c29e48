"""Generate the figures of the theory and quickstart pages (run from the repository root, a few seconds):

    python docs/figures/make_figures.py

* ``sorted_trains.png``: spike rasters of a ParallelConversionNode for neurons with different
  input means, the paper's step form ``V[x] = T/(T-x+1) m + b[x]`` for the same neurons, and an
  IF neuron (soft reset, membrane starting at half the threshold) fed the same currents;
* ``pipeline.png`` and ``one_layer.png``: diagrams of the conversion chain and of one layer;
* ``qcfs_staircase.png``: QCFS rate vs SNN firing rate as a function of the mean input current,
  for ``T == L`` (identical staircases, Theorem 4.1 (i)) and ``T != L`` (Theorem 4.1 (ii));
* ``compare_resnet20.png`` and ``compare_cnn.png``: accuracy against ``T`` from the committed
  comparison tables ``docs/results/compare_resnet20.{json,md}`` and ``compare_cnn_T4-32.md``.
  Their timings are single runs on a loaded machine, so the plots leave throughput out (the
  benchmark pages have medians of repeated runs).

The script checks what it draws: the node's spikes equal the matrix form's, and its rates equal
QCFS at ``T == L``.
"""
from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from spikingjelly.activation_based import functional, neuron  # noqa: E402

from sj_parallel_conversion import ParallelConversionNode  # noqa: E402
from sj_parallel_conversion import formulas  # noqa: E402
from sj_parallel_conversion.tools.compare import LABELS, ComparisonRow, ComparisonTable  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def sorted_trains(path: str) -> None:
    T, theta = 8, 1.0
    means = torch.tensor([0.05, 0.2, 0.33, 0.5, 0.62, 0.8, 0.95, 1.1], dtype=torch.float64)
    # A current sequence whose time mean is `means` but whose steps vary (parallel conversion
    # only looks at the mean): alternate +/- 0.3 around it.
    wiggle = 0.3 * torch.tensor([(-1.0) ** t for t in range(T)], dtype=torch.float64)
    current = means[None, :] + wiggle[:, None]                              # [T, N]
    node = ParallelConversionNode(T, v_threshold=theta).double()
    spikes = node(current)                                                  # [T, N], values theta or 0
    matrix = formulas.matrix_form_spikes(current, theta, theta / 2, channel_dim=0)
    assert torch.equal((spikes > 0).double(), matrix), "closed form and matrix form disagree"

    x = torch.arange(1, T + 1, dtype=torch.float64)
    b = formulas.shift_vector(T, theta / 2)                                 # [T]
    v_step = T / (T - x + 1)[:, None] * means[None, :] + b[:, None]         # [T, N]

    # The IF neuron gets the same input and starts at half the threshold, as SpikingJelly's
    # RateCodingRecipe(half_threshold=True) sets it: its counts are then comparable with the
    # parallel neuron's (both round m*T to the nearest integer), and only the spike order differs.
    if_node = neuron.HalfThresholdIFNode(v_threshold=theta, step_mode="m").double()
    functional.reset_net(if_node)
    if_spikes = if_node(current)
    functional.reset_net(if_node)

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.9), gridspec_kw={"width_ratios": [1, 1.25, 1]})
    ax = axes[0]
    for n in range(len(means)):
        t_on = np.nonzero(spikes[:, n].numpy() > 0)[0] + 1
        ax.scatter(t_on, np.full(len(t_on), n), marker="|", s=220, color="tab:blue")
        ax.text(T + 0.6, n, f"k={len(t_on)}", va="center", fontsize=7)
    ax.set_yticks(range(len(means)), [f"m={m:.2f}" for m in means.tolist()])
    ax.set_xticks(range(1, T + 1))
    ax.set_xlim(0.5, T + 1.5)
    ax.set_xlabel("time step x")
    ax.set_title(f"ParallelConversionNode, T={T}, theta={theta:g}\n(sorted, back-loaded trains)", fontsize=9)
    ax.grid(axis="x", alpha=0.3)

    ax = axes[1]
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(means)))
    for n in range(len(means)):
        v = v_step[:, n].numpy()
        ax.plot(x.numpy(), v, marker="o", ms=3, color=colors[n], label=f"m={means[n]:.2f}")
        fired = v >= theta
        ax.scatter(x.numpy()[fired], v[fired], s=40, facecolor="none", edgecolor="k", lw=0.8)
    ax.axhline(theta, color="k", ls="--", lw=1, label="theta_pre")
    ax.set_yscale("log")
    ax.set_xticks(range(1, T + 1))
    ax.set_xlabel("time step x")
    ax.set_ylabel("T/(T-x+1) m + b[x]")
    ax.set_title("step form (paper Eq. 8 + shift b): a neuron fires\nat step x iff the curve is above theta "
                 "(circled)", fontsize=9)
    ax.legend(fontsize=6, ncol=2, loc="upper left")

    ax = axes[2]
    for n in range(len(means)):
        t_on = np.nonzero(if_spikes[:, n].numpy() > 0)[0] + 1
        ax.scatter(t_on, np.full(len(t_on), n), marker="|", s=220, color="tab:red")
        ax.text(T + 0.6, n, f"k={len(t_on)}", va="center", fontsize=7)
    ax.set_yticks(range(len(means)), [f"m={m:.2f}" for m in means.tolist()])
    ax.set_xticks(range(1, T + 1))
    ax.set_xlim(0.5, T + 1.5)
    ax.set_xlabel("time step t")
    ax.set_title("IF neuron, soft reset, v0 = theta/2, same input\n(spikes spread over time)", fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def staircases(path: str) -> None:
    theta = 1.0
    m = torch.linspace(-0.1, 1.15, 2001, dtype=torch.float64)

    def snn_rate(T: int) -> torch.Tensor:
        node = ParallelConversionNode(T, v_threshold=theta).double()
        return node.rate(m[:, None])[:, 0]

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.9), sharey=True)
    L = 4
    q = formulas.qcfs(m, theta, L, theta / 2)
    r = snn_rate(L)
    assert torch.equal(q, r), "T == L must be lossless"
    ax = axes[0]
    ax.plot(m, q, lw=4, alpha=0.35, color="tab:blue", label=f"QCFS, L={L}")
    ax.plot(m, r, lw=1.2, color="tab:orange", label=f"parallel SNN rate, T={L}")
    ax.plot(m, m.clamp(0, theta), lw=0.8, ls=":", color="k", label="ClipReLU")
    ax.set_title(f"T == L = {L}: the two staircases coincide (Theorem 4.1 (i))", fontsize=9)

    L = 8
    ax = axes[1]
    ax.plot(m, formulas.qcfs(m, theta, L, theta / 2), lw=4, alpha=0.35, color="tab:blue", label=f"QCFS, L={L}")
    for T, c in ((4, "tab:orange"), (16, "tab:green")):
        ax.plot(m, snn_rate(T), lw=1.2, color=c, label=f"parallel SNN rate, T={T} (uncalibrated)")
    ax.plot(m, m.clamp(0, theta), lw=0.8, ls=":", color="k", label="ClipReLU")
    ax.set_title(f"T != L = {L}: different steps, zero mean difference for\nuniformly spread inputs "
                 "(Theorem 4.1 (ii)); DA-QCFS calibrates the rest", fontsize=9)
    for ax in axes:
        ax.set_xlabel("mean input current m (theta = 1)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")
    axes[0].set_ylabel("output rate (spike value x k / T)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _boxes(ax, labels, y, colors, arrow_labels=()):
    """Boxes left to right at height y joined by arrows (optionally labelled)."""
    n = len(labels)
    xs = np.linspace(0.1, 0.9, n)
    for i, (x, text, c) in enumerate(zip(xs, labels, colors)):
        ax.text(x, y, text, ha="center", va="center", fontsize=8.5,
                bbox=dict(boxstyle="round,pad=0.5", fc=c, ec="0.3"))
        if i + 1 < n:
            ax.annotate("", xy=(xs[i + 1] - 0.085, y), xytext=(x + 0.085, y),
                        arrowprops=dict(arrowstyle="->", lw=1.2))
            if i < len(arrow_labels) and arrow_labels[i]:
                ax.text((x + xs[i + 1]) / 2, y + 0.13, arrow_labels[i], ha="center", va="bottom", fontsize=7,
                        color="0.25")


def pipeline(path: str) -> None:
    """The conversion chain of one activation site, for both sources."""
    fig, ax = plt.subplots(figsize=(11, 2.9))
    ax.set_axis_off()
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ann, mid, snn = "#dbe9f6", "#fdebd0", "#d5f5e3"
    _boxes(ax, ["ReLU\n(trained ANN)", "ClipReLU\nclip(x, 0, theta)", "DA-QCFS\nT levels, psi_DA, phi_DA",
                "ParallelConversionNode\ntheta_pre, theta_post, psi_DA"], 0.68, [ann, mid, mid, snn],
           ["record per-channel\nmax on data", "Algorithm 1 / learned\ncalibration on data", "same rates,\nexact"])
    _boxes(ax, ["QCFS, L levels\n(trained ANN)", "(already clipped\nat its theta)", "DA-QCFS\nT levels",
                "ParallelConversionNode"], 0.2, ["#dbe9f6", "white", mid, snn], ["", "", "same rates,\nexact"])
    ax.text(0.5, 0.36, "T = L: nothing to calibrate, no data (lossless);   T != L: calibrated like the ReLU path",
            ha="center", fontsize=7.5, color="0.25")
    ax.set_title("What the recipe does to every activation site (ann2snn.Converter + ParallelConversionRecipe)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def one_layer(path: str) -> None:
    """What one parallel neuron layer computes, with shapes."""
    fig, ax = plt.subplots(figsize=(12, 1.9))
    ax.set_axis_off()
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    _boxes(ax, ["input currents\n[T_in, N, C, ...]", "time mean m\n[N, C, ...]",
                "spike count k =\nfloor((m + psi_DA) T\n/ theta_pre + 1/2),\nclipped to 0..T",
                "sorted train [T, N, C, ...]\nlast k steps = theta_post"], 0.5,
           ["#dbe9f6", "#fdebd0", "#fdebd0", "#d5f5e3"], ["mean over\nsteps", "closed form,\nO(1) per neuron",
                                                           "write T steps\nat once"])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _md_rows(path: str, keep=lambda method: True) -> list:
    """The rows of the method tables in a results file (the text ``ComparisonTable.to_text`` writes)."""
    methods = {label: m for m, label in LABELS.items()}
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if len(cells) != 7 or cells[0] not in methods or not keep(methods[cells[0]]):
                continue
            T = None if cells[1] == "-" else int(cells[1])
            rows.append(ComparisonRow(methods[cells[0]], T, float(cells[2]) / 100, 0, float(cells[3]),
                                      float(cells[4]), cells[6]))
    if not rows:
        raise ValueError(f"{path}: no comparison rows found")
    return rows


def compare_plots(out_dir: str) -> list:
    results = os.path.join(HERE, "..", "results")
    r20 = ComparisonTable.from_json(os.path.join(results, "compare_resnet20.json"))
    # The same model, test images and calibration batches with SpikingJelly's strongest settings,
    # run later (second compare table of the same file).
    r20.rows += _md_rows(os.path.join(results, "compare_resnet20.md"), lambda m: m.startswith("rate-cw-"))
    r20.title += "; accuracy only (timings: benchmarks page)"
    cnn = ComparisonTable(rows=_md_rows(os.path.join(results, "compare_cnn_T4-32.md")),
                          title="CIFAR-10 five-layer CNN (ReLU), 500 test images; accuracy only")
    paths = []
    for name, table in (("compare_resnet20.png", r20), ("compare_cnn.png", cnn)):
        table.timed_calls = 1  # timings not robust (loaded machine, sums of calls): accuracy only
        paths.append(table.plot(os.path.join(out_dir, name)))
    return paths


def main() -> None:
    torch.set_num_threads(1)
    for path in compare_plots(HERE):
        print(f"wrote {os.path.relpath(path)}")
    for name, fn in (("sorted_trains.png", sorted_trains), ("qcfs_staircase.png", staircases),
                     ("pipeline.png", pipeline), ("one_layer.png", one_layer)):
        out = os.path.join(HERE, name)
        fn(out)
        print(f"wrote {os.path.relpath(out)}")


if __name__ == "__main__":
    main()
