"""Reports: one row per configuration (never averaging other settings as if they were seeds),
labels naming what sets a row apart, the number of seeds behind every mean, and a refusal to
put different dev sets in one table. Synthetic cells with known numbers (the oracle is a hand
mean / std)."""

import statistics

import pytest

from eebench.errors import EebenchError
from eebench.reports.grouping import group_cells
from eebench.reports.report import layer_table, main_table, report
from eebench.runs.results import CellResult, SignalSweep


def cell(method, seed, acc, *, task="toy", dev="d" * 64, **changes):
    """A finished cell whose energy sweep reaches ``acc`` at 2x and whose final layer scores ``acc``."""
    from eebench import MATHS_VERSION
    from eebench.strategy import get_method

    config = {"maths_version": MATHS_VERSION, "task": task, "model": "tiny", "method": method, "seed": seed,
              "method_params": dict(get_method(method).defaults), "epochs": 1, "lr": 1e-3, "head_lr": 1e-3,
              "pooling": "mean", "final_pooling": "mean", "num_layers": 4, "backbone_layers": 4,
              "eval_samples": None, "eval_split": "dev", "main_metric": "accuracy", "metrics": ["accuracy"],
              "train_fingerprint": "t" * 64, "dev_fingerprint": dev, "train_rows": 96, "dev_rows": 48}
    for k, v in changes.items():
        if k in config["method_params"]:
            config["method_params"][k] = v
        else:
            config[k] = v
    k = config["num_layers"]
    points = [{"threshold": 0.5, "speedup": 4 / k, "exit_counts": [0] * (k - 1) + [48], "accuracy": acc - 0.1,
               "pareto": True}]
    if method != "final-only":
        points.append({"threshold": 0.1, "speedup": 2.0, "exit_counts": [24] + [0] * (k - 2) + [24], "accuracy": acc,
                       "pareto": True})
    return CellResult(cell_id=f"{method}{seed}{acc}", task=task, method=method, seed=seed, config=config,
                      data={"dev_fingerprint": dev, "task_source": task}, model={"pooling": config["pooling"]},
                      training={}, layers=[{"accuracy": acc}] * k,
                      sweeps={"energy": SignalSweep(signal="energy", points=points, summary={})})


def test_rows_are_configurations_with_labels_and_seed_counts():
    rs = [cell("cosee", 1, 0.80), cell("cosee", 2, 0.84), cell("cosee", 3, 0.70, alpha=0.01),
          cell("final-only", 1, 0.90), cell("final-only", 1, 0.60, num_layers=2),
          cell("vanilla", 1, 0.75), cell("vanilla", 1, 0.65, pooling="cls", final_pooling="cls")]
    groups = group_cells(rs)
    labels = [g.label for g in groups]
    assert labels == ["final-only", "final-only (2 of 4 layers)", "vanilla", "vanilla (pooling=cls)",
                      "cosee", "cosee (alpha=0.01)"]
    assert [len(g.cells) for g in groups] == [1, 1, 1, 1, 2, 1]
    df = main_table(rs, 2.0)
    sd = statistics.stdev([80.0, 84.0])
    assert df.loc["cosee", "energy"] == f"82.0 ± {sd:.1f} (n=2)"
    assert df.loc["cosee (alpha=0.01)", "energy"] == "70.0 (n=1)"
    assert df.loc["final-only", "energy"] == "80.0 (n=1)"  # its only point: the last layer
    assert df.loc["final-only (2 of 4 layers)", "energy"] == "50.0 (n=1)"
    lt = layer_table(rs)
    assert lt.loc["final-only (2 of 4 layers)"].tolist() == ["60.0 (n=1)", "60.0 (n=1)", "", ""]
    assert lt.loc["cosee", "L4"] == f"82.0 ± {sd:.1f} (n=2)"


