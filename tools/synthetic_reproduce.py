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

With --jobs 2 (the default on 2 or more cores) the seeds' pipelines and the ablations run as
separate processes, two at a time, each with an equal share of the CPU threads (their logs:
<output>/logs/); the stages that do not use two threads well (data, RPN, transfer) then
overlap. --jobs 1 runs everything one after another in this process.

  python tools/synthetic_reproduce.py --output output/synthetic_reproduce
"""
import argparse
import json
import math
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

ABLATIONS = (
    ("distillation only", dict(pretrain_loss_weights="0,1,0")),
    ("contrastive + distillation", dict(pretrain_loss_weights="1,1,0")),
    ("grid regions", dict(pretrain_regions="GRID")),
    ("random regions", dict(pretrain_regions="RANDOM")),
)
# the transfer detector again from the first seed's student, without focal scaling
NO_FOCAL = "no focal scaling"
# opt-in (--ablations; it trains a second world CLIP, ~7 min): that CLIP teaches the student
SECOND_TEACHER = ("second world CLIP as teacher", dict(teacher_clip_seed_offset=1000))
ROWS = (("world CLIP", "world CLIP"), ("RegionCLIP student", "RegionCLIP student"))


def mean_std(values):
    vals = [v for v in values if v == v]
    if not vals:
        return float("nan"), float("nan")
    m = sum(vals) / len(vals)
    sd = math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
    return m, sd


def cached(path, fn, needs=()):
    """The JSON result at ``path``, or ``fn()`` written there; a stored result that lacks one of
    the keys ``needs`` is computed again."""
    if os.path.isfile(path):
        with open(path) as f:
            result = json.load(f)
        if all(k in result for k in needs):
            return result
    result = fn()
    with open(path, "w") as f:
        json.dump(result, f, indent=1, default=str)
    return result


def fmt(pair):
    m, sd = pair
    return f"{m:.1f} ± {sd:.1f}" if m == m else "n/a"


def main(argv=None):
    from synthetic_pipeline import PROFILES, parse_overrides

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output", default="output/synthetic_reproduce", help="output folder (default: %(default)s)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="default: %(default)s")
    ap.add_argument("--profile", default="demo", choices=list(PROFILES))
    ap.add_argument("--no-ablations", action="store_true", help="only the seeds")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override profile values")
    ap.add_argument("--ablation-seeds", type=int, nargs="+", default=None, metavar="SEED",
                    help="run the pretraining ablations on these seeds' worlds too (each one of --seeds; default: "
                         "the first seed only) and report each ablation minus the world CLIP over them; the "
                         "transfer ablation runs on the first of them")
    names = [n for n, _ in ABLATIONS] + [NO_FOCAL]
    ap.add_argument("--ablations", nargs="+", default=None, metavar="NAME",
                    help=f"only these ablations (default: all of {names}; also {SECOND_TEACHER[0]!r}, which "
                         "trains a second world CLIP)")
    ap.add_argument("--ablation-transfer", action="store_true",
                    help="the pretraining ablations also train the transfer detector from their student (about 4 "
                         "min more each) and the per-seed table reports transfer AP50 novel minus the world CLIP's")
    ap.add_argument("--val-zero-shot", action="store_true",
                    help="also measure zero-shot GT-box accuracy on the val split (three times the test split's "
                         "images) for each seed's world CLIP, student and pretraining ablations, to show how much "
                         "of a test-split difference is noise (one process, about a minute per model)")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                    help="runs at a time, as separate processes with an equal share of the CPU threads "
                         "(default: %(default)s); 1: one after another in this process")
    ap.add_argument("--only-ablations", action="store_true",
                    help="run only the ablations, on seed runs that have finished (what each ablation process "
                         "of --jobs runs); writes no report")
    args = ap.parse_args(argv)
    ablation_seeds = args.ablation_seeds or args.seeds[:1]
    if not set(ablation_seeds) <= set(args.seeds):
        ap.error(f"--ablation-seeds {ablation_seeds} must be among --seeds {args.seeds}")
    chosen = args.ablations or names
    unknown = [n for n in chosen if n not in names + [SECOND_TEACHER[0]]]
    if unknown:
        ap.error(f"--ablations {unknown}: use names from {names + [SECOND_TEACHER[0]]}")
    if args.jobs < 1:
        ap.error(f"--jobs {args.jobs}: use 1 or more")
    try:
        overrides = parse_overrides(args.set, args.profile)
    except ValueError as e:
        ap.error(f"--set {e}")
    t0 = time.time()
    os.makedirs(args.output, exist_ok=True)
    if args.only_ablations:
        missing = [s for s in ablation_seeds if not os.path.isfile(seed_results(args.output, s))]
        if missing:
            ap.error(f"--only-ablations: seeds {missing} have not finished (no {seed_results(args.output, missing[0])})"
                     ": run them first (without --only-ablations)")
        run_ablations(args, overrides, ablation_seeds, chosen)
        return 0
    if args.jobs > 1:
        failed = run_in_processes(args, ablation_seeds, chosen)
        if failed:
            print("synthetic_reproduce: " + "; ".join(failed), file=sys.stderr)
            return 1
    runs = {}
    for i, seed in enumerate(args.seeds):
        path = seed_results(args.output, seed)
        if not os.path.isfile(path):
            from synthetic_pipeline import Pipeline

            print(f"=== seed {seed} ({i + 1}/{len(args.seeds)}) ===", flush=True)
            Pipeline(os.path.dirname(path), args.profile, seed, overrides).run()
        with open(path) as f:
            runs[seed] = json.load(f)
        add_ensemble_rows(runs[seed], os.path.dirname(path), args.profile, seed, overrides)
    ablations, by_seed = ({}, {}) if args.no_ablations else run_ablations(args, overrides, ablation_seeds, chosen)
    val = val_zero_shot(args, overrides, runs, by_seed) if args.val_zero_shot else {}
    md = (report(runs, ablations, args, time.time() - t0, ablation_seeds[0])
          + seed_ablation_report(runs, by_seed) + val_report(val))
    with open(os.path.join(args.output, "reproduce.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    with open(os.path.join(args.output, "reproduce.json"), "w") as f:
        json.dump({"seeds": {s: {k: r[k] for k in ("zero_shot", "transfer", "teacher", "total_s")}
                             for s, r in runs.items()}, "ablations": ablations, "ablations_by_seed": by_seed,
                   "val_zero_shot": val},
                  f, indent=1, default=str)
    plot(runs, ablations, os.path.join(args.output, "reproduce.png"))
    print("\n".join(md))
    return 0


def add_ensemble_rows(run: dict, run_dir: str, profile: str, seed: int, overrides: dict):
    """A seed run finished before the score ensemble existed: its transfer detectors evaluated
    with it now (two evaluations, about a minute), the rows added to ``run`` and its results.json."""
    from synthetic_pipeline import Pipeline

    pipe = Pipeline(run_dir, profile, seed, dict(run.get("profile", {}), **overrides))
    if not pipe.p.get("ensemble") or all(f"{label} + ensemble" in run["transfer"] for label, _ in ROWS):
        return
    print(f"seed {seed}: evaluating its transfer detectors with the score ensemble ...", flush=True)
    run["transfer"].update(pipe.ensemble_results(os.path.join(run_dir, "pretrain", "model_final.pth")))
    with open(os.path.join(run_dir, "results.json"), "w") as f:
        json.dump(run, f, indent=1, default=str)


def seed_results(output: str, seed: int) -> str:
    return os.path.join(output, f"seed{seed}", "results.json")


def ablation_cache(output: str, seed: int, name: str) -> str:
    tag = "no_focal" if name == NO_FOCAL else name.replace(" ", "_").replace("+", "plus")
    return os.path.join(output, f"seed{seed}", "ablations", tag + ".json")


def ablation_done(args, seed, name) -> bool:
    path = ablation_cache(args.output, seed, name)
    if not os.path.isfile(path):
        return False
    if not args.ablation_transfer or name == NO_FOCAL:
        return True
    with open(path) as f:
        return "transfer" in json.load(f)


def ablation_plan(args, ablation_seeds, chosen):
    """(seed, name) of each ablation to run: the chosen pretraining ablations on every
    ablation seed, the transfer ablation on the first."""
    plan = [(s, n) for s in ablation_seeds for n, _ in ABLATIONS + (SECOND_TEACHER,) if n in chosen]
    return plan + ([(ablation_seeds[0], NO_FOCAL)] if NO_FOCAL in chosen else [])


def run_ablations(args, overrides, ablation_seeds, chosen):
    """The ablations in this process (a finished one is read from its JSON file); returns
    (the first ablation seed's results by name, the pretraining ablations by seed)."""
    from synthetic_pipeline import Pipeline

    settings = dict(ABLATIONS + (SECOND_TEACHER,))
    by_seed = {s: {} for s in ablation_seeds}
    first = {}
    for seed, name in ablation_plan(args, ablation_seeds, chosen):
        pipe = Pipeline(os.path.join(args.output, f"seed{seed}"), args.profile, seed, overrides)
        os.makedirs(os.path.join(pipe.out, "ablations"), exist_ok=True)
        print(f"=== ablation: {name} (seed {seed}) ===", flush=True)
        if name == NO_FOCAL:
            first[name + " (transfer)"] = cached(
                ablation_cache(args.output, seed, name),
                lambda pipe=pipe: pipe.ablation("no_focal", dict(focal=0.0), transfer_only=True))
            continue
        tag = os.path.splitext(os.path.basename(ablation_cache(args.output, seed, name)))[0]
        transfer = args.ablation_transfer
        by_seed[seed][name] = cached(ablation_cache(args.output, seed, name),
                                     lambda pipe=pipe, tag=tag, ov=settings[name]: pipe.ablation(
                                         tag, ov, zero_shot_only=not transfer),
                                     needs=("transfer",) if transfer else ())
    # finished ablations that were not asked for this time stay in the report
    for seed in ablation_seeds:
        for name, _ in ABLATIONS + (SECOND_TEACHER,):
            path = ablation_cache(args.output, seed, name)
            if name not in by_seed[seed] and os.path.isfile(path):
                with open(path) as f:
                    by_seed[seed][name] = json.load(f)
    path = ablation_cache(args.output, ablation_seeds[0], NO_FOCAL)
    if NO_FOCAL + " (transfer)" not in first and os.path.isfile(path):
        with open(path) as f:
            first[NO_FOCAL + " (transfer)"] = json.load(f)
    return dict(by_seed[ablation_seeds[0]], **first), by_seed


def run_in_processes(args, ablation_seeds, chosen) -> list:
    """The seeds' pipelines (tools/synthetic_demo.py), then each ablation once its seed has
    finished (this script with --only-ablations), ``args.jobs`` processes at a time, each with
    ``cpu_count // jobs`` threads; logs in <output>/logs/. Returns what failed."""
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    common = ["--profile", args.profile] + (["--set"] + args.set if args.set else [])
    ablation_common = common + (["--ablation-transfer"] if args.ablation_transfer else [])
    here = os.path.dirname(os.path.abspath(__file__))
    tasks, done = [], set()
    for seed in args.seeds:
        if os.path.isfile(seed_results(args.output, seed)):
            done.add(f"seed {seed}")
        else:
            tasks.append((f"seed {seed}", [sys.executable, os.path.join(here, "synthetic_demo.py"), "--output",
                                           os.path.join(args.output, f"seed{seed}"), "--seed", str(seed)] + common,
                          None))
    if not args.no_ablations:
        for seed, name in ablation_plan(args, ablation_seeds, chosen):
            if not ablation_done(args, seed, name):
                tasks.append((f"ablation {name} (seed {seed})",
                              [sys.executable, os.path.abspath(__file__), "--output", args.output, "--seeds", str(seed),
                               "--only-ablations", "--jobs", "1", "--ablations", name] + ablation_common,
                              f"seed {seed}"))
    logs = os.path.join(args.output, "logs")
    os.makedirs(logs, exist_ok=True)
    running, failed = {}, []
    while tasks or running:
        for task in list(tasks):
            name, cmd, after = task
            if after is not None and any(f.startswith(after + ":") for f in failed):
                tasks.remove(task)
                failed.append(f"{name}: not run ({after} failed)")
            elif len(running) < args.jobs and (after is None or after in done):
                tasks.remove(task)
                log_path = os.path.join(logs, name.replace(" ", "_").replace("(", "").replace(")", "") + ".log")
                log = open(log_path, "w")
                running[name] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log,
                                 log_path, time.time())
                print(f"[{time.strftime('%H:%M:%S')}] {name}: started ({threads} thread(s); log {log_path})",
                      flush=True)
        time.sleep(1)
        for name, (proc, log, log_path, start) in list(running.items()):
            if proc.poll() is None:
                continue
            log.close()
            del running[name]
            minutes = (time.time() - start) / 60
            if proc.returncode == 0:
                done.add(name)
                print(f"[{time.strftime('%H:%M:%S')}] {name}: done in {minutes:.1f} min", flush=True)
            else:
                failed.append(f"{name}: exit code {proc.returncode} after {minutes:.1f} min, log {log_path}")
                print(f"[{time.strftime('%H:%M:%S')}] {failed[-1]}", flush=True)
    return failed


