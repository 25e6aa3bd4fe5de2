"""Pictures of attributions, one PNG each, drawn as `jaxdist.plot` draws curves (Agg, 110 dpi).

- images: each example's input beside its attribution map (red adds to the explained
  output, blue takes away), titled with the predicted and the true class;
- tabular data: the mean |attribution| of each feature beside the model's own coefficients;
- text: the bytes of each window, each shaded by its attribution to the next-byte prediction.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

DPI = 110
MAX_IMAGES = 8
MAX_WINDOWS = 4
CHARS_PER_LINE = 64


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _class_title(prediction: float, label: float | None) -> str:
    true = f" / true {int(label)}" if label is not None else ""
    return f"pred {int(prediction)}{true}"


def images(inputs: np.ndarray, attributions: np.ndarray, predictions: np.ndarray,
           labels: np.ndarray | None, title: str, path: Path) -> Path:
    """A grid: for each example, the input and its attribution map."""
    plt = _pyplot()
    count = min(len(inputs), MAX_IMAGES)
    fig, axes = plt.subplots(2, count, figsize=(1.8 * count + 1.0, 4.0), squeeze=False)
    # One colour scale for every map, so that their strengths compare, shown by the colour bar.
    heats = [np.asarray(attributions[i], np.float32) for i in range(count)]
    heats = [heat.sum(axis=-1) if heat.ndim == 3 else heat for heat in heats]
    limit = max(max(float(np.abs(heat).max()) for heat in heats), 1e-12)
    for i in range(count):
        image = np.asarray(inputs[i], np.float32)
        if image.ndim == 3 and image.shape[-1] == 3:
            shown = (image - image.min()) / max(float(np.ptp(image)), 1e-12)
            axes[0, i].imshow(shown)
        else:
            axes[0, i].imshow(image.reshape(image.shape[:2]), cmap="gray")
        shown_heat = axes[1, i].imshow(heats[i], cmap="RdBu_r", vmin=-limit, vmax=limit)
        axes[0, i].set_title(_class_title(predictions[i], None if labels is None
                                          else labels[i]), fontsize=8)
        for ax in axes[:, i]:
            ax.set_xticks([])
            ax.set_yticks([])
    axes[0, 0].set_ylabel("input")
    axes[1, 0].set_ylabel("attribution")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    bar = fig.colorbar(shown_heat, ax=list(axes[1]), fraction=0.02, pad=0.01)
    bar.set_label("attribution (red > 0 > blue)", fontsize=7)
    bar.ax.tick_params(labelsize=6)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")  # the bar's label inside the picture
    plt.close(fig)
    return path


def tabular(attributions: np.ndarray, coefficients: np.ndarray | None,
            names: list[str], title: str, path: Path) -> Path:
    """Mean |attribution| per feature, beside the model's coefficients (if it has them)."""
    plt = _pyplot()
    panels = 2 if coefficients is not None else 1
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4.0), squeeze=False)
    positions = np.arange(len(names))
    axes[0, 0].barh(positions, np.abs(attributions).mean(axis=0), color="tab:blue")
    axes[0, 0].set_xlabel("mean |attribution|")
    if coefficients is not None:
        axes[0, 1].barh(positions, np.asarray(coefficients), color="tab:orange")
        axes[0, 1].axvline(0, color="black", linewidth=0.8)
        axes[0, 1].set_xlabel("the model's coefficient")
    for ax in axes[0]:
        ax.set_yticks(positions, names)
        ax.invert_yaxis()
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def text(tokens: np.ndarray, attributions: np.ndarray, predictions: np.ndarray,
         title: str, path: Path) -> Path:
    """Each window's bytes shaded by attribution, with the predicted and true next byte."""
    plt = _pyplot()
    count = min(len(tokens), MAX_WINDOWS)
    lines_per = [-(-attributions.shape[1] // CHARS_PER_LINE) for _ in range(count)]
    fig, ax = plt.subplots(figsize=(9.5, 0.28 * (sum(lines_per) + 2 * count) + 0.6))
    cmap = plt.get_cmap("RdBu_r")
    row = 0
    for i in range(count):
        window, heat = tokens[i, :-1], attributions[i]
        limit = max(float(np.abs(heat).max()), 1e-12)
        ax.text(0, -row, f"window {i}: next byte predicted {_byte(predictions[i])!r}, "
                         f"true {_byte(tokens[i, -1])!r}", fontsize=8, weight="bold",
                va="top")
        row += 1
        for j, (value, weight) in enumerate(zip(window, heat, strict=True)):
            line, column = divmod(j, CHARS_PER_LINE)
            ax.text(column, -(row + line), _byte(value), fontsize=8, family="monospace",
                    va="top", ha="left",
                    bbox={"boxstyle": "square,pad=0.05", "linewidth": 0,
                          "facecolor": cmap(0.5 + 0.5 * weight / limit)})
        row += -(-len(window) // CHARS_PER_LINE) + 1
    ax.set_xlim(-1, CHARS_PER_LINE + 1)
    ax.set_ylim(-row - 0.5, 1)
    ax.axis("off")
    ax.set_title(title, fontsize=9)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return path


def _byte(value: float) -> str:
    code = int(value)
    return chr(code) if 32 <= code < 127 else "·"
