"""The cell explorer: its tables against brute force, an offline page, and a real browser.

The browser test drives Debian's headless Chromium through Selenium (chromedriver from the
``chromium-driver`` package; nothing is downloaded): it opens the page from disk, clicks a
cell of the K map at its pixel position and reads what the page then shows. It skips only
where Chromium or chromedriver is absent (QKOV_REQUIRE_BROWSER=1, set by .ci/run as root,
turns that skip into a failure). The screenshot is kept in $QKOV_TEST_ARTIFACTS (default:
the test's tmp_path).
"""
from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from interference.figures import explorer as X
from interference.figures.inputs import cell_name
from test_figures import HEADS, LAYERS, N_A, N_B, fake_cells, fake_heatmap

CLICKED = "K/L3/KV1"            # layer 3 = row 0; kv group 1 = query heads 4, 5, 6 (x 3..5)


def texts():
    out = {f"math:{k}": {"prompt": f"What is {k} <+> {k}?", "answer": str(2 * k)}
           for k in range(N_A)}
    out.update({f"code:{k}": f"def f{k}(x):\n    return x | {k}" for k in range(N_B)})
    return out


def validation():
    rows = [dict(step_rule=r, name=n, delta_loss_a=s * 0.01, delta_loss_a_se=0.002,
                 predicted_delta_a=s * 0.009, delta_loss_b=-0.02)
            for r, s in (("adam", 1.0), ("relative", 2.0)) for n in (CLICKED, "Q/L7/H4")]
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("explorer")
    control = fake_cells(seed=5).assign(significant=False, statistic=-0.123)
    return X.write_explorer(fake_heatmap(), fake_cells(), tmp_path / "explorer.html", texts(),
                            control_cells=control, validation=validation(),
                            summary={"fdr_alpha": 0.05, "min_effect_size": 0.2}, k=3)


def test_cell_pairs_match_a_brute_force_sort():
    heat, cells = fake_heatmap(), fake_cells()
    pairs = X.cell_pairs(heat, cells, {}, k=4)
    assert len(pairs) == 4 * len(cells)
    for cell in cells.to_dict("records"):
        name = cell_name(cell)
        hp = HEADS.index(int(str(cell["kv_group"]).split(",")[0]))
        m = heat[cell["block"]]["scores"][:, :, LAYERS.index(cell["layer"]), hp]
        ref = sorted(((float(m[i, j]), f"math:{i}", f"code:{j}") for i in range(N_A)
                      for j in range(N_B)), key=lambda t: -t[0])[:4]
        got = pairs[pairs["cell"] == name]
        assert list(got["rank"]) == [1, 2, 3, 4]
        assert list(zip(got["score"], got["sample_a"], got["sample_b"])) == ref


def test_signed_variant_takes_the_most_negative_pairs():
    m = np.array([[0.5, -2.0], [-3.0, 1.0]])
    i, j = X.top_pairs(m, 2, signed=True)
    assert list(zip(i, j)) == [(1, 0), (0, 1)]
    i, j = X.top_pairs(m, 1)
    assert list(zip(i, j)) == [(1, 1)]


def test_cell_table_positions_statistics_and_panels():
    heat, cells = fake_heatmap(), fake_cells()
    control = fake_cells(seed=5)
    pairs = X.cell_pairs(heat, cells, X.load_texts(texts()), k=2)
    t = X.explorer_cells(heat, cells, pairs, control, validation()).set_index("name")
    assert len(t) == len(cells)
    k = t.loc[CLICKED]
    assert (k.x, k.width, k.y) == (4.0, 3, 0)                 # spans heads 4, 5, 6
    assert k.M == pytest.approx(heat["K"]["layer_head_avg"][0, 3])
    q = t.loc["Q/L7/H4"]
    assert (q.x, q.width, q.y) == (HEADS.index(4), 1, 1) and q.significant
    row = cells[(cells.block == "K") & (cells.layer == 3) & (cells.kv_head == 1)].iloc[0]
    assert k.d == row.effect_size and k.q == row.q_value
    ctrl = control[(control.block == "K") & (control.layer == 3) & (control.kv_head == 1)]
    assert f"T {float(ctrl.statistic.iloc[0]):.4g}" in k.stats_html
    assert "95% bootstrap interval [" in k.stats_html
    assert "measured ΔL_A (adam step)</th><td>0.01 ± 0.002" in k.stats_html
    assert "not among the validated cells" in t.loc["O/L11/H0"].stats_html
    assert "&lt;+&gt;" in k.texts_html and "<+>" not in k.texts_html   # texts escaped
    with pytest.raises(ValueError, match="lacks columns"):
        X.explorer_cells(heat, cells, pairs, validation=validation().drop(columns="name"))
    no_val = X.explorer_cells(heat, cells, pairs).set_index("name")
    assert "no validation run" in no_val.loc[CLICKED].stats_html
    assert "no control analysis" in no_val.loc[CLICKED].stats_html


