#!/usr/bin/env python
"""CPU speed and memory benchmarks of regionclip_d2 (RN50-C4, random weights: speed does
not depend on weight values).

Measured, each in its own subprocess (so peak memory is per setting):
  * zero-shot inference of CLIPFastRCNN in GT and RPN mode at 800x1333 and 480x640, with
    vocabularies of 65 and 1203 classes and 100 / 300 / 1000 regions: median and spread of
    repeated runs after warm-up, a breakdown by stage, and peak resident memory with where it
    goes (libraries, model weights by part, the folded inference copies, inference on top);
  * the limit: the bare compute the method needs, as plain module calls in the same
    process (CLIP backbone to res4 on the image + res5 and attention pool on the regions
    + the RPN branch's backbone in RPN mode); reported as end-to-end / limit;
  * stock detectron2 Faster R-CNN R50-C4 at the same size and number of proposals;
  * one training step of pretraining (batch 2, 100 regions per image) and of transfer, in fp32,
    channels-last (transfer) and bf16 autocast, with the speed-up against fp32;
  * vocabulary embedding throughput (prompts/s) against bare encode_text on the same prompts.

  python bench/run.py --quick           # a few settings (minutes)
  python bench/run.py                   # the whole matrix (long on 2 cores)
  python bench/run.py --only zs --sizes 480x640 --regions 100 300

Writes bench/results/results.json and results.md. A setting whose run fails is reported
as failed with its error, never with a number.
"""
import argparse
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_RPN = "configs/COCO-InstanceSegmentation/CLIP_fast_rcnn_R_50_C4_zsinf.yaml"
CONFIG_GT = "configs/COCO-InstanceSegmentation/CLIP_fast_rcnn_R_50_C4_zsinf_GT.yaml"


# ----------------------------------------------------------------------------- child side
def _timer():
    import torch  # noqa: F401

    return time.perf_counter


class StageTimer:
    """Accumulates wall time per named stage, timing methods of modules patched in place.

    :meth:`patch` puts a ``functools.partial`` of the class's method on the instance: a deep
    copy of the module (the detector's folded inference copies, ``MODEL.CLIP.FOLD_BATCHNORM``)
    then times its own method, where a wrapped bound method would run the original's."""

    def __init__(self):
        self.t = {}

        def timed(name, fn, obj, *a, **k):  # a plain function: deep copies share it
            t0 = time.perf_counter()
            out = fn(obj, *a, **k)
            self.t[name] = self.t.get(name, 0.0) + time.perf_counter() - t0
            return out

        self._timed = timed

    def patch(self, obj, method, name):
        setattr(obj, method, functools.partial(self._timed, name, getattr(type(obj), method), obj))

    def reset(self):
        self.t = {}


def _build_detector(mode, vocab, regions, opts):
    import torch

    from detectron2.modeling import build_model

    from regionclip_d2 import get_regionclip_cfg

    cfg = get_regionclip_cfg(CONFIG_GT if mode == "GT" else CONFIG_RPN,
                             ["MODEL.DEVICE", "cpu", "MODEL.CLIP.VOCABULARY", "", "MODEL.ROI_HEADS.NUM_CLASSES", vocab,
                              "MODEL.CLIP.OFFLINE_RPN_POST_NMS_TOPK_TEST", regions,
                              "MODEL.RPN.PRE_NMS_TOPK_TEST", max(1000, regions)] + list(opts))
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    model.set_vocabulary(torch.nn.functional.normalize(torch.randn(vocab, 1024), dim=-1))
    if model.offline_proposal_generator is not None:
        # random RPN weights move anchors anywhere and NMS then keeps few boxes; with zero
        # deltas the proposals are anchors (random objectness), so the requested number survives
        head = model.offline_proposal_generator.rpn_head
        torch.nn.init.zeros_(head.anchor_deltas.weight)
        torch.nn.init.zeros_(head.anchor_deltas.bias)
    return model


