"""LiveDashboard: recording, throttling, downsampling, static export, Trainer callback."""

from types import SimpleNamespace

import pytest

from labkit import live
from labkit.live import LiveDashboard, downsample, trainer_metrics


class FakeHandle:
    def __init__(self, log):
        self.log = log

    def update(self, obj, raw=False):
        self.log.append(("update", obj))


@pytest.fixture
def fake_display(monkeypatch):
    """Replace IPython's display with a recorder, so the notebook path runs in a plain process."""
    calls = []

    def display(obj, raw=False, display_id=None, **kw):
        calls.append(("display", obj))
        return FakeHandle(calls) if display_id else None

    import IPython.display

    monkeypatch.setattr(IPython.display, "display", display)
    return calls


def test_headless_records_everything_and_never_displays(fake_display):
    dash = LiveDashboard("t", headless=True)
    for step in range(50):
        dash.log(step, {"loss/train": 1.0 / (step + 1), "lr": 0.1, "note": "text is ignored"})
    dash.close()
    assert fake_display == [] and dash.renders == 0
    assert len(dash.history["loss/train"]) == 50
    assert dash.history["loss/train"][3] == (3.0, 0.25)
    assert "note" not in dash.history
    assert dash.last("lr") == 0.1 and dash.last("missing") is None


def test_outside_a_kernel_defaults_to_headless():
    assert not live.in_notebook()
    assert LiveDashboard("t").headless


def test_throttling_1000_logs_give_few_renders(fake_display):
    dash = LiveDashboard("t", headless=False, min_interval=10.0)
    for step in range(1000):
        dash.log(step, {"loss/policy": step * 0.5, "loss/value": -step})
    # First log draws at once; the next 999 fall inside the 10 s interval.
    assert dash.renders == 1
    dash.close()  # the final state is always drawn
    assert dash.renders == 2
    assert [kind for kind, _ in fake_display] == ["display", "update"]
    final = fake_display[-1][1]["application/vnd.plotly.v1+json"]  # the raw mime bundle
    ys = {tr["name"]: list(tr["y"]) for tr in final["data"]}
    assert ys["loss/policy"][-1] == 999 * 0.5 and ys["loss/value"][-1] == -999
    assert len(dash.history["loss/policy"]) == 1000  # history complete
    dash.close()  # nothing new: no extra render
    assert dash.renders == 2


