#!/usr/bin/env python
"""Does folding the frozen BatchNorms into the convolutions pay? (issue: backbones' speed)

Times the two backbones of RN50-C4 zero-shot inference, each as it is and with its BatchNorms
folded (regionclip_d2.modeling.fold.folded_copy): the CLIP RN50 to res4 on the image (the
recognition branch) and the R50-FPN of the RPN branch (configs/RPN/rpn_R_50_FPN_ovd.yaml),
fp32, random weights with non-trivial BatchNorm statistics. Runs alternate (original, folded,
original, ...) after a warm-up; the median of --repeats each. Prints the ratio original /
folded (> 1: folding is faster) and the largest output difference relative to the largest output
value of the same map.

  python bench/fold_frozen_bn.py --size 800x1216 --repeats 5 --threads 2
"""
import argparse
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="800x1216", help="H x W of the input (default: %(default)s)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from conftest import randomize_batchnorm_stats

    from detectron2.modeling import build_backbone

    from regionclip_d2 import get_regionclip_cfg
    from regionclip_d2.modeling.fold import folded_copy

    torch.set_num_threads(args.threads)
    h, w = (int(v) for v in args.size.lower().split("x"))
    nets = {
        "CLIP RN50 to res4": get_regionclip_cfg(os.path.join(ROOT, "configs/COCO-InstanceSegmentation/"
                                                             "CLIP_fast_rcnn_R_50_C4_zsinf_GT.yaml")),
        "RPN branch R50-FPN": get_regionclip_cfg(os.path.join(ROOT, "configs/RPN/rpn_R_50_FPN_ovd.yaml")),
    }
    print(f"{args.size}, fp32, {args.threads} thread(s), median of {args.repeats}, runs alternating")
    print("| backbone | original | folded | original / folded | max diff / max value |")
    print("|---|---|---|---|---|")
    x = torch.randn(1, 3, h, w)
    for name, cfg in nets.items():
        torch.manual_seed(0)
        net = build_backbone(cfg).eval()
        randomize_batchnorm_stats(net)
        fold = folded_copy(net)
        times = {"original": [], "folded": []}
        with torch.inference_mode():
            a, b = net(x), fold(x)  # warm-up, and the difference
            diff = max(float((a[k] - b[k]).abs().max() / a[k].abs().max()) for k in a)
            for _ in range(args.repeats):
                for label, m in (("original", net), ("folded", fold)):
                    t = time.perf_counter()
                    m(x)
                    times[label].append(time.perf_counter() - t)
        o, f = statistics.median(times["original"]), statistics.median(times["folded"])
        print(f"| {name} | {o:.3f} s | {f:.3f} s | {o / f:.3f} | {diff:.1e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
