#!/usr/bin/env python
"""Image exemplars against names, in the synthetic world (after `make demo`).

The demo's transfer detector (trained on base boxes only) is evaluated on the test split with
all 12 shape names as the vocabulary, and with each novel shape given instead by example boxes
from the val split (regionclip_d2.Exemplar: the mean of the detector's own L2-normalised region
embeddings of the boxes), with raw cosines and with the exemplar calibration
(Detector.calibrate_exemplars) fitted on the base shapes' val boxes. Novel AP50 says whether an
exemplar finds its shape as well as its name does. Writes <run>/exemplars/results.json and
prints a table.

  python tools/synthetic_exemplars.py --run output/synthetic_demo --shots 5
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default="output/synthetic_demo", help="a finished synthetic demo run (default: "
                    "%(default)s)")
    ap.add_argument("--shots", type=int, default=5, help="example boxes per novel shape (default: %(default)s)")
    ap.add_argument("--detector", default=None, choices=["world CLIP", "RegionCLIP student"],
                    help="which transfer detector (default: the one the demo's pictures show)")
    args = ap.parse_args(argv)
    if args.shots < 1:
        ap.error(f"--shots {args.shots}: give 1 or more")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from synthetic_pipeline import finished_run_settings

    # the run is complete (or a message says what to do), and the detector's weights
    s = finished_run_settings(args.run, "synthetic_exemplars", args.detector)
    pipe, shown = s["pipeline"], s["label"]
    try:
        res = pipe.exemplar_eval(s["weights"], pipe.p["transfer_arch"], args.shots)
    except ValueError as e:
        raise SystemExit(f"synthetic_exemplars: {e}") from None
    lines = [f"Novel shapes by name or by {args.shots} val-split exemplars each ({shown} transfer detector, "
             f"{pipe.p['transfer_arch']}; test split):", "",
             "| novel classes given as | AP50 novel | base | all |", "|---|---|---|---|"]
    for label in ("names", "exemplars", "exemplars, calibrated"):
        if label not in res:
            continue
        r = res[label]
        lines.append(f"| {label} | {r['AP50-novel']:.1f} | {r['AP50-base']:.1f} | {r['AP50-all']:.1f} |")
    c = res["calibration"]
    if "error" in c:
        lines += ["", f"The calibration failed, so no calibrated row: {c['error']}"]
        print("\n".join(lines))
        return 0
    lines += ["", f"Calibration (fitted on the {len(pipe.names()[0])} base shapes' val boxes, {args.shots} each): "
              f"exemplar cosine x -> {c['scale']:.3f} x {c['bias']:+.3f}; exemplar cosines of positives / negatives "
              f"{c['positive_exemplar_cos']:.3f} / {c['negative_exemplar_cos']:.3f}, text cosines "
              f"{c['positive_text_cos']:.3f} / {c['negative_text_cos']:.3f}."]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
