"""A grid of the first samples of every run: same noise and labels in every row.

Row = one run (model / sampler / label), column = sample index; the class label is under each
image. Written atomically (a temporary file, then a rename).
"""
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def first_samples(path: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``n`` images and labels of a sample npz, copied (50,000 images must not stay in memory)."""
    with np.load(path) as data:
        return np.array(data["arr_0"][:n]), np.array(data["arr_1"][:n])


def main(paths, png, n, banner: str = ""):
    """A grid of each run's first ``n`` images, one row per run; ``banner`` is a first title line."""
    rows = []
    for path in paths:
        parts = Path(path).parts
        rows.append((" / ".join(parts[-4:-1]), *first_samples(path, n)))
    fig, axes = plt.subplots(len(rows), 1, figsize=(n * 0.45 + 2.5, len(rows) * 0.7 + 0.4), squeeze=False)
    for ax, (title, images, labels) in zip(axes[:, 0], rows):
        strip = np.concatenate([np.pad(im, ((1, 1), (1, 1), (0, 0)), constant_values=255) for im in images], axis=1)
        ax.imshow(strip, interpolation="nearest")
        ax.set_xticks([(i + 0.5) * images.shape[2] + i * 2 + 1 for i in range(len(labels))])
        ax.set_xticklabels([str(int(v)) for v in labels], fontsize=7)
        ax.set_yticks([])
        ax.set_ylabel(title, rotation=0, ha="right", va="center", fontsize=8)
    title = "samples (label under each; same noise and label in every row)"
    if banner:
        fig.suptitle(f"{banner}\n{title}", fontsize=9, color="firebrick")
    else:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    from tokencache.io import write_atomic

    write_atomic(png, format=lambda f: fig.savefig(f, format="png", dpi=150))
    plt.close(fig)


if __name__ == "__main__" and "snakemake" in globals():
    main([*snakemake.input.npz, *snakemake.input.get("tuned_npz", [])], snakemake.output.png,  # noqa: F821
         int(snakemake.params.n), snakemake.params.get("banner", ""))  # noqa: F821
