"""The report of evaluate_models: results.json, a Markdown summary table, and plots."""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from goldfish_ds.eval.membership import ATTACKS


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _columns(results: dict) -> list[tuple[str, Callable[[dict], str]]]:
    """(header, cell of a run) for every measurement present in some run."""
    runs = list(results["runs"].values())
    cols: list[tuple[str, Callable[[dict], str]]] = [
        ("docs (skipped)", lambda r: f"{r['num_documents']} ({r['num_skipped']})"),
        ("exact match", lambda r: _fmt(r["exact_match_rate"])),
        ("RougeL", lambda r: _fmt(r["rougeL_mean"])),
        ("token match", lambda r: _fmt(r["token_match_mean"])),
        ("longest run", lambda r: _fmt(r["longest_run_mean"], 1)),
    ]
    if any("beam" in r for r in runs):
        cols += [("beam exact match", lambda r: _fmt(r["beam"]["exact_match_rate"]) if "beam" in r else "-"),
                 ("beam RougeL", lambda r: _fmt(r["beam"]["rougeL_mean"]) if "beam" in r else "-")]
    if any("mia" in r for r in runs):
        for attack in ATTACKS:
            cols += [(f"AUC {attack}", lambda r, a=attack: _fmt(r["mia"][a]["auc"]) if "mia" in r else "-"),
                     (f"TPR@1%FPR {attack}",
                      lambda r, a=attack: _fmt(r["mia"][a]["tpr_at_1pct_fpr"]) if "mia" in r else "-")]
    if any("val_loss" in r for r in runs):  # added by the memorization experiment
        cols.append(("val loss", lambda r: _fmt(r.get("val_loss"), 4)))
    if any("divergence" in r for r in runs):
        cols += [("divergences on dropped", lambda r: _fmt(r["divergence"]["on_dropped_rate"])
                  if "divergence" in r else "-"),
                 ("suffix drop rate", lambda r: _fmt(r["divergence"]["suffix_drop_rate"])
                  if "divergence" in r else "-")]
    return cols


