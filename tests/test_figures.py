"""Figures built from a small saved result: files, axes labels, marked cells, tables."""
from __future__ import annotations

import json

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pandas as pd
import pytest

from interference import figures as F
from interference.figures.heatmaps import MARK_GID
from interference.results import save_heatmap
from interference.figures.style import new_figure

LAYERS = [3, 7, 11]                 # real ids, deliberately not 0..n-1
HEADS = [0, 1, 2, 4, 5, 6]          # query heads 3 is not selected
KV_OF = [0, 0, 0, 1, 1, 1]          # GQA: two kv heads, groups {0,1,2}, {4,5,6}
N_A, N_B = 6, 5


def fake_heatmap(seed=0, variant="qkov", n_b=N_B):
    rng = np.random.default_rng(seed)
    heat = {"meta": {"task_a": "math", "task_b": "code", "layers": LAYERS, "heads": HEADS,
                     "kv_head_of": KV_OF, "num_kv_heads": 2, "num_heads": 7,
                     "variant": variant, "sample_ids_a": [f"math:{k}" for k in range(N_A)],
                     "sample_ids_b": [f"code:{k}" for k in range(n_b)],
                     "fisher_tasks": ["math", "code"], "settings": {"aggregate": "sum"}}}
    for b in "QKVO":
        s = rng.gamma(2.0, 1.0, (N_A, n_b, len(LAYERS), len(HEADS)))
        if b in "KV":  # K/V columns of one group hold the same values
            s[..., 1:3] = s[..., :1]
            s[..., 4:6] = s[..., 3:4]
        heat[b] = {"scores": s, "layer_head_avg": s.mean(axis=(0, 1)), "top_conflicts": []}
    return heat


def fake_cells(seed=0):
    """One row per distinct cell; a few significant, in Q and in K (a GQA group)."""
    rng = np.random.default_rng(seed)
    rows = []
    for b in "QKVO":
        for layer in LAYERS:
            if b in "KV":
                for kv, grp in ((0, [0, 1, 2]), (1, [4, 5, 6])):
                    rows.append(dict(block=b, layer=layer, head=grp[0], kv_head=kv,
                                     kv_group=",".join(map(str, grp))))
            else:
                for h, kv in zip(HEADS, KV_OF):
                    rows.append(dict(block=b, layer=layer, head=h, kv_head=kv, kv_group=str(h)))
    df = pd.DataFrame(rows)
    m = len(df)
    df["statistic"] = rng.normal(size=m)
    df["p_value"] = rng.uniform(size=m)
    df["q_value"] = np.minimum(1, df["p_value"] * 3)
    df["effect_size"] = rng.normal(0.3, 0.3, size=m)
    df["auc"] = 0.5
    df["ci_low"], df["ci_high"] = df["statistic"] - 1, df["statistic"] + 1
    df["null_mean"], df["null_sd"] = 0.0, 1.0
    sig = [("Q", 7, 4), ("K", 3, 4), ("O", 11, 0)]  # K/L3/KV1 covers heads 4, 5, 6
    df["significant"] = [(b, l, h) in sig for b, l, h in zip(df["block"], df["layer"], df["head"])]
    df.loc[df["significant"], ["p_value", "q_value"]] = [1e-4, 0.01]
    # a significant cell's statistic points the conflict's way (T > 0), as the stats' are
    df.loc[df["significant"], "statistic"] = df.loc[df["significant"], "statistic"].abs()
    df["q_significant"] = df["q_value"] <= 0.05
    return df


@pytest.fixture
def saved(tmp_path):
    heat = fake_heatmap()
    save_heatmap(tmp_path / "heatmap", heat)
    cells = fake_cells()
    cells.to_csv(tmp_path / "cells.csv", index=False)
    texts = {f"math:{k}": {"id": f"math:{k}", "prompt": f"What is {k}+{k}?", "answer": str(2 * k)}
             for k in range(N_A)}
    texts.update({f"code:{k}": f"def f{k}(x):\n    return x | {k}" for k in range(N_B)})
    (tmp_path / "texts.json").write_text(json.dumps(texts))
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "null_top.npz", null=rng.normal(size=(3, 500)),
             statistic=np.array([3.0, 2.5, 2.0]), cells=np.array(["Q/L7/H4", "K/L3/KV1", "O/L11/H0"]))
    return tmp_path