@pytest.mark.parametrize("metric", ["accuracy", "f1", "matthews"])
def test_layer_table_ends_with_the_majority_class_score(metric):
    """The last row is the dev score of always answering the majority class (the floor a layer must
    clear), rebuilt from the per-label exit counts a sweep records and checked against sklearn."""
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    plain = [cell("vanilla", 1, 0.75), cell("cosee", 1, 0.8)]
    assert "majority class (constant answer)" not in layer_table(plain).index  # sweeps without label counts
    for negatives, positives in [(30, 18), (18, 30)]:
        rs = [cell("vanilla", s, 0.75, main_metric=metric, metrics=[metric]) for s in (1, 2)]
        for r in rs:
            for p in r.sweeps["energy"].points:
                p[metric] = p.pop("accuracy")
                p["exit_counts_by_label"] = [[0, 0, 0, negatives], [0, 0, 0, positives]]
            r.layers = [{metric: 0.75}] * 4
        labels = [0] * negatives + [1] * positives
        constant = [int(positives > negatives)] * 48
        want = {"accuracy": accuracy_score, "f1": lambda y, p: f1_score(y, p, zero_division=0),
                "matthews": matthews_corrcoef}[metric](labels, constant)
        lt = layer_table(rs)
        assert lt.index[-1] == "majority class (constant answer)"
        assert lt.iloc[-1].tolist() == [f"{100 * want:.1f}"] * 4
        assert lt.loc["vanilla", "L1"] == "75.0 ± 0.0 (n=2)"
    assert want == {"accuracy": 30 / 48, "f1": 2 * 30 / (48 + 30), "matthews": 0.0}[metric]


def test_settings_that_differ_are_named():
    rs = [cell("vanilla", 1, 0.7), cell("vanilla", 1, 0.8, epochs=3), cell("vanilla", 1, 0.6, model="other"),
          cell("vanilla", 2, 0.5, lr=5e-3, head_lr=5e-3)]
    labels = {g.label for g in group_cells(rs)}
    # each row names what sets it apart from eebench's default (epochs 1), else from most rows
    assert labels == {"vanilla", "vanilla (epochs=3)", "vanilla (model=other)", "vanilla (lr=0.005)"}
    two = {g.label for g in group_cells(rs[:1] + [cell("vanilla", 1, 0.6, pooling="cls", final_pooling="cls")])}
    assert two == {"vanilla (pooling=mean)", "vanilla (pooling=cls)"}  # a tie: both named


