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


def load_jsonl(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


# ----------------------------------------------------------------------------- the run report

def _pick_samples(records: list[dict], n: int) -> list[int]:
    """Indices of ``n`` eval prompts from as many categories as possible."""
    seen, picks = set(), []
    for i, r in enumerate(records):
        if r["category"] not in seen and len(picks) < n:
            seen.add(r["category"])
            picks.append(i)
    return picks + [i for i in range(len(records)) if i not in picks][:n - len(picks)]


def write_run_report(run, metrics: dict, records: list[dict]) -> Path:
    """``run.dir/report.html`` of a ``labkit run`` (``run``: a ``labkit.pipeline.Run``)."""
    from labkit import labelers
    from labkit.stage import read_history


    evals = metrics["eval"]
    names = list(evals)
    summary_cols = ["model", "gold/mean", "helpful/instruction_following", "honest/closed_qa_accuracy",
                    "harmless/refusal_rate_harmful", "harmless/refusal_rate_lookalike",
                    "response/words_mean", "response/stop_rate"]
    short = {"gold/mean": "gold", "helpful/instruction_following": "follows all checks",
             "honest/closed_qa_accuracy": "closed-QA correct", "harmless/refusal_rate_harmful": "refuses harmful",
             "harmless/refusal_rate_lookalike": "refuses look-alike", "response/words_mean": "words",
             "response/stop_rate": "stops"}
    summary = [{"model": n, **{short[c]: evals[n].get(c) for c in summary_cols[1:]}} for n in names]
    summary_cols = ["model"] + [short[c] for c in summary_cols[1:]]
    comps = metrics.get("comparisons") or {}
    wins = [{"comparison": k, "win_rate": v["win_rate"], "ci95": tuple(v["ci95"]), "wins": v["wins"],
             "ties": v["ties"], "losses": v["losses"]} for k, v in comps.items() if isinstance(v, dict)]
    times = [{"stage": k, "seconds": v} for k, v in metrics["stage_wall_s"].items()]
    overview = [table(summary, summary_cols), "<h3>Win rates</h3>", table(wins),
                f"<p>KL(final policy ‖ SFT) on eval responses: {fmt(comps.get('kl_to_sft', float('nan')))} nats"
                + "".join(f"; {esc(k.split('/', 1)[1])}: {fmt(v)} nats" for k, v in comps.items()
                          if k.startswith("kl_to_sft/")) + "</p>",
                "<h3>Wall time per stage</h3>", table(times)]
    sections = [("Overview", overview), ("Outside judge (IFEval-style)", outside_judge_html(metrics)),
                ("Gold score per category", [category_figure({n: evals[n]["gold/per_category"] for n in names},
                                                                 "Gold score per category (eval split)")])]
    curves = []
    rounds = range(1, run.config.rounds + 1)
    key_curves = {"sft": ["loss/train", "loss/eval", "learning_rate"],
                  "rm": None,  # the RM logs few curves: show them all
                  "ppo": ["objective/rlhf_reward", "objective/scores", "objective/gold", "objective/kl",
                          "objective/entropy", "loss/policy", "loss/value", "policy/clipfrac", "response/length"]}
    for folder, title, kind in [(run.dir / "sft", "SFT", "sft")] + [
            (run.dir / f"rm_r{k}", f"Reward model, round {k}", "rm") for k in rounds] + [
            (run.dir / f"first_choices_r{k}", f"SFT on the room's first choices, round {k}", "sft")
            for k in rounds if run.config.first_choices] + [
            (run.dir / f"ppo_r{k}", f"PPO, round {k}", "ppo") for k in rounds]:
        hist = read_history(folder)
        if hist:
            curves.append(curves_figure(hist, title, key_curves[kind]))
    sections.append(("Training curves", curves or ["<p class='muted'>(no curves recorded)</p>"]))
    over = []
    for k in range(1, run.config.rounds + 1):
        hist = read_history(run.dir / f"ppo_r{k}")
        if hist.get("objective/gold") and hist.get("objective/kl"):
            over.append(overoptimisation_figure(hist, f"Round {k}: RM score and gold score as KL grows"))
    sections.append(("Reward over-optimisation", over or ["<p class='muted'>(needs objective/gold in the PPO history)</p>"]))
    gold = labelers.GoldLabeler()
    answers = {n: load_jsonl(run.dir / "eval" / f"{n}.jsonl") for n in names}
    samples = []
    for i in _pick_samples(records, run.config.n_samples):
        rec = records[i]
        s = {"id": rec["id"], "prompt": rec["prompt"], "category": rec["category"]}
        for n in names:
            a = answers[n][i]
            b = gold.breakdown(rec, a["response"], truncated=a["truncated"])
            s[n] = {"response": a["response"], "gold": b["score"],
                    "checks": {c["type"]: c["passed"] for c in b["checks"]}}
        samples.append(s)
    sections.append(("Sample responses before and after", [samples_html(samples, names)]))
    return write_report(run.dir / "report.html", f"labkit run: {run.config.preset} preset, {run.config.model}",
                           sections)


def outside_judge_html(metrics: dict) -> list[str]:
    """The outside judge's strict accuracies per model and the paired differences, as tables."""
    oj = metrics.get("outside_judge") or {}
    models_ = [n for n in oj if isinstance(oj[n], dict) and "prompt_strict" in oj[n]]
    if not models_:
        return ["<p class='muted'>(the outside judge was off for this run)</p>"]
    families = sorted({f for n in models_ for f in oj[n].get("per_family", {})})
    rows = [{"model": n, "prompt-level strict": oj[n]["prompt_strict"],
             "instruction-level strict": oj[n]["instruction_strict"],
             **{f: oj[n]["per_family"].get(f, float("nan")) for f in families}} for n in models_]
    paired = [{"difference": k.split("/", 1)[1].replace("_minus_", " − "), "prompt-level": v["prompt_strict"]["diff"],
               "prompt ci95": (v["prompt_strict"]["low"], v["prompt_strict"]["high"]),
               "instruction-level": v["instruction_strict"]["diff"],
               "instruction ci95": (v["instruction_strict"]["low"], v["instruction_strict"]["high"])}
              for k, v in (oj.get("paired") or {}).items()]
    intro = (f"<p>IFEval-style verifiable instructions (labkit.ifeval) on {oj[models_[0]].get('n_prompts', '?')} "
             f"prompts no stage trains on (source: {esc(oj.get('source'))}). Strict accuracy: a prompt counts when "
             "every one of its instructions is followed; per family: share of instructions followed. "
             "The alignment tax shows as a negative PPO − SFT difference (InstructGPT §4.2).</p>")
    return [intro, table(rows), "<h3>Paired differences (95% bootstrap over prompts)</h3>", table(paired)]


def overoptimisation_figure(history: dict, title: str):
    """RM score (proxy) and gold score against KL over a PPO run (Gao et al. 2022).

    ``history``: a PPO stage's curves, ``labkit.stage.read_history(out_dir)``.
    """
    def by_step(name):
        return dict(history.get(name, []))

    kl, rm, gold = by_step("objective/kl"), by_step("objective/scores"), by_step("objective/gold")
    steps = sorted(set(kl) & set(gold))
    fig = go.Figure()
    # Markers, not lines: each step samples other prompts, so KL is not monotone in the step and
    # a line through the steps would zig-zag; the step is in the hover text.
    fig.add_trace(go.Scatter(x=[kl[s] for s in steps if s in rm], y=[rm[s] for s in steps if s in rm],
                             text=[f"step {s:g}" for s in steps if s in rm], mode="markers",
                             marker=dict(size=9), name="RM score (proxy)"))
    fig.add_trace(go.Scatter(x=[kl[s] for s in steps], y=[gold[s] for s in steps], mode="markers",
                             text=[f"step {s:g}" for s in steps], marker=dict(size=9, symbol="diamond"),
                             name="gold score", yaxis="y2"))
    fig.update_layout(title=title, xaxis_title="KL(policy ‖ SFT), nats", yaxis_title="RM score",
                      yaxis2=dict(title="gold score", overlaying="y", side="right", showgrid=False, tickmode="auto",
                                  tickformat=".2f"), template="plotly_white",
                      legend=dict(orientation="h", yanchor="bottom", y=1.02, xanchor="right", x=1),
                      height=380)
    return fig


def reward_hacking_figure(histories: dict[str, dict], panels: dict[str, str], title: str) -> go.Figure:
    """PPO runs side by side, step by step: one panel per metric (``{metric: panel title}``),
    one colour per run (``{run label: labkit.stage.read_history(out_dir)}``). For a scripted
    reward, put its score next to what it costs: gold score, KL, response length."""
    fig = make_subplots(rows=1, cols=len(panels), subplot_titles=list(panels.values()))
    colours = ["#d62728", "#1f77b4", "#2ca02c", "#9467bd"]
    for i, (label, history) in enumerate(histories.items()):
        for j, metric in enumerate(panels, start=1):
            points = history.get(metric, [])
            fig.add_trace(go.Scatter(x=[s for s, _ in points], y=[v for _, v in points], mode="lines+markers",
                                     name=label, legendgroup=label, showlegend=j == 1,
                                     line=dict(color=colours[i % len(colours)])), row=1, col=j)
    fig.update_xaxes(title_text="PPO step")
    fig.update_layout(title=title, template="plotly_white", height=400, margin=dict(t=120),
                      legend=dict(orientation="h", yanchor="bottom", y=1.18, xanchor="left", x=0))
    return fig


def length_figure(groups: dict[str, tuple[list[float], list[float]]], fit: dict, title: str,
                  x_title: str = "answer length (words)", y_title: str = "RM score") -> go.Figure:
    """Scores against answer length, one marker colour per group (``{label: (lengths, scores)}``),
    with the line of ``labkit.evaluate.length_fit`` drawn over the lengths shown."""
    fig = go.Figure()
    for label, (lengths, scores) in groups.items():
        fig.add_trace(go.Scatter(x=lengths, y=scores, mode="markers", name=label, opacity=0.7))
    xs = [x for lengths, _ in groups.values() for x in lengths]
    lo, hi = min(xs), max(xs)
    fig.add_trace(go.Scatter(x=[lo, hi], y=[fit["intercept"] + fit["slope"] * x for x in (lo, hi)], mode="lines",
                             name=f"fit: {fit['slope']:+.3f} ± {fit['slope_se']:.3f} per word (r = {fit['r']:.2f})",
                             line=dict(color="black", dash="dash")))
    fig.update_layout(title=title, xaxis_title=x_title, yaxis_title=y_title, template="plotly_white", height=380,
                      legend=dict(orientation="h", yanchor="bottom", y=1.02, xanchor="right", x=1))
    return fig