def test_make_all_figures_writes_every_file_and_manifest(saved):
    out = saved / "figures"
    paths = F.make_all_figures(saved / "heatmap", saved / "cells.csv", out,
                               texts=saved / "texts.json", null_npz=saved / "null_top.npz")
    names = {p.name for p in paths}
    for stem in ["heatmap_Q", "heatmap_K", "heatmap_V", "heatmap_O", "heatmap_panel",
                 "block_comparison", "forensics", "pvalue_histogram", "null_top"]:
        assert {f"{stem}.pdf", f"{stem}.png"} <= names
    assert {"top_conflicts.csv", "top_conflicts.tex", "forensics.md", "figures.json"} <= names
    for p in paths:
        assert p.exists() and p.stat().st_size > 0, p
    assert (out / "heatmap_Q.pdf").read_bytes()[:4] == b"%PDF"
    assert (out / "heatmap_Q.png").read_bytes()[:4] == b"\x89PNG"
    manifest = json.loads((out / "figures.json").read_text())
    assert {(out / e["path"]) for e in manifest} == set(paths) - {out / "figures.json"}
    captions = {e["path"]: e["caption"] for e in manifest}
    assert all(captions.values())
    for b in "QKVO":  # block, tasks and variant spelled out
        assert all(w in captions[f"heatmap_{b}.png"] for w in (f"Block {b}", "math", "code",
                                                               "variant qkov"))
    assert not list(out.glob(".*")), "temporary files left behind"
    # without null samples the optional figure is skipped
    paths2 = F.make_all_figures(saved / "heatmap", saved / "cells.csv", saved / "f2")
    assert not any(p.name.startswith("null_top") for p in paths2)


@pytest.mark.parametrize("block", list("QKVO"))
def test_heatmap_axes_and_marks(block):
    heat, cells = fake_heatmap(), fake_cells()
    fig, ax = new_figure(4, 3)
    F.draw_block_heatmap(ax, heat, cells, block)
    assert [t.get_text() for t in ax.get_xticklabels()] == [str(h) for h in HEADS]
    assert [t.get_text() for t in ax.get_yticklabels()] == [str(l) for l in LAYERS]
    marks = [p for p in ax.patches if p.get_gid() == MARK_GID]
    sig = cells[(cells.block == block) & cells.significant]
    expected = sum(len(g.split(",")) for g in sig["kv_group"])  # K/V: whole group marked
    assert len(marks) == expected
    marked = {(round(p.get_y() + 0.5), round(p.get_x() + 0.5)) for p in marks}
    if block == "K":  # K/L3/KV1 -> layer position 0, head positions of 4, 5, 6
        assert marked == {(0, 3), (0, 4), (0, 5)}
    np.testing.assert_allclose(ax.images[0].get_array(), heat[block]["layer_head_avg"])


def test_heatmap_rejects_cells_off_the_axes():
    cells = fake_cells()
    cells.loc[0, ["layer", "significant"]] = [99, True]
    fig, ax = new_figure(4, 3)
    with pytest.raises(ValueError, match="not on the heatmap"):
        F.draw_block_heatmap(ax, fake_heatmap(), cells, "Q")


def test_block_means_bootstrap():
    heat = fake_heatmap()
    t = F.block_means(heat, n_bootstrap=500, seed=3)
    assert list(t["block"]) == list("QKVO")
    q_mean = heat["Q"]["scores"].mean()
    assert t.loc[0, "mean"] == pytest.approx(q_mean)
    assert (t["ci_low"] <= t["mean"]).all() and (t["mean"] <= t["ci_high"]).all()
    assert list(t["n_cells"]) == [18, 6, 6, 18]  # K/V: one per kv group
    pd.testing.assert_frame_equal(t, F.block_means(heat, n_bootstrap=500, seed=3))


def test_top_table_rows_and_latex(tmp_path):
    cells = fake_cells()
    # a cell significant the other way (two-sided q): the smallest q, but no conflict
    other_way = cells.index[~cells["significant"]][5]
    cells.loc[other_way, ["p_value", "q_value", "statistic"]] = [1e-5, 0.001, -5.0]
    F.write_top_table(cells, tmp_path, n=10, meta=fake_heatmap()["meta"])
    table = pd.read_csv(tmp_path / "top_conflicts.csv", dtype={"kv_group": str})
    # the conflict's way (T > 0) first by q, then T; then the others, least significant first
    toward = cells[cells["statistic"] > 0].sort_values(["q_value", "statistic"],
                                                       ascending=[True, False])
    other = cells[cells["statistic"] <= 0].sort_values(["q_value", "statistic"],
                                                       ascending=[False, False])
    expected = pd.concat([toward, other]).head(10)
    assert (expected["statistic"] > 0).all() and other_way not in expected.index
    assert list(table["statistic"]) == pytest.approx(list(expected["statistic"]))
    assert list(table["block"]) == list(expected["block"])
    assert table["significant"].sum() == cells["significant"].sum() == 3
    tex = (tmp_path / "top_conflicts.tex").read_text()
    assert r"\toprule" in tex and r"\bottomrule" in tex
    body = tex.split(r"\midrule")[1].split(r"\bottomrule")[0]
    assert body.count(r"\\") == 10
    assert "kv1 (4,5,6)*" in tex


