"""The chat playground in a real JupyterLab, driven by headless Chromium.

A notebook cell shows a ChatWidget with three tiny models (base / SFT / PPO stand-ins) and a
tiny reward model; the test types a prompt, clicks Ask, waits for the three streamed answers
with their RM and gold scores, then scores its own answer in the "beat the reward model" box.
A screenshot goes to tests/artifacts/chat_playground.png.
"""

from pathlib import Path

import pytest
from jupyterlab_support import ARTIFACTS, CHROMIUM, jupyterlab, launch_chromium, run_notebook

pytestmark = [pytest.mark.slow, pytest.mark.browser]

PROMPT = "Name three fruits <b>please</b>."
MY_ANSWER = "Apple, banana and cherry."

CHAT_CELL = """\
import torch
from labkit.chat import ChatWidget
from labkit.feedback import FeedbackStore
from labkit.models import load_model
from labkit.reward import RewardModel

torch.set_num_threads(1)
models_ = {{name: load_model("tiny", dtype="float32", device="cpu", seed=s) for s, name in enumerate(["base", "sft", "ppo"])}}
rm_model, rm_tok = load_model("tiny", dtype="float32", device="cpu", seed=3)
chat = ChatWidget(models_, reward=(RewardModel.from_causal_lm(rm_model), rm_tok), store=FeedbackStore({store!r}),
                  author="browser", max_new_tokens=16, seed=0)
chat"""


def _write_notebook(path: Path, store: Path) -> None:
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(CHAT_CELL.format(store=str(store)))]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)


def test_chat_playground_in_jupyterlab(tmp_path):
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} not found (install it with: apt-get install chromium, or `make browser` as root)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright for Python is not installed")
    from labkit.chat import user_prompts
    from labkit.feedback import FeedbackStore

    ARTIFACTS.mkdir(exist_ok=True)
    root, store = tmp_path / "root", tmp_path / "feedback.sqlite"
    root.mkdir()
    _write_notebook(root / "chat.ipynb", store)
    dialogs = []
    with jupyterlab(tmp_path, root) as (port, token), sync_api.sync_playwright() as pw:
        browser = launch_chromium(pw)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
        run_notebook(page, f"http://127.0.0.1:{port}/lab/tree/chat.ipynb?token={token}", timeout_ms=90_000)
        chat = page.locator(".lk-chat")
        chat.wait_for(timeout=120_000)

        # Ask: three columns fill in, streamed, then each gets its RM score and gold checks.
        chat.locator("textarea").nth(0).fill(PROMPT)
        chat.locator("button", has_text="Ask").click()
        page.wait_for_function(
            "[...document.querySelectorAll('.lk-chat .widget-html-content')]"
            ".filter(e => e.innerText.includes('RM ') && e.innerText.includes('gold')).length >= 3",
            timeout=120_000)
        columns = chat.locator(".widget-hbox").nth(1).locator(".widget-html-content")
        texts = columns.all_inner_texts()
        assert len(texts) == 3
        assert [t.split("\n", 1)[0].strip() for t in texts] == ["base", "sft", "ppo"]
        assert all("RM " in t and "gold " in t for t in texts)

        # Beat the reward model: score our own answer against the three.
        chat.locator("textarea").nth(1).fill(MY_ANSWER)
        chat.locator("button", has_text="Score my answer").click()
        page.wait_for_function(
            "document.querySelector('.lk-chat').innerText.includes('Your answer: RM ')", timeout=60_000)
        verdict = chat.inner_text()
        assert "beats" in verdict and MY_ANSWER in verdict
        assert chat.locator("img, script").count() == 0  # answers are text, never markup
        chat.scroll_into_view_if_needed()
        chat.screenshot(path=str(ARTIFACTS / "chat_playground.png"))
        browser.close()

    assert dialogs == [], f"a response ran as code: {dialogs}"
    kept = user_prompts(FeedbackStore(store), author="browser")
    assert [p["prompt"] for p in kept] == [PROMPT]  # the typed prompt is kept as a user-based prompt
