"""The paper's whole pipeline in the synthetic world, through the public tools only.

Stages (each a command-line tool run as a subprocess, as a user would run it):
  1. world       tools/make_synthetic_ovd.py      images, COCO boxes (no novel boxes in train), captions
  2. clip        tools/train_world_clip.py        the world's CLIP, trained from scratch on the captions
  3. concepts    tools/extract_concepts.py        the concept pool of the training captions + embeddings
  4. classes     tools/embed_vocabulary.py        base (training) and all (test) class embeddings
  5. rpn         tools/train_net.py               the class-agnostic RPN on base boxes
  6. pretrain    tools/train_net.py               RegionCLIP region-text pretraining (teacher = world CLIP)
  7. zeroshot    region classification on GT boxes (world CLIP vs pretrained student) and
                 tools/train_net.py --eval-only  zero-shot detection with GT boxes
  8. transfer    tools/train_net.py               detectors on base classes, from the world CLIP and from
                                                  the pretrained student; novel/base/all AP50 on test
  9. demo        tools/demo.py                    DefaultPredictor with a vocabulary including novel classes
 10. report      results.md, results.json, results.png
"""
import json
import logging
import os
import subprocess
import sys
import time
from typing import Dict, List

logger = logging.getLogger(__name__)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PROFILES = {
    # the demo: all stages in about 15 minutes on 2 CPU cores
    "demo": dict(num_train=2000, num_val=100, num_test=300, clip_steps=500, clip_batch=128, min_count=30,
                 rpn_iters=100, rpn_batch=16, pretrain_iters=150, pretrain_batch=16, transfer_iters=150,
                 transfer_batch=8, demo_images=4),
    # the test suite: every stage, tiny
    "tiny": dict(num_train=48, num_val=8, num_test=12, clip_steps=30, clip_batch=16, min_count=2,
                 rpn_iters=4, rpn_batch=4, pretrain_iters=3, pretrain_batch=4, transfer_iters=4,
                 transfer_batch=4, demo_images=2),
}


