"""Every plot a person looks at, in one place: a run's perplexity and plan, a comparison of
strategies, and the study's curves and final perplexities (matplotlib, written as PNG)."""

from __future__ import annotations

from pathlib import Path

from hsplitlora.strategies import STRATEGIES


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def whole_model(strategy: str) -> bool:
    """Whether the strategy runs the whole model on every client (or one central trainer)."""
    return strategy in STRATEGIES and not STRATEGIES[strategy].crosses_cut()


def plot_run(metrics: list[dict], folder: Path) -> list[Path]:
    """val_ppl vs round and vs simulated time; each client's split point and total rank."""
    from matplotlib.ticker import MaxNLocator

    plt = pyplot()
    paths = []
    evaluated = [m for m in metrics if m.get("val_ppl") is not None]
    strategy = metrics[0]["strategy"] if metrics else ""
    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, label in ((axes[0], "round", "round"), (axes[1], "sim_time_s", "simulated time (s)")):
        ax.plot([m[key] for m in evaluated], [m["val_ppl"] for m in evaluated], marker="o", label=strategy)
        ax.set_xlabel(label)
        if key == "round":
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("validation perplexity")
        ax.grid(alpha=0.3)
        ax.legend()
    figure.suptitle("Validation perplexity (E2E test references)")
    figure.tight_layout()
    paths.append(folder / "val_ppl.png")
    figure.savefig(paths[-1], dpi=120)
    plt.close(figure)

    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    clients = sorted({c["client"] for m in metrics for c in m["clients"]})
    styles = ["-", "--", ":", "-."]
    for cid in clients:
        rows = [(m["round"], c) for m in metrics for c in m["clients"] if c["client"] == cid]
        # Clients with equal values overlap: shrinking markers and varied line styles keep all visible.
        style = {"marker": "o", "markersize": 9 - 1.2 * (cid % 6), "linestyle": styles[cid % 4],
                 "label": f"client {cid}"}  # fmt: skip
        axes[0].plot([r for r, _ in rows], [c["split_point"] for _, c in rows], **style)
        axes[1].plot([r for r, _ in rows], [c["client_rank_total"] for _, c in rows], **style)
    tail = next((c.get("tail_blocks") for m in metrics for c in m["clients"]), None)
    front = "front blocks on the client" if tail is not None else "blocks on the client"
    axes[0].set_ylabel(f"split point ({front})")
    if tail is not None:
        axes[0].set_title(f"U-shaped: every client also runs the last {tail} block(s) and the head", fontsize=9)
    axes[1].set_ylabel("total LoRA rank on the client")
    for ax in axes:
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5))
    figure.suptitle(f"{strategy}: each client's cut and ranks")
    figure.tight_layout()
    paths.append(folder / "plan.png")
    figure.savefig(paths[-1], dpi=120)
    plt.close(figure)
    return paths


def plot_comparison(results: dict, target: float, path: Path) -> Path:
    from matplotlib.ticker import MaxNLocator

    plt = pyplot()
    figure, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for strategy, result in results.items():
        evaluated = [m for m in result.metrics if m["val_ppl"] is not None]
        style = "--" if whole_model(strategy) else "-"
        for ax, key in ((axes[0], "round"), (axes[1], "sim_time_s")):
            ax.plot([m[key] for m in evaluated], [m["val_ppl"] for m in evaluated], style, marker="o", label=strategy)
    for ax, label in ((axes[0], "round"), (axes[1], "simulated time (s)")):
        ax.axhline(target, color="grey", linewidth=0.8, linestyle=":", label=f"target {target:.3f}")
        ax.set_xlabel(label)
        ax.set_ylabel("validation perplexity")
        ax.grid(alpha=0.3)
    axes[0].xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[1].legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5))
    figure.suptitle("Strategies on identical data, budgets and seed (dashed: whole model on every client, "
                    "not limited by the budgets)", fontsize=10)  # fmt: skip
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