def test_different_dev_sets_are_refused_unless_a_setting_explains_them(capsys, tmp_path):
    other_dev = [cell("vanilla", 1, 0.7), cell("vanilla", 2, 0.8, dev="e" * 64)]
    with pytest.raises(EebenchError, match="cells of task 'toy' were evaluated on 2 different dev sets"):
        group_cells(other_dev)
    with pytest.raises(EebenchError, match="different dev sets"):
        report(other_dev, None)
    # the CLI: one line, exit 2
    from eebench.cli import main

    for i, r in enumerate(other_dev):
        d = tmp_path / "runs" / "toy" / f"cell{i}"
        d.mkdir(parents=True)
        r.to_disk(d / "result.json")
        (d / "cell_config.json").write_text("{}")
    capsys.readouterr()
    assert main(["report", "--results", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert "different dev sets" in err and err.count("\n") == 1
    # --eval-samples says why the dev sets differ: two labelled rows
    subset = [cell("vanilla", 1, 0.7), cell("vanilla", 1, 0.8, dev="e" * 64, eval_samples=20)]
    assert {g.label for g in group_cells(subset)} == {"vanilla", "vanilla (eval_samples=20)"}
    # other tasks are other tables, never one row
    tasks = [cell("vanilla", 1, 0.7), cell("vanilla", 1, 0.8, task="rte", dev="e" * 64)]
    assert [(g.task, g.label) for g in group_cells(tasks)] == [("rte", "vanilla"), ("toy", "vanilla")]


def test_same_seed_twice_in_one_configuration_is_refused():
    with pytest.raises(EebenchError, match="seed 1 share one configuration"):
        group_cells([cell("vanilla", 1, 0.7), cell("vanilla", 1, 0.8)])


def test_the_cells_table_lists_every_cell_with_its_cost_machine_and_exit_check(tmp_path):
    from eebench.reports.report import cells_table

    a, b, c = cell("vanilla", 2, 0.60), cell("vanilla", 1, 0.70), cell("cosee", 1, 0.80)
    a.training = {"steps": 30, "seconds": 12.4, "resumed_from_step": 10}
    a.model |= {"device": "cpu", "machine": {"cpu_model": "AMD EPYC", "torch_threads": 1}}
    b.model |= {"device": "cuda", "machine": {"cpu_model": "Intel Xeon", "torch_threads": 8, "gpu": "NVIDIA H200"}}
    ok = {"threshold": 0.1, "exit_mismatches": 0, "prediction_mismatches": 0, "n": 48}
    a.sweeps["energy"].confirm = [ok, ok | {"exit_mismatches": 2, "prediction_mismatches": 1}]
    b.sweeps["energy"].confirm = [ok]
    df = cells_table([a, b, c])
    assert df.index.tolist() == ["vanilla", "vanilla", "cosee"]  # the tables' row order, seeds ascending
    assert df["seed"].tolist() == [1, 2, 1] and df["cell"].tolist() == [b.cell_id, a.cell_id, c.cell_id]
    va = df[df["cell"] == a.cell_id].iloc[0]
    # resumed from a checkpoint without the earlier processes' time: only a lower bound is known
    assert (va["final layer accuracy"], va["steps"], va["training s"], va["resumed from step"]) == ("60.0", 30, "≥ 12", 10)
    a.training["seconds_before_resume"] = 4.0  # recorded: "seconds" is then the total over both processes
    assert cells_table([a])["training s"].iloc[0] == "12"
    assert va["trained on"] == "cpu, AMD EPYC, 1 thread(s)"
    # the kind behind a generic model name: two "AMD EPYC" cells from other CPUs read apart
    zen1 = {"cpu_model": "AMD EPYC", "cpu_signature": "family 23 model 1 stepping 2",
            "torch_cpu_capability": "AVX2", "torch_threads": 1}
    c.model |= {"device": "cpu", "machine": zen1}
    assert cells_table([c])["trained on"].iloc[0] == "cpu, AMD EPYC (family 23 model 1 stepping 2, AVX2), 1 thread(s)"
    c.model["machine"] = {"cpu_model": "AMD EPYC", "torch_cpu_capability": "AVX512", "torch_threads": 1}  # before signatures
    assert cells_table([c])["trained on"].iloc[0] == "cpu, AMD EPYC (AVX512), 1 thread(s)"
    del c.model["machine"]
    assert va["early exit == simulation"] == "3 mismatches / 2 thresholds"
    vb = df[df["cell"] == b.cell_id].iloc[0]
    assert vb["trained on"] == "cuda, NVIDIA H200, Intel Xeon, 8 thread(s)"
    assert vb["early exit == simulation"] == "0 mismatches / 1 threshold"
    assert df[df["cell"] == c.cell_id].iloc[0]["early exit == simulation"] == "not confirmed"
    report([a, b, c], tmp_path)
    text = (tmp_path / "toy" / "cells.md").read_text()
    assert "| 60.0 " in text and a.cell_id in text  # written as text: 60.0, not 60


def test_versus_pairs_seeds_against_the_reference_and_tests_the_difference(tmp_path):
    from scipy import stats

    from eebench.reports.report import versus_table

    ref = [cell("cosee", 1, 0.80), cell("cosee", 2, 0.84), cell("cosee", 3, 0.70)]
    van = [cell("vanilla", 1, 0.75), cell("vanilla", 2, 0.80), cell("vanilla", 3, 0.66)]
    other = [cell("weighted", 4, 0.99)]  # no seed in common with the reference: nothing to pair
    full = [cell("final-only", 1, 0.90)]  # a reference row, not a front: left out
    df = versus_table(ref + van + other + full, "cosee", "energy", speedups=(2.0,))
    diffs = [-0.05, -0.04, -0.04]
    p = stats.ttest_rel([0.75, 0.80, 0.66], [0.80, 0.84, 0.70]).pvalue
    # the only test of the table: Holm's adjustment leaves its p as it is
    assert df.loc["vanilla / energy", "2x"] == f"-4.3 ± {100 * statistics.stdev(diffs):.1f} (n=3, p={p:.2f}, Holm {p:.2f})"
    assert df.loc["weighted / energy", "2x"] == "n/a"
    assert "cosee / energy" not in df.index and not any(i.startswith("final-only") for i in df.index)
    assert versus_table(van, "cosee", "energy") is None  # no such configuration: no table
    assert versus_table(ref + van, "cosee", "entropy") is None  # the reference has no such sweep
    report(ref + van, tmp_path, operating="oracle", reference="vanilla")
    assert "cosee / energy" in (tmp_path / "toy" / "versus_vanilla.md").read_text()


def test_the_cells_table_shows_each_cells_own_held_out_point():
    from eebench.exits.operating import Target
    from eebench.reports.report import cells_table

    class Held:  # stands in for HeldOut: (splits, mean, std, speed-up reached) of one cell
        def cell(self, r, signal, target):
            return (20, r.layers[-1]["accuracy"], 0.03, 2.5) if r.seed == 1 else None

    df = cells_table([cell("vanilla", 1, 0.6), cell("vanilla", 2, 0.7)], "energy", Held(), Target(speedup=2))
    col = "held-out accuracy, energy, >= 2x"
    assert df[col].tolist() == ["60.0 ± 3.0 (2.50x)", "n/a"]  # seed 2: target not reached
    assert col not in cells_table([cell("vanilla", 1, 0.6)]).columns  # no operating point asked for


def test_one_value_is_shown_without_a_spread():
    from eebench.exits.operating import Target
    from eebench.reports.report import HeldOut, cells_table

    # a final-only cell: nothing is chosen, so its held-out point is one value, not a mean of splits
    fo = cell("final-only", 1, 0.8)
    df = cells_table([fo], "energy", HeldOut(), Target(speedup=2))
    assert df["held-out accuracy, energy, >= 2x"].tolist() == ["70.0 (1.00x)"]  # its one point (the helper's)
    two = main_table([fo, cell("final-only", 2, 0.7)], 2.0, HeldOut())
    assert two.loc["final-only", "energy"].startswith(f"65.0 ± {100 * statistics.stdev([0.7, 0.6]):.1f} (")


def test_an_unknown_reference_is_one_line_naming_the_labels(tmp_path):
    rs = [cell("cosee", 1, 0.8), cell("vanilla", 1, 0.7)]
    with pytest.raises(EebenchError, match=r"--reference 'vanila' is no configuration of these results; known: vanilla, cosee"):
        report(rs, tmp_path, operating="oracle", reference="vanila")
    report([cell("vanilla", 1, 0.7)], tmp_path / "no-cosee", operating="oracle")  # the default: no cosee row, no table
    assert not list((tmp_path / "no-cosee").rglob("versus_*"))
    with pytest.raises(EebenchError, match=r"--reference 'cosee/entropy': cosee has no 'entropy' front; its signals: energy"):
        report(rs, tmp_path, operating="oracle", reference="cosee/entropy")


def test_a_reference_can_name_its_own_exit_signal(tmp_path):
    """--reference LABEL/SIGNAL: e.g. cosee-softmax with softmax exits against cosee-entropy with
    entropy exits (the paper's Figs. 8-9 compare each signal under COSEE trained with it)."""
    def with_entropy(c, acc):
        pts = [dict(p, accuracy=acc if p["speedup"] == 2.0 else p["accuracy"]) for p in c.sweeps["energy"].points]
        c.sweeps["entropy"] = SignalSweep(signal="entropy", points=pts, summary={})
        return c

    rs = [with_entropy(cell("cosee", s, 0.8), 0.7 + s / 100) for s in (1, 2)] + [cell("vanilla", s, 0.75) for s in (1, 2)]
    report(rs, tmp_path, operating="oracle", reference="cosee/entropy")
    text = (tmp_path / "toy" / "versus_cosee_entropy.md").read_text()
    assert "minus cosee / entropy" in text and "with entropy exits" not in text  # the index names the reference
    row = next(line for line in text.splitlines() if line.startswith("| vanilla / energy"))
    assert "+3.5 ± 0.7 (n=2" in row  # 0.75 - (0.71, 0.72)
    rows = [line.split("|")[1].strip() for line in text.splitlines()[2:]]
    assert rows == ["vanilla / energy", "cosee / energy"]  # the reference itself is no row


def test_holm_multiplies_the_kth_smallest_p_by_the_tests_left_and_keeps_the_order():
    from eebench.reports.report import holm

    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])  # .04 x 1 < .03 x 2: made monotone
    assert holm([0.5, 0.01]) == pytest.approx([0.5, 0.02])
    assert holm([0.4, 0.3, 0.9]) == pytest.approx([0.9, 0.9, 0.9])  # capped at 1, then monotone
    assert holm([]) == []