def _inputs(h, w, mode, regions):
    import torch

    from detectron2.structures import Boxes, Instances

    g = torch.Generator().manual_seed(0)
    img = torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)
    x = {"image": img, "height": h, "width": w}
    if mode == "GT":
        xy = torch.rand(regions, 2, generator=g) * torch.tensor([w * 0.8, h * 0.8])
        wh = (torch.rand(regions, 2, generator=g) * 0.5 + 0.05) * torch.tensor([w, h])
        boxes = torch.cat([xy, torch.minimum(xy + wh, torch.tensor([w, h]))], dim=1)
        x["instances"] = Instances((h, w), gt_boxes=Boxes(boxes), gt_classes=torch.zeros(regions, dtype=torch.long))
    return [x]


def _rss_mib() -> float:
    """This process's resident memory now (Linux), MiB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def _param_mib(*modules, exclude=()) -> float:
    """MiB of the distinct parameter and buffer tensors of ``modules`` (not those in ``exclude``)."""
    seen = {t.data_ptr() for m in exclude if m is not None for t in list(m.parameters()) + list(m.buffers())}
    total = 0
    for m in modules:
        if m is None:
            continue
        for t in list(m.parameters()) + list(m.buffers()):
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
    return total / 2 ** 20


def memory_breakdown(model, rss_libraries, rss_model, peak, rss_before_inference) -> dict:
    """Where the detector's peak memory goes: the libraries (RSS after importing them), the built
    model (RSS growth while building it; its parts' weights counted exactly), the folded inference
    copies' own weights, and what inference adds on top at its peak (activations, allocator)."""
    folded = model.__dict__.get("_folded") or {}
    parts = {"CLIP image tower": _param_mib(model.backbone),
             "CLIP text tower": _param_mib(model.lang_encoder),
             "RPN branch": _param_mib(model.offline_backbone, model.offline_proposal_generator)}
    parts["other"] = _param_mib(model) - sum(parts.values())
    return {"libraries_mib": rss_libraries, "model_mib": rss_model - rss_libraries, "weights_mib": parts,
            "folded_copies_mib": _param_mib(*folded.values(), exclude=[model]),
            "inference_mib": peak - rss_before_inference, "peak_mib": peak}


def child_zero_shot(args):
    import resource

    import torch
    from official_compute import _Clock, compare_detections, count_flops, official_inference

    import detectron2.modeling  # noqa: F401  (the libraries' memory, before the model's)

    import regionclip_d2.modeling  # noqa: F401

    torch.set_num_threads(args.threads)
    mode, vocab, regions = args.mode, args.vocab, args.regions
    h, w = args.size
    rss_libraries = _rss_mib()
    model = _build_detector(mode, vocab, regions, args.opts)
    rss_model = _rss_mib()
    inputs = _inputs(h, w, mode, regions)
    if getattr(args, "official_peak", False):  # this process runs the official-compute baseline alone
        official_inference(model, inputs)
        return {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}
    timer = StageTimer()
    if model.offline_backbone is not None:
        timer.patch(model.offline_backbone, "forward", "rpn_branch")
        timer.patch(model.offline_proposal_generator, "forward", "rpn_branch")
    timer.patch(model.backbone, "forward", "backbone_res4")
    timer.patch(model.roi_heads.pooler, "forward", "roialign")
    res = model.clip_resnet
    timer.patch(res, "encode_pooled_regions", "res5_attnpool")
    pred = model.roi_heads.box_predictor
    timer.patch(pred, "forward", "classifier")
    timer.patch(pred, "inference", "postprocess")
    # the limit: the same compute as plain module calls
    with torch.inference_mode():
        images = model.preprocess_image(inputs)
        off = model.offline_preprocess_image(inputs) if model.offline_backbone is not None else None
    n_regions = regions if mode == "GT" else len(model.get_regions(inputs)[0])
    pooled = []  # the limit's input, made after the end-to-end peak is read (1000 regions: 800 MB)
    orig_bb = type(model.backbone).forward

    def limit_once():
        with torch.inference_mode():
            if off is not None:
                type(model.offline_backbone).forward(model.offline_backbone, off.tensor)
            orig_bb(model.backbone, images.tensor)
            if not pooled:
                pooled.append(torch.randn(n_regions, res.layer3[-1].conv3.out_channels, 14, 14))
            type(res).encode_pooled_regions(res, pooled[0])

    rss_before_inference = _rss_mib()
    for _ in range(max(1, args.warmup)):
        out = model(inputs)
    # peak memory of the end-to-end forward alone (the limit's unchunked res5 comes later)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # MiB (Linux: KiB)
    memory = memory_breakdown(model, rss_libraries, rss_model, peak, rss_before_inference)
    for _ in range(max(1, args.warmup)):
        limit_once()
        official_out = official_inference(model, inputs)
    equal = compare_detections(official_out, out)
    # end-to-end, official-compute and limit runs alternate, so that machine noise hits all alike
    times, stages, limit, official, official_stages = [], [], [], [], []
    for _ in range(args.repeats):
        timer.reset()
        t0 = time.perf_counter()
        out = model(inputs)
        times.append(time.perf_counter() - t0)
        stages.append(dict(timer.t))
        clock = _Clock()
        t0 = time.perf_counter()
        official_inference(model, inputs, clock)
        official.append(time.perf_counter() - t0)
        official_stages.append(clock.t)
        t0 = time.perf_counter()
        limit_once()
        limit.append(time.perf_counter() - t0)
    n_dets = len(out[0]["instances"])

    def medians(rows):
        return {k: statistics.median(s.get(k, 0.0) for s in rows) for k in rows[0]}

    return {"times": times, "stages": medians(stages), "limit_times": limit, "official_times": official,
            "official_stages": medians(official_stages), "equal": equal,
            "gflop": count_flops(model, inputs, n_regions),
            "regions": n_regions, "detections": n_dets, "peak_rss_mib": peak, "memory": memory}


def child_stock(args):
    import resource

    import torch

    from detectron2 import model_zoo
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    torch.set_num_threads(args.threads)
    cfg = get_cfg()
    cfg.merge_from_file(model_zoo.get_config_file("COCO-Detection/faster_rcnn_R_50_C4_1x.yaml"))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.RPN.POST_NMS_TOPK_TEST = args.regions
    cfg.MODEL.RPN.PRE_NMS_TOPK_TEST = max(6000, args.regions)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    # as for the CLIP detector's RPN branch: zero deltas keep the proposals on the anchors, so
    # that random weights still give the requested number of proposals after NMS
    torch.nn.init.zeros_(model.proposal_generator.rpn_head.anchor_deltas.weight)
    torch.nn.init.zeros_(model.proposal_generator.rpn_head.anchor_deltas.bias)
    counted = []
    pool = model.roi_heads._shared_roi_transform
    model.roi_heads._shared_roi_transform = lambda f, b: (counted.append(sum(len(x) for x in b)), pool(f, b))[1]
    h, w = args.size
    x = [{"image": torch.randint(0, 256, (3, h, w), dtype=torch.uint8), "height": h, "width": w}]
    times = []
    with torch.no_grad():
        for i in range(args.warmup + args.repeats):
            t0 = time.perf_counter()
            model(x)
            if i >= args.warmup:
                times.append(time.perf_counter() - t0)
    return {"times": times, "regions": counted[-1],
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}


def child_train(args):
    import torch

    from detectron2.modeling import build_model
    from detectron2.utils.events import EventStorage

    from regionclip_d2 import get_regionclip_cfg

    torch.set_num_threads(args.threads)
    h, w = args.size
    torch.manual_seed(0)
    variant = args.variant
    opts = list(args.opts) + (["MODEL.CLIP.CHANNELS_LAST", True] if variant == "channels-last" else [])
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=variant == "bf16")
    if args.kind == "pretrain":
        cfg = get_regionclip_cfg("configs/pretrain/RegionCLIP_RN50.yaml",
                                 ["MODEL.DEVICE", "cpu", "MODEL.CLIP.PRETRAIN_SAMPLE_REGIONS", 100,
                                  "MODEL.CLIP.GATHER_GPUS", False] + opts)
        model = build_model(cfg)
        model.set_concept_pool(torch.randn(4764, 1024))  # the COCO Captions pool size
        batch = [{"image": torch.randint(0, 256, (3, h, w), dtype=torch.uint8), "caption": "a photo of a dog"}
                 for _ in range(2)]
    else:
        model = _build_detector("RPN", 48, 1000, opts)
        model.set_vocabulary(torch.randn(48, 1024), train=True)

        batch = []
        for _ in range(2):
            x = _inputs(h, w, "GT", 5)[0]
            batch.append(x)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1e-4, momentum=0.9)
    times = []
    with EventStorage(0):
        for i in range(args.warmup + args.repeats):
            t0 = time.perf_counter()
            with autocast:  # as GuardedTrainer does with SOLVER.AMP.ENABLED, DTYPE bfloat16
                loss = sum(model(batch).values())
            opt.zero_grad()
            loss.backward()
            opt.step()
            if i >= args.warmup:
                times.append(time.perf_counter() - t0)
    return {"times": times}