def summary_markdown(results: dict) -> str:
    """A Markdown table with one row per model."""
    cols = _columns(results)
    config = results["config"]
    prompt = "all but the last n tokens" if config["prefix_len"] is None else f"the first {config['prefix_len']} tokens"
    lines = [f"Extraction: prompt = {prompt}, n = {config['n']} tokens decoded greedily"
             + (f" and with {config['num_beams']}-beam search" if config["num_beams"] else "") + ".", "",
             "| model | " + " | ".join(h for h, _ in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, run in results["runs"].items():
        lines.append(f"| {name} | " + " | ".join(cell(run) for _, cell in cols) + " |")
    return "\n".join(lines) + "\n"


def _plot_rouge_histograms(results: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    runs = results["runs"]
    fig, axes = plt.subplots(1, len(runs), figsize=(3.6 * len(runs), 3.0), sharey=True, squeeze=False)
    bins = [i / 20 for i in range(21)]
    for ax, (name, run) in zip(axes[0], runs.items()):
        ax.hist([d["rougeL"] for d in run["documents"]], bins=bins, color="tab:blue", alpha=0.8, label="greedy")
        if "beam" in run:
            ax.hist([d["rougeL"] for d in run["beam"]["documents"]], bins=bins, histtype="step", color="tab:red",
                    linewidth=1.5, label=f"{run['beam']['num_beams']} beams")
            ax.legend(fontsize=8)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("RougeL")
        ax.set_xlim(0, 1)
    axes[0][0].set_ylabel("documents")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_exact_match(results: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    names = list(results["runs"])
    runs = [results["runs"][n] for n in names]
    has_beam = any("beam" in r for r in runs)
    width = 0.4 if has_beam else 0.6
    fig, ax = plt.subplots(figsize=(max(3.5, 1.3 * len(names) + 1.5), 3.2))
    xs = range(len(names))
    ax.bar([x - (width / 2 if has_beam else 0) for x in xs], [r["exact_match_rate"] or 0.0 for r in runs],
           width, label="greedy", color="tab:blue")
    if has_beam:
        ax.bar([x + width / 2 for x in xs], [r["beam"]["exact_match_rate"] or 0.0 if "beam" in r else 0.0
                                             for r in runs], width, label="beam search", color="tab:red")
        ax.legend(fontsize=8)
    ax.set_xticks(list(xs), names)
    ax.set_ylim(0, 1)
    ax.set_ylabel(f"exact match rate ({results['config']['n']} tokens)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _goldfish_k(run: dict) -> int | None:
    """k of a run trained with the goldfish loss (the memorization experiment's "goldfish" entry), else None."""
    return run["goldfish"]["k"] if run.get("goldfish") else None


def _plot_against_k(results: dict, path: Path) -> None:
    """The paper's figure: exact-match rate and RougeL of each goldfish run against k (log scale), one line per h
    (dashed: beam search), the standard and control runs as horizontal reference lines."""
    import matplotlib.pyplot as plt

    runs = results["runs"]
    goldfish = sorted((r["goldfish"]["h"], r["goldfish"]["k"], r) for r in runs.values() if _goldfish_k(r))
    ks = sorted({k for _, k, _ in goldfish})
    fig, axes = plt.subplots(1, 2, figsize=(9.0, 3.4))
    for ax, key, label in ((axes[0], "exact_match_rate", "exact match rate"), (axes[1], "rougeL_mean", "RougeL")):
        for h in sorted({h for h, _, _ in goldfish}):
            points = [(k, r) for hh, k, r in goldfish if hh == h]
            ax.plot([k for k, _ in points], [r[key] or 0.0 for _, r in points], "o-", label=f"goldfish h={h}")
            beams = [(k, r["beam"][key] or 0.0) for k, r in points if "beam" in r]
            if beams:
                ax.plot(*zip(*beams), "s--", label=f"goldfish h={h}, {points[0][1]['beam']['num_beams']} beams")
        for (name, run), color in zip(((n, r) for n, r in runs.items() if not _goldfish_k(r)),
                                      ("tab:red", "tab:gray", "tab:purple", "tab:brown")):
            ax.axhline(run[key] or 0.0, color=color, linestyle="-", linewidth=1, label=name)
            if "beam" in run:
                ax.axhline(run["beam"][key] or 0.0, color=color, linestyle=":", linewidth=1,
                           label=f"{name}, {run['beam']['num_beams']} beams")
        ax.set_xscale("log")
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.minorticks_off()
        ax.set_xlabel("goldfish k")
        ax.set_ylabel(f"{label} ({results['config']['n']} tokens)")
        ax.set_ylim(0, 1.02)
    axes[1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(results: dict, out_dir: str | Path, json_name: str = "results.json") -> list[Path]:
    """Write results.json (or json_name), summary.md and, when matplotlib is installed (the [eval] extra), the
    plots rougeL_hist.png, exact_match.png and, when runs carry goldfish settings (the memorization
    experiment), memorization_vs_k.png; summary.md names the plots written. Returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plots = [("rougeL_hist.png", _plot_rouge_histograms), ("exact_match.png", _plot_exact_match)]
    if any(_goldfish_k(r) for r in results["runs"].values()):
        plots.append(("memorization_vs_k.png", _plot_against_k))
    try:
        import matplotlib
    except ImportError:
        plots, note = [], "No plots: matplotlib is not installed (pip install \"goldfish_ds[eval]\")."
    else:
        matplotlib.use("Agg")  # files only, no display
        note = "Plots: " + ", ".join(name for name, _ in plots) + "."
    paths = [out / json_name, out / "summary.md"]
    paths[0].write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    paths[1].write_text(summary_markdown(results) + "\n" + note + "\n", encoding="utf-8")
    for name, plot in plots:
        plot(results, out / name)
        paths.append(out / name)
    return paths