def report(runs, ablations, args, seconds, s0=None):
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
    for label, key in ROWS:
        key = f"{key} + ensemble"
        if all(key in runs[s]["transfer"] for s in seeds):
            cells = ["-"] * 3 + [fmt(mean_std([runs[s]["transfer"][key][f"AP50-{k}"] for s in seeds]))
                                 for k in ("novel", "base", "all")]
            md.append(f"| {label}, scores ensembled with it | " + " | ".join(cells) + " |")
    diffs = {k: mean_std([runs[s]["zero_shot"]["RegionCLIP student"][f"acc-{k}"]
                          - runs[s]["zero_shot"]["world CLIP"][f"acc-{k}"] for s in seeds]) for k in ("novel", "all")}
    tdiff = mean_std([runs[s]["transfer"]["RegionCLIP student"]["AP50-novel"]
                      - runs[s]["transfer"]["world CLIP"]["AP50-novel"] for s in seeds])
    ens = ""
    if all("RegionCLIP student + ensemble" in runs[s]["transfer"] for s in seeds):
        ens = "; with the ensemble " + fmt(mean_std([runs[s]["transfer"]["RegionCLIP student + ensemble"]["AP50-novel"]
                                                     - runs[s]["transfer"]["world CLIP + ensemble"]["AP50-novel"]
                                                     for s in seeds]))
    md += ["", f"Student minus world CLIP, per seed then averaged: zero-shot novel {fmt(diffs['novel'])}, all "
           f"{fmt(diffs['all'])}; transfer AP50 novel {fmt(tdiff)}{ens}.",
           "Teacher pseudo-label accuracy on RPN regions overlapping a box: "
           + fmt(mean_std([runs[s]["teacher"]["accuracy"] for s in seeds])) + "%."]
    if ablations:
        s0 = seeds[0] if s0 is None else s0
        full = runs[s0]["zero_shot"]["RegionCLIP student"]
        teacher = runs[s0]["zero_shot"]["world CLIP"]
        md += ["", f"Ablations (seed {s0}; pretraining changed, then zero-shot GT-box accuracy):", "",
               "| setting | zero-shot acc. novel | base | all |", "|---|---|---|---|",
               f"| world CLIP (no pretraining) | {teacher['acc-novel']:.1f} | {teacher['acc-base']:.1f} | "
               f"{teacher['acc-all']:.1f} |",
               f"| contrastive + distillation + image-text, RPN regions (default) | {full['acc-novel']:.1f} | "
               f"{full['acc-base']:.1f} | {full['acc-all']:.1f} |"]
        for name, _ in ABLATIONS + (SECOND_TEACHER,):
            if name not in ablations:
                continue
            z = ablations[name]["zero_shot"]
            md.append(f"| {name} | {z['acc-novel']:.1f} | {z['acc-base']:.1f} | {z['acc-all']:.1f} |")
            t = ablations[name].get("teacher_zero_shot")
            if t:
                md.append(f"| ... that teacher itself (whole-image accuracy "
                          f"{100 * ablations[name]['teacher_clip']['zero_shot']['accuracy']:.1f}%) | "
                          f"{t['acc-novel']:.1f} | {t['acc-base']:.1f} | {t['acc-all']:.1f} |")
        nofocal = ablations.get(NO_FOCAL + " (transfer)")
        if nofocal:
            t_focal, t_nofocal = runs[s0]["transfer"]["RegionCLIP student"], nofocal["transfer"]
            md += ["", "| transfer from the student | AP50 novel | base | all |", "|---|---|---|---|",
                   f"| focal scaling gamma 0.5 (default) | {t_focal['AP50-novel']:.1f} | {t_focal['AP50-base']:.1f} | "
                   f"{t_focal['AP50-all']:.1f} |",
                   f"| no focal scaling | {t_nofocal['AP50-novel']:.1f} | {t_nofocal['AP50-base']:.1f} | "
                   f"{t_nofocal['AP50-all']:.1f} |"]
    return md