def _with_dis_and_rates(c, dis, premature, delayed):
    """``c`` with DIS per layer and, on its two swept points (1x, 2x), premature / delayed rates."""
    sw = c.sweeps["energy"]
    sw.dis = dis
    for p, pre, dl in zip(sw.points, premature, delayed, strict=True):
        p["premature_rate"], p["delayed_rate"] = pre, dl
    return c


def test_dis_and_exit_rates_are_compared_with_the_reference_paired_by_seed_with_holm(tmp_path):
    from scipy import stats

    from eebench.reports.report import dis_versus_table, exit_rates_versus_table, holm

    # points are listed 1x (threshold 0.5) then 2x (threshold 0.1); the final layer has no DIS
    ref = [_with_dis_and_rates(cell("cosee", s, 0.8), [0.70 + s / 100, 0.6, 0.8, None], [0.0, 0.10 + s / 100], [0.5, 0.3])
           for s in (1, 2, 3)]
    van = [_with_dis_and_rates(cell("vanilla", s, 0.7), [0.57 + s / 20, 0.6, 0.7, None], [0.0, 0.20], [0.5, 0.4 + s / 100])
           for s in (1, 2, 3)]
    full = [cell("final-only", 1, 0.9)]
    dis = dis_versus_table(ref + van + full, "cosee", "energy")
    d1 = [(0.57 + s / 20) - (0.70 + s / 100) for s in (1, 2, 3)]  # -0.09, -0.05, -0.01
    d3 = [-0.1] * 3
    p1 = stats.ttest_1samp(d1, 0.0).pvalue
    p_adj = holm([p1, 1.0, 0.0])  # layer 2: no difference at all (p = 1); layer 3: the same -0.1 on every seed (p = 0)
    assert list(dis.columns) == ["L1", "L2", "L3"] and list(dis.index) == ["vanilla"]
    assert f"{p1:.2f}" == "0.16" and f"{p_adj[0]:.2f}" == "0.33"  # second smallest of three: times 2
    assert dis.loc["vanilla", "L1"] == f"-0.050 ± {statistics.stdev(d1):.3f} (n=3, p=0.16, Holm 0.33)"
    assert dis.loc["vanilla", "L2"] == "+0.000 ± 0.000 (n=3, p=1.00, Holm 1.00)"
    assert dis.loc["vanilla", "L3"].startswith(f"{d3[0]:+.3f} ± 0.000 (n=3, p=0.00")

    rates = exit_rates_versus_table(ref + van + full, "cosee", "energy", speedups=(1.5, 2.0, 3.0))
    pre_2x = [0.20 - (0.10 + s / 100) for s in (1, 2, 3)]  # 0.09, 0.08, 0.07
    pre_15x = [d / 2 for d in pre_2x]  # halfway between 1x (0.0 for both) and 2x
    assert list(rates.index) == ["vanilla / premature", "vanilla / delayed"]
    assert rates.loc["vanilla / premature", "2x"].startswith(f"+8.0 ± {100 * statistics.stdev(pre_2x):.1f} (n=3, p=")
    assert rates.loc["vanilla / premature", "1.5x"].startswith(f"+4.0 ± {100 * statistics.stdev(pre_15x):.1f} (n=3")
    assert rates.loc["vanilla / delayed", "2x"].startswith("+12.0 ± 1.0 (n=3")  # 0.4 + s/100 - 0.3
    assert rates.loc["vanilla / premature", "3x"] == "n/a"  # beyond either side's fastest point

    report(ref + van + full, tmp_path, operating="oracle")
    assert "vanilla" in (tmp_path / "toy" / "dis_versus_cosee.md").read_text()
    assert "vanilla / delayed" in (tmp_path / "toy" / "exit_rates_versus_cosee.md").read_text()
    assert dis_versus_table(van, "cosee", "energy") is None  # no reference row, no table
    assert exit_rates_versus_table([cell("cosee", 1, 0.8), cell("vanilla", 1, 0.7)], "cosee", "energy") is None  # no rates


