#!/usr/bin/env python
"""The synthetic demo's claims over several seeds, and the paper's ablations that fit.

1. The whole pipeline of tools/synthetic_demo.py for each seed (default 0, 1, 2: a new
   world, CLIP, RPN, pretraining and transfer each time).
2. On the first seed's world, CLIP and RPN: region-text pretraining again with
   - distillation only, contrastive + distillation (no image-text loss);
   - grid and random regions instead of RPN regions;
   and the transfer detector again without focal scaling (from the same student).

Writes <output>/reproduce.md (tables: mean and standard deviation over seeds, the ablations),
reproduce.json and reproduce.png; each run keeps its own folder (seed<N>/, seed<N>/ablations/),
and a finished run is not repeated when the command is run again.

  python tools/synthetic_reproduce.py --output output/synthetic_reproduce
"""
import argparse
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

ABLATIONS = (
    ("distillation only", dict(pretrain_loss_weights="0,1,0")),
    ("contrastive + distillation", dict(pretrain_loss_weights="1,1,0")),
    ("grid regions", dict(pretrain_regions="GRID")),
    ("random regions", dict(pretrain_regions="RANDOM")),
)
ROWS = (("world CLIP", "world CLIP"), ("RegionCLIP student", "RegionCLIP student"))


def mean_std(values):
    vals = [v for v in values if v == v]
    if not vals:
        return float("nan"), float("nan")
    m = sum(vals) / len(vals)
    sd = math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
    return m, sd


def cached(path, fn):
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    result = fn()
    with open(path, "w") as f:
        json.dump(result, f, indent=1, default=str)
    return result


def fmt(pair):
    m, sd = pair
    return f"{m:.1f} ± {sd:.1f}" if m == m else "n/a"