def test_page_is_self_contained(page):
    text = page.read_text()
    assert "<script src" not in text and "<link " not in text      # nothing fetched
    assert "Bokeh" in text and "map_K" in text and len(text) > 500_000


def test_page_bytes_do_not_depend_on_bokehs_random_ids(page):
    body = page.read_text().rpartition("<body>")[2]
    assert "00000000-0000-4000-8000-000000000000" in body           # Bokeh's UUIDs renumbered
    assert not X._UUID.search(body.replace("00000000-0000-4000-8000-", "x"))
    assert X.stable_ids(f"<body>{uuid.uuid4()} {uuid.uuid4()}") == X.stable_ids(
        f"<body>{uuid.uuid4()} {uuid.uuid4()}")


# ----------------------------------------------------------------------------- real browser


def chrome(window: tuple[int, int] = (1400, 1300)):
    """A headless Chromium driven by Debian's chromedriver, or a skip (a failure under
    QKOV_REQUIRE_BROWSER=1) where either is missing."""
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (binary and driver):
        msg = ("Chromium and chromedriver are not installed (Debian: apt-get install "
               "chromium chromium-driver); the explorer's browser test needs them")
        if os.environ.get("QKOV_REQUIRE_BROWSER") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                f"--window-size={window[0]},{window[1]}",
                "--host-resolver-rules=MAP * ~NOTFOUND"):   # offline: no host resolves
        opts.add_argument(arg)
    opts.binary_location = binary
    return webdriver.Chrome(service=Service(driver), options=opts)


# (x, y) in the viewport of data point (x, y) on the figure named arguments[0]
PIXEL_OF = """
const fig = Bokeh.documents[0].get_model_by_name(arguments[0]);
const view = Bokeh.index.find_one(fig);
const box = view.canvas_view.el.getBoundingClientRect();
return [box.left + view.frame.x_scale.compute(arguments[1]),
        box.top + view.frame.y_scale.compute(arguments[2])];
"""
# the rendered text of the page, shadow roots included, scripts (the embedded data) not
DEEP_TEXT = """
const out = [];
function walk(n) {
  if (n.nodeType === Node.TEXT_NODE) { out.push(n.textContent); return; }
  if (['SCRIPT', 'STYLE', 'TEMPLATE'].includes(n.tagName)) return;
  if (n.shadowRoot) walk(n.shadowRoot);
  for (const c of n.childNodes) walk(c);
}
walk(document.body);
return out.join(' ');
"""
VISIBLE = """
const fig = Bokeh.documents[0].get_model_by_name(arguments[0]);
return fig.renderers.filter(r => r.glyph).map(r => r.visible);
"""
PRESS = """
const label = arguments[0];
function find(n) {
  if (n.shadowRoot) { const f = find(n.shadowRoot); if (f) return f; }
  for (const c of n.children || []) {
    if (c.tagName === 'BUTTON' && c.textContent.trim() === label) return c;
    const f = find(c); if (f) return f;
  }
  return null;
}
const b = find(document.body); b.click(); return b !== null;
"""


def open_page(driver, html: Path) -> None:
    """Load ``html`` from disk and wait until Bokeh has drawn the four maps."""
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(html.resolve().as_uri())
    WebDriverWait(driver, 60).until(lambda d: d.execute_script(
        "return window.Bokeh !== undefined && Bokeh.documents.length > 0 && "
        "Bokeh.index.find_one(Bokeh.documents[0].get_model_by_name('map_O')) != null"))