def child_vocab(args):
    import torch

    from regionclip_d2.data.vocabularies import load_vocabulary, prompt_name
    from regionclip_d2.modeling.text import build_language_encoder, embed_class_names
    from regionclip_d2.modeling.text.templates import get_templates

    torch.set_num_threads(args.threads)
    enc = build_language_encoder("RN50-quickgelu")
    names = load_vocabulary("lvis")[: args.vocab]
    prompts = [t.format(prompt_name(n)) for n in names for t in get_templates("imagenet80")]
    res = {"prompts": len(prompts)}
    for rep in range(2):  # second round is the measured one
        t0 = time.perf_counter()
        embed_class_names(names, enc, templates="imagenet80", use_cache=False, progress=False)
        t_embed = time.perf_counter() - t0
        t0 = time.perf_counter()
        with torch.no_grad():
            for i in range(0, len(prompts), 512):
                enc(enc.tokenize(prompts[i:i + 512]))
        t_bare = time.perf_counter() - t0
    res.update(embed_s=t_embed, bare_s=t_bare)
    return res


def child_peak(args):
    from official_compute import machine_peak

    return machine_peak(args.threads)


CHILDREN = {"peak": child_peak, "zs": child_zero_shot, "stock": child_stock, "train": child_train, "vocab": child_vocab}


