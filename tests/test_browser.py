"""The ranking board in a real JupyterLab, driven by headless Chromium.

Starts JupyterLab on 127.0.0.1 (random free port, a token, a temporary root), opens a
notebook that shows a RankingWidget with K = 4 responses, two of them HTML/JS injections,
ranks one item with the mouse and one with the keyboard, and checks the store from here.
A screenshot goes to tests/artifacts/ranking_board.png.
"""

import json
import sqlite3
import time
from pathlib import Path

import pytest
from jupyterlab_support import ARTIFACTS, CHROMIUM, jupyterlab, launch_chromium, run_notebook

pytestmark = [pytest.mark.slow, pytest.mark.browser]

EVIL_IMG = "<img src=x onerror=alert(1)>"
EVIL_SCRIPT = "<script>alert(2)</script>"
ITEMS = [
    {"prompt_id": "rm-0001", "prompt": "Write a two-line poem about the sea. Use only lowercase letters.",
     "category": "generation", "checks": [{"type": "lowercase"}, {"type": "max_words", "n": 20}],
     "responses": ["waves fold into foam\nthe tide keeps its slow time",
                   EVIL_IMG,
                   "The Sea Is Big.\nIt is blue & <b>wet</b>.",
                   EVIL_SCRIPT],
     "models": ["sft", "base", "ppo", "base"]},
    {"prompt_id": "rm-0002", "prompt": "Name a primary colour.", "category": "open_qa",
     "responses": ["Red.", "Blue is a primary colour.", "Purple.", "I like turtles."],
     "models": ["sft", "ppo", "base", "base"]},
    {"prompt_id": "rm-0003", "prompt": "Give a synonym of happy.", "category": "open_qa",
     "responses": ["Sad.", "Glad.", "Joyful.", "Happy happy happy happy happy."]},
]

NOTEBOOK_CELL = """\
from labkit.feedback import FeedbackStore
from labkit.widgets import RankingWidget
store = FeedbackStore({store!r})
items = {items}
board = RankingWidget(store, items, annotator="browser")
board"""
AB_CELL = """from labkit.widgets import ComparisonWidget
ab = ComparisonWidget(store, [{{"prompt_id": "eval-0001", "prompt": "Greet me.", "models": ["base", "sft"],
                               "responses": [{evil!r}, "Hello! Nice to meet you."]}}], annotator="browser", seed=0)
ab"""
CLASSIC_CELL = """RankingWidget(store, items[:1], annotator="classic", ui="classic")"""


def _write_notebook(path: Path, store: Path) -> None:
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(NOTEBOOK_CELL.format(store=str(store), items=json.dumps(ITEMS, indent=1))),
                nbformat.v4.new_code_cell(AB_CELL.format(evil=EVIL_IMG)),
                nbformat.v4.new_code_cell(CLASSIC_CELL)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)


def _stored(store: Path) -> list[tuple]:
    with sqlite3.connect(store) as db:
        return db.execute("SELECT prompt_id, annotator, status, tiers, score, flags FROM rankings ORDER BY id").fetchall()


