"""The cell explorer: one self-contained HTML page per analysis (Bokeh, inline resources).

A layer x head map per block Q, K, V, O (K/V: one wide cell per GQA group, groups separated
by lines as in the static heatmaps; significant cells outlined), switchable between the mean
score M, the effect size d the test decides on, and the BH q value. Clicking a cell shows its
statistics (T, p, q, d, AUC, bootstrap interval, split seeds that flag it, the negative
control's value of the same cell, the measured counterfactual effect where the validation
measured it), the k most conflicting (task-A, task-B) sample pairs with their dataset ids and
the text of both samples.

Bokeh writes the page with its JavaScript inlined (no CDN, no server: it opens offline from
disk). The only JavaScript is the library's ``CustomJS`` callbacks (:data:`ON_TAP`,
:data:`ON_SWITCH`); every table and text is formatted (and HTML-escaped) here in Python.
"""
from __future__ import annotations

import html
import re
from pathlib import Path
from typing import Mapping

import numpy as np
import pandas as pd

from .._tables import BLOCKS, SHARED_BLOCKS
from ..results import load_heatmap
from . import style
from .forensics import top_pairs
from .inputs import cell_name, excerpt, grid_positions, load_cells, load_texts

QUANTITIES = {"M": "mean score M", "d": "effect size d", "q": "BH q value"}
PAIR_COLUMNS = ["cell", "rank", "sample_a", "sample_b", "score", "text_a", "text_b"]
VALIDATION_COLUMNS = {"step_rule", "name", "delta_loss_a"}
TEXT_CHARS = 1200           # characters of each sample's text kept in the page
CELL_PX = (34, 22)          # (width per query head, most height per layer) of a map, pixels

ON_TAP = """
const i = src.selected.indices[0];
if (i === undefined) return;
for (const o of sources) { if (o !== src && o.selected.indices.length) o.selected.indices = []; }
stats.text = src.data.stats_html[i];
texts.text = src.data.texts_html[i];
const all = pairs_all.data, keep = [];
for (let j = 0; j < all.cell.length; j++) if (all.cell[j] === src.data.name[i]) keep.push(j);
const out = {};
for (const k of Object.keys(all)) out[k] = keep.map(j => all[k][j]);
pairs.data = out;
"""
ON_SWITCH = "groups.forEach((g, k) => g.forEach(m => { m.visible = (k === cb_obj.active); }));"


# ----------------------------------------------------------------------------- data


def cell_pairs(heatmap: Mapping, cells: pd.DataFrame, texts: Mapping[str, str], k: int = 5
               ) -> pd.DataFrame:
    """The k most conflicting sample pairs of EVERY distinct cell (columns
    :data:`PAIR_COLUMNS`); a K/V cell is read from the first query head of its group."""
    meta = heatmap["meta"]
    ids_a, ids_b = [str(s) for s in meta["sample_ids_a"]], [str(s) for s in meta["sample_ids_b"]]
    signed = meta.get("variant") == "signed"
    rows = []
    for cell, squares in zip(cells.to_dict("records"),
                             grid_positions(cells, meta["layers"], meta["heads"])):
        lp, hp = squares[0]
        m = np.asarray(heatmap[cell["block"]]["scores"])[:, :, lp, hp]   # [n_a, n_b]
        for rank, (i, j) in enumerate(zip(*top_pairs(m, k, signed)), start=1):
            a, b = ids_a[i], ids_b[j]
            rows.append(dict(cell=cell_name(cell), rank=rank, sample_a=a, sample_b=b,
                             score=float(m[i, j]), text_a=texts.get(a, "")[:TEXT_CHARS],
                             text_b=texts.get(b, "")[:TEXT_CHARS]))
    return pd.DataFrame(rows, columns=PAIR_COLUMNS)


def table_rows(pairs: pd.DataFrame, chars: int = 120) -> pd.DataFrame:
    """The pair table's rows: one-line excerpts of the texts (the full texts are shown
    below the table, so the page carries them once)."""
    return pairs.assign(text_a=[excerpt(t, chars) for t in pairs["text_a"]],
                        text_b=[excerpt(t, chars) for t in pairs["text_b"]])




def validation_by_cell(validation: pd.DataFrame | None) -> dict[str, list[dict]]:
    """Cell name -> the validation's rows of that cell (one per step rule)."""
    if validation is None or validation.empty:
        return {}
    missing = sorted(VALIDATION_COLUMNS - set(validation.columns))
    if missing:
        raise ValueError(f"the validation table lacks columns {missing}: pass the validate "
                         "rule's validation_cells.csv")
    return {name: g.to_dict("records") for name, g in validation.groupby("name", sort=False)}


# ----------------------------------------------------------------------------- HTML snippets