def test_throttle_interval_is_respected(fake_display, monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(live.time, "monotonic", lambda: clock[0])
    dash = LiveDashboard("t", headless=False, min_interval=0.5)
    for i in range(100):  # 100 logs over 10 simulated seconds: one render per 0.5 s
        clock[0] = i * 0.1
        dash.log(i, {"x": i})
    assert dash.renders == 20


def test_downsample_keeps_ends_and_bounds_size():
    pts = [(float(i), float(i * i)) for i in range(10_001)]
    ds = downsample(pts, 500)
    assert len(ds) == 500
    assert ds[0] == pts[0] and ds[-1] == pts[-1]
    assert all(a[0] < b[0] for a, b in zip(ds, ds[1:]))
    assert downsample(pts[:10], 500) == pts[:10]


def test_figure_groups_by_prefix_and_downsamples():
    dash = LiveDashboard("RM", headless=True, max_points=100)
    for step in range(1000):
        dash.log(step, {"loss/train": 1.0, "loss/eval": 2.0, "objective/kl": 0.1, "accuracy": 0.5})
    assert dash.panels() == {"loss": ["loss/train", "loss/eval"], "objective": ["objective/kl"],
                             "accuracy": ["accuracy"]}
    fig = dash.figure()
    assert [tr.name for tr in fig.data] == ["loss/train", "loss/eval", "objective/kl", "accuracy"]
    assert all(len(tr.x) == 100 for tr in fig.data)
    assert [a.text for a in fig.layout.annotations] == ["loss", "objective", "accuracy"]


def test_metrics_argument_selects_what_is_plotted():
    dash = LiveDashboard("t", metrics=["b"], headless=True)
    dash.log(0, {"a": 1, "b": 2})
    assert [tr.name for tr in dash.figure().data] == ["b"]
    assert "a" in dash.history


def test_layout_argument_sets_panels_and_skips_empty_ones():
    dash = LiveDashboard("t", headless=True, layout={"scores": ["s/rm", "s/gold"], "kl": ["kl"], "ptx": ["ptx"]})
    dash.log(1, {"s/rm": 0.5, "kl": 0.1, "entropy": 40.0})
    assert dash.panels() == {"scores": ["s/rm"], "kl": ["kl"]}  # "ptx" never logged
    assert [a.text for a in dash.figure().layout.annotations] == ["scores", "kl"]
    assert dash.history["entropy"] == [(1.0, 40.0)]  # recorded though not plotted


def test_save_html_is_self_contained(tmp_path):
    dash = LiveDashboard("my run", headless=True)
    for step in range(20):
        dash.log(step, {"loss/policy": 1.0 / (step + 1), "objective/rlhf_reward": step})
    out = dash.save(tmp_path / "curves.html")
    html = out.read_text().replace("\\u002f", "/")  # plotly's JSON escapes "/"
    assert "loss/policy" in html and "objective/rlhf_reward" in html and "my run" in html
    assert "<script src=" not in html  # plotly.js is inline: the file works offline
    assert len(html) > 1_000_000


def test_save_png_without_kaleido_falls_back_to_html(tmp_path):
    pytest.importorskip("plotly")
    try:
        import kaleido  # noqa: F401
        pytest.skip("kaleido installed: the image path is taken instead")
    except ImportError:
        pass
    dash = LiveDashboard("t", headless=True)
    dash.log(0, {"x": 1})
    with pytest.warns(UserWarning, match="kaleido"):
        out = dash.save(tmp_path / "curves.png")
    assert out.suffix == ".html" and out.exists()


def test_save_json_history(tmp_path):
    import json

    dash = LiveDashboard("t", headless=True)
    dash.log(1, {"x": 2.5})
    data = json.loads(dash.save(tmp_path / "h.json").read_text())
    assert data["history"] == {"x": [[1.0, 2.5]]}


def test_trainer_callback_on_log():
    dash = LiveDashboard("sft", headless=True)
    cb = dash.callback()
    state = SimpleNamespace(global_step=7)
    cb.on_log(None, state, None, logs={"loss": 2.5, "learning_rate": 1e-4, "epoch": 0.3})
    state.global_step = 9
    cb.on_log(None, state, None, logs={"eval_loss": 2.0, "eval_mean_token_accuracy": 0.4, "eval_runtime": 3.0})
    cb.on_log(None, state, None, logs={"train_runtime": 12.0, "train_loss": 2.4})
    assert dash.history == {"loss/train": [(7.0, 2.5)], "learning_rate": [(7.0, 1e-4)],
                            "loss/eval": [(9.0, 2.0)], "mean_token_accuracy/eval": [(9.0, 0.4)]}
    from transformers import TrainerCallback

    assert isinstance(cb, TrainerCallback)


def test_trainer_metrics_mapping():
    assert trainer_metrics({"loss": 1, "eval_loss": 2, "eval_x": 3, "grad_norm": 4, "total_flos": 5,
                            "eval_steps_per_second": 6, "x": 7}) == {
        "loss/train": 1, "loss/eval": 2, "x/eval": 3, "grad_norm": 4, "x": 7}
    dash = LiveDashboard("t", headless=True)
    dash.log(0, trainer_metrics({"x": 1, "eval_x": 2}))
    assert dash.panels() == {"x": ["x", "x/eval"]}  # train and eval curves of x share a panel


def test_progress_wraps_tqdm():
    bar = progress_items = live.progress(range(5), desc="work", disable=True)
    assert list(progress_items) == [0, 1, 2, 3, 4]
    assert bar.total == 5


def test_in_a_real_kernel_the_figure_updates_in_place():
    """One output per dashboard, refreshed by update_display (what JupyterLab/VS Code/Colab show)."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(
        "from labkit.live import LiveDashboard\n"
        "d = LiveDashboard('k', min_interval=0.0)\n"
        "for i in range(5):\n"
        "    d.log(i, {'loss/a': i * 2})\n"
        "d.close()\n"
        "print(d.headless, d.renders)")]
    nbclient.NotebookClient(nb, kernel_name="python3", timeout=120).execute()
    outputs = nb.cells[0].outputs
    shown = [o for o in outputs if o["output_type"] == "display_data"]
    assert len(shown) == 1  # five renders, one output area
    fig = shown[0]["data"]["application/vnd.plotly.v1+json"]
    assert list(fig["data"][0]["y"]) == [0, 2, 4, 6, 8]  # the last update's state
    assert any(o.get("text", "").strip() == "False 5" for o in outputs if o["output_type"] == "stream")


def test_figure_widget_option_updates_one_widget_in_place(fake_display):
    pytest.importorskip("anywidget")
    dash = LiveDashboard("w", headless=False, widget=True, min_interval=0.0)
    for step in range(3):
        dash.log(step, {"a": step * 10})
    dash.close()
    assert len(fake_display) == 1  # one widget displayed, then updated in place
    widget = fake_display[0][1]
    assert type(widget).__name__ == "FigureWidget"
    assert list(widget.data[0].y) == [0.0, 10.0, 20.0] and dash.renders == 3
