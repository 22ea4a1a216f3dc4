#!/usr/bin/env python
"""CLIPSelf and F-ViT in the synthetic world, on CPU, in minutes (`make clipself`).

The second system of the family (CLIPSelf, ICLR 2024) through the project's public tools:
a world CLIP with a tiny ViT image tower is trained from scratch on the world's captions;
CLIPSelf fine-tunes its image tower without labels so that the dense map, RoI-pooled over
a grid cell, matches the frozen tower's embedding of the cell's crop; then

  * region classification on the test split's ground-truth boxes (the paper's Table 1 effect):
    the dense map RoI-pooled over each box, before and after CLIPSelf, against the box's crop
    embedded by the frozen ViT, each compared with the 12 class names' text embeddings;
  * F-ViT-style transfer: detectors on the frozen ViT (before / after CLIPSelf) with a simple
    feature pyramid, trained on base boxes, AP50 on novel / base / all classes.

Stages (logs in <output>/logs):
  1. world     tools/make_synthetic_ovd.py   (or --world-from RUN: that run's world and RPN)
  2. clip      tools/train_world_clip.py --image-tower vit
  3. classes   tools/embed_vocabulary.py     base and all class names, the ViT CLIP's text tower
  4. rpn       tools/train_net.py            the class-agnostic RPN on base boxes (not with --world-from)
  5. clipself  tools/train_net.py --config-file configs/synthetic/CLIPSelf_world.yaml
  6. regions   dense-map and crop region classification on ground-truth boxes
  7. transfer  tools/convert_weights.py --format clipself, then tools/train_net.py with
               configs/synthetic/FViT_world_ovd.yaml from both ViTs
  8. report    <output>/results.md, results.json, results.png

  python tools/synthetic_clipself.py --output output/synthetic_clipself
  python tools/synthetic_clipself.py --world-from output/synthetic_demo   # reuse its world and RPN
"""
import argparse
import json
import os
import sys
import time
from typing import Dict, List

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from synthetic_pipeline import PROFILES as REGIONCLIP_PROFILES  # noqa: E402
from synthetic_pipeline import WORLD_KEYS, Pipeline, parse_overrides  # noqa: E402

PROFILES = {
    # about 40 minutes on 2 CPU cores (fp32, AVX2), 30 of them for the ViT CLIP
    # the world of make demo with upright, larger objects (36-64 px instead of 30-54, no rotation): the ViT
    # learns from far fewer examples there (measured, contrastive steps of 128 pairs, whole-image shape
    # accuracy: demo world 14% after 500 steps; this world, 1500 steps with zoomed crops: 78.5%). CLIPSelf: 600
    # iterations at lr 2e-4 lift the dense map (200 at 1e-4 did not; README)
    "clipself": dict({k: REGIONCLIP_PROFILES["demo"][k] for k in WORLD_KEYS + ("num_train", "num_val", "num_test")},
                     min_size=36, max_size=64, single_min_size=36, single_max_size=64, max_rotation=0.0,
                     clip_tower="vit", vit_patch=8, vit_width=64, vit_layers=4,
                     clip_steps=1500, clip_batch=128, clip_lr=0.002, clip_logit_scale=50.0, clip_warmup=100,
                     clip_zoom_prob=0.5, clip_zoom_min_scale=0.4,
                     rpn_iters=140, rpn_batch=16,
                     clipself_iters=600, clipself_batch=16, clipself_lr=0.0002, clipself_grid=3,
                     transfer_iters=400, transfer_batch=8, transfer_lr=0.001, focal=0.5, bg_weight=0.2,
                     transfer_arch="FVIT", transfer_jobs=2),
}
# the test suite: every stage, tiny
PROFILES["tiny"] = dict(PROFILES["clipself"], num_train=48, num_val=40, num_test=12, clip_steps=20, clip_batch=16,
                        clip_warmup=0, vit_width=32, vit_layers=2, rpn_iters=4, rpn_batch=4, clipself_iters=3,
                        clipself_batch=4, transfer_iters=4, transfer_batch=4)

# (row label, output tag): the F-ViT transfer detectors
INITS = (("world CLIP ViT", "world_vit"), ("CLIPSelf student", "clipself"))


