"""Figures written next to a pruned model."""

from __future__ import annotations

from pathlib import Path


def new_figure(width: float, height: float):
    """A matplotlib Figure that is not attached to pyplot: drawing and saving it neither needs a display nor changes
    the backend of the caller (a notebook keeps its inline plots)."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height))


def save(figure, path: Path) -> None:
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def with_perplexities(title: str, stage: dict) -> str:
    """A stage's title, with its perplexity before and after when it was measured."""
    if stage.get("perplexity_before") is None:
        return title
    return f"{title}: perplexity {stage['perplexity_before']:.2f} -> {stage['perplexity_after']:.2f}"


def plot_allocation(allocation: dict, target_sparsity: float, path: Path) -> None:
    """Per-block sparsity (bars) and OWL outlier ratio (line) as a PNG."""
    blocks = [entry["block"] for entry in allocation["blocks"]]
    figure = new_figure(max(6, len(blocks) * 0.3), 4)
    sparsity_axis = figure.subplots()
    sparsity_axis.bar(blocks, [entry["sparsity"] for entry in allocation["blocks"]], color="tab:blue", alpha=0.7, label="block sparsity")
    sparsity_axis.axhline(target_sparsity, color="tab:blue", linestyle="--", linewidth=1, label=f"target {target_sparsity:.0%}")
    sparsity_axis.set_xlabel("block")
    sparsity_axis.set_ylabel("sparsity", color="tab:blue")
    ratio_axis = sparsity_axis.twinx()
    ratio_axis.plot(blocks, [entry["outlier_ratio"] for entry in allocation["blocks"]], color="tab:red", marker="o", label="outlier ratio D")
    ratio_axis.set_ylabel(f"outlier ratio (scores > {allocation['owl_m']:g} x mean)", color="tab:red")
    rule = allocation["rule"] + (f", λ = {allocation['owl_lambda']:g}" if allocation.get("owl_lambda") is not None else "")
    sparsity_axis.set_title(f"OWL allocation ({rule})")
    figure.legend(loc="upper right")
    save(figure, path)


def plot_recover(recover: dict, path: Path) -> None:
    """Training loss (and learning rate) against step of the recovery fine-tune, as a PNG."""
    steps = [point["step"] for point in recover["curve"]]
    figure = new_figure(6, 4)
    loss_axis = figure.subplots()
    loss_axis.plot(steps, [point["loss"] for point in recover["curve"]], color="tab:blue", marker=".", label="training loss")
    loss_axis.set_xlabel("step")
    loss_axis.set_ylabel("training loss", color="tab:blue")
    rate_axis = loss_axis.twinx()
    rate_axis.plot(steps, [point["lr"] for point in recover["curve"]], color="tab:gray", linestyle=":", label="learning rate")
    rate_axis.set_ylabel("learning rate", color="tab:gray")
    loss_axis.set_title(with_perplexities(f"recovery with {recover['optimizer']} ({recover['steps']} steps)", recover))
    save(figure, path)


def plot_refine(refine: dict, path: Path) -> None:
    """The loss residual L(m) − L(m₀) (and the tracker δ) against step of the MaskPro refinement, as a PNG."""
    steps = [point["step"] for point in refine["curve"]]
    figure = new_figure(6, 4)
    axis = figure.subplots()
    axis.plot(steps, [point["residual"] for point in refine["curve"]], color="tab:blue", marker=".", label="L(m) − L(m₀), mean since last point")
    axis.plot(steps, [point["tracker"] for point in refine["curve"]], color="tab:orange", linestyle="--", label="tracker δ")
    axis.axhline(0.0, color="tab:gray", linewidth=0.8)
    axis.set_xlabel("step")
    axis.set_ylabel("loss residual")
    axis.set_title(with_perplexities(f"MaskPro refinement ({refine['steps']} steps)", refine))
    axis.legend()
    save(figure, path)