def test_each_claim_is_its_own_holm_family_so_rows_outside_it_do_not_move_its_verdict(tmp_path):
    """claims_tables: each of the paper's claims as the comparisons that make it up, with Holm's
    adjustment over that claim's tests only. Adding a baseline row changes the whole-table Holm
    values of versus / DIS tables but not a claim's; rows outside every claim are not shown."""
    from scipy import stats

    from eebench.reports.report import claims_tables, dis_versus_table, holm

    def dis_cell(method, s, acc, dis):
        return _with_dis_and_rates(cell(method, s, acc), dis, [0.0, 0.1], [0.5, 0.3])

    ref = [dis_cell("cosee", s, 0.8, [0.70 + s / 100, 0.6, 0.8, None]) for s in (1, 2, 3)]
    van = [dis_cell("vanilla", s, 0.7 + s / 50, [0.57 + s / 20, 0.6, 0.7, None]) for s in (1, 2, 3)]
    two = [dis_cell("two-stage", s, 0.7 + s / 40, [0.60 + s / 30, 0.5, 0.7, None]) for s in (1, 2, 3)]
    ent = [cell("cosee-entropy", s, 0.8) for s in (1, 2, 3)]
    for c, s in zip(ent, (1, 2, 3), strict=True):  # COSEE trained with entropy, swept with it
        c.sweeps["entropy"] = SignalSweep(signal="entropy", points=c.sweeps.pop("energy").points, summary={})
        c.sweeps["entropy"].points[1]["accuracy"] = 0.78 + s / 100
    base = ref + van + two + ent
    # a baseline whose DIS differences are noise (large p): ranked after the claim's tests, they
    # raise the multipliers of a whole-table Holm family
    noise = {1: 0.3, 2: -0.3, 3: 0.25}
    baseline = [dis_cell("gpfee", s, 0.9, [0.71 + noise[s], 0.6 - noise[s], 0.8 + noise[s] / 2, None]) for s in (1, 2, 3)]

    claims = claims_tables(base)
    assert sorted(claims) == ["claim1", "claim3", "claim4", "claim5"]  # no ablation rows: no claim 2
    c1 = claims["claim1"][1]
    assert list(c1.index) == ["vanilla / energy minus cosee / energy", "two-stage / energy minus cosee / energy"]
    assert "cosee-entropy" not in " ".join(c1.index)  # another signal's row is claim 5's, not claim 1's
    assert list(claims["claim5"][1].index) == ["cosee-entropy / entropy minus cosee / energy"]
    # claim 3's family is its six DIS tests (2 rows x 3 layers), not the table's
    c3 = claims["claim3"][1]
    d = {m: [[x[i] - y[i] for x, y in zip([c.sweeps["energy"].dis for c in cs], [c.sweeps["energy"].dis for c in ref],
                                          strict=True)] for i in range(3)] for m, cs in (("vanilla", van), ("two-stage", two))}

    def p(diffs):
        return stats.ttest_1samp(diffs, 0.0).pvalue if statistics.stdev(diffs) > 0 else (1.0 if statistics.mean(diffs) == 0 else 0.0)

    ps = [p(d[m][i]) for m in ("vanilla", "two-stage") for i in range(3)]
    assert c3.loc["vanilla minus cosee / energy", "L1"].endswith(f"p={ps[0]:.2f}, Holm {holm(ps)[0]:.2f})")
    # a baseline joins: the DIS table's Holm values grow, the claim's do not move
    with_baseline = base + baseline
    assert claims_tables(with_baseline)["claim3"][1].equals(c3)
    assert claims_tables(with_baseline)["claim1"][1].equals(c1)
    whole_before = dis_versus_table(base, "cosee", "energy").loc["vanilla", "L1"]
    whole_after = dis_versus_table(with_baseline, "cosee", "energy").loc["vanilla", "L1"]
    assert whole_before != whole_after and whole_before.split("Holm")[0] == whole_after.split("Holm")[0]
    assert not any("gpfee" in i for _, df in claims_tables(with_baseline).values() for i in df.index)

    report(with_baseline, tmp_path, operating="oracle")
    text = (tmp_path / "toy" / "claim3.md").read_text()
    assert "vanilla minus cosee / energy" in text and "gpfee" not in text
    assert not (tmp_path / "toy" / "claim2.md").exists()