class CLIPSelfPipeline(Pipeline):
    profiles = PROFILES

    def __init__(self, output_dir: str, profile: str = "clipself", seed: int = 0, overrides: Dict = None,
                 python: str = sys.executable):
        super().__init__(output_dir, profile, seed, overrides, python)

    def clip_extra_args(self) -> List:
        p = self.p
        return ["--image-tower", p["clip_tower"], "--patch-size", p["vit_patch"], "--vision-width", p["vit_width"],
                "--vision-layers", p["vit_layers"], "--zoom-prob", p["clip_zoom_prob"], "--zoom-min-scale",
                p["clip_zoom_min_scale"]]

    def use_world(self, run_dir: str):
        """Take the world and the RPN of a finished RegionCLIP run (``make demo`` / ``make
        reproduce``: the RPN branch does not depend on the CLIP) instead of making them."""
        world, rpn = os.path.join(run_dir, "world"), os.path.join(run_dir, "rpn", "model_final.pth")
        for path in (os.path.join(world, "world.json"), rpn):
            if not os.path.isfile(path):
                raise RuntimeError(f"--world-from {run_dir}: {path} is missing: give the folder of a finished "
                                   "`make demo` run (output/synthetic_demo) or leave --world-from out")
        with open(os.path.join(world, "world.json")) as f:
            size = json.load(f)["image_size"]
        if size != self.p["image_size"]:
            raise RuntimeError(f"--world-from {run_dir}: its world has {size} px images but this profile "
                               f"{self.p['image_size']} px: use --set image_size={size}")
        self.world, self.rpn_weights = os.path.abspath(world), os.path.abspath(rpn)

    def clipself_args(self, out: str) -> List[str]:
        p = self.p
        return [str(a) for a in
                ["--config-file", "configs/synthetic/CLIPSelf_world.yaml", "--register",
                 f"world_train={self.ann('train')}:{os.path.join(self.world, 'train')}",
                 "DATASETS.TRAIN", "('world_train',)", "OUTPUT_DIR", out, "MODEL.CLIPSELF.MAX_GRID",
                 p["clipself_grid"], "SOLVER.MAX_ITER", p["clipself_iters"], "SOLVER.IMS_PER_BATCH",
                 p["clipself_batch"], "SOLVER.BASE_LR", p["clipself_lr"], "SOLVER.WARMUP_ITERS",
                 min(20, p["clipself_iters"] // 4)] + self.size_args() + self.model_args()]

    def clipself(self) -> str:
        out = os.path.join(self.out, "clipself")
        self.tool("train_net.py", self.clipself_args(out), "clipself")
        return os.path.join(out, "model_final.pth")

    def region_accuracy(self, student_weights: str, split: str = "test") -> Dict:
        """Classification of the ``split``'s ground-truth boxes among all classes: the dense map
        RoI-pooled over the box (world ViT, then the CLIPSelf student) and the box's crop
        embedded by the frozen ViT. Also the mean cosine between the two embeddings."""
        import torch

        from detectron2.data import DatasetCatalog, MetadataCatalog
        from detectron2.modeling import build_model

        from regionclip_d2 import get_regionclip_cfg
        from regionclip_d2.checkpoint import RegionCLIPCheckpointer
        from regionclip_d2.data.datasets import register_coco_format
        from regionclip_d2.data.mappers import build_test_mapper
        from regionclip_d2.evaluation.region_classification import dense_region_accuracy

        self._quiet_logs()
        name = f"world_{split}_{os.getpid()}_{id(self)}"
        register_coco_format(name, self.ann(split), os.path.join(self.world, split))
        dicts = DatasetCatalog.get(name)
        names = MetadataCatalog.get(name).thing_classes
        _, novel, all_names = self.names()
        if list(names) != list(all_names):
            raise RuntimeError(f"the {split} split's classes {names} are not the world's {all_names}")
        text = torch.load(os.path.join(self.out, "classes", "all.pth"), map_location="cpu", weights_only=True)
        args = self.clipself_args(os.path.join(self.out, "regions"))
        # GT region mode: the test mapper keeps the (resized) ground-truth boxes
        opts = args[args.index("OUTPUT_DIR"):] + ["MODEL.DEVICE", "cpu", "MODEL.CLIP.CROP_REGION_TYPE", "GT"]
        cfg = get_regionclip_cfg("configs/synthetic/CLIPSelf_world.yaml", opts)
        results = {}
        for label, weights in (("world CLIP ViT", ""), ("CLIPSelf student", student_weights)):
            torch.manual_seed(0)
            model = build_model(cfg)
            if weights:
                RegionCLIPCheckpointer(model).load(weights)
            r = dense_region_accuracy(model, dicts, build_test_mapper(cfg), text, names, novel, progress=False)
            results[label] = {"dense": r["dense"], "crop": r["crop"]}
        return results

    def convert_student(self, student_weights: str) -> str:
        """The CLIPSelf student's ViT under the F-ViT detector's key names."""
        out = os.path.join(self.out, "clipself", "fvit_vit.pth")
        self.tool("convert_weights.py", ["--format", "clipself", "--input", student_weights, "--output", out,
                                         "--config-file", "configs/synthetic/FViT_world_ovd.yaml", "--opts"]
                  + [str(a) for a in self.model_args() + self.class_args()], "convert")
        return out

    def transfer_rows(self):
        return [(label, tag, self.p["transfer_arch"]) for label, tag in INITS]

    @staticmethod
    def transfer_weights(tag: str, student_vit: str) -> str:
        return student_vit if tag == "clipself" else ""

    def finished_clip(self) -> Dict:
        """With ``--resume``: the metrics of the world CLIP already in the output folder, checked
        to be the profile's (steps, learning rate, zoom); None when there is none."""
        path = os.path.join(self.clip_dir, "world_clip_metrics.json")
        if not (os.path.isfile(path) and os.path.isfile(self.clip_weights)):
            return None
        with open(path) as f:
            metrics = json.load(f)
        p = self.p
        for key, want in (("steps", p["clip_steps"]), ("lr", p["clip_lr"]), ("zoom_prob", p["clip_zoom_prob"])):
            if metrics.get(key) != want:
                raise RuntimeError(f"--resume: the world CLIP in {self.clip_dir} was trained with {key}="
                                   f"{metrics.get(key)}, the profile asks for {want}: use another --output")
        return metrics

    def run(self, world_from: str = "", resume: bool = False) -> Dict:
        """All stages; ``resume`` reuses the world, world CLIP, class embeddings and RPN already in
        the output folder (stages 5-8, which the CLIPSelf and transfer settings change, always run)."""
        t0 = time.time()

        def have(*paths):
            return resume and all(os.path.isfile(x) for x in paths)

        if world_from:
            self.use_world(world_from)
        elif have(os.path.join(self.world, "world.json")):
            print(f"1/8 world: reusing {self.world}", flush=True)
        else:
            self._stage("1/8 world: generating images, boxes and captions", self.make_world)
        clip_metrics = self.finished_clip() if resume else None
        clip_reused = clip_metrics is not None
        if not clip_reused:
            clip_metrics = self._stage("2/8 clip: training the world's CLIP with a ViT image tower", self.train_clip)
        else:
            print(f"2/8 clip: reusing {self.clip_dir}", flush=True)
        # the RPN trains while the class names are embedded
        rpn = None if world_from or have(self.rpn_weights) else self.start_rpn()
        classes = [os.path.join(self.out, "classes", f"{split}.pth") for split in ("base", "all")]
        if clip_reused and have(*classes):
            print("3/8 classes: reusing " + os.path.dirname(classes[0]), flush=True)
        else:
            self._stage("3/8 classes: embedding base and all class names", self.class_embeddings)
        if rpn is not None:
            self._stage("4/8 rpn: training the RPN on base boxes (started before stage 3)", lambda: self.train_rpn(rpn))
        student = self._stage("5/8 clipself: self-distillation of the ViT's dense map", self.clipself)
        regions = self._stage("6/8 regions: classification of ground-truth boxes",
                              lambda: self.region_accuracy(student))
        vit = self._stage("7a/8 convert: the student's ViT for the detector", lambda: self.convert_student(student))
        tr = self._stage("7b/8 transfer: F-ViT detectors on base classes", lambda: self.transfer(vit))
        losses = self.clipself_losses()
        with open(os.path.join(self.world, "world.json")) as f:
            world = json.load(f)
        results = {"profile": self.p, "seed": self.seed, "world": self.world, "world_params": world["params"],
                   "world_train_images": world["counts"]["train"]["images"], "world_clip": clip_metrics,
                   "clipself_loss": {"first": losses[0], "last": losses[-1]} if losses else {},
                   "regions": regions, "transfer": tr, "timings_s": self.timings}
        results["total_s"] = time.time() - t0
        self._stage("8/8 report: table and plot", lambda: self.report(results))
        with open(os.path.join(self.out, "results.json"), "w") as f:
            json.dump(results, f, indent=1, default=str)
        return results

    def clipself_losses(self) -> List[float]:
        """The logged CLIPSelf losses of the last training run (detectron2 appends each run's
        metrics to the same metrics.json: the last run starts where the iteration goes down)."""
        with open(os.path.join(self.out, "clipself", "metrics.json")) as f:
            rows = [json.loads(line) for line in f if '"total_loss"' in line]  # total_loss = loss_clipself
        start = 0
        for i in range(1, len(rows)):
            if rows[i]["iteration"] <= rows[i - 1]["iteration"]:
                start = i
        return [r["total_loss"] for r in rows[start:]]

    def rerun_regions(self) -> Dict:
        """Stage 6 again on a finished run (its world, CLIP, classes and CLIPSelf student);
        updates results.json and results.md."""
        path = os.path.join(self.out, "results.json")
        student = os.path.join(self.out, "clipself", "model_final.pth")
        for f in (path, student):
            if not os.path.isfile(f):
                raise RuntimeError(f"--regions-only: {f} is missing: run tools/synthetic_clipself.py --output "
                                   f"{self.out} first")
        with open(path) as f:
            results = json.load(f)
        self.world = results["world"]
        results["regions"] = self._stage("6/8 regions: classification of ground-truth boxes",
                                         lambda: self.region_accuracy(student))
        losses = self.clipself_losses()
        results["clipself_loss"] = {"first": losses[0], "last": losses[-1]} if losses else {}
        self.report(results)
        with open(path, "w") as f:
            json.dump(results, f, indent=1, default=str)
        return results

    def report(self, results: Dict):
        md = clipself_report(results, self.p, self.seed)
        with open(os.path.join(self.out, "results.md"), "w") as f:
            f.write("\n".join(md) + "\n")
        plot_clipself(results, os.path.join(self.out, "results.png"))
        print("\n".join(md))


def clipself_report(results: Dict, p: Dict, seed: int) -> List[str]:
    reg, tr, clip = results["regions"], results["transfer"], results["world_clip"]
    n_all = len(results["world_params"]["categories"])
    n_novel = len(results["world_params"]["novel"])
    rows = []
    for label in ("world CLIP ViT", "CLIPSelf student"):
        d, t = reg[label]["dense"], tr[label]
        rows.append(f"| {label} | {d['acc-novel']:.1f} | {d['acc-base']:.1f} | {d['acc-all']:.1f} | "
                    f"{t['AP50-novel']:.1f} | {t['AP50-base']:.1f} | {t['AP50-all']:.1f} |")
    crop = reg["world CLIP ViT"]["crop"]
    rows.append(f"| crops of the boxes, frozen ViT (reference) | {crop['acc-novel']:.1f} | {crop['acc-base']:.1f} | "
                f"{crop['acc-all']:.1f} | - | - | - |")
    z = clip.get("zero_shot", {})
    loss = results.get("clipself_loss", {})
    w = results["world_params"]
    return ["# CLIPSelf in the synthetic world", "",
            f"World ({results['world']}): {results['world_train_images']} training images of {w['image_size']} px, "
            f"objects of {w['min_size']}-{w['max_size']} px rotated by up to {w['max_rotation']:g} degrees, {n_all} "
            f"shapes ({n_novel} novel without training boxes: {', '.join(w['novel'])}); seed {seed}. "
            f"World CLIP: ViT image tower "
            f"(patch {p['vit_patch']}, width {p['vit_width']}, {p['vit_layers']} blocks), {p['clip_steps']} steps; "
            f"whole-image shape accuracy {100 * z.get('accuracy', float('nan')):.1f}% on {z.get('n', 0)} held-out "
            f"single-object images. Total time {results['total_s'] / 60:.1f} min.", "",
            "| ViT | region acc. (dense map) novel | base | all | F-ViT transfer AP50 novel | base | all |",
            "|---|---|---|---|---|---|---|"] + rows + [
            "", f"Region accuracy: top-1 of classifying the test split's {crop['boxes']} ground-truth boxes among all "
            f"{n_all} shapes (mean of per-class accuracy, chance {100 / n_all:.1f}%) by the cosine of the box's "
            "embedding with the class names' text embeddings; dense map: RoIAlign of the ViT's dense map (the last "
            "block's value path) over the box, averaged; crops: the box cropped, resized to the ViT's input and "
            f"embedded as an image (what CLIPSelf distils). CLIPSelf: {p['clipself_iters']} iterations of "
            f"{p['clipself_batch']} images, grids of 1..{p['clipself_grid']} x 1..{p['clipself_grid']} cells, loss "
            f"1 - cos {loss.get('first', float('nan')):.3f} (first logged) -> {loss.get('last', float('nan')):.3f}; on "
            "the test boxes, the mean cosine of the dense-map and crop embeddings went from "
            f"{reg['world CLIP ViT']['dense'].get('cosine_to_crop', float('nan')):.3f} to "
            f"{reg['CLIPSelf student']['dense'].get('cosine_to_crop', float('nan')):.3f}. Transfer: "
            f"the frozen ViT with a simple feature pyramid, box head and text-embedding classifier, trained "
            f"{p['transfer_iters']} iterations on base boxes with the world's RPN branch, evaluated on all "
            f"{n_all} classes.", "",
            "Stage times (s): " + ", ".join(f"{k.split(':')[0]} {v:.0f}" for k, v in results["timings_s"].items())]


def plot_clipself(results: Dict, path: str):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
        splits = ["novel", "base", "all"]
        reg, tr = results["regions"], results["transfer"]
        bars = (("dense map, world CLIP ViT", [reg["world CLIP ViT"]["dense"][f"acc-{s}"] for s in splits]),
                ("dense map, CLIPSelf", [reg["CLIPSelf student"]["dense"][f"acc-{s}"] for s in splits]),
                ("crops (reference)", [reg["world CLIP ViT"]["crop"][f"acc-{s}"] for s in splits]))
        for i, (label, vals) in enumerate(bars):
            axes[0].bar([j + 0.27 * i for j in range(3)], vals, width=0.25, label=label)
        axes[0].set_title("region accuracy on GT boxes (%)")
        for i, label in enumerate(("world CLIP ViT", "CLIPSelf student")):
            axes[1].bar([j + 0.38 * i for j in range(3)], [tr[label][f"AP50-{s}"] for s in splits], width=0.36,
                        label=label)
        axes[1].set_title("F-ViT transfer AP50")
        for ax, off in ((axes[0], 0.27), (axes[1], 0.19)):
            ax.set_xticks([j + off for j in range(3)], splits)
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
    except Exception as e:  # the table is the result; the plot is a convenience
        print(f"could not draw the plot: {e}", file=sys.stderr)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output", default="output/synthetic_clipself", help="output folder (default: %(default)s)")
    ap.add_argument("--profile", default="clipself", choices=list(PROFILES),
                    help="sizes: clipself (about 40 min on 2 cores) or tiny (a smoke test)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--world-from", default="", metavar="RUN",
                    help="use the world and RPN of a finished `make demo` run (e.g. output/synthetic_demo) instead "
                         "of generating them")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help=f"override profile values (keys: {', '.join(PROFILES['clipself'])})")
    ap.add_argument("--resume", action="store_true",
                    help="reuse the world, world CLIP, class embeddings and RPN already in --output (the CLIP is "
                         "checked against the profile); CLIPSelf, the region measures and transfer run again")
    ap.add_argument("--regions-only", action="store_true",
                    help="only measure the region classification again on the finished run in --output")
    args = ap.parse_args(argv)
    try:
        overrides = parse_overrides(args.set, args.profile, PROFILES)
    except ValueError as e:
        ap.error(f"--set {e}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        pipe = CLIPSelfPipeline(args.output, args.profile, args.seed, overrides)
        pipe.rerun_regions() if args.regions_only else pipe.run(args.world_from, args.resume)
    except RuntimeError as e:
        print(f"synthetic_clipself: {e}", file=sys.stderr)
        return 1
    print(f"\ntable: {os.path.join(args.output, 'results.md')}\nplot: {os.path.join(args.output, 'results.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
