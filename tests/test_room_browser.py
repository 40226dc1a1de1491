"""Two annotators rank into one room from two JupyterLab pages, driven by headless Chromium.

A room is served on 127.0.0.1 (a free port) from this process; one JupyterLab server (also
loopback) holds two notebooks, each opening ``open_store(join URL)`` and a ranking board under
another name. Each page ranks the same shared item differently; the room's store then holds
both rankings, and the instructor's agreement matrix (``agreement_matrix``, drawn by
``agreement_figure``) shows the pair. Screenshots go to tests/artifacts/room_*.png.
Bounded: every wait has a timeout, and the servers are stopped in ``finally``.
"""

import json
from pathlib import Path

import pytest

from jupyterlab_support import ARTIFACTS, CHROMIUM, jupyterlab, launch_chromium, run_notebook  # rootdir-relative

pytestmark = [pytest.mark.slow, pytest.mark.browser]

ITEMS = [{"prompt_id": "rm-0101", "prompt": "Say something nice about Mondays.", "category": "generation",
          "responses": ["Mondays are a fresh start!", "<b>Mondays</b> exist.", "Coffee helps.", "I refuse."],
          "truncated": [False, False, True, False]}]
CELL = """\
import os
os.environ["LABKIT_CACHE"] = {cache!r}   # this laptop's outbox and device id
from labkit.feedback import open_store
from labkit.widgets import RankingWidget
store = open_store({url!r})
board = RankingWidget(store, {items}, annotator={name!r})
board"""


def _notebook(path: Path, url: str, name: str, cache: Path) -> None:
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(CELL.format(url=url, name=name, items=repr(ITEMS), cache=str(cache)))]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)


def _open_and_rank(browser, base: str, token: str, notebook: str, keys: list[str], shot: Path) -> None:
    page = browser.new_page(viewport={"width": 1100, "height": 900})
    page.set_default_timeout(180_000)  # JupyterLab's bundle and a kernel start slowly on a busy machine
    # a workspace per page: the two pages are two laptops, not two tabs of one
    run_notebook(page, f"{base}/lab/workspaces/{Path(notebook).stem}/tree/{notebook}?token={token}",
                 timeout_ms=180_000, path=notebook)
    try:  # the kernel imports labkit first: minutes on a busy 2-core machine
        page.locator(".lk-board").wait_for(timeout=300_000)
    except Exception:
        page.screenshot(path=str(shot.with_name(shot.stem + "_failed.png")))
        raise
    page.wait_for_selector(".lk-card[data-index='3']", timeout=30_000)
    assert page.locator(".lk-card[data-index='2'] .lk-cutoff").count() == 1  # the cut-off answer is marked
    assert page.locator(".lk-cutoff").count() == 1 and page.locator(".lk-board b").count() == 0
    page.focus(".lk-board")
    for key in keys:
        page.keyboard.press(key)
        page.wait_for_timeout(80)
    page.wait_for_function("document.querySelectorAll('.lk-card.lk-ranked').length === 3", timeout=30_000)
    page.screenshot(path=str(shot))
    page.keyboard.press("Enter")
    page.wait_for_function("document.querySelector('.lk-msg').textContent.startsWith('Saved rm-0101')", timeout=30_000)
    page.close()


def test_two_annotators_rank_into_one_room(tmp_path):
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} not found (install it with: apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    from labkit.feedback import agreement_matrix
    from labkit.room import agreement_figure, start_room

    ARTIFACTS.mkdir(exist_ok=True)
    room = start_room(tmp_path / "room.sqlite", port=0)
    root = tmp_path / "root"
    root.mkdir()
    for name in ("ana", "ben"):  # two laptops: each its own cache (outbox, device id)
        _notebook(root / f"{name}.ipynb", room.url, name, tmp_path / f"cache-{name}")
    try:
        with jupyterlab(tmp_path, root, timeout=240,  # a busy machine
                        env=dict(PYTHONPATH=str(Path(__file__).resolve().parents[1]))) as (port, token), \
                sync_api.sync_playwright() as pw:
            browser = launch_chromium(pw)
            base = f"http://127.0.0.1:{port}"
            _open_and_rank(browser, base, token, "ana.ipynb", ["1", "2", "3"], ARTIFACTS / "room_board_ana.png")
            _open_and_rank(browser, base, token, "ben.ipynb", ["2", "1", "3"], ARTIFACTS / "room_board_ben.png")
            # the instructor's view of the same room: the agreement matrix as a heatmap
            matrix = agreement_matrix(room.store.agreement(gold=None))
            html = tmp_path / "agreement.html"
            agreement_figure(matrix).write_html(str(html), include_plotlyjs=True)  # self-contained, offline
            page = browser.new_page(viewport={"width": 700, "height": 420})
            page.goto(html.as_uri())
            page.wait_for_selector(".heatmaplayer, .hm", timeout=30_000)
            page.screenshot(path=str(ARTIFACTS / "room_agreement.png"))
            browser.close()
    finally:
        room.stop()

    rankings = room.store.rankings()
    assert sorted((r["annotator"], json.dumps(r["tiers"])) for r in rankings) == [
        ("ana", "[[0], [1], [2], [3]]"), ("ben", "[[1], [0], [2], [3]]")]
    assert set(room.store.names()) == {"ana", "ben"} and len(set(room.store.names().values())) == 2
    assert matrix["names"] == ["ana", "ben"]
    assert matrix["matrix"][0][1] == pytest.approx(5 / 6) and matrix["items"][0][1] == 1