class Pipeline:
    def __init__(self, output_dir: str, profile: str = "demo", seed: int = 0, overrides: Dict = None,
                 python: str = sys.executable):
        if profile not in PROFILES:
            raise ValueError(f"unknown profile {profile!r}: use one of {list(PROFILES)}")
        self.p = dict(PROFILES[profile], **(overrides or {}))
        self.out = os.path.abspath(output_dir)
        self.seed = seed
        self.python = python
        self.timings = {}
        os.makedirs(self.out, exist_ok=True)
        self.world = os.path.join(self.out, "world")
        self.clip_dir = os.path.join(self.out, "world_clip")
        self.clip_cfg = os.path.join(self.clip_dir, "world_clip.json")
        self.clip_weights = os.path.join(self.clip_dir, "world_clip.pt")

    # ------------------------------------------------------------------ helpers
    def tool(self, name: str, args: List[str], stage: str, log_name: str = None):
        """Run ``tools/<name>`` with ``args``; its output goes to <out>/logs/<stage>.log."""
        os.makedirs(os.path.join(self.out, "logs"), exist_ok=True)
        log_path = os.path.join(self.out, "logs", (log_name or stage) + ".log")
        cmd = [self.python, os.path.join(ROOT, "tools", name)] + [str(a) for a in args]
        env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
        with open(log_path, "w") as log:
            log.write(" ".join(cmd) + "\n\n")
            log.flush()
            r = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
        if r.returncode != 0:
            with open(log_path) as f:
                tail = "".join(f.readlines()[-25:])
            raise RuntimeError(f"stage {stage!r} failed ({name} exited with {r.returncode}); log {log_path}:\n{tail}")
        return log_path

    def _stage(self, name, fn):
        t0 = time.time()
        print(f"[{time.strftime('%H:%M:%S')}] {name} ...", flush=True)
        result = fn()
        self.timings[name] = time.time() - t0
        print(f"[{time.strftime('%H:%M:%S')}] {name} done in {self.timings[name]:.0f} s", flush=True)
        return result

    def ann(self, split):
        return os.path.join(self.world, "annotations", f"instances_{split}.json")

    def register_args(self):
        return ["--register", f"world_train={self.ann('train')}:{os.path.join(self.world, 'train')}",
                "--categories", "world_train=base",
                "--register", f"world_test={self.ann('test')}:{os.path.join(self.world, 'test')}"]

    def model_args(self):
        return ["MODEL.CLIP.OPENCLIP_MODEL_CONFIG", self.clip_cfg, "MODEL.CLIP.CLIP_WEIGHTS", self.clip_weights,
                "SEED", self.seed]

    def names(self):
        with open(os.path.join(self.world, "world.json")) as f:
            w = json.load(f)
        cats = w["categories"]
        return ([c["name"] for c in cats if c["split"] == "base"], [c["name"] for c in cats if c["split"] == "novel"],
                [c["name"] for c in cats])

    # ------------------------------------------------------------------ stages
    def make_world(self):
        p = self.p
        self.tool("make_synthetic_ovd.py", ["--output-dir", self.world, "--num-train", p["num_train"], "--num-val",
                                            p["num_val"], "--num-test", p["num_test"], "--seed", self.seed,
                                            "--no-progress"], "world")

    def train_clip(self):
        p = self.p
        self.tool("train_world_clip.py", ["--world-dir", self.world, "--output-dir", self.clip_dir, "--steps",
                                          p["clip_steps"], "--batch-size", p["clip_batch"], "--seed", self.seed,
                                          "--no-progress"], "clip")
        with open(os.path.join(self.clip_dir, "world_clip_metrics.json")) as f:
            return json.load(f)

    def concepts(self):
        out = os.path.join(self.out, "concepts")
        self.tool("extract_concepts.py", ["--captions", os.path.join(self.world, "annotations", "captions_train.jsonl"),
                                          "--output-dir", out, "--min-count", self.p["min_count"], "--model-config",
                                          self.clip_cfg, "--clip-weights", self.clip_weights, "--templates", "single",
                                          "--quiet"], "concepts")
        with open(os.path.join(out, "concepts.txt")) as f:
            return [line.split("\t")[0] for line in f if line.strip()]

    def class_embeddings(self):
        base, _, all_names = self.names()
        out = os.path.join(self.out, "classes")
        for split, names in (("base", base), ("all", all_names)):
            self.tool("embed_vocabulary.py", ["--vocabulary", ",".join(names), "--model-config", self.clip_cfg,
                                              "--clip-weights", self.clip_weights, "--templates", "single",
                                              "--output", os.path.join(out, f"{split}.pth")], "classes",
                      log_name=f"classes_{split}")

    def train_rpn(self):
        p = self.p
        out = os.path.join(self.out, "rpn")
        self.tool("train_net.py", ["--config-file", "configs/synthetic/rpn_R_18_FPN_world.yaml"] + self.register_args()
                  + ["DATASETS.TRAIN", "('world_train',)", "OUTPUT_DIR", out, "SOLVER.MAX_ITER", p["rpn_iters"],
                     "SOLVER.IMS_PER_BATCH", p["rpn_batch"], "SOLVER.STEPS", f"({int(p['rpn_iters'] * 0.8)},)",
                     "SOLVER.WARMUP_ITERS", min(30, p["rpn_iters"] // 4), "SEED", self.seed], "rpn")
        return os.path.join(out, "model_final.pth")

    def pretrain(self, rpn_weights):
        p = self.p
        out = os.path.join(self.out, "pretrain")
        self.tool("train_net.py", ["--config-file", "configs/synthetic/pretrain_world.yaml", "--register-captions",
                                   f"world_captions_train={os.path.join(self.world, 'annotations', 'captions_train.jsonl')}"
                                   f":{os.path.join(self.world, 'train')}"]
                  + ["OUTPUT_DIR", out, "MODEL.CLIP.CONCEPT_POOL_EMB",
                     os.path.join(self.out, "concepts", "concept_embeddings.pth"), "MODEL.CLIP.BB_RPN_WEIGHTS", rpn_weights,
                     "SOLVER.MAX_ITER", p["pretrain_iters"], "SOLVER.IMS_PER_BATCH", p["pretrain_batch"],
                     "SOLVER.STEPS", f"({int(p['pretrain_iters'] * 0.8)},)",
                     "SOLVER.WARMUP_ITERS", min(20, p["pretrain_iters"] // 4)] + self.model_args(), "pretrain")
        return os.path.join(out, "model_final.pth")

    def zero_shot(self, student_weights):
        """Region classification on GT boxes of the test split: world CLIP vs student."""
        import torch
        from detectron2.data import DatasetCatalog, MetadataCatalog
        from detectron2.modeling import build_model

        from .. import get_regionclip_cfg
        from ..checkpoint import RegionCLIPCheckpointer
        from ..data.datasets import register_coco_format
        from ..data.mappers import build_test_mapper
        from ..evaluation.region_classification import region_classification_accuracy

        for name in ("fvcore", "detectron2", "d2", "regionclip_d2"):  # keep the console to the progress lines
            logging.getLogger(name).setLevel(logging.ERROR)
        register_coco_format("world_test", self.ann("test"), os.path.join(self.world, "test"))
        dicts = DatasetCatalog.get("world_test")
        names = MetadataCatalog.get("world_test").thing_classes
        _, novel, _ = self.names()
        results = {}
        for label, weights in (("world CLIP", ""), ("RegionCLIP student", student_weights)):
            cfg = get_regionclip_cfg("configs/synthetic/CLIP_fast_rcnn_world_zsinf_GT.yaml",
                                     [str(v) for v in self.model_args()] + ["MODEL.DEVICE", "cpu",
                                                                            "MODEL.CLIP.VOCABULARY", ""])
            torch.manual_seed(0)
            model = build_model(cfg)
            if weights:
                RegionCLIPCheckpointer(model).load(weights)
            results[label] = region_classification_accuracy(model, dicts, build_test_mapper(cfg), names, novel,
                                                            progress=False)
            # the same through the public evaluation tool: zero-shot detection AP50 with GT boxes
            out = os.path.join(self.out, "zeroshot", label.split()[0].lower())
            self.tool("train_net.py", ["--eval-only", "--config-file", "configs/synthetic/CLIP_fast_rcnn_world_zsinf_GT.yaml",
                                       "--register", f"world_test={self.ann('test')}:{os.path.join(self.world, 'test')}",
                                       "DATASETS.TEST", "('world_test',)", "OUTPUT_DIR", out, "MODEL.WEIGHTS", weights,
                                       "MODEL.CLIP.VOCABULARY", ""] + self.model_args(), "zeroshot",
                      log_name=f"zeroshot_{label.split()[0].lower()}")
            with open(os.path.join(out, "inference", "world_test", "results.json")) as f:
                results[label]["gt_boxes_bbox"] = json.load(f)["bbox"]
        return results

    def transfer(self, rpn_weights, student_weights):
        p = self.p
        results = {}
        for label, weights in (("world CLIP", ""), ("RegionCLIP student", student_weights)):
            out = os.path.join(self.out, "transfer", label.split()[0].lower())
            self.tool("train_net.py", ["--config-file", "configs/synthetic/CLIP_fast_rcnn_world_ovd.yaml"]
                      + self.register_args()
                      + ["DATASETS.TRAIN", "('world_train',)", "DATASETS.TEST", "('world_test',)", "OUTPUT_DIR", out,
                         "MODEL.WEIGHTS", weights, "MODEL.CLIP.BB_RPN_WEIGHTS", rpn_weights,
                         "MODEL.CLIP.TEXT_EMB_PATH", os.path.join(self.out, "classes", "base.pth"),
                         "MODEL.CLIP.OPENSET_TEST_TEXT_EMB_PATH", os.path.join(self.out, "classes", "all.pth"),
                         "SOLVER.MAX_ITER", p["transfer_iters"], "SOLVER.IMS_PER_BATCH", p["transfer_batch"],
                         "SOLVER.STEPS", f"({int(p['transfer_iters'] * 0.8)},)",
                         "SOLVER.WARMUP_ITERS", min(30, p["transfer_iters"] // 4)] + self.model_args(), "transfer",
                      log_name=f"transfer_{label.split()[0].lower()}")
            with open(os.path.join(out, "inference", "world_test", "results.json")) as f:
                results[label] = json.load(f)["bbox"]
            results[label]["weights"] = os.path.join(out, "model_final.pth")
        return results

    def demo(self, detector_weights, rpn_weights):
        _, novel, all_names = self.names()
        test_dir = os.path.join(self.world, "test")
        images = sorted(os.listdir(test_dir))[: self.p["demo_images"]]
        out = os.path.join(self.out, "demo")
        self.tool("demo.py", ["--config-file", "configs/synthetic/CLIP_fast_rcnn_world_ovd.yaml", "--input"]
                  + [os.path.join(test_dir, i) for i in images]
                  + ["--output", out, "--vocabulary", "custom", "--custom-vocabulary", ",".join(all_names),
                     "--confidence-threshold", "0.3", "--cpu", "--opts", "MODEL.WEIGHTS", detector_weights,
                     "MODEL.CLIP.BB_RPN_WEIGHTS", rpn_weights] + self.model_args(), "demo")
        return out

    # ------------------------------------------------------------------ all
    def run(self) -> Dict:
        t0 = time.time()
        self._stage("1/10 world: generating images, boxes and captions", self.make_world)
        clip_metrics = self._stage("2/10 clip: training the world's CLIP from scratch", self.train_clip)
        concepts = self._stage("3/10 concepts: extracting the concept pool", self.concepts)
        self._stage("4/10 classes: embedding base and all class names", self.class_embeddings)
        rpn = self._stage("5/10 rpn: training the RPN on base boxes", self.train_rpn)
        student = self._stage("6/10 pretrain: region-text pretraining", lambda: self.pretrain(rpn))
        zs = self._stage("7/10 zero-shot: region classification on GT boxes", lambda: self.zero_shot(student))
        tr = self._stage("8/10 transfer: detectors on base classes", lambda: self.transfer(rpn, student))
        demo_dir = self._stage("9/10 demo: DefaultPredictor with novel classes",
                               lambda: self.demo(tr["RegionCLIP student"]["weights"], rpn))
        results = {"profile": self.p, "seed": self.seed, "world_clip": clip_metrics, "concepts": len(concepts),
                   "zero_shot": zs, "transfer": tr, "demo_dir": demo_dir, "timings_s": self.timings,
                   "total_s": time.time() - t0}
        self._stage("10/10 report: table and plot", lambda: self.report(results))
        results["total_s"] = time.time() - t0
        with open(os.path.join(self.out, "results.json"), "w") as f:
            json.dump(results, f, indent=1, default=str)
        return results

    def report(self, results):
        zs, tr = results["zero_shot"], results["transfer"]
        rows = []
        for label in ("world CLIP", "RegionCLIP student"):
            z, t = zs[label], tr[label]
            rows.append(f"| {label} | {z['acc-novel']:.1f} | {z['acc-base']:.1f} | {z['acc-all']:.1f} | "
                        f"{t['AP50-novel']:.1f} | {t['AP50-base']:.1f} | {t['AP50-all']:.1f} |")
        md = ["# RegionCLIP in the synthetic world", "",
              f"World: {self.p['num_train']} training images, 14 shapes (10 base, 4 novel with no training boxes); "
              f"seed {self.seed}. Total time {results['total_s'] / 60:.1f} min.", "",
              "| initialisation | zero-shot GT-box acc. novel | base | all | transfer AP50 novel | base | all |",
              "|---|---|---|---|---|---|---|"] + rows + [
              "", "Zero-shot: top-1 accuracy of classifying ground-truth boxes of the test split among all 14 "
              "classes (mean of per-class accuracy). Transfer: detectors trained on base-class boxes with the "
              "RPN branch, evaluated on all 14 classes (mean of per-class AP50).", "",
              f"World CLIP: held-out image-to-caption retrieval top-1 "
              f"{100 * results['world_clip'].get('retrieval_top1', float('nan')):.1f}% (chance "
              f"{100 * results['world_clip'].get('retrieval_chance', float('nan')):.1f}%); whole-image shape accuracy "
              f"{100 * results['world_clip'].get('zero_shot', {}).get('accuracy', float('nan')):.1f}% over 14 shapes "
              f"(novel {100 * results['world_clip'].get('zero_shot', {}).get('accuracy_novel', float('nan')):.1f}%).",
              f"Concept pool: {results['concepts']} concepts.", "",
              "Stage times (s): " + ", ".join(f"{k.split(':')[0]} {v:.0f}" for k, v in self.timings.items()), "",
              f"Visualised detections: {results['demo_dir']}"]
        with open(os.path.join(self.out, "results.md"), "w") as f:
            f.write("\n".join(md) + "\n")
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt

            fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
            for ax, (title, key_fmt, data) in zip(axes, (("zero-shot GT-box accuracy (%)", "acc-{}", zs),
                                                         ("transfer AP50", "AP50-{}", tr))):
                splits = ["novel", "base", "all"]
                for i, label in enumerate(("world CLIP", "RegionCLIP student")):
                    vals = [data[label][key_fmt.format(s)] for s in splits]
                    ax.bar([j + 0.38 * i for j in range(3)], vals, width=0.36, label=label)
                ax.set_xticks([j + 0.19 for j in range(3)], splits)
                ax.set_title(title)
            axes[0].legend(fontsize=8)
            fig.tight_layout()
            fig.savefig(os.path.join(self.out, "results.png"), dpi=100)
            plt.close(fig)
        except Exception as e:  # the table is the result; the plot is a convenience
            logger.warning("could not draw the plot: %s", e)
        print("\n".join(md))
