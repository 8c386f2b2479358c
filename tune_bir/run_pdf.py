"""PDF report of one run (`--pdf`): accuracy curves, and decoded replay samples in pixel space."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from matplotlib.backends.backend_pdf import PdfPages  # noqa: E402

if TYPE_CHECKING:
    from tune_bir.engine import Engine


def write_run_pdf(engine: Engine, record: dict[str, Any], path: Path) -> Path:
    """Write the PDF; returns its path."""
    acc = record["acc_matrix"]
    n = len(acc)
    with PdfPages(path) as pdf:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        tasks_axis = list(range(1, n + 1))
        for k in range(n):
            ax.plot(tasks_axis[k:], [acc[t][k] for t in range(k, n)], marker="o", lw=1, label=f"task {k + 1}")
        ax.plot(tasks_axis, [sum(r) / len(r) for r in acc], color="black", lw=2.5, label="average")
        ax.set(xlabel="tasks trained", ylabel="test accuracy", ylim=(0, 1.02), xticks=tasks_axis,
               title=f"{record['method']} on {record['config']['experiment']} "
                     f"({record['config']['scenario']}-IL)")
        ax.legend(fontsize=7, ncol=2)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        pdf.savefig(fig)
        plt.close(fig)
        samples = _pixel_samples(engine)
        if samples is not None:
            fig = _sample_grid(samples, engine.scenario.n_outputs)
            pdf.savefig(fig)
            plt.close(fig)
    return path


@torch.no_grad()
def _pixel_samples(engine: Engine, per_class: int = 8) -> torch.Tensor | None:
    """Decoded samples of every class (only where replay is in pixel space: MNIST)."""
    generator = getattr(engine.replay, "generator_model", None) or (engine.model if engine.model.spec.decoder else None)
    if generator is None or engine.conv is not None:
        return None
    n_classes = engine.scenario.n_outputs
    classes = torch.arange(n_classes, device=engine.device).repeat_interleave(per_class)
    rng = torch.Generator(device=engine.device).manual_seed(engine.cfg.seed)
    generator.eval()
    images = generator.generate(classes, rng).clamp(0, 1).cpu()
    return images.view(n_classes, per_class, *images.shape[1:])


def _sample_grid(samples: torch.Tensor, n_classes: int):
    per_class = samples.shape[1]
    fig, axes = plt.subplots(n_classes, per_class, figsize=(per_class * 0.8, n_classes * 0.8))
    for c in range(n_classes):
        for j in range(per_class):
            axes[c, j].imshow(samples[c, j, 0], cmap="gray", vmin=0, vmax=1)
            axes[c, j].axis("off")
    fig.suptitle("decoded samples per class (rows), from the final model")
    return fig
