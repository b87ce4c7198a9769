"""The bench's plots: success and feature-FID vs budget (per sampler; tiers as rows, rho as columns),
latency histograms per tier, and latency utilisation."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from abcd_edge.bench.grid import METHODS
from abcd_edge.bench.store import EXAMPLES_DIR, RESULTS_CSV, example_name, read_csv, slug


MATPLOTLIB_MISSING = "plots skipped: matplotlib is not installed (pip install matplotlib)"
PLOT_DESCRIPTIONS = {"examples.png": "one seed's image at each budget, time-uniform above ABCD"}


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def plots_line(plots: list[str], note: str | None = None) -> str:
    """summary.md's line naming the plots actually written (or why there are none)."""
    if not plots:
        return f"Plots: none — {note}." if note else "Plots: none."
    return "Plots: " + ", ".join(f"`{p}`" + (f" ({PLOT_DESCRIPTIONS[p]})" if p in PLOT_DESCRIPTIONS else "")
                                 for p in plots) + "."


def make_plots(out: Path, cells: list[dict]) -> list[str]:
    """Write the plots into ``out``; return the names of those written ([] without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    out = Path(out)
    made = []
    ok = [c for c in cells if c["status"] == "ok"]
    tiers = list(dict.fromkeys(c["tier"] for c in cells))
    rhos = sorted({c["rho"] for c in cells})
    samplers = sorted({c["sampler"] for c in cells})
    sim = {c["tier"]: c["simulated"] for c in cells}
    methods = [m for m in METHODS if any(c["method"] == m for c in ok)]
    colors = {m: plt.cm.tab10(i) for i, m in enumerate(METHODS)}

    def title(t):
        return f"{t} (simulated)" if sim.get(t) else t

    for key, label, fname in (("success", "success rate", "success_vs_budget"),
                              ("fid", "feature-FID of on-time images", "fid_vs_budget")):
        for s in samplers:
            fig, axes = plt.subplots(len(tiers), len(rhos), figsize=(4.2 * len(rhos), 3.2 * len(tiers)),
                                     squeeze=False)
            for i, t in enumerate(tiers):
                for j, q in enumerate(rhos):
                    ax = axes[i][j]
                    for m in methods:
                        pts = sorted((c["budget_ms"], c[key]) for c in ok if c["tier"] == t and c["sampler"] == s
                                     and c["rho"] == q and c["method"] == m and c[key] is not None)
                        if pts:
                            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=m, color=colors[m],
                                    linestyle="--" if m == "oracle" else "-")
                    ax.set_xscale("log")
                    ax.set_title(f"{title(t)}, rho={q}", fontsize=9)
                    ax.set_xlabel("budget (ms)")
                    ax.set_ylabel(label)
                    if key == "success":
                        ax.set_ylim(-0.02, 1.02)
            seen_labels: dict[str, Any] = {}
            for ax in axes.flat:
                for h, lab in zip(*ax.get_legend_handles_labels()):
                    seen_labels.setdefault(lab, h)
            labels = [m for m in methods if m in seen_labels]
            handles = [seen_labels[m] for m in labels]
            if handles:
                fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 8), fontsize=8)
            fig.suptitle(f"{label} vs budget — sampler {s}", fontsize=10)
            fig.tight_layout(rect=(0, 0.06, 1, 0.97))
            path = out / f"{fname}_{s}.png"
            fig.savefig(path, dpi=90)
            plt.close(fig)
            made.append(path.name)
    rows = [r for r in read_csv(out / RESULTS_CSV) if r["status"] == "ok"]
    for t in tiers:
        budgets = sorted({(float(r["budget_ms"]), r["budget"]) for r in rows if r["tier"] == t})
        if not budgets:
            continue
        fig, axes = plt.subplots(1, len(budgets), figsize=(4.5 * len(budgets), 3.3), squeeze=False)
        for j, (bms, b) in enumerate(budgets):
            ax = axes[0][j]
            for m in methods:
                lat = [float(r["latency_ms"]) for r in rows if r["tier"] == t and r["budget"] == b and r["method"] == m]
                if lat:
                    ax.hist(lat, bins=30, histtype="step", label=m, color=colors[m])
            ax.axvline(bms, color="k", linestyle="--", linewidth=1)
            ax.set_title(f"{title(t)}, budget {b}", fontsize=9)
            ax.set_xlabel("latency (ms); dashed: budget")
        axes[0][0].legend(fontsize=7)
        fig.tight_layout()
        path = out / f"latency_hist_{slug(t)}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        made.append(path.name)
    groups = sorted({(c["tier"], c["budget_ms"], c["budget"]) for c in ok})
    if groups:
        fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(groups) * max(1, len(methods)) / 3), 3.6))
        w = 0.8 / max(1, len(methods))
        for i, m in enumerate(methods):
            ys = []
            for g in groups:
                v = [c["util"] for c in ok if (c["tier"], c["budget_ms"], c["budget"]) == g and c["method"] == m
                     and c["util"] is not None]
                ys.append(float(np.mean(v)) if v else 0.0)
            ax.bar(np.arange(len(groups)) + i * w, ys, w, label=m, color=colors[m])
        ax.axhline(1.0, color="k", linestyle="--", linewidth=1)
        ax.set_xticks(np.arange(len(groups)) + 0.4 - w / 2)
        ax.set_xticklabels([f"{title(g[0])}\n{g[2]}" for g in groups], fontsize=7)
        ax.set_ylabel("mean latency / budget")
        ax.legend(fontsize=7, ncol=4)
        fig.tight_layout()
        fig.savefig(out / "utilisation.png", dpi=90)
        plt.close(fig)
        made.append("utilisation.png")
    picture = side_by_side(out, cells, plt)
    if picture:
        made.append(picture)
    return made


def side_by_side(out: Path, cells: list[dict], plt) -> str | None:
    """examples.png: one seed's image at each budget, time-uniform above ABCD (rho = the grid's highest),
    one block of rows per tier; the cell's feature-FID under each picture."""
    folder = Path(out) / EXAMPLES_DIR
    tiers = list(dict.fromkeys(c["tier"] for c in cells))
    budgets = sorted({(c["budget_ms"], c["budget"]) for c in cells})
    rho = max(c["rho"] for c in cells)
    rows = [(t, m) for t in tiers for m in ("uniform", "abcd")]
    if not any((folder / example_name(t, b, m)).is_file() for t, m in rows for _, b in budgets):
        return None
    fig, axes = plt.subplots(len(rows), len(budgets), figsize=(2.2 * len(budgets), 2.4 * len(rows)), squeeze=False)
    look = {(c["tier"], c["budget"], c["method"], c["rho"]): c for c in cells}
    for i, (t, m) in enumerate(rows):
        for j, (_, b) in enumerate(budgets):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            path = folder / example_name(t, b, m)
            if path.is_file():
                ax.imshow(plt.imread(str(path)), interpolation="nearest")
            c = look.get((t, b, m, rho))
            fid = f"FID {c['fid']:.1f}" if c and c.get("fid") is not None else ""
            ax.set_title(f"{b}  {fid}", fontsize=8)
            if j == 0:
                ax.set_ylabel(f"{t}\n{'time-uniform' if m == 'uniform' else f'ABCD rho={rho:g}'}", fontsize=8)
    fig.tight_layout()
    fig.savefig(Path(out) / "examples.png", dpi=110)
    plt.close(fig)
    return "examples.png"
