"""tools/synthetic_reproduce.py's reports, on hand-made results (no runs): the per-seed
ablation table is each setting minus that seed's world CLIP, then mean ± sd; the top-label
lines of the demo's report."""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tools"))


def _zs(novel, all_):
    return {"acc-novel": novel, "acc-base": 0.0, "acc-all": all_}


def test_seed_ablation_report_by_hand():
    from synthetic_reproduce import main, seed_ablation_report

    runs = {s: {"zero_shot": {"world CLIP": _zs(10.0 + s, 20.0), "RegionCLIP student": _zs(12.0 + s, 21.0 + s)},
                "transfer": {"world CLIP": {"AP50-novel": 30.0}, "RegionCLIP student": {"AP50-novel": 29.0 + 2 * s}}}
            for s in (0, 1)}
    by_seed = {0: {"grid regions": {"zero_shot": _zs(14.0, 26.0)}},
               1: {"grid regions": {"zero_shot": _zs(11.0, 18.0)}}}
    md = seed_ablation_report(runs, by_seed)
    default = next(line for line in md if line.startswith("| default"))
    grid = next(line for line in md if line.startswith("| grid regions"))
    # default: novel +2, +2 -> 2.0 ± 0.0; all +1, +2 -> 1.5 ± 0.7
    # transfer novel -1, +1 -> 0.0 ± 1.4
    assert default == ("| default (RPN regions, all three losses) | 2.0 ± 0.0 | 1.5 ± 0.7 | +1.0, +2.0 | 0.0 ± 1.4 | "
                       "-1.0, +1.0 |")
    # grid: novel +4, -0 -> 2.0 ± 2.8; all +6, -2 -> 2.0 ± 5.7; no transfer detectors
    assert grid == "| grid regions | 2.0 ± 2.8 | 2.0 ± 5.7 | +6.0, -2.0 | - | - |"
    by_seed[0]["grid regions"]["transfer"] = {"AP50-novel": 33.0}
    by_seed[1]["grid regions"]["transfer"] = {"AP50-novel": 34.0}
    grid = next(line for line in seed_ablation_report(runs, by_seed) if line.startswith("| grid regions"))
    assert grid.endswith("| 3.5 ± 0.7 | +3.0, +4.0 |")
    assert seed_ablation_report(runs, {0: by_seed[0]}) == []  # one seed: no such table
    with pytest.raises(SystemExit):
        main(["--seeds", "0", "1", "--ablation-seeds", "2"])  # not among --seeds
    with pytest.raises(SystemExit):
        main(["--seeds", "0", "--ablations", "no such ablation"])


def test_top_label_lines():
    from synthetic_pipeline import top_label_lines

    tl = {"objects": 5, "missed": 1, "base": {"objects": 4, "right": 1, "wrong_same_split": 1, "other_split": 2},
          "novel": {"objects": 1, "right": 1, "wrong_same_split": 0, "other_split": 0},
          "other_split_labels": {"base": {"bolt": 2}}}
    lines = top_label_lines({"world CLIP": {"top_labels": tl}, "no breakdown": {}})
    assert len(lines) == 2
    assert lines[1] == ("- world CLIP: base objects (4): right 25%, another base class 25%, a novel class 50% "
                        "(bolt 2); novel objects (1): right 100%, another novel class 0%, a base class 0%; "
                        "no detection 1.")


def test_only_ablations_needs_finished_seeds(tmp_path, capsys):
    from synthetic_reproduce import main

    with pytest.raises(SystemExit):
        main(["--output", str(tmp_path), "--seeds", "3", "--only-ablations"])
    assert "seeds [3] have not finished" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--output", str(tmp_path), "--jobs", "0"])


def test_cached_recomputes_a_result_without_the_needed_keys(tmp_path):
    from synthetic_reproduce import cached

    path = str(tmp_path / "a.json")
    calls = []

    def run(result):
        calls.append(result)
        return result

    assert cached(path, lambda: run({"zero_shot": 1})) == {"zero_shot": 1}
    assert cached(path, lambda: run({"other": 2})) == {"zero_shot": 1}  # stored: not run again
    assert cached(path, lambda: run({"zero_shot": 1, "transfer": 3}), needs=("transfer",))["transfer"] == 3
    assert len(calls) == 2


def test_val_report_by_hand():
    from synthetic_reproduce import val_report

    val = {0: {"world CLIP": _zs(40.0, 50.0), "RegionCLIP student": _zs(41.0, 49.0), "grid regions": _zs(38.0, 50.0)},
           1: {"world CLIP": _zs(30.0, 44.0), "RegionCLIP student": _zs(33.0, 45.0)}}
    md = val_report(val)
    rows = [line for line in md if line.startswith("| ") and not line.startswith("| model")]
    # grid regions lacks seed 1: left out; the student: novel +1, +3 -> 2.0 ± 1.4; all -1, +1 -> 0.0 ± 1.4
    assert rows == ["| RegionCLIP student | 2.0 ± 1.4 | 0.0 ± 1.4 | +1.0, +3.0 | -1.0, +1.0 | 50.0, 44.0 |"]
    assert val_report({}) == []