# ----------------------------------------------------------------------------- parent side
def run_child(kind, params, timeout):
    cmd = [sys.executable, os.path.abspath(__file__), "--child", kind, "--params", json.dumps(params)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    try:
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    if r.returncode != 0 or not lines:
        tail = (r.stderr or r.stdout).strip().splitlines()[-3:]
        return {"error": f"exit {r.returncode}: " + " | ".join(tail)}
    return json.loads(lines[-1][len("RESULT "):])


def machine_peak_child(base, timeout):
    print("this CPU's fp32 peak (a res4-like 3x3 convolution, a 2048^3 matrix product) ...", flush=True)
    return run_child("peak", base, timeout)


def summarize(times):
    med = statistics.median(times)
    return {"median_s": med, "min_s": min(times), "max_s": max(times), "n": len(times)}


def fmt(x, nd=2):
    return "—" if x is None else f"{x:.{nd}f}"


def machine():
    info = {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count()}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import torch

    info["torch"] = torch.__version__
    info["threads"] = torch.get_num_threads()
    return info


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a small subset (480x640, 100 regions, 65 classes)")
    ap.add_argument("--only", nargs="+", choices=["zs", "stock", "train", "vocab"], default=None,
                    help="which groups to run (default: all)")
    ap.add_argument("--sizes", nargs="+", default=None, help="HxW sizes (default: 800x1333 480x640)")
    ap.add_argument("--regions", nargs="+", type=int, default=None, help="default: 100 300 1000")
    ap.add_argument("--vocabs", nargs="+", type=int, default=None, help="default: 65 1203")
    ap.add_argument("--modes", nargs="+", choices=["GT", "RPN"], default=None)
    ap.add_argument("--preset", choices=["official"], default=None,
                    help="official: the five settings measured with the official code (GT 3 boxes and RPN "
                         "100/300/1000 regions at 800x1200, RPN 1000 at 800x800; 65 classes), ratios against "
                         "the official-compute baseline, and this CPU's peak fp32 rate")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per setting")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results"))
    ap.add_argument("--train-variants", nargs="+", choices=["fp32", "channels-last", "bf16"], default=None,
                    help="training-step variants, each in its own process (bf16: CPU autocast, as SOLVER.AMP.ENABLED "
                         "with DTYPE bfloat16; one measured step); default: fp32 channels-last, and bf16 on CPUs "
                         "with bf16 instructions (elsewhere a bf16 step takes minutes)")
    ap.add_argument("--opts", nargs="*", default=[], help="config overrides for every detector setting")
    ap.add_argument("--render", action="store_true",
                    help="only write results.md again from the results.json in --out (no measurement)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--params", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        p = argparse.Namespace(**json.loads(args.params))
        p.size = tuple(p.size) if hasattr(p, "size") else None
        print("RESULT " + json.dumps(CHILDREN[args.child](p)), flush=True)
        return 0
    if args.render:
        path = os.path.join(args.out, "results.json")
        if not os.path.isfile(path):
            ap.error(f"--render: {path} not found: run a measurement first")
        with open(path) as f:
            text = render(json.load(f))
        with open(os.path.join(args.out, "results.md"), "w") as f:
            f.write(text)
        print(text)
        return 0
    sizes = args.sizes or (["480x640"] if args.quick else ["800x1333", "480x640"])
    try:
        sizes = [tuple(int(v) for v in s.lower().split("x")) for s in sizes]
    except ValueError:
        ap.error(f"--sizes must look like 800x1333, got {args.sizes}")
    regions = args.regions or ([100] if args.quick else [100, 300, 1000])
    vocabs = args.vocabs or ([65] if args.quick else [65, 1203])
    modes = args.modes or ["GT", "RPN"]
    groups = args.only or ["zs", "stock", "train", "vocab"]
    repeats = 3 if args.quick and args.repeats == 5 else args.repeats
    for cfg in (CONFIG_GT, CONFIG_RPN):
        if not os.path.isfile(os.path.join(ROOT, cfg)):
            raise SystemExit(f"bench: config {cfg} is missing; run from a complete checkout")
    base = {"warmup": args.warmup, "repeats": repeats, "threads": args.threads, "opts": args.opts}
    results = {"machine": machine(), "zero_shot": [], "stock": [], "train": [], "vocab": []}
    os.makedirs(args.out, exist_ok=True)

    def save():
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump(results, f, indent=1)
        with open(os.path.join(args.out, "results.md"), "w") as f:
            f.write(render(results))

    if "zs" in groups:
        if args.preset == "official":  # the settings of the official code's measured table
            settings = [("GT", (800, 1200), 65, 3)] + [("RPN", (800, 1200), 65, n) for n in (100, 300, 1000)] \
                + [("RPN", (800, 800), 65, 1000)]
            results["peak"] = machine_peak_child(base, args.timeout)
        else:
            settings = [(mode, size, vocab, n) for size in sizes for mode in modes for vocab in vocabs for n in regions]
        for mode, size, vocab, n in settings:
            params = dict(base, mode=mode, vocab=vocab, regions=n, size=size, official_peak=False)
            print(f"zero-shot {mode} {size[0]}x{size[1]} vocab {vocab} regions {n} ...", flush=True)
            r = run_child("zs", params, args.timeout)
            row = {"mode": mode, "size": f"{size[0]}x{size[1]}", "vocab": vocab, "regions": n}
            if "error" in r:
                row["error"] = r["error"]
            else:
                e2e, lim, off = summarize(r["times"]), summarize(r["limit_times"]), summarize(r["official_times"])
                row.update(e2e=e2e, limit=lim, ratio=e2e["median_s"] / lim["median_s"], stages=r["stages"],
                           official=off, speedup=off["median_s"] / e2e["median_s"],
                           official_stages=r["official_stages"], equal=r["equal"], gflop=r["gflop"],
                           actual_regions=r["regions"], peak_rss_mib=r["peak_rss_mib"], memory=r["memory"])
                peak = run_child("zs", dict(params, official_peak=True, warmup=0, repeats=0), args.timeout)
                row["official_peak_rss_mib"] = peak.get("peak_rss_mib")
            results["zero_shot"].append(row)
            print("   ", row.get("error") or f"{row['e2e']['median_s']:.3f} s, official compute "
                  f"{row['official']['median_s']:.3f} s (speed-up {row['speedup']:.2f}x, "
                  f"{100 * row['equal']['share']:.1f}% of its detections equal), limit "
                  f"{row['limit']['median_s']:.3f} s, ratio {row['ratio']:.2f}", flush=True)
            save()
    if "stock" in groups:
        for size in sizes:
            for n in regions:
                print(f"stock Faster R-CNN R50-C4 {size[0]}x{size[1]} proposals {n} ...", flush=True)
                r = run_child("stock", dict(base, size=size, regions=n), args.timeout)
                row = {"size": f"{size[0]}x{size[1]}", "regions": n}
                row.update({"error": r["error"]} if "error" in r else
                           {"e2e": summarize(r["times"]), "actual_regions": r["regions"],
                            "peak_rss_mib": r["peak_rss_mib"]})
                results["stock"].append(row)
                save()
    if "train" in groups:
        from regionclip_d2.synthetic.clip_training import cpu_has_fast_bf16

        train_variants = args.train_variants or ["fp32", "channels-last"] + (["bf16"] if cpu_has_fast_bf16() else [])
        for kind in ("pretrain", "transfer"):
            size = (480, 640)
            # channels-last is a detector option (MODEL.CLIP.CHANNELS_LAST): not for the pretraining model
            for variant in [v for v in train_variants if not (kind == "pretrain" and v == "channels-last")]:
                print(f"training step: {kind}, {variant} ...", flush=True)
                r = run_child("train", dict(base, kind=kind, size=size, variant=variant, warmup=1,
                                            repeats=max(2, repeats // 2) if variant != "bf16" else 1), args.timeout)
                row = {"kind": kind, "variant": variant, "size": "480x640", "batch": 2}
                row.update({"error": r["error"]} if "error" in r else {"step": summarize(r["times"])})
                results["train"].append(row)
                save()
    if "vocab" in groups:
        for vocab in (args.vocabs or ([65] if args.quick else [65, 200])):
            print(f"vocabulary embedding: {vocab} classes x 80 templates ...", flush=True)
            r = run_child("vocab", dict(base, vocab=vocab), args.timeout)
            row = {"classes": vocab}
            row.update({"error": r["error"]} if "error" in r else
                       {"prompts": r["prompts"], "embed_prompts_per_s": r["prompts"] / r["embed_s"],
                        "bare_prompts_per_s": r["prompts"] / r["bare_s"], "ratio": r["embed_s"] / r["bare_s"]})
            results["vocab"].append(row)
            save()
    save()
    print(render(results))
    return 0


def official_tables(rows, peak):
    """Speed-ups against the official-compute baseline (bench/official_compute.py), per stage,
    and the backbones' achieved rate against this CPU's measured fp32 peak."""
    out = ["\n## Against the official compute (bench/official_compute.py; same weights and inputs, runs alternating)\n",
           "| mode | size | regions | official s | ours s | speed-up | detections equal | RPN branch | res4 | RoIAlign "
           "| res5 + attention pool | classifier + post | peak RSS MiB official / ours |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def pair(o, u):
        return f"{fmt(o)} / {fmt(u)}" if o or u else "—"

    def head(stages):  # classifier and post-processing (split differently in the two)
        return stages.get("classifier", 0) + stages.get("postprocess", 0)

    for r in rows:
        o, u, eq = r["official_stages"], r["stages"], r["equal"]
        out.append(
            f"| {r['mode']} | {r['size']} | {r['actual_regions']} | {fmt(r['official']['median_s'])} | "
            f"{fmt(r['e2e']['median_s'])} | {fmt(r['speedup'])}x | {eq['matched']}/{eq['detections']} "
            f"(scores within {eq['max_score_diff']:.0e}) | {pair(o.get('rpn_branch'), u.get('rpn_branch'))} | "
            f"{pair(o.get('backbone_res4'), u.get('backbone_res4'))} | {pair(o.get('roialign'), u.get('roialign'))} | "
            f"{pair(o.get('res5', 0) + o.get('attnpool', 0), u.get('res5_attnpool'))} | "
            f"{pair(head(o), head(u))}"
            f" | {fmt(r.get('official_peak_rss_mib'), 0)} / {fmt(r['peak_rss_mib'], 0)} |")
    out.append("\n(stage columns: official / ours, seconds, medians)")
    if peak and "error" not in peak:
        out += [f"\nThis CPU's fp32 rate: {peak['conv_gflops']:.0f} GFLOP/s on a res4-like 3x3 convolution, "
                f"{peak['matmul_gflops']:.0f} GFLOP/s on a 2048^3 matrix product.\n",
                "| mode | size | regions | stage | GFLOP official / ours | official GFLOP/s | ours GFLOP/s "
                "| ours, % of the convolution peak |",
                "|---|---|---|---|---|---|---|---|"]
        for r in rows:
            g, o, u = r["gflop"], r["official_stages"], r["stages"]
            stages = [("RPN branch (R50-FPN)", g.get("rpn_branch"), g.get("rpn_branch"), o.get("rpn_branch"),
                       u.get("rpn_branch")),
                      ("CLIP to res4", g["backbone_res4"], g["backbone_res4"], o.get("backbone_res4"),
                       u.get("backbone_res4")),
                      ("res5 + attention pool", g["res5"] + g["attnpool"], g["res5"] + g["attnpool_one_query"],
                       o.get("res5", 0) + o.get("attnpool", 0), u.get("res5_attnpool"))]
            for name, f_off, f_ours, to, tu in stages:
                if not f_off or not to or not tu:
                    continue
                out.append(f"| {r['mode']} | {r['size']} | {r['actual_regions']} | {name} | {f_off:.0f} / {f_ours:.0f} "
                           f"| {f_off / to:.0f} | {f_ours / tu:.0f} | {100 * f_ours / tu / peak['conv_gflops']:.0f}% |")
        out.append("\n(operations executed: the official attention pool projects all 50 tokens, the detector's only "
                   "the query it keeps; at 300+ regions the detector's RoIAlign runs inside its chunked res5 loop "
                   "and is timed with it)")
    return out


def render(res):
    m = res["machine"]
    out = [f"Machine: {m.get('cpu', '?')}, {m['cpus']} CPUs, torch {m['torch']}, {m['threads']} threads\n"]
    if res["zero_shot"]:
        out += ["## Zero-shot inference (CLIPFastRCNN RN50-C4, batch 1)\n",
                "| mode | size | vocab | regions | end-to-end s (min-max) | limit s | ratio | x stock | RPN | res4 "
                "| RoIAlign | res5+pool | classifier | post | peak RSS MiB |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        stock = {(r["size"], r["regions"]): r["e2e"]["median_s"] for r in res["stock"] if "e2e" in r}
        for r in res["zero_shot"]:
            if "error" in r:
                out.append(f"| {r['mode']} | {r['size']} | {r['vocab']} | {r['regions']} | failed: {r['error'][:80]} "
                           "| | | | | | | | | | |")
                continue
            s = r["stages"]
            key = (r['size'], r['regions'])
            out.append(f"| {r['mode']} | {r['size']} | {r['vocab']} | {r['actual_regions']} | "
                       f"{fmt(r['e2e']['median_s'])} ({fmt(r['e2e']['min_s'])}-{fmt(r['e2e']['max_s'])}) | "
                       f"{fmt(r['limit']['median_s'])} | {fmt(r['ratio'])} | "
                       f"{fmt(r['e2e']['median_s'] / stock[key]) if key in stock else '—'} | "
                       f"{fmt(s.get('rpn_branch'))} | "
                       f"{fmt(s.get('backbone_res4'))} | {fmt(s.get('roialign'))} | {fmt(s.get('res5_attnpool'))} | "
                       f"{fmt(s.get('classifier'), 3)} | {fmt(s.get('postprocess'), 3)} | {r['peak_rss_mib']:.0f} |")
    official = [r for r in res["zero_shot"] if "official" in r]
    if official:
        out += official_tables(official, res.get("peak"))
    mem = [r for r in res["zero_shot"] if "memory" in r]
    if mem:
        out += ["\n## Where the peak memory goes (MiB, RSS)\n",
                "| mode | size | regions | libraries | model (built) | weights: CLIP image / text / RPN branch / other "
                "| folded copies' own weights | inference on top | peak |", "|---|---|---|---|---|---|---|---|---|"]
        for r in mem:
            m, wt = r["memory"], r["memory"]["weights_mib"]
            out.append(f"| {r['mode']} | {r['size']} | {r['regions']} | {m['libraries_mib']:.0f} "
                       f"| {m['model_mib']:.0f} "
                       f"| {wt['CLIP image tower']:.0f} / {wt['CLIP text tower']:.0f} / {wt['RPN branch']:.0f} / "
                       f"{wt['other']:.0f} | {m['folded_copies_mib']:.0f} | {m['inference_mib']:.0f} "
                       f"| {m['peak_mib']:.0f} |")
    if res["stock"]:
        out += ["\n## Stock detectron2 Faster R-CNN R50-C4 (reference)\n",
                "| size | proposals asked | proposals | s (min-max) | peak RSS MiB |", "|---|---|---|---|---|"]
        for r in res["stock"]:
            out.append(f"| {r['size']} | {r['regions']} | | failed: {r['error'][:80]} | |" if "error" in r else
                       f"| {r['size']} | {r['regions']} | {r.get('actual_regions', '?')} | {fmt(r['e2e']['median_s'])} "
                       f"({fmt(r['e2e']['min_s'])}-{fmt(r['e2e']['max_s'])}) | {r['peak_rss_mib']:.0f} |")
    if res["train"]:
        out += ["\n## Training step (batch 2, 480x640)\n",
                "| kind | variant | s / step (min-max) | fp32 / variant |", "|---|---|---|---|"]
        fp32 = {r["kind"]: r["step"]["median_s"] for r in res["train"]
                if r.get("variant", "fp32") == "fp32" and "step" in r}
        for r in res["train"]:
            v = r.get("variant", "fp32")
            if "error" in r:
                out.append(f"| {r['kind']} | {v} | failed: {r['error'][:80]} | |")
                continue
            ratio = f"{fp32[r['kind']] / r['step']['median_s']:.2f}x" if r["kind"] in fp32 else "—"
            out.append(f"| {r['kind']} | {v} | {fmt(r['step']['median_s'])} "
                       f"({fmt(r['step']['min_s'])}-{fmt(r['step']['max_s'])}) | {ratio} |")
    if res["vocab"]:
        out += ["\n## Vocabulary embedding (80 templates)\n",
                "| classes | prompts | embed_class_names prompts/s | bare encode_text prompts/s | time ratio |",
                "|---|---|---|---|---|"]
        for r in res["vocab"]:
            out.append(f"| {r['classes']} | failed: {r['error'][:80]} | | | |" if "error" in r else
                       f"| {r['classes']} | {r['prompts']} | {r['embed_prompts_per_s']:.0f} | "
                       f"{r['bare_prompts_per_s']:.0f} | {r['ratio']:.2f} |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.exit(main())
