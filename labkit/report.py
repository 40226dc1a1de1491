"""A self-contained ``report.html`` for a run: plots, tables, and sample responses.

Everything that came from a model is untrusted text and goes through ``html.escape``;
plotly.js is inlined once so the file opens offline.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import plotly.graph_objects as go
from plotly.offline import get_plotlyjs
from plotly.subplots import make_subplots

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1100px;color:#1f2933;padding:0 1rem}
h1{margin-bottom:.2rem} h2{border-bottom:2px solid #e4e7eb;padding-bottom:.3rem;margin-top:2.2rem}
table{border-collapse:collapse;margin:.8rem 0;font-size:.92rem} th,td{border:1px solid #d9e2ec;padding:.35rem .6rem;text-align:right}
th{background:#f0f4f8} td:first-child,th:first-child{text-align:left}
.sample{border:1px solid #d9e2ec;border-radius:8px;margin:1rem 0;padding:.6rem 1rem;background:#fbfcfd}
.sample pre{white-space:pre-wrap;word-wrap:break-word;background:#fff;border:1px solid #e4e7eb;border-radius:6px;padding:.5rem;margin:.3rem 0;font-size:.88rem}
.cols{display:grid;grid-template-columns:repeat(auto-fit,minmax(300px,1fr));gap:.8rem}
.muted{color:#7b8794;font-size:.85rem} .good{color:#1b7f3b} .bad{color:#b42318}
"""


def esc(x) -> str:
    return html.escape(str(x), quote=True)


def fmt(x) -> str:
    if isinstance(x, float):
        return "–" if x != x else f"{x:.3f}"
    if isinstance(x, (list, tuple)) and len(x) == 2 and all(isinstance(v, float) for v in x):
        return f"[{x[0]:.2f}, {x[1]:.2f}]"
    return esc(x)


def table(rows: list[dict], columns: list[str] | None = None) -> str:
    if not rows:
        return "<p class='muted'>(none)</p>"
    columns = columns or list(rows[0])
    head = "".join(f"<th>{esc(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{fmt(r.get(c, ''))}</td>" for c in columns) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def curves_figure(history: dict[str, list[tuple[float, float]]], title: str, names: list[str] | None = None) -> go.Figure:
    """One small panel per metric from a ``{name: [(step, value), ...]}`` history."""
    names = [n for n in (names or sorted(history)) if history.get(n)]
    cols = min(3, max(1, len(names)))
    rows = max(1, -(-len(names) // cols))
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=names or ["(no data)"])
    for i, name in enumerate(names):
        steps, values = zip(*history[name])
        fig.add_trace(go.Scatter(x=steps, y=values, mode="lines+markers", marker_size=4, name=name,
                                 showlegend=False), row=i // cols + 1, col=i % cols + 1)
    fig.update_layout(title=title, height=260 * rows + 60, margin=dict(l=40, r=20, t=70, b=30), template="plotly_white")
    return fig


def category_figure(per_model: dict[str, dict[str, float]], title: str) -> go.Figure:
    """Grouped bars: one group per category, one bar per model."""
    fig = go.Figure()
    for model, per_cat in per_model.items():
        cats = sorted(per_cat)
        fig.add_trace(go.Bar(name=model, x=cats, y=[per_cat[c] for c in cats]))
    fig.update_layout(title=title, barmode="group", yaxis_range=[0, 1], height=380, template="plotly_white",
                      margin=dict(l=40, r=20, t=60, b=60))
    return fig


def figure_html(fig: go.Figure) -> str:
    return fig.to_html(full_html=False, include_plotlyjs=False)


def samples_html(samples: list[dict], models_: list[str]) -> str:
    """Sample responses side by side: ``{"prompt", "category", model: {"response", "gold", "checks"}}``."""
    out = []
    for s in samples:
        cols = []
        for m in models_:
            r = s.get(m)
            if r is None:
                continue
            checks = "".join(
                f"<span class='{'good' if ok else 'bad'}'>{'✓' if ok else '✗'} {esc(name)}</span> "
                for name, ok in r.get("checks", {}).items())
            cols.append(f"<div><b>{esc(m)}</b> <span class='muted'>gold {r['gold']:.2f}</span>"
                        f"<pre>{esc(r['response'])}</pre><div class='muted'>{checks}</div></div>")
        out.append(f"<div class='sample'><div class='muted'>{esc(s.get('category', ''))} · {esc(s.get('id', ''))}</div>"
                   f"<pre>{esc(s['prompt'])}</pre><div class='cols'>{''.join(cols)}</div></div>")
    return "".join(out)


def write_report(path: str | Path, title: str, sections: list[tuple[str, list]]) -> Path:
    """Write a report: ``sections`` is ``[(heading, [html str | plotly Figure, ...]), ...]``."""
    parts = [f"<h1>{esc(title)}</h1>"]
    for heading, items in sections:
        parts.append(f"<h2>{esc(heading)}</h2>")
        for item in items:
            parts.append(figure_html(item) if isinstance(item, go.Figure) else item)
    doc = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{esc(title)}</title>"
           f"<style>{CSS}</style><script>{get_plotlyjs()}</script></head><body>{''.join(parts)}</body></html>")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(doc, encoding="utf-8")
    tmp.replace(path)
    return path


def json_dump(obj, path: str | Path) -> None:
    """Atomic JSON write (a crash never leaves half a metrics file)."""
    path = Path(path)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str), encoding="utf-8")
    tmp.replace(path)