def test_forensics_finds_the_largest_pairs(tmp_path, saved):
    heat, cells = fake_heatmap(), fake_cells()
    texts = json.loads((saved / "texts.json").read_text())
    t = F.pair_forensics(heat, cells, texts, n_cells=3, k=4)
    assert len(t) == 12 and t["cell"].nunique() == 3
    first = t[t["rank"] == 1].iloc[0]
    row = F.top_cells(cells, 1).iloc[0]
    m = heat[row["block"]]["scores"][:, :, LAYERS.index(row["layer"]), HEADS.index(row["head"])]
    i, j = np.unravel_index(np.argmax(m), m.shape)
    assert (first.sample_a, first.sample_b) == (f"math:{i}", f"code:{j}")
    assert first.score == pytest.approx(m.max())
    assert first.text_a == f"What is {i}+{i}? → {2 * i}"
    F.write_forensics(heat, cells, tmp_path, texts)
    md = (tmp_path / "forensics.md").read_text()
    assert md.count("\n") == 2 + 4 * 5 and r"x \| " in md  # '|' escaped


def test_ablation_self_correlation_and_counts(tmp_path):
    maps = {v: {b: fake_heatmap(seed)[b]["layer_head_avg"] for b in "QKVO"}
            for v, seed in (("qkov", 0), ("symmetric", 1))}
    maps["signed"] = {b: -m for b, m in maps["qkov"].items()}
    rho = F.rank_correlations(maps, kv_head_of=KV_OF)
    assert np.diag(rho.to_numpy()) == pytest.approx(1.0)
    assert rho.loc["qkov", "signed"] == pytest.approx(-1.0)
    assert F.rank_correlations(maps, kv_head_of=KV_OF, flip=["signed"]).loc["qkov", "signed"] \
        == pytest.approx(1.0)
    assert F.rank_correlations(maps, "K", KV_OF).loc["qkov", "qkov"] == pytest.approx(1.0)
    cells = {"qkov": fake_cells(0), "symmetric": fake_cells(1), "signed": fake_cells(2)}
    cells["symmetric"].loc[:, "significant"] = False
    counts = F.significant_counts(cells)
    assert list(counts["significant"]) == [3, 0, 3]
    assert counts.loc["qkov", ["Q", "K", "V", "O"]].tolist() == [1, 1, 0, 1]
    entries = F.write_ablation_summary(maps, cells, tmp_path, kv_head_of=KV_OF, flip=["signed"])
    for e in entries:
        assert (tmp_path / e["path"]).stat().st_size > 0
    corr = pd.read_csv(tmp_path / "ablation_summary_correlations.csv")
    assert set(corr["block"]) == {"pooled", "Q", "K", "V", "O"}


def test_stability_jaccard_and_flag_counts(tmp_path):
    a = F.significant_set(fake_cells())
    assert a == {"Q/L7/H4", "K/L3/KV1", "O/L11/H0"}
    assert F.jaccard(a, set(a)) == 1.0 and np.isnan(F.jaccard(set(), set()))
    assert F.jaccard(a, {"Q/L7/H4"}) == pytest.approx(1 / 3)
    c2 = fake_cells()
    c2.loc[(c2.block == "O") & c2.significant, "significant"] = False
    cells = {0: fake_cells(), 1: fake_cells(), 2: c2}
    maps = {s: {b: fake_heatmap(0)[b]["layer_head_avg"] for b in "QKVO"} for s in cells}
    flags = F.flag_counts(cells)
    assert len(flags) == len(c2)
    got = dict(zip(flags["cell"], flags["n_seeds_flagged"]))
    assert got["Q/L7/H4"] == got["K/L3/KV1"] == 3 and got["O/L11/H0"] == 2
    assert sum(got.values()) == 8
    F.write_stability_report(maps, cells, tmp_path, kv_head_of=KV_OF)
    pairs = pd.read_csv(tmp_path / "stability_pairs.csv")
    assert len(pairs) == 3 and pairs["spearman"].to_numpy() == pytest.approx(1.0)
    assert pairs.loc[0, "jaccard"] == 1.0 and pairs.loc[1, "jaccard"] == pytest.approx(2 / 3)
    for stem in ("stability.pdf", "stability.png", "stability_cells.csv"):
        assert (tmp_path / stem).stat().st_size > 0


def test_signed_variant_uses_diverging_map_and_lower_tail():
    heat = fake_heatmap(variant="signed")
    for b in "QKVO":
        heat[b]["layer_head_avg"] = heat[b]["layer_head_avg"] - 2.0
    fig, ax = new_figure(4, 3)
    F.draw_block_heatmap(ax, heat, fake_cells(), "Q")
    assert ax.images[0].get_cmap().name.startswith("RdBu")
    t = F.top_cells(fake_cells(), None, variant="signed")
    tie = t[t["q_value"] == t["q_value"].iloc[0]]["statistic"]
    assert tie.is_monotonic_increasing


