"""Live plots and progress bars for every training stage.

:class:`LiveDashboard` collects metric dicts (``dash.log(step, {"loss/policy": 0.3})``) and
keeps one plotly figure up to date in the notebook. Metrics sharing a prefix before ``/``
(``loss/``, ``objective/``) share a panel, as in cleanrl's and TRL's metric names.

Why it is built this way:

- **Portable display.** The figure is shown with ``IPython.display.display(fig,
  display_id=True)`` and refreshed with ``handle.update(fig)``: plain Jupyter display
  messages, understood by JupyterLab 4, VS Code and Colab alike, with no widget extension
  to install. ``widget=True`` uses a ``plotly.graph_objects.FigureWidget`` instead
  (smoother in JupyterLab, needs anywidget in the front end).
- **Throttled.** A training loop may log hundreds of times per second; re-rendering each
  time would make the notebook the bottleneck. A render happens at most once per
  ``min_interval`` seconds; :meth:`LiveDashboard.flush` / :meth:`LiveDashboard.close`
  always draw the final state.
- **Downsampled.** ``.history`` keeps every point; the figure shows at most ``max_points``
  per metric (evenly spaced, first and last kept), so a long run stays light in the browser.
- **Headless.** Without an IPython kernel (scripts, CI, ``labkit run``) nothing is
  displayed, everything is still recorded, and :meth:`LiveDashboard.save` leaves a static,
  self-contained HTML file (plotly.js inline, works offline).
"""

from __future__ import annotations

import json
import math
import time
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path

__all__ = ["LiveDashboard", "progress", "in_notebook", "downsample"]

# Summary numbers the HF Trainer logs once at the end of training; they are not curves.
TRAINER_SUMMARY_KEYS = {"train_runtime", "train_samples_per_second", "train_steps_per_second",
                        "total_flos", "train_loss", "epoch"}
TIMING_SUFFIXES = ("_runtime", "_samples_per_second", "_steps_per_second")