def main(argv=None):
    from synthetic_pipeline import PROFILES, Pipeline, parse_overrides

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output", default="output/synthetic_reproduce", help="output folder (default: %(default)s)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="default: %(default)s")
    ap.add_argument("--profile", default="demo", choices=list(PROFILES))
    ap.add_argument("--no-ablations", action="store_true", help="only the seeds")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override profile values")
    ap.add_argument("--ablation-seeds", type=int, nargs="+", default=None, metavar="SEED",
                    help="run the pretraining ablations on these seeds' worlds too (each one of --seeds; default: "
                         "the first seed only) and report each ablation minus the world CLIP over them")
    ap.add_argument("--ablations", nargs="+", default=None, metavar="NAME",
                    help=f"only these pretraining ablations (default: all of {[n for n, _ in ABLATIONS]})")
    args = ap.parse_args(argv)
    ablation_seeds = args.ablation_seeds or args.seeds[:1]
    if not set(ablation_seeds) <= set(args.seeds):
        ap.error(f"--ablation-seeds {ablation_seeds} must be among --seeds {args.seeds}")
    chosen = args.ablations or [n for n, _ in ABLATIONS]
    unknown = [n for n in chosen if n not in dict(ABLATIONS)]
    if unknown:
        ap.error(f"--ablations {unknown}: use names from {[n for n, _ in ABLATIONS]}")
    try:
        overrides = parse_overrides(args.set, args.profile)
    except ValueError as e:
        ap.error(f"--set {e}")
    t0 = time.time()
    os.makedirs(args.output, exist_ok=True)
    runs = {}
    for i, seed in enumerate(args.seeds):
        out = os.path.join(args.output, f"seed{seed}")
        print(f"=== seed {seed} ({i + 1}/{len(args.seeds)}) ===", flush=True)
        pipe = Pipeline(out, args.profile, seed, overrides)
        path = os.path.join(out, "results.json")
        runs[seed] = json.load(open(path)) if os.path.isfile(path) else pipe.run()
    ablations, by_seed = {}, {}
    if not args.no_ablations:
        for seed in ablation_seeds:
            pipe = Pipeline(os.path.join(args.output, f"seed{seed}"), args.profile, seed, overrides)
            os.makedirs(os.path.join(pipe.out, "ablations"), exist_ok=True)
            by_seed[seed] = {}
            for name, ov in ABLATIONS:
                if name not in chosen:
                    continue
                print(f"=== ablation: {name} (seed {seed}) ===", flush=True)
                tag = name.replace(" ", "_").replace("+", "plus")
                by_seed[seed][name] = cached(os.path.join(pipe.out, "ablations", tag + ".json"),
                                             lambda ov=ov, tag=tag, pipe=pipe: pipe.ablation(tag, ov,
                                                                                             zero_shot_only=True))
        first = Pipeline(os.path.join(args.output, f"seed{args.seeds[0]}"), args.profile, args.seeds[0], overrides)
        ablations = dict(by_seed.get(args.seeds[0], {}))
        print("=== ablation: no focal scaling ===", flush=True)
        ablations["no focal scaling (transfer)"] = cached(
            os.path.join(first.out, "ablations", "no_focal.json"),
            lambda: first.ablation("no_focal", dict(focal=0.0), transfer_only=True))
    md = report(runs, ablations, args, time.time() - t0) + seed_ablation_report(runs, by_seed)
    with open(os.path.join(args.output, "reproduce.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    with open(os.path.join(args.output, "reproduce.json"), "w") as f:
        json.dump({"seeds": {s: {k: r[k] for k in ("zero_shot", "transfer", "teacher", "total_s")}
                             for s, r in runs.items()}, "ablations": ablations, "ablations_by_seed": by_seed},
                  f, indent=1, default=str)
    plot(runs, ablations, os.path.join(args.output, "reproduce.png"))
    print("\n".join(md))
    return 0


def report(runs, ablations, args, seconds):
    seeds = list(runs)
    md = ["# RegionCLIP in the synthetic world: seeds and ablations", "",
          f"Seeds {', '.join(map(str, seeds))} (`{' '.join(['python tools/synthetic_reproduce.py'] + sys.argv[1:])}`), "
          f"{seconds / 60:.0f} min. Mean ± standard deviation over the seeds.", "",
          "| initialisation | zero-shot GT-box acc. novel | base | all | transfer AP50 "
          f"({runs[seeds[0]]['profile']['transfer_arch']}) novel | base | all |",
          "|---|---|---|---|---|---|---|"]
    for label, key in ROWS:
        splits = ("novel", "base", "all")
        cells = [fmt(mean_std([runs[s]["zero_shot"][key][f"acc-{k}"] for s in seeds])) for k in splits]
        cells += [fmt(mean_std([runs[s]["transfer"][key][f"AP50-{k}"] for s in seeds])) for k in splits]
        md.append(f"| {label} | " + " | ".join(cells) + " |")
    diffs = {k: mean_std([runs[s]["zero_shot"]["RegionCLIP student"][f"acc-{k}"]
                          - runs[s]["zero_shot"]["world CLIP"][f"acc-{k}"] for s in seeds]) for k in ("novel", "all")}
    tdiff = mean_std([runs[s]["transfer"]["RegionCLIP student"]["AP50-novel"]
                      - runs[s]["transfer"]["world CLIP"]["AP50-novel"] for s in seeds])
    md += ["", f"Student minus world CLIP, per seed then averaged: zero-shot novel {fmt(diffs['novel'])}, all "
           f"{fmt(diffs['all'])}; transfer AP50 novel {fmt(tdiff)}.",
           "Teacher pseudo-label accuracy on RPN regions overlapping a box: "
           + fmt(mean_std([runs[s]["teacher"]["accuracy"] for s in seeds])) + "%."]
    if ablations:
        s0 = seeds[0]
        full = runs[s0]["zero_shot"]["RegionCLIP student"]
        teacher = runs[s0]["zero_shot"]["world CLIP"]
        md += ["", f"Ablations (seed {s0}; pretraining changed, then zero-shot GT-box accuracy):", "",
               "| setting | zero-shot acc. novel | base | all |", "|---|---|---|---|",
               f"| world CLIP (no pretraining) | {teacher['acc-novel']:.1f} | {teacher['acc-base']:.1f} | "
               f"{teacher['acc-all']:.1f} |",
               f"| contrastive + distillation + image-text, RPN regions (default) | {full['acc-novel']:.1f} | "
               f"{full['acc-base']:.1f} | {full['acc-all']:.1f} |"]
        for name, _ in ABLATIONS:
            if name not in ablations:
                continue
            z = ablations[name]["zero_shot"]
            md.append(f"| {name} | {z['acc-novel']:.1f} | {z['acc-base']:.1f} | {z['acc-all']:.1f} |")
        t_focal = runs[s0]["transfer"]["RegionCLIP student"]
        t_nofocal = ablations["no focal scaling (transfer)"]["transfer"]
        md += ["", "| transfer from the student | AP50 novel | base | all |", "|---|---|---|---|",
               f"| focal scaling gamma 0.5 (default) | {t_focal['AP50-novel']:.1f} | {t_focal['AP50-base']:.1f} | "
               f"{t_focal['AP50-all']:.1f} |",
               f"| no focal scaling | {t_nofocal['AP50-novel']:.1f} | {t_nofocal['AP50-base']:.1f} | "
               f"{t_nofocal['AP50-all']:.1f} |"]
    return md


def seed_ablation_report(runs, by_seed):
    """With ablations on more than one seed: each setting minus that seed's world CLIP,
    zero-shot GT-box accuracy, mean ± standard deviation over the seeds."""
    seeds = [s for s in by_seed if by_seed[s]]
    if len(seeds) < 2:
        return []
    names = [n for n, _ in ABLATIONS if all(n in by_seed[s] for s in seeds)]

    def delta(seed, z, k):
        return z[f"acc-{k}"] - runs[seed]["zero_shot"]["world CLIP"][f"acc-{k}"]

    md = ["", f"Ablations over seeds {', '.join(map(str, seeds))}: zero-shot GT-box accuracy minus the world CLIP "
          "of the same seed (mean ± standard deviation):", "",
          "| setting | novel | all | per seed (all) |", "|---|---|---|---|"]
    rows = [("default (RPN regions, all three losses)", {s: runs[s]["zero_shot"]["RegionCLIP student"] for s in seeds})]
    rows += [(n, {s: by_seed[s][n]["zero_shot"] for s in seeds}) for n in names]
    for label, zs in rows:
        cells = [fmt(mean_std([delta(s, zs[s], k) for s in seeds])) for k in ("novel", "all")]
        per = ", ".join(f"{delta(s, zs[s], 'all'):+.1f}" for s in seeds)
        md.append(f"| {label} | {cells[0]} | {cells[1]} | {per} |")
    return md


def plot(runs, ablations, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        seeds = list(runs)
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
        for i, (label, key) in enumerate(ROWS):
            zs = [mean_std([runs[s]["zero_shot"][key][f"acc-{k}"] for s in seeds]) for k in ("novel", "base", "all")]
            axes[0].bar([j + 0.38 * i for j in range(3)], [m for m, _ in zs], yerr=[sd for _, sd in zs], width=0.36,
                        label=label, capsize=3)
            tr = [mean_std([runs[s]["transfer"][key][f"AP50-{k}"] for s in seeds]) for k in ("novel", "base", "all")]
            axes[1].bar([j + 0.38 * i for j in range(3)], [m for m, _ in tr], yerr=[sd for _, sd in tr], width=0.36,
                        label=label, capsize=3)
        for ax, title in zip(axes, ("zero-shot GT-box accuracy (%)", "transfer AP50")):
            ax.set_xticks([j + 0.19 for j in range(3)], ["novel", "base", "all"])
            ax.set_title(f"{title}, {len(seeds)} seeds")
        axes[0].legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
    except Exception as e:  # the table is the result
        print(f"could not draw the plot: {e}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