def click_cell(driver, block: str, x: float, y: float) -> str:
    """Click data point (x, y) of block's map with the mouse (then move it away, so no
    tooltip hides the map); returns the page's rendered text once the panels are filled."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.support.ui import WebDriverWait

    px, py = driver.execute_script(PIXEL_OF, f"map_{block}", x, y)
    actions = ActionChains(driver)
    actions.w3c_actions.pointer_action.move_to_location(int(px), int(py)).click()
    actions.w3c_actions.pointer_action.move_to_location(1, 1)
    actions.perform()
    WebDriverWait(driver, 10).until(lambda d: "Top pairs of" in d.execute_script(DEEP_TEXT))
    return driver.execute_script(DEEP_TEXT)


def screenshot_after_click(html: Path, png: Path, block: str, x: float, y: float,
                           window: tuple[int, int] = (1400, 1300)) -> str:
    """Open ``html`` in headless Chromium, click data point (x, y) of block's map, save a
    screenshot to ``png`` (how docs/figures/explorer.png was made); returns the page text."""
    driver = chrome(window)
    try:
        open_page(driver, html)
        text = click_cell(driver, block, x, y)
        png.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(png))
        return text
    finally:
        driver.quit()


def test_browser_click_shows_statistics_pairs_and_texts(page, tmp_path):
    """One browser session: click a K cell (shared by query heads 4, 5, 6), read the
    panels, keep a screenshot; then switch the maps to the effect size."""
    from selenium.webdriver.support.ui import WebDriverWait

    png = Path(os.environ.get("QKOV_TEST_ARTIFACTS", tmp_path)) / "explorer_click.png"
    driver = chrome()
    try:
        open_page(driver, page)
        assert "Top pairs of" not in driver.execute_script(DEEP_TEXT)
        text = click_cell(driver, "K", 4.0, 0.0)
        png.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(png))
        print(f"\nexplorer screenshot: {png}")
        heat = fake_heatmap()
        m = heat["K"]["scores"][:, :, 0, 3]
        assert f"Top pairs of {CLICKED}" in text and "query heads 4, 5, 6" in text
        for f in np.argsort(-m.ravel(), kind="stable")[:3]:   # the pair table, both texts
            i, j = np.unravel_index(f, m.shape)
            assert f"math:{i}" in text and f"code:{j}" in text
            assert f"What is {i} <+> {i}? → {2 * i}" in text
            assert f"return x | {j}" in text
        assert "measured ΔL_A (adam step)" in text and "T -0.123" in text  # validation, control
        assert driver.execute_script(VISIBLE, "map_Q") == [True, False, False]
        assert driver.execute_script(PRESS, X.QUANTITIES["d"])
        WebDriverWait(driver, 5).until(
            lambda d: d.execute_script(VISIBLE, "map_Q") == [False, True, False])
        assert driver.execute_script(VISIBLE, "map_K") == [False, True, False]
    finally:
        driver.quit()
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"


def test_qkov_ui_opens_the_explorer(tmp_path, monkeypatch, capsys):
    import webbrowser

    from qkov_pipeline import cli

    opened = []
    monkeypatch.setattr(webbrowser, "open", lambda uri: opened.append(uri) or True)
    base = tmp_path / "default" / "smollm2"
    for pair in ("math__code.control", "math__code", "math__text"):
        (base / pair / "figures").mkdir(parents=True)
        (base / pair / "figures" / "explorer.html").write_text("<html></html>")
    assert cli.main(["ui", "--results", str(tmp_path), "--explorer"]) == 0
    assert opened[-1] == (base / "math__code" / "figures" / "explorer.html").resolve().as_uri()
    assert cli.main(["ui", "--results", str(tmp_path), "--explorer", "math__code.control"]) == 0
    assert opened[-1].endswith("math__code.control/figures/explorer.html")
    assert cli.main(["ui", "--results", str(tmp_path), "--explorer", "-e", "tiny"]) == 1
    assert "snakemake figures --config experiment=tiny" in capsys.readouterr().err
    calls = []
    monkeypatch.setattr(cli.subprocess, "call", lambda cmd, **kw: calls.append(cmd) or 0)
    assert cli.main(["ui", "--results", str(tmp_path)]) == 0 and "mlflow" in calls[0]
    assert capsys.readouterr().out.count("cell explorer (no server needed): file://") == 3


def test_the_workflow_writes_an_explorer_per_analysis(tiny_run):
    """draw_figures writes explorer.html for both analyses of the tiny run; the main one
    carries the control's value of each cell, the control itself has none."""
    for analysis, ctrl in ((tiny_run["pair"], True), (tiny_run["control"], False)):
        page = (analysis / "figures" / "explorer.html").read_text()
        assert "<script src" not in page and "map_K" in page
        assert ("no control analysis" in page) != ctrl
        assert "no validation run for this analysis" in page