def in_notebook() -> bool:
    """True inside a Jupyter kernel (JupyterLab, VS Code, Colab), False in scripts and terminals."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and "IPKernelApp" in getattr(shell, "config", {})


def progress(iterable: Iterable | None = None, desc: str | None = None, total: int | None = None,
             **kwargs):
    """A ``tqdm.auto`` progress bar (a widget in notebooks, text elsewhere) for long steps."""
    from tqdm.auto import tqdm

    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, desc=desc, total=total, **kwargs)


def downsample(points: list[tuple[float, float]], max_points: int) -> list[tuple[float, float]]:
    """At most ``max_points`` evenly spaced points of ``points``, always keeping the first and last."""
    n = len(points)
    if n <= max_points:
        return list(points)
    if max_points < 2:
        return [points[-1]]
    idx = sorted({round(i * (n - 1) / (max_points - 1)) for i in range(max_points)})
    return [points[i] for i in idx]


def _as_float(value) -> float | None:
    """A Python float for numbers, 0-d tensors and numpy scalars; None for anything else."""
    if isinstance(value, bool):
        return float(value)
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


class LiveDashboard:
    """A live, throttled plotly dashboard of training metrics.

    >>> dash = LiveDashboard("SFT")
    >>> for step in range(100):
    ...     dash.log(step, {"loss/train": 1 / (step + 1), "lr": 1e-4})
    >>> dash.close()                      # draws the final state
    >>> dash.save("runs/sft/curves.html")  # static, offline HTML
    """

    def __init__(self, title: str = "labkit", metrics: list[str] | None = None,
                 headless: bool | None = None, max_points: int = 500, min_interval: float = 0.5,
                 widget: bool = False, cols: int = 3, layout: Mapping[str, list[str]] | None = None):
        self.title = title
        self.metrics = list(metrics) if metrics is not None else None  # None: plot every metric logged
        # panel title -> metric names; None: one panel per name prefix. Every metric is still recorded.
        self.layout = {k: list(v) for k, v in layout.items()} if layout is not None else None
        self.headless = (not in_notebook()) if headless is None else bool(headless)
        self.max_points = max_points
        self.min_interval = min_interval
        self.widget = widget
        self.cols = cols
        self.history: dict[str, list[tuple[float, float]]] = {}
        self.renders = 0  # how many times the figure was drawn (throttling makes this small)
        self._handle = None  # IPython DisplayHandle, or the FigureWidget when widget=True
        self._last_render = -math.inf
        self._dirty = False

    # ------------------------------------------------------------------ recording

    def log(self, step: int | float, values: Mapping[str, object]) -> None:
        """Record ``{name: value}`` at ``step``; non-numeric values are ignored. Redraws if due."""
        for name, value in values.items():
            v = _as_float(value)
            if v is not None:
                self.history.setdefault(str(name), []).append((float(step), v))
                self._dirty = True
        if not self.headless and self._dirty and time.monotonic() - self._last_render >= self.min_interval:
            self._render()

    def last(self, name: str) -> float | None:
        """The most recent value of ``name`` (None if never logged)."""
        points = self.history.get(name)
        return points[-1][1] if points else None

    def flush(self) -> None:
        """Draw the current state now (no-op when headless or nothing changed)."""
        if not self.headless and self._dirty:
            self._render()

    def close(self) -> None:
        """Flush the final state; the dashboard keeps its history and can still be saved."""
        self.flush()

    def __enter__(self) -> "LiveDashboard":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ figure

    def panels(self) -> dict[str, list[str]]:
        """Panel title -> metric names: the ``layout`` given (panels with data only), or else
        metrics sharing a ``prefix/`` share a panel."""
        if self.layout is not None:
            return {title: [n for n in names if n in self.history] for title, names in self.layout.items()
                    if any(n in self.history for n in names)}
        names = self.metrics if self.metrics is not None else list(self.history)
        groups: dict[str, list[str]] = {}
        for name in names:
            key = name.split("/", 1)[0] if "/" in name else name
            groups.setdefault(key, []).append(name)
        return groups

    def figure(self):
        """The current state as a ``plotly.graph_objects.Figure`` (at most ``max_points`` per curve)."""
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        groups = self.panels()
        if not groups:
            fig = go.Figure()
            fig.update_layout(title=f"{self.title} (no metrics yet)", height=250)
            return fig
        cols = max(1, min(self.cols, len(groups)))
        rows = math.ceil(len(groups) / cols)
        fig = make_subplots(rows=rows, cols=cols, subplot_titles=list(groups),
                            horizontal_spacing=0.08, vertical_spacing=min(0.12, 0.4 / rows))
        for i, (panel, names) in enumerate(groups.items()):
            row, col = i // cols + 1, i % cols + 1
            for name in names:
                points = downsample(self.history.get(name, []), self.max_points)
                label = name.split("/", 1)[1] if "/" in name else name
                fig.add_trace(go.Scatter(x=[p[0] for p in points], y=[p[1] for p in points],
                                         mode="lines", name=name, legendgroup=panel,
                                         hovertemplate=f"{label}<br>step %{{x}}<br>%{{y:.4g}}<extra></extra>"),
                              row=row, col=col)
        fig.update_layout(title=self.title, height=260 * rows + 60, template="plotly_white",
                          margin=dict(l=40, r=20, t=70, b=30), legend=dict(font=dict(size=10)))
        return fig

    def _render(self) -> None:
        fig = self.figure()
        if self.widget:
            self._render_widget(fig)
        else:
            from IPython.display import display

            # The raw mime bundle, not the figure: a plotly figure's _ipython_display_ would
            # open a new output each time and ignore display_id.
            bundle = fig._repr_mimebundle_() or {  # empty when plotly found no renderer
                "application/vnd.plotly.v1+json": json.loads(fig.to_json()), "text/plain": self.title}
            if self._handle is None:
                self._handle = display(bundle, raw=True, display_id=True)
            else:
                self._handle.update(bundle, raw=True)
        self.renders += 1
        self._last_render = time.monotonic()
        self._dirty = False

    def _render_widget(self, fig) -> None:
        import plotly.graph_objects as go
        from IPython.display import display

        if self._handle is None or len(self._handle.data) != len(fig.data):
            # New metrics change the subplot grid: start a fresh widget.
            if self._handle is not None:
                self._handle.close()
            self._handle = go.FigureWidget(fig)
            display(self._handle)
            return
        with self._handle.batch_update():
            for old, new in zip(self._handle.data, fig.data):
                old.x, old.y = new.x, new.y

    # ------------------------------------------------------------------ output

    def save(self, path: str | Path) -> Path:
        """Write the figure: ``.html`` (self-contained, offline), ``.png``/``.svg``/``.pdf``
        (needs kaleido; falls back to HTML next to it with a warning) or ``.json`` (history)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        suffix = path.suffix.lower()
        if suffix == ".json":
            path.write_text(json.dumps({"title": self.title, "history": self.history}))
            return path
        fig = self.figure()
        if suffix in (".png", ".svg", ".pdf", ".jpg", ".jpeg", ".webp"):
            try:
                fig.write_image(str(path))
                return path
            except (ImportError, ValueError, RuntimeError) as e:
                path = path.with_suffix(".html")
                warnings.warn(f"static image export needs kaleido ({e}); wrote {path} instead")
        elif suffix not in (".html", ".htm"):
            path = path.with_suffix(path.suffix + ".html")
        fig.write_html(str(path), include_plotlyjs=True, full_html=True)
        return path

    def callback(self):
        """A ``transformers.TrainerCallback`` feeding this dashboard from ``Trainer`` logs.

        Names are mapped by :func:`trainer_metrics` so train and eval curves share panels.
        """
        from transformers import TrainerCallback

        dash = self

        class LiveDashboardCallback(TrainerCallback):
            def on_log(self, args, state, control, logs=None, **kwargs):
                if logs:
                    dash.log(state.global_step, trainer_metrics(logs))

            def on_train_end(self, args, state, control, **kwargs):
                dash.flush()

        return LiveDashboardCallback()


def trainer_metrics(logs: Mapping[str, object]) -> dict[str, object]:
    """Rename HF ``Trainer`` log keys so train and eval curves share a panel.

    ``loss`` -> ``loss/train``, ``eval_loss`` -> ``loss/eval``, ``eval_<x>`` -> ``<x>/eval``
    (plotted next to ``<x>``); timing numbers and the end-of-training summary are dropped.
    """
    out = {}
    for key, value in logs.items():
        if key in TRAINER_SUMMARY_KEYS or key.endswith(TIMING_SUFFIXES):
            continue
        if key == "loss":
            key = "loss/train"
        elif key.startswith("eval_"):
            key = key[len("eval_"):] + "/eval"
        out[key] = value
    return out