def test_ranking_board_in_jupyterlab(tmp_path):
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} not found (install it with: apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    ARTIFACTS.mkdir(exist_ok=True)
    root, store = tmp_path / "root", tmp_path / "feedback.sqlite"
    root.mkdir()
    _write_notebook(root / "rank.ipynb", store)
    dialogs = []
    timings = {}
    with jupyterlab(tmp_path, root) as (port, token), sync_api.sync_playwright() as pw:
        browser = launch_chromium(pw)
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
        run_notebook(page, f"http://127.0.0.1:{port}/lab/tree/rank.ipynb?token={token}")
        board = page.locator(".lk-board")
        board.wait_for(timeout=60_000)
        page.wait_for_selector(".lk-card[data-index='3']")

        # Untrusted text is shown literally: no <img>/<script> element, the markup is visible text.
        texts = page.locator(".lk-card .lk-text").all_text_contents()
        assert texts[1] == EVIL_IMG and texts[3] == EVIL_SCRIPT
        assert "<b>wet</b>" in texts[2]
        assert board.locator("img, script, b").count() == 0
        assert "lowercase" in page.locator(".lk-checks").text_content()

        # Item 1 with the mouse: response 1 best, 3 tied with it, then 2, 4 last implied by Submit.
        t0 = time.time()
        page.click(".lk-card[data-index='0']")
        page.wait_for_function("document.querySelector(\".lk-card[data-index='0'] .lk-badge\").textContent === '#1'")
        page.click(".lk-btn[data-cmd='tie']")
        page.wait_for_selector(".lk-btn[data-cmd='tie'].lk-active")
        page.click(".lk-card[data-index='2']")
        page.wait_for_function("document.querySelector(\".lk-card[data-index='2'] .lk-badge\").textContent === '= #1'")
        page.click(".lk-card[data-index='1']")
        page.wait_for_function("document.querySelector(\".lk-card[data-index='1'] .lk-badge\").textContent === '#3'")
        page.click(".lk-score-btn:nth-of-type(6)")  # score 6 of 7 (first child is the label)
        page.click(".lk-flag:has-text('hallucination')")
        page.wait_for_selector(".lk-flag.lk-on")
        timings["mouse"] = time.time() - t0
        page.screenshot(path=str(ARTIFACTS / "ranking_board.png"), full_page=False)
        t0 = time.time()
        page.click(".lk-submit")
        page.wait_for_function("document.querySelector('.lk-msg').textContent.startsWith('Saved rm-0001')")
        timings["mouse"] += time.time() - t0

        # Item 2 with the keyboard only: 2, t, 1, 4, Enter  ->  [[1, 0], [3], [2]];
        # then once more with a drag: response 3 dropped on response 2 goes above it.
        page.wait_for_function("document.querySelector('.lk-id').textContent === 'rm-0002'")
        page.focus(".lk-board")
        t0 = time.time()
        for key in ["2", "t", "1", "4"]:
            page.keyboard.press(key)
            page.wait_for_timeout(60)
        page.wait_for_function("document.querySelectorAll('.lk-card.lk-ranked').length === 3")
        page.keyboard.press("Enter")
        page.wait_for_function("document.querySelector('.lk-msg').textContent.startsWith('Saved rm-0002')")
        timings["keyboard"] = time.time() - t0
        page.wait_for_function("document.querySelector('.lk-id').textContent === 'rm-0003'")
        page.keyboard.press("2")
        page.keyboard.press("1")
        page.wait_for_function("document.querySelectorAll('.lk-card.lk-ranked').length === 2")
        page.drag_and_drop(".lk-card[data-index='2'] .lk-card-top", ".lk-card[data-index='1'] .lk-text")
        page.wait_for_function("document.querySelector(\".lk-card[data-index='2'] .lk-badge\").textContent === '#1'")
        page.click(".lk-submit")
        page.wait_for_function("document.querySelector('.lk-msg').textContent.startsWith('Saved rm-0003')")
        page.wait_for_selector(".lk-done")
        assert page.locator(".lk-progress-text").text_content() == "3 of 3 done"
        page.screenshot(path=str(ARTIFACTS / "ranking_board_done.png"))
        # The plain-ipywidgets views in the same page: blind A/B and the classic ranking view.
        ab = page.locator(".lk-ab")
        ab.wait_for()
        assert EVIL_IMG in ab.inner_text() and ab.locator("img").count() == 0
        assert "sft" not in ab.inner_text() and "base" not in ab.inner_text()
        ab.scroll_into_view_if_needed()
        ab.screenshot(path=str(ARTIFACTS / "ab_widget.png"))
        ab.locator("button", has_text="A is better").click()
        page.wait_for_function("document.querySelector('.lk-ab').innerText.includes('A was ')")
        classic = page.locator(".lk-classic")
        assert EVIL_SCRIPT in classic.inner_text() and classic.locator("script, img").count() == 0
        for label in ("Rank 2", "Rank 1", "Rank 4"):
            classic.locator("button", has_text=label).click()
            page.wait_for_timeout(150)
        page.wait_for_function("document.querySelector('.lk-classic').innerText.includes('Ranking: 2 > 1 > 4')")
        classic.scroll_into_view_if_needed()
        classic.screenshot(path=str(ARTIFACTS / "classic_view.png"))
        classic.locator("button", has_text="Submit").click()
        page.wait_for_function("document.querySelector('.lk-classic').innerText.includes('Saved rm-0001')")
        # The notebook cell did not turn into markdown: the keys went to the board, not to JupyterLab.
        assert page.locator(".jp-MarkdownCell").count() == 0
        browser.close()

    assert dialogs == [], f"a response ran as code: {dialogs}"
    rows = _stored(store)
    assert [(r[0], r[1], r[2]) for r in rows[:3]] == [(f"rm-000{i}", "browser", "submitted") for i in (1, 2, 3)]
    assert json.loads(rows[0][3]) == [[0, 2], [1], [3]] and rows[0][4] == 6 and json.loads(rows[0][5]) == ["hallucination"]
    assert json.loads(rows[1][3]) == [[1, 0], [3], [2]]
    assert json.loads(rows[2][3]) == [[2], [1], [0], [3]]
    assert json.loads(rows[3][3]) == [[1], [0], [3], [2]] and rows[3][1] == "classic"
    with sqlite3.connect(store) as db:
        choice, shown_first, model_a = db.execute("SELECT choice, a_shown_first, model_a FROM comparisons").fetchone()
    # "A is better": A is the item's response_a exactly when it was shown first.
    assert model_a == "base" and choice == ("a" if shown_first else "b")
    print(f"K=4 by mouse: 7 clicks (3 cards, tie, score, flag, submit) {timings['mouse']:.2f}s; "
          f"by keyboard: 5 keys (2 t 1 4 Enter) {timings['keyboard']:.2f}s")
