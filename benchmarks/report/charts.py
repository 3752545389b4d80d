"""The page's charts: the speed measurements as bar panels, test-split mask AP against training time."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .formatting import ap, image_size


def speed_chart(secs: dict[str, Any], path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []
    inf, tr, ms = secs.get("inference"), secs.get("train"), secs.get("msda")
    if inf:
        names = [n for n in ("isda", "maskrcnn_eq", "maskrcnn") if n in inf]
        labels = {"isda": "ISDA-R50", "maskrcnn_eq": "Mask R-CNN\n(same speed-ups)",
                  "maskrcnn": "Mask R-CNN\n(stock)" if "maskrcnn_eq" in inf else "Mask R-CNN"}
        panels.append((f"Inference latency, {image_size(inf)} (s)", [labels[n] for n in names],
                       [inf[n]["time"]["median"] for n in names]))
        panels.append(("Inference peak RSS (GiB)", [labels[n] for n in names], [inf[n]["peak_rss_gib"] for n in names]))
    if tr:
        names = [n for n in ("isda", "maskrcnn_frozen_eq", "maskrcnn_frozen", "maskrcnn") if n in tr]
        labels = {"isda": "ISDA-R50", "maskrcnn_frozen_eq": "Mask R-CNN\n(frozen st.1,\nsame speed-ups)",
                  "maskrcnn_frozen": "Mask R-CNN\n(frozen st.1)", "maskrcnn": "Mask R-CNN\n(all, BN)"}
        panels.append((f"Training step, batch 2, {image_size(tr, '512x512')} (s)", [labels[n] for n in names],
                       [tr[n]["time"]["median"] for n in names]))
    if ms:
        cases = list(ms["cases"])
        panels.append(("ms_deform_attn speed-up vs textbook (x)", [c.replace("/", "\n").replace("_", "+") for c in cases],
                       [ms["cases"][c]["reference"]["median"] / ms["cases"][c]["isda"]["median"] for c in cases]))
    if not panels:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8))
    axes = [axes] if len(panels) == 1 else list(axes)
    colors = ["#2c7fb8", "#de2d26", "#fc9272", "#31a354", "#756bb1"]
    for ax, (title, labels, values) in zip(axes, panels):
        bars = ax.bar(range(len(values)), values, color=[colors[i % len(colors)] for i in range(len(values))])
        ax.set_xticks(range(len(values)))
        ax.set_xticklabels(labels, fontsize=7, rotation=0 if len(values) <= 3 else 30, ha="center" if len(values) <= 3 else "right")
        ax.set_title(title, fontsize=9)
        for bar, v in zip(bars, values):
            ax.annotate(f"{v:.2f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=7)
        ax.margins(y=0.15)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def accuracy_chart(acc: dict[str, Any] | None, path: Path) -> bool:
    """Test-split mask AP against training time, both models in one plot: every seed's run as a point, the seed
    means joined by a line."""
    if not acc or "seeds" not in acc or not acc.get("budgets_s"):
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    drawn = False
    for model, label, colour in (("isda", "ISDA tiny", "#2c7fb8"), ("maskrcnn", "Mask R-CNN R18 (tuned)", "#de2d26")):
        xs, means = [], []
        for b in sorted(acc.get(model, {}), key=int):
            aps = [ap(r) for r in acc[model][b].values() if r and r.get("ap")]
            if aps:
                ax.scatter([int(b) / 60] * len(aps), aps, color=colour, s=14, alpha=0.6)
                xs.append(int(b) / 60)
                means.append(sum(aps) / len(aps))
        if xs:
            ax.plot(xs, means, "-o", color=colour, label=label)
            drawn = True
    if not drawn:
        plt.close(fig)
        return False
    ax.set_xlabel("training time (min, one thread each)")
    ax.set_ylabel("test-split mask AP")
    ax.set_title("Shapes test split: mask AP vs training time", fontsize=9)
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