def test_every_front_is_compared_with_the_budget_row_at_its_speed_up_paired_by_seed(tmp_path):
    from scipy import stats

    from eebench.reports.report import budget_versus_table

    # cell(): an early-exit row scores acc at 2x; a budget row (2 of 4 layers) its one point, acc - 0.1, at 2x
    budget = [cell("final-only", s, 0.90 + s / 100, num_layers=2) for s in (1, 2, 3)]  # 0.81, 0.82, 0.83
    cosee = [cell("cosee", s, 0.80 + s / 50) for s in (1, 2, 3)]  # 0.82, 0.84, 0.86
    van = [cell("vanilla", s, 0.79) for s in (1, 2)]
    full = [cell("final-only", 1, 0.95)]  # the full model is a reference, not a budget: no column
    df = budget_versus_table(budget + cosee + van + full)
    assert list(df.columns) == ["final-only (2 of 4 layers) (2.00x)"]
    assert list(df.index) == ["vanilla / energy", "cosee / energy"]
    d = [(0.80 + s / 50) - (0.80 + s / 100) for s in (1, 2, 3)]  # +0.01, +0.02, +0.03
    p = stats.ttest_1samp(d, 0.0).pvalue
    col = df.columns[0]
    assert df.loc["cosee / energy", col] == f"+2.0 ± 1.0 (n=3, p={p:.2f}, Holm {min(1.0, 2 * p):.2f})"
    assert df.loc["vanilla / energy", col].startswith("-2.5 ± 0.7 (n=2, p=")  # 0.79 - 0.81, 0.79 - 0.82
    report(budget + cosee + van + full, tmp_path, operating="oracle")
    assert "cosee / energy" in (tmp_path / "toy" / "versus_budget.md").read_text()
    assert budget_versus_table(cosee + van + full) is None  # no budget row, no table
    assert budget_versus_table(budget + full) is None  # nothing to compare it with
    bare = cell("final-only", 1, 0.91, num_layers=2)
    bare.sweeps.clear()  # a hand-made budget cell with no sweep: no column, not an IndexError
    assert budget_versus_table([bare] + cosee) is None