def val_zero_shot(args, overrides, runs, by_seed):
    """Zero-shot GT-box accuracy on the val split: {seed: {model: accuracies}} for each seed's
    world CLIP, default student and finished pretraining ablations (cached per seed)."""
    from synthetic_pipeline import Pipeline

    out = {}
    for seed in runs:
        pipe = Pipeline(os.path.join(args.output, f"seed{seed}"), args.profile, seed, overrides)
        models = [("RegionCLIP student", os.path.join(pipe.out, "pretrain", "model_final.pth"))]
        for name in by_seed.get(seed, {}):
            tag = os.path.splitext(os.path.basename(ablation_cache(args.output, seed, name)))[0]
            models.append((name, os.path.join(pipe.out, "ablations", tag, "pretrain", "model_final.pth")))
        path = os.path.join(pipe.out, "val_zero_shot.json")
        res = {}
        if os.path.isfile(path):
            with open(path) as f:
                res = json.load(f)
        for i, (label, weights) in enumerate(models):
            if label in res or not os.path.isfile(weights):
                continue
            print(f"=== val zero-shot: {label} (seed {seed}) ===", flush=True)
            z = pipe.zero_shot(weights, eval_tool=False, teacher="world CLIP" not in res, split="val")
            res.update({k if k == "world CLIP" else label: v for k, v in z.items()})
            with open(path, "w") as f:
                json.dump(res, f, indent=1)
        out[seed] = res
    return out


