"""Figures of causal abstraction: a trained featurizer's training curve, and probes beside IIA.

The IIA heatmap is the `Result` heatmap (`mechnb.display.viz`); these are the two figures it
does not draw. Both return a matplotlib figure sized for a notebook column.

    >>> das.plot()                     # loss per step, held-out IIA per epoch
    >>> probe.plot()                   # probe accuracy and IIA per layer, one colour per position
"""

from __future__ import annotations

from ..core.errors import CausalError


def training_curve(featurizer, ax=None):
    """The loss of every training step and the held-out IIA after each epoch."""
    import matplotlib.pyplot as plt

    history = getattr(featurizer, "history", None)
    if history is None or history.empty:
        raise CausalError("this featurizer was not trained here (no history): plot the one model.das returns")
    created = ax is None
    figure, left = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(7, 3.6))
    left.plot(history.step, history.loss, color="#4a6fa5", linewidth=1, label="training loss")
    left.set_xlabel("step")
    left.set_ylabel("loss", color="#4a6fa5")
    epochs = history.dropna(subset=["iia"])
    right = left.twinx()
    right.plot(epochs.step, epochs.iia, "o-", color="#c8553d", label="held-out IIA")
    right.set_ylim(0, 1.02)
    right.set_ylabel("held-out IIA", color="#c8553d")
    meta = featurizer.meta
    left.set_title(f"{featurizer.kind} at {featurizer.site} for {featurizer.variable}: "
                   f"held-out IIA {meta.get('iia', float('nan')):.3f} (k={featurizer.n_features})", fontsize=10)
    figure.tight_layout()
    if created:
        plt.close(figure)  # shown once, as the returned figure, not again by the inline backend
    return figure


def probe_figure(result, ax=None):
    """Probe accuracy (solid) and IIA (dashed) per site, one colour per position pattern."""
    import matplotlib.pyplot as plt

    df = result.df
    created = ax is None
    figure, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(8, 3.8))
    x_name = "layer" if "layer" in df else "site"
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for number, (position, part) in enumerate(df.groupby("position", sort=False)):
        colour = colours[number % len(colours)]
        x = part[x_name] if x_name == "layer" else range(len(part))
        ax.plot(x, part.probe, "-", color=colour, label=f"probe @{position}")
        if "iia" in part and part.iia.notna().any():
            ax.plot(x, part.iia, "--", color=colour, label=f"IIA @{position}")
    if x_name == "site":
        ax.set_xticks(range(len(df.site.unique())), df.site.unique(), rotation=90, fontsize=7)
    chance = result.meta.get("chance")
    if chance is not None:
        ax.axhline(chance, color="grey", linewidth=0.8, linestyle=":", label="chance")
    ax.set_ylim(0, 1.02)
    ax.set_xlabel(x_name)
    ax.set_ylabel("accuracy")
    ax.set_title(result.meta.get("title", "probe"), fontsize=10)
    ax.legend(fontsize=7, ncols=2)
    figure.tight_layout()
    if created:
        plt.close(figure)
    return figure