def test_the_pareto_figure_has_a_panel_per_shared_signal_and_one_for_policies_of_one_configuration(tmp_path):
    from eebench.reports.report import pareto_panels
    from eebench.runs.plots import plot_pareto_panels

    cosee = [cell("cosee", s, 0.80 + s / 100) for s in (1, 2, 3)]  # 0.81, 0.82, 0.83 at 2x
    van = [cell("vanilla", s, 0.70) for s in (1, 2)]
    own = cell("vanilla", 3, 0.70)
    own.sweeps["lte"] = SignalSweep(signal="lte", points=own.sweeps["energy"].points, summary={})  # only one row has it
    panels = pareto_panels(cosee + van + [own] + [cell("final-only", 1, 0.9)], "accuracy")
    assert list(panels) == ["energy exits", "policies of one configuration"]
    curves, bands = panels["energy exits"]
    assert list(curves) == ["final-only", "vanilla", "cosee"]  # one curve per configuration, not per seed
    front = {p["speedup"]: p["accuracy"] for p in curves["cosee"].points if p["pareto"]}
    assert front[2.0] == pytest.approx(0.82)  # the mean over its three seeds
    xs, lo, hi = bands["cosee"]
    assert (lo[xs.index(2.0)], hi[xs.index(2.0)]) == (pytest.approx(0.81), pytest.approx(0.83))
    assert list(panels["policies of one configuration"][0]) == ["vanilla / lte"]
    # a single configuration: every signal is its own panel
    assert list(pareto_panels(cosee, "accuracy")) == ["energy exits"]
    png = plot_pareto_panels(panels, tmp_path / "p.png", metric="accuracy", title="toy")
    assert png.stat().st_size > 1000 and not list(tmp_path.glob("*.tmp*"))