def val_report(val):
    """Each model minus the world CLIP of its seed on the val split, per seed and mean ± sd."""
    seeds = [s for s in val if "world CLIP" in val[s]]
    if not seeds:
        return []
    names = [n for n in val[seeds[0]] if n != "world CLIP" and all(n in val[s] for s in seeds)]
    md = ["", f"Zero-shot GT-box accuracy on the val split (seeds {', '.join(map(str, seeds))}): each model minus the "
          "world CLIP of the same seed, per seed, then mean ± standard deviation:", "",
          "| model | novel | all | per seed (novel) | per seed (all) | world CLIP, per seed (all) |",
          "|---|---|---|---|---|---|"]
    for n in names:
        d = {k: [val[s][n][f"acc-{k}"] - val[s]["world CLIP"][f"acc-{k}"] for s in seeds] for k in ("novel", "all")}
        md.append(f"| {n} | {fmt(mean_std(d['novel']))} | {fmt(mean_std(d['all']))} | "
                  + ", ".join(f"{v:+.1f}" for v in d["novel"]) + " | " + ", ".join(f"{v:+.1f}" for v in d["all"])
                  + " | " + ", ".join(f"{val[s]['world CLIP']['acc-all']:.1f}" for s in seeds) + " |")
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

    def tdelta(seed, t):
        return t["AP50-novel"] - runs[seed]["transfer"]["world CLIP"]["AP50-novel"]

    md = ["", f"Ablations over seeds {', '.join(map(str, seeds))}: each setting minus the world CLIP of the same "
          "seed (mean ± standard deviation; zero-shot GT-box accuracy, and transfer AP50 on novel classes where "
          "the ablation trained a transfer detector, `--ablation-transfer`):", "",
          "| setting | zero-shot novel | all | per seed (all) | transfer AP50 novel | per seed |",
          "|---|---|---|---|---|---|"]
    rows = [("default (RPN regions, all three losses)", {s: runs[s]["zero_shot"]["RegionCLIP student"] for s in seeds},
             {s: runs[s]["transfer"]["RegionCLIP student"] for s in seeds})]
    rows += [(n, {s: by_seed[s][n]["zero_shot"] for s in seeds},
              {s: by_seed[s][n]["transfer"] for s in seeds} if all("transfer" in by_seed[s][n] for s in seeds)
              else None) for n in names]
    for label, zs, tr in rows:
        cells = [fmt(mean_std([delta(s, zs[s], k) for s in seeds])) for k in ("novel", "all")]
        per = ", ".join(f"{delta(s, zs[s], 'all'):+.1f}" for s in seeds)
        tcell, tper = ("-", "-") if tr is None else (
            fmt(mean_std([tdelta(s, tr[s]) for s in seeds])), ", ".join(f"{tdelta(s, tr[s]):+.1f}" for s in seeds))
        md.append(f"| {label} | {cells[0]} | {cells[1]} | {per} | {tcell} | {tper} |")
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
