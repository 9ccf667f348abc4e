"""A grid of the first samples of every run: same noise and labels in every column."""
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def main(paths, png, n):
    rows = []
    for path in paths:
        data = np.load(path)
        parts = Path(path).parts
        rows.append((" / ".join(parts[-4:-1]), data["arr_0"][:n], data["arr_1"][:n]))
    fig, axes = plt.subplots(len(rows), 1, figsize=(n * 0.45 + 2.5, len(rows) * 0.7 + 0.4), squeeze=False)
    for ax, (title, images, labels) in zip(axes[:, 0], rows):
        strip = np.concatenate([np.pad(im, ((1, 1), (1, 1), (0, 0)), constant_values=255) for im in images], axis=1)
        ax.imshow(strip, interpolation="nearest")
        ax.set_xticks([(i + 0.5) * images.shape[2] + i * 2 + 1 for i in range(len(labels))])
        ax.set_xticklabels([str(int(v)) for v in labels], fontsize=7)
        ax.set_yticks([])
        ax.set_ylabel(title, rotation=0, ha="right", va="center", fontsize=8)
    fig.suptitle("samples (label under each; same noise and label in every row)", fontsize=9)
    fig.tight_layout()
    Path(png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=150)


if __name__ == "__main__" and "snakemake" in globals():
    main(snakemake.input.npz, snakemake.output.png, int(snakemake.params.n))  # noqa: F821