@pytest.mark.filterwarnings("ignore:.*relabellings")
def test_real_statistics_output_round_trips(tmp_path):
    """cells.csv as the stats stage writes it (if that stage is importable here)."""
    stats = pytest.importorskip("interference.stats")
    heat, ref = fake_heatmap(), fake_heatmap(seed=9, n_b=8)
    heat["Q"]["scores"][:, :, 1] *= 4          # plant conflicts: Q at layer 7, K/L3/KV1
    heat["K"]["scores"][:, :, 0, 3:] *= 4
    out = stats.test_scores({b: heat[b]["scores"] for b in "QKVO"},
                            {b: ref[b]["scores"] for b in "QKVO"}, LAYERS, HEADS, KV_OF,
                            n_permutations=2000, n_bootstrap=50, seed=0)
    out["cells"].to_csv(tmp_path / "cells.csv", index=False)
    cells = F.load_cells(tmp_path / "cells.csv")
    assert len(cells) == 3 * (6 + 2 + 2 + 6)
    fig, ax = new_figure(4, 3)
    F.draw_block_heatmap(ax, heat, cells, "K")
    sig = cells[(cells.block == "K") & cells.significant]
    assert len(sig) >= 1 and cells["significant"].sum() >= 6
    assert sum(p.get_gid() == MARK_GID for p in ax.patches) == 3 * len(sig)
    F.write_top_table(cells, tmp_path, n=None)
    assert len(pd.read_csv(tmp_path / "top_conflicts.csv")) == len(cells)


def test_effect_size_map_shows_the_tested_quantity():
    """The d map beside M: each square holds its cell's effect size (a K/V cell on every
    query head of its group), boxed where the cell is significant."""
    heat, cells = fake_heatmap(), fake_cells()
    fig, ax = new_figure(4, 3)
    F.draw_block_heatmap(ax, heat, cells, "K", quantity="effect")
    expected = np.full((len(LAYERS), len(HEADS)), np.nan)
    for r in cells[cells.block == "K"].itertuples():
        for h in map(int, r.kv_group.split(",")):
            expected[LAYERS.index(r.layer), HEADS.index(h)] = r.effect_size
    np.testing.assert_array_equal(np.asarray(ax.images[0].get_array()), expected)
    assert ax.images[0].get_cmap().name.startswith("RdBu")     # d is signed: diverging
    assert sum(p.get_gid() == MARK_GID for p in ax.patches) == 3   # K/L3/KV1: 3 heads
    with pytest.raises(ValueError, match="quantity"):
        F.draw_block_heatmap(ax, heat, cells, "K", quantity="q")


def test_forensics_figure_shows_full_ids_texts_and_a_dominant_sample(tmp_path):
    heat, cells = fake_heatmap(), fake_cells()
    long_a = [f"math:packed:{k:06d}-{k:06d}" for k in range(N_A)]
    heat["meta"]["sample_ids_a"] = long_a
    for b in "QKVO":
        heat[b]["scores"][2] += 100.0            # task-A sample 2 tops every cell
    texts = {a: f"Question {k}: " + "long words " * 30 for k, a in enumerate(long_a)}
    texts.update({f"code:{k}": f"def f{k}(x): return x" for k in range(N_B)})
    table = F.pair_forensics(heat, cells, texts, n_cells=4, k=5)
    from interference.figures.forensics import dominance_note, draw_forensics

    note = dominance_note(table)
    assert note == (f"Note: task-A sample {long_a[2]} is in at least half of the top pairs of "
                    "4 of 4 cells (20 of 20 pairs).")
    half = table[table["cell"].isin(table["cell"].unique()[:2])]   # 2 of 3 cells: still
    assert "2 of 3 cells (10 of 15" in dominance_note(pd.concat([half, table[table.cell == (
        table.cell.unique()[2])].assign(sample_a="math:other")]))
    assert dominance_note(table.assign(sample_a=[f"s{k}" for k in range(len(table))])) == ""
    fig, axes = new_figure(11, 12, nrows=4, ncols=2, squeeze=False)
    draw_forensics(list(axes), table)
    drawn = "\n".join(t.get_text() for ax in axes[:, 1] for t in ax.texts)
    for r in table.itertuples():
        assert r.sample_a in drawn and r.sample_b in drawn      # ids in full, never cut
    assert "Question 2: long words" in drawn and "def f" in drawn   # both texts
    assert max(len(line) for line in drawn.splitlines()) <= 70     # wrapped
    entries = F.write_forensics(heat, cells, tmp_path, texts)
    assert note in entries[0]["caption"] and note in (tmp_path / "forensics.md").read_text()