def _num(v, fmt: str = ".4g") -> str:
    try:
        v = float(v)
    except (TypeError, ValueError):
        return "n/a"
    return "n/a" if not np.isfinite(v) else format(v, fmt)


def _rows(pairs: list[tuple[str, str]]) -> str:
    return "".join(f"<tr><th style='text-align:left;padding-right:1em'>{html.escape(k)}</th>"
                   f"<td>{v}</td></tr>" for k, v in pairs)


def stats_html(cell: Mapping, control: Mapping | None, measured: list[dict] | None,
               rule: str, validated: bool) -> str:
    """The statistics panel of one cell (escaped HTML)."""
    heads = str(cell["kv_group"]).replace(",", ", ")
    n_seeds = cell.get("n_split_seeds")
    seeds = (f"{int(cell['n_seeds_significant'])} of {int(n_seeds)}"
             if n_seeds is not None and np.isfinite(float(n_seeds)) else "n/a (one split seed)")
    rows = [("cell", html.escape(cell_name(cell)) + f" (query heads {heads})"),
            ("mean score M", _num(cell["M"])), ("statistic T", _num(cell["statistic"])),
            ("permutation p", _num(cell["p_value"])), ("BH q", _num(cell["q_value"])),
            ("effect size d", _num(cell["effect_size"])), ("AUC", _num(cell.get("auc"))),
            ("mean difference B − R", f"{_num(cell.get('mean_diff'))}, 95% bootstrap interval "
             f"[{_num(cell.get('ci_low'))}, {_num(cell.get('ci_high'))}]"),
            ("significant", ("<b>yes</b>" if cell["significant"] else "no") + f" ({rule})"),
            ("significant in split seeds", seeds)]
    if control is None:
        rows.append(("negative control", "n/a (no control analysis)"))
    else:
        rows.append(("negative control", f"T {_num(control['statistic'])}, q "
                     f"{_num(control['q_value'])}, d {_num(control['effect_size'])}, "
                     + ("significant" if control["significant"] else "not significant")))
    if not validated:
        rows.append(("measured effect", "n/a (no validation run for this analysis)"))
    elif not measured:
        rows.append(("measured effect", "not among the validated cells"))
    for r in measured or []:
        rows.append((f"measured ΔL_A ({r['step_rule']} step)",
                     f"{_num(r['delta_loss_a'])} ± {_num(r.get('delta_loss_a_se'))} (predicted "
                     f"{_num(r.get('predicted_delta_a'))}; ΔL_B {_num(r.get('delta_loss_b'))})"))
    return f"<table style='font-size:13px'>{_rows(rows)}</table>"


def texts_html(name: str, pairs: pd.DataFrame) -> str:
    """Both samples' texts of every top pair of one cell (escaped, wrapped)."""
    pre = "style='white-space:pre-wrap;margin:2px 0 8px 0;font-size:12px'"
    parts = [f"<h4 style='margin:4px 0'>Top pairs of {html.escape(name)}: texts</h4>"]
    for r in pairs.to_dict("records"):
        sides = "".join(
            f"<div style='flex:1;min-width:0'><b>{tag} {html.escape(r[f'sample_{s}'])}</b>"
            f"<pre {pre}>{html.escape(r[f'text_{s}'] or '(no text)')}</pre></div>"
            for tag, s in (("A", "a"), ("B", "b")))
        parts.append(f"<div class='pair'><b>#{r['rank']}</b> score {_num(r['score'])}"
                     f"<div style='display:flex;gap:16px'>{sides}</div></div>")
    return "".join(parts)


# ----------------------------------------------------------------------------- the page


def explorer_cells(heatmap: Mapping, cells: pd.DataFrame, pairs: pd.DataFrame,
                   control: pd.DataFrame | None = None, validation: pd.DataFrame | None = None,
                   summary: Mapping | None = None) -> pd.DataFrame:
    """One row per distinct cell: its map position (x, width in head positions, y in layer
    positions), M, d, q, significant, and its statistics and texts panels (HTML)."""
    meta = heatmap["meta"]
    ctrl = ({cell_name(r): r for r in control.to_dict("records")}
            if control is not None else None)
    measured, rule = validation_by_cell(validation), style.significance_rule(summary)
    by_cell = dict(tuple(pairs.groupby("cell", sort=False)))
    rows = []
    for cell, squares in zip(cells.to_dict("records"),
                             grid_positions(cells, meta["layers"], meta["heads"])):
        lp, hp = squares[0]
        cols = [h for _, h in squares]
        name = cell_name(cell)
        cell = dict(cell, M=float(np.asarray(heatmap[cell["block"]]["layer_head_avg"])[lp, hp]))
        rows.append(dict(
            name=name, block=cell["block"], y=lp, x=(min(cols) + max(cols)) / 2,
            width=max(cols) - min(cols) + 1, M=cell["M"], d=float(cell["effect_size"]),
            q=max(float(cell["q_value"]), 1e-300), significant=bool(cell["significant"]),
            line_color="black" if cell["significant"] else "white",
            line_width=3.0 if cell["significant"] else 0.5,
            stats_html=stats_html(cell, None if ctrl is None else ctrl.get(name),
                                  measured.get(name), rule, validation is not None),
            texts_html=texts_html(name, by_cell.get(name, pairs.iloc[:0]))))
    return pd.DataFrame(rows)