@pytest.mark.parametrize("n", [3, 10, 11, 20, 21, 45])
def test_every_configuration_of_a_pareto_figure_has_its_own_colour_and_line_style(n):
    from eebench.runs.plots import configuration_looks

    looks = configuration_looks([f"config-{i}" for i in range(n)])
    assert len(set(looks.values())) == n  # past 20 (tab20) the colours come round with other line styles
    styles = {style for _, style in looks.values()}
    if n <= 20:  # solid up to ten; then every second one dashed
        assert styles == ({"-"} if n <= 10 else {"-", "--"})
    else:
        a, b = looks["config-0"], looks["config-20"]
        assert a[0] == b[0] and a[1] != b[1]


def test_held_out_points_computed_together_are_those_computed_one_by_one(tmp_path, monkeypatch):
    """The report asks for each (cell, signal, speed-up) separately; with ``prefetch`` one
    simulation of the splits serves all its speed-ups, and the dev splits are drawn once per dev
    set: the same numbers, fewer calls."""
    import torch
    from safetensors.torch import save_file

    import eebench.exits.operating as operating
    from eebench.exits.operating import SplitSpec, Target
    from eebench.reports.report import SPEEDUPS, HeldOut

    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 2, (120,), generator=g)
    cells, index = [], {}
    for seed in (1, 2):
        logits = torch.randn(120, 4, 2, generator=g) + 2.5 * torch.nn.functional.one_hot(labels, 2)[:, None] * \
            torch.linspace(0.2, 1.0, 4)[None, :, None]
        c = cell("vanilla", seed, 0.8)
        c.sweeps["energy"].heldout = {"num_thresholds": 30}
        save_file({"logits": logits, "labels": labels}, tmp_path / f"{seed}.safetensors")
        index[c.cell_id] = tmp_path / f"{seed}.safetensors"
        cells.append(c)
    calls = {"held_out_many": 0, "dev_splits": 0}
    for name in calls:
        real = getattr(operating, name)

        def counted(*a, _real=real, _name=name, **k):
            calls[_name] += 1
            return _real(*a, **k)

        monkeypatch.setattr(operating, name, counted)
    targets = [Target(speedup=x) for x in SPEEDUPS]
    split = SplitSpec(repeats=5)
    alone = {(c.cell_id, t): HeldOut(split, index).cell(c, "energy", t) for c in cells for t in targets}
    assert calls == {"held_out_many": 8, "dev_splits": 8}
    calls.update(held_out_many=0, dev_splits=0)
    together = HeldOut(split, index, prefetch=tuple(targets))
    assert {(c.cell_id, t): together.cell(c, "energy", t) for c in cells for t in targets} == alone
    assert calls == {"held_out_many": 2, "dev_splits": 1}  # one per cell; one dev set
    assert any(v is not None and v[0] for v in alone.values())
