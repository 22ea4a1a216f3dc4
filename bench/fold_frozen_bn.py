#!/usr/bin/env python
"""Do folded BatchNorms and channels-last pay for the backbones? (issue 16: backbones' speed)

Times the two backbones of RN50-C4 zero-shot inference, fp32, random weights with non-trivial
BatchNorm statistics: the CLIP RN50 to res4 on the image (the recognition branch) and the R50-FPN
of the RPN branch (configs/RPN/rpn_R_50_FPN_ovd.yaml), each

  * as it is (the official code's form),
  * in channels-last memory format,
  * with its BatchNorms folded (regionclip_d2.modeling.fold.folded_copy),
  * folded and channels-last: what the detector's inference runs on CPU (MODEL.CLIP.FOLD_BATCHNORM),
  * with --compile: the folded channels-last copy under torch.compile (inductor, weight freezing),
  * with --jit: TorchScript trace + freeze + optimize_for_inference of the folded copy.

Runs alternate after a warm-up; the median of --repeats each. Prints each variant's time, the
speed-up against the original and the largest output difference relative to the largest output
value of the same map.

  python bench/fold_frozen_bn.py --size 800x1216 --repeats 5 --threads 2 [--compile] [--jit]
"""
import argparse
import copy
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))


def _variants(net, x, args):
    import torch

    from regionclip_d2.modeling.fold import folded_copy

    cl = torch.channels_last
    out = {"original": net,
           "channels-last": copy.deepcopy(net).to(memory_format=cl),
           "folded": folded_copy(net),
           "folded, channels-last": folded_copy(net, channels_last=True)}
    build = {}
    keys = None
    if args.compile or args.jit:
        with torch.no_grad():
            keys = sorted(net(x))

    class Tuple(torch.nn.Module):  # dict outputs as a tuple, for tracing
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, inp):
            o = self.m(inp)
            return tuple(o[k] for k in keys)

    def as_dict(fn):
        return lambda inp: dict(zip(keys, fn(inp)))

    if args.compile:
        import torch._inductor.config as inductor_config

        inductor_config.freezing = True
        t = time.perf_counter()
        compiled = torch.compile(Tuple(folded_copy(net, channels_last=True)))
        with torch.no_grad():
            compiled(x)
        build["torch.compile"] = time.perf_counter() - t
        out["torch.compile"] = as_dict(compiled)
    if args.jit:
        t = time.perf_counter()
        with torch.no_grad():
            traced = torch.jit.trace(Tuple(folded_copy(net)), x, check_trace=False)
            frozen = torch.jit.optimize_for_inference(torch.jit.freeze(traced.eval()))
            frozen(x)
        build["TorchScript"] = time.perf_counter() - t
        out["TorchScript"] = as_dict(frozen)
    return out, build


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="800x1216", help="H x W of the input (default: %(default)s)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--compile", action="store_true", help="also torch.compile (inductor, freezing): slow to build")
    ap.add_argument("--jit", action="store_true", help="also TorchScript freeze + optimize_for_inference")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from conftest import randomize_batchnorm_stats

    from detectron2.modeling import build_backbone

    from regionclip_d2 import get_regionclip_cfg

    torch.set_num_threads(args.threads)
    h, w = (int(v) for v in args.size.lower().split("x"))
    nets = {
        "CLIP RN50 to res4": get_regionclip_cfg(os.path.join(ROOT, "configs/COCO-InstanceSegmentation/"
                                                             "CLIP_fast_rcnn_R_50_C4_zsinf_GT.yaml")),
        "RPN branch R50-FPN": get_regionclip_cfg(os.path.join(ROOT, "configs/RPN/rpn_R_50_FPN_ovd.yaml")),
    }
    print(f"{args.size}, fp32, {args.threads} thread(s), median of {args.repeats}, runs alternating")
    print("| backbone | variant | time | original / variant | max diff / max value |")
    print("|---|---|---|---|---|")
    x = torch.randn(1, 3, h, w)
    for name, cfg in nets.items():
        torch.manual_seed(0)
        net = build_backbone(cfg).eval()
        randomize_batchnorm_stats(net)
        variants, build = _variants(net, x, args)
        times = {k: [] for k in variants}
        with torch.inference_mode():
            ref = net(x)
            diffs = {}
            for label, m in variants.items():  # warm-up, and the difference
                got = m(x)
                diffs[label] = max(float((ref[k] - got[k]).abs().max() / ref[k].abs().max()) for k in ref)
            for _ in range(args.repeats):
                for label, m in variants.items():
                    t = time.perf_counter()
                    m(x)
                    times[label].append(time.perf_counter() - t)
        base = statistics.median(times["original"])
        for label in variants:
            t = statistics.median(times[label])
            extra = f" (built in {build[label]:.1f} s)" if label in build else ""
            print(f"| {name} | {label}{extra} | {t:.3f} s | {base / t:.2f}x | {diffs[label]:.1e} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