def _mappers(table: pd.DataFrame, signed: bool, block: str) -> dict:
    """One colour mapper per quantity: M scaled per block (as the static heatmaps), d and q
    shared by the four blocks (comparable across blocks)."""
    from bokeh.models import LinearColorMapper, LogColorMapper
    from bokeh.palettes import RdBu11, Viridis256

    diverging = list(RdBu11)  # Bokeh's RdBu11 runs red (high) to blue (low): low first
    diverging = diverging[::-1]

    def centred(v):
        lim = float(np.nanmax(np.abs(v))) or 1.0
        return LinearColorMapper(palette=diverging, low=-lim, high=lim)

    m = table.loc[table["block"] == block, "M"].to_numpy()
    q_low = float(min(np.nanmin(table["q"]), 0.5))
    return {"M": centred(m) if signed else LinearColorMapper(
                palette=Viridis256, low=float(np.nanmin(m)), high=float(np.nanmax(m))),
            "d": centred(table["d"].to_numpy()),
            "q": LogColorMapper(palette=list(Viridis256)[::-1], low=q_low, high=1.0)}


def block_figure(block: str, source, meta: Mapping, mappers: dict):
    """The layer x head map of one block: one rect renderer and colour bar per quantity
    (only M's visible at first); returns (figure, {quantity: [renderer, colour bar]})."""
    from bokeh.models import ColorBar, FixedTicker, HoverTool, Span, TapTool
    from bokeh.plotting import figure

    layers, heads = meta["layers"], meta["heads"]
    kv_of = meta.get("kv_head_of") or list(heads)
    shared = block in SHARED_BLOCKS and len(set(kv_of)) < len(heads)
    fig = figure(name=f"map_{block}", title=f"{block}" + (" (one cell per kv group)"
                                                          if shared else ""),
                 width=max(230, 110 + CELL_PX[0] * len(heads)),
                 height=max(170, 70 + max(12, min(CELL_PX[1], 480 // len(layers)))
                            * len(layers)),
                 x_range=(-0.5, len(heads) - 0.5), y_range=(-0.5, len(layers) - 0.5),
                 tools="", toolbar_location=None, x_axis_label="query head",
                 y_axis_label="layer")
    for axis, ids in ((fig.xaxis, heads), (fig.yaxis, layers)):
        axis.ticker = FixedTicker(ticks=list(range(len(ids))))
        axis.major_label_overrides = {k: str(v) for k, v in enumerate(ids)}
    fig.grid.visible = False
    layers_of = {}
    for key, mapper in mappers.items():
        r = fig.rect(x="x", y="y", width="width", height=1, source=source,
                     fill_color={"field": key, "transform": mapper}, line_color="line_color",
                     line_width="line_width", visible=key == "M",
                     selection_line_color="#D55E00", nonselection_fill_alpha=0.55)
        bar = ColorBar(color_mapper=mapper, width=8, visible=key == "M", title=key)
        fig.add_layout(bar, "right")
        layers_of[key] = [r, bar]
    for k in range(1, len(kv_of)):
        if kv_of[k] != kv_of[k - 1]:
            fig.add_layout(Span(location=k - 0.5, dimension="height", line_color="black",
                                line_width=2 if shared else 1,
                                line_dash="solid" if shared else "dotted"))
    fig.add_tools(TapTool(renderers=[v[0] for v in layers_of.values()]),
                  HoverTool(renderers=[v[0] for v in layers_of.values()],
                            tooltips=[("cell", "@name"), ("M", "@M{0.0000}"),
                                      ("d", "@d{0.000}"), ("q", "@q{0.0000}")]))
    return fig, layers_of


def header_html(meta: Mapping, summary: Mapping | None, n_pairs: int, validated: bool) -> str:
    """Title and how to read the page."""
    return (f"<h2 style='margin:0'>Cell explorer: {html.escape(style.describe(meta))}</h2>"
            "<p style='max-width:1100px'>Click a cell of any block's layer x head map to see "
            f"its statistics and its {n_pairs} most conflicting (task-A, task-B) sample pairs "
            "with both texts. Colour: the quantity chosen below (M: the mean score over all "
            "pairs, scaled per block; d: the effect size of the permutation test that decides "
            "significance, one scale for all blocks; q: "
            "its BH-adjusted p value, log scale, bright = small). Outlined black: significant "
            f"({html.escape(style.significance_rule(summary))}). K/V parameters are shared by "
            "the query heads of a GQA group: one wide cell per group, groups separated by "
            "lines. " + ("Measured counterfactual effects come from the validation stage."
                         if validated else "No validation run for this analysis.") + "</p>")


def explorer_layout(heatmap: Mapping, table: pd.DataFrame, pairs: pd.DataFrame,
                    summary: Mapping | None, validated: bool):
    """The Bokeh layout of the page (models named for tests: map_<B>, cells_<B>, stats,
    pairs, texts, quantity)."""
    from bokeh.layouts import column, row
    from bokeh.models import (ColumnDataSource, CustomJS, DataTable, Div, NumberFormatter,
                              RadioButtonGroup, TableColumn)

    meta = heatmap["meta"]
    sources = {b: ColumnDataSource(table[table["block"] == b].reset_index(drop=True),
                                   name=f"cells_{b}") for b in BLOCKS}
    figs, groups = [], {k: [] for k in QUANTITIES}
    for b in BLOCKS:
        mappers = _mappers(table, meta.get("variant") == "signed", b)
        fig, layers_of = block_figure(b, sources[b], meta, mappers)
        figs.append(fig)
        for k, models in layers_of.items():
            groups[k] += models
    switch = RadioButtonGroup(labels=list(QUANTITIES.values()), active=0, name="quantity")
    switch.js_on_change("active", CustomJS(args=dict(groups=list(groups.values())),
                                           code=ON_SWITCH))
    stats = Div(text="<i>Click a cell.</i>", name="stats", width=900)
    texts = Div(text="", name="texts", width=1100)
    shown = ColumnDataSource({c: [] for c in PAIR_COLUMNS}, name="pairs_shown")
    every = ColumnDataSource(table_rows(pairs), name="pairs_all")
    columns = [TableColumn(field="rank", title="#", width=30),
               TableColumn(field="sample_a", title="task-A sample id", width=190),
               TableColumn(field="sample_b", title="task-B sample id", width=190),
               TableColumn(field="score", title="score M_ij", width=90,
                           formatter=NumberFormatter(format="0.0000")),
               TableColumn(field="text_a", title="text A", width=260),
               TableColumn(field="text_b", title="text B", width=260)]
    table_view = DataTable(source=shown, columns=columns, name="pairs", width=1020,
                           height=34 + 25 * max(int(pairs.groupby("cell").size().max()
                                                    if len(pairs) else 1), 1),
                           index_position=None)
    for src in sources.values():
        src.selected.js_on_change("indices", CustomJS(
            args=dict(src=src, sources=list(sources.values()), stats=stats, texts=texts,
                      pairs=shown, pairs_all=every), code=ON_TAP))
    n_pairs = int(pairs["rank"].max()) if len(pairs) else 0
    return column(Div(text=header_html(meta, summary, n_pairs, validated), width=1100),
                  switch, row(*figs), row(stats), table_view, texts)


def write_explorer(heatmap, cells, out_html: str | Path, texts=None, *, control_cells=None,
                   validation=None, summary: Mapping | None = None, k: int = 5) -> Path:
    """Write the explorer page of one analysis to ``out_html`` (atomically); returns it.

    heatmap: a ``save_heatmap`` folder or its loaded dict; cells, control_cells: cells
    tables (paths or DataFrames; control_cells: the negative control's, optional);
    texts: sample id -> text (:func:`.inputs.load_texts`); validation: the validation's
    ``validation_cells.csv`` (path or DataFrame), optional; k: pairs per cell."""
    from bokeh.embed import file_html
    from bokeh.resources import INLINE

    if not isinstance(heatmap, Mapping):
        heatmap, _ = load_heatmap(heatmap)
    cells = load_cells(cells)
    control = load_cells(control_cells) if control_cells is not None else None
    if isinstance(validation, (str, Path)):
        validation = pd.read_csv(validation)
    pairs = cell_pairs(heatmap, cells, load_texts(texts), k)
    table = explorer_cells(heatmap, cells, pairs, control, validation, summary)
    layout = explorer_layout(heatmap, table, pairs, summary, validation is not None)
    page = file_html(layout, INLINE,
                     title=f"QK-OV cell explorer: {style.describe(heatmap['meta'])}")
    return style.write_text(out_html, stable_ids(page))


_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")


def stable_ids(page: str) -> str:
    """Bokeh names the document and the elements that hold it with random UUIDs (in the
    page's body); number them in order of appearance instead, so the same analysis always
    writes the same bytes. The inlined library before ``<body>`` is left as it is."""
    head, sep, body = page.rpartition("<body>")
    if not sep:
        return page
    ids: dict[str, str] = {}
    return head + sep + _UUID.sub(
        lambda m: ids.setdefault(m.group(0), f"00000000-0000-4000-8000-{len(ids):012d}"), body)
