"""The figures the command line draws (matplotlib, headless)."""
from __future__ import annotations


def plot_compare(results, metric, path, args) -> None:
    """Bars of ``metric`` per init, grouped by bit width (``cloq compare``'s compare.png)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    inits = list(dict.fromkeys(r["init"] for r in results))
    bits = list(dict.fromkeys(r["bits"] for r in results))
    width = 0.8 / len(inits)
    for i, init in enumerate(inits):
        vals = [next(r[metric] for r in results if r["bits"] == b and r["init"] == init) for b in bits]
        ax.bar([j + i * width for j in range(len(bits))], vals, width, label=init)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(bits))], [f"{b}-bit" for b in bits])
    ax.set_ylabel(f"{metric} vs full precision (held-out)")
    ax.set_title(f"LoRA init at rank {args.rank}, {args.quantizer} g{args.group_size}")
    if metric == "cosine":
        lo = min(r[metric] for r in results)
        ax.set_ylim(max(0.0, lo - 0.05), 1.0)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
