"""The paper's whole pipeline in the synthetic world, through the public tools only (a driver of
the repository's tools/, used by tools/synthetic_demo.py and tools/synthetic_reproduce.py; not
part of the installed library).

Stages (each a command-line tool run as a subprocess, as a user would run it):
  1. world       tools/make_synthetic_ovd.py      images, COCO boxes (no novel boxes in train), captions
  2. clip        tools/train_world_clip.py        the world's CLIP, trained from scratch on the captions
  3. concepts    tools/extract_concepts.py        the concept pool of the training captions + embeddings
  4. classes     tools/embed_vocabulary.py        base (training) and all (test) class embeddings
  5. rpn         tools/train_net.py               the class-agnostic RPN on base boxes
  6. teacher     what the teacher knows about regions: its pseudo labels on RPN regions that
                 overlap a ground-truth box (the knowledge region-text pretraining distils)
  7. pretrain    tools/train_net.py               RegionCLIP region-text pretraining (teacher = world CLIP)
  8. zeroshot    region classification on GT boxes (world CLIP vs pretrained student) and
                 tools/train_net.py --eval-only  zero-shot detection with GT boxes
  9. transfer    tools/train_net.py               detectors on base classes (C4 from the world CLIP and
                                                  from the student; FPN by default, C4 rows too
                                                  with c4_rows=1);
                                                  novel/base/all AP50 on test
 10. demo        tools/demo.py                    DefaultPredictor with a vocabulary including novel classes
 11. report      results.md, results.json, results.png

``Pipeline.ablation`` reruns stages 7-9 (or 9 alone) with changed settings on the artifacts of
a finished run (same world, CLIP, RPN, concepts), for the paper's ablations.
"""
import json
import logging
import os
import subprocess
import sys
import time
from typing import Dict, List

logger = logging.getLogger(__name__)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository (this file is in tools/)

WORLD_KEYS = ("image_size", "max_objects", "min_size", "max_size", "single_min_size", "single_max_size",
              "single_object_prob", "colour_prob", "max_rotation", "categories", "novel")

PROFILES = {
    # the demo: all stages in about 15 minutes on 2 CPU cores (fp32, AVX2; 14.5 min measured on seed 0, 14-18
    # over earlier runs as the machine's speed varies)
    "demo": dict(num_train=3000, num_val=900, num_test=300, image_size=96, max_objects=3, min_size=30,
                 max_size=54, single_min_size=30, single_max_size=54, single_object_prob=0.6, colour_prob=0.0,
                 max_rotation=180.0,
                 categories="circle,square,triangle,star,cross,ring,arrow,diamond,heart,moon,bolt,frame",
                 novel="heart,moon,bolt,frame",
                 clip_steps=640, clip_batch=128, clip_lr=0.004, clip_logit_scale=50.0, clip_warmup=100,
                 min_count=30,
                 rpn_iters=140, rpn_batch=16,
                 pretrain_iters=130, pretrain_batch=16, pretrain_lr=0.0005, pretrain_optimizer="ADAMW",
                 pretrain_regions="RPN",
                 pretrain_loss_weights="1,1,1", teacher_clip_seed_offset=0,
                 transfer_iters=400, transfer_batch=8, transfer_lr=0.001, focal=0.5, bg_weight=0.2,
                 transfer_arch="FPN", c4_rows=0, transfer_jobs=2,
                 ensemble=0, ensemble_alpha=0.35, ensemble_beta=0.65,  # ensemble=1: "+ ensemble" rows, README
                 demo_images=4, demo_threshold=0.5),
}

# the test suite: every stage, tiny
PROFILES["tiny"] = dict(PROFILES["demo"], num_train=48, num_val=40, num_test=12, clip_steps=30, clip_batch=16,
                        clip_warmup=0, min_count=2, rpn_iters=4, rpn_batch=4, pretrain_iters=3, pretrain_batch=4,
                        transfer_iters=4, transfer_batch=4, demo_images=2, c4_rows=1, ensemble=1)

# the transfer detectors: (row label, output tag, initialisation); the main rows use the
# profile's transfer_arch, and with c4_rows (when that is FPN) the C4 design adds its rows
INITS = (("world CLIP", "world"), ("RegionCLIP student", "regionclip"))
TRANSFER_CONFIGS = {"C4": "configs/synthetic/CLIP_fast_rcnn_world_ovd.yaml",
                    "FPN": "configs/synthetic/CLIP_fast_rcnn_world_ovd_FPN.yaml",
                    "FVIT": "configs/synthetic/FViT_world_ovd.yaml"}  # FVIT: tools/synthetic_clipself.py


def parse_overrides(pairs: List[str], profile: str = "demo", profiles: Dict = None) -> Dict:
    """``["clip_steps=800", "pretrain_regions=GRID"]`` -> a dict typed like the profile's values
    (``profiles``: where ``profile`` is defined, default this pipeline's)."""
    defaults = (profiles or PROFILES)[profile]
    out = {}
    for kv in pairs:
        k, sep, v = kv.partition("=")
        if not sep or k not in defaults:
            raise ValueError(f"{kv!r}: expected KEY=VALUE with KEY in {list(defaults)}")
        kind = type(defaults[k])
        try:
            out[k] = kind(v)
        except ValueError:
            raise ValueError(f"{kv!r}: {k} must be of type {kind.__name__}") from None
    return out


class Pipeline:
    profiles = PROFILES  # the profiles this pipeline runs (a subclass brings its own)

    def __init__(self, output_dir: str, profile: str = "demo", seed: int = 0, overrides: Dict = None,
                 python: str = sys.executable):
        if profile not in self.profiles:
            raise ValueError(f"unknown profile {profile!r}: use one of {list(self.profiles)}")
        self.p = dict(self.profiles[profile], **(overrides or {}))
        self.out = os.path.abspath(output_dir)
        self.seed = seed
        self.python = python
        self.timings = {}
        os.makedirs(self.out, exist_ok=True)
        self.world = os.path.join(self.out, "world")
        self.clip_dir = os.path.join(self.out, "world_clip")
        self.clip_cfg = os.path.join(self.clip_dir, "world_clip.json")
        self.clip_weights = os.path.join(self.clip_dir, "world_clip.pt")
        self.rpn_weights = os.path.join(self.out, "rpn", "model_final.pth")

    # ------------------------------------------------------------------ helpers
    def tool(self, name: str, args: List[str], stage: str, log_name: str = None):
        """Run ``tools/<name>`` with ``args``; its output goes to <out>/logs/<stage>.log."""
        return self.wait_tools([self.start_tool(name, args, stage, log_name)])[0]

    def start_tool(self, name: str, args: List[str], stage: str, log_name: str = None, threads: int = 0):
        """Start ``tools/<name>`` without waiting (``threads``: its torch/OpenMP threads; 0 = the
        default); returns a handle for :meth:`wait_tools`."""
        os.makedirs(os.path.join(self.out, "logs"), exist_ok=True)
        log_path = os.path.join(self.out, "logs", (log_name or stage) + ".log")
        cmd = [self.python, os.path.join(ROOT, "tools", name)] + [str(a) for a in args]
        env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
        if threads:
            env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        log = open(log_path, "w")
        log.write(" ".join(cmd) + "\n\n")
        log.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
        return proc, log, log_path, name, stage

    @staticmethod
    def wait_tools(handles) -> List[str]:
        """Wait for every started tool; the first that failed raises with its log's tail (the
        others are still waited for). Returns the log paths."""
        failed = None
        for proc, log, log_path, name, stage in handles:
            code = proc.wait()
            log.close()
            if code != 0 and failed is None:
                with open(log_path) as f:
                    tail = "".join(f.readlines()[-25:])
                failed = RuntimeError(f"stage {stage!r} failed ({name} exited with {code}); log {log_path}:\n{tail}")
        if failed is not None:
            raise failed
        return [h[2] for h in handles]

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

    def size_args(self):
        """Input sizes and pooled grids for the world's image size (res4 is 1/16 of it; res5
        halves that to the attention pool's native grid)."""
        s = self.p["image_size"]
        return ["INPUT.MIN_SIZE_TRAIN", f"({s},)", "INPUT.MAX_SIZE_TRAIN", s, "INPUT.MIN_SIZE_TEST", s,
                "INPUT.MAX_SIZE_TEST", s]

    def pool_args(self):
        g = self.p["image_size"] // 16
        return ["MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION", g, "MODEL.CLIP.TEACHER_POOLER_RESOLUTION", g]

    def names(self):
        with open(os.path.join(self.world, "world.json")) as f:
            w = json.load(f)
        cats = w["categories"]
        return ([c["name"] for c in cats if c["split"] == "base"], [c["name"] for c in cats if c["split"] == "novel"],
                [c["name"] for c in cats])

    def class_args(self, test_vocab: bool = True):
        base, _, all_names = self.names()
        if not test_vocab:
            return ["MODEL.ROI_HEADS.NUM_CLASSES", len(all_names)]
        return ["MODEL.ROI_HEADS.NUM_CLASSES", len(base), "MODEL.CLIP.OPENSET_TEST_NUM_CLASSES", len(all_names)]

    # ------------------------------------------------------------------ stages
    def make_world(self):
        p = self.p
        args = ["--output-dir", self.world, "--num-train", p["num_train"], "--num-val", p["num_val"],
                "--num-test", p["num_test"], "--seed", self.seed, "--no-progress"]
        for k in WORLD_KEYS:
            args += ["--" + k.replace("_", "-"), p[k]]
        self.tool("make_synthetic_ovd.py", args, "world")

    def train_clip(self, out_dir: str = None, seed: int = None):
        """Train the world's CLIP (or, with ``out_dir`` and ``seed``, another one by the same
        recipe); returns its metrics."""
        p = self.p
        out_dir = out_dir or self.clip_dir
        self.tool("train_world_clip.py", ["--world-dir", self.world, "--output-dir", out_dir, "--steps",
                                          p["clip_steps"], "--batch-size", p["clip_batch"], "--lr", p["clip_lr"],
                                          "--seed", self.seed if seed is None else seed, "--no-progress"]
                  + (["--init-logit-scale", p["clip_logit_scale"]] if p["clip_logit_scale"] > 0 else [])
                  + (["--warmup", p["clip_warmup"]] if p["clip_warmup"] > 0 else []) + self.clip_extra_args(),
                  "clip" if seed is None else "teacher_clip")
        with open(os.path.join(out_dir, "world_clip_metrics.json")) as f:
            return json.load(f)

    def clip_extra_args(self) -> List:
        """Further options of tools/train_world_clip.py (the image tower, augmentation; default none: its ResNet)."""
        return []

    def teacher_dir(self) -> str:
        return os.path.join(self.out, "teacher_clip")

    def train_teacher_clip(self):
        """With ``teacher_clip_seed_offset`` N > 0: a second world CLIP (same recipe, seed + N)
        that teaches in pretraining instead of the student's own initialisation (the paper's
        teacher/student ablation), and the concept pool embedded by its text tower."""
        out = self.teacher_dir()
        metrics = self.train_clip(out, self.seed + self.p["teacher_clip_seed_offset"])
        names = os.path.join(out, "concept_names.txt")
        with open(os.path.join(self.out, "concepts", "concepts.txt")) as f, open(names, "w") as g:
            g.writelines(line.split("\t")[0] + "\n" for line in f if line.strip())
        self.tool("embed_vocabulary.py", ["--vocabulary", names, "--model-config", os.path.join(out, "world_clip.json"),
                                          "--clip-weights", os.path.join(out, "world_clip.pt"), "--templates", "single",
                                          "--output", os.path.join(out, "concept_embeddings.pth")], "teacher_concepts")
        return metrics

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

    def start_rpn(self):
        """Start training the class-agnostic RPN on base boxes without waiting (it needs only
        the world, so it runs while the concept pool and class names are embedded)."""
        p = self.p
        out = os.path.join(self.out, "rpn")
        self._rpn_started = time.time()
        return self.start_tool("train_net.py", ["--config-file", "configs/synthetic/rpn_R_18_FPN_world.yaml"]
                               + self.register_args()
                               + ["DATASETS.TRAIN", "('world_train',)", "OUTPUT_DIR", out, "SOLVER.MAX_ITER",
                                  p["rpn_iters"], "SOLVER.IMS_PER_BATCH", p["rpn_batch"], "SOLVER.STEPS",
                                  f"({int(p['rpn_iters'] * 0.8)},)", "SOLVER.WARMUP_ITERS",
                                  min(30, p["rpn_iters"] // 4), "SEED", self.seed] + self.size_args(), "rpn")

    def train_rpn(self, handle=None):
        """Train the RPN (or wait for the one :meth:`start_rpn` started); returns its weights."""
        self.wait_tools([handle or self.start_rpn()])
        self.timings["rpn training (from its start)"] = time.time() - self._rpn_started
        return self.rpn_weights

    def pretrain_args(self, out: str) -> List:
        p = self.p
        return (["--config-file", "configs/synthetic/pretrain_world.yaml", "--register-captions",
                 f"world_captions_train={os.path.join(self.world, 'annotations', 'captions_train.jsonl')}"
                 f":{os.path.join(self.world, 'train')}"]
                + ["OUTPUT_DIR", out, "MODEL.CLIP.CONCEPT_POOL_EMB",
                   os.path.join(self.out, "concepts", "concept_embeddings.pth"), "MODEL.CLIP.BB_RPN_WEIGHTS",
                   self.rpn_weights, "MODEL.CLIP.CROP_REGION_TYPE", p["pretrain_regions"],
                   "MODEL.CLIP.PRETRAIN_LOSS_WEIGHTS", f"[{p['pretrain_loss_weights']}]",
                   "MODEL.CLIP.PRETRAIN_IMG_TXT_LEVEL", float(p["pretrain_loss_weights"].split(",")[2]) > 0,
                   "SOLVER.MAX_ITER", p["pretrain_iters"], "SOLVER.IMS_PER_BATCH", p["pretrain_batch"],
                   "SOLVER.BASE_LR", p["pretrain_lr"], "SOLVER.OPTIMIZER", p["pretrain_optimizer"],
                   "SOLVER.STEPS", f"({int(p['pretrain_iters'] * 0.8)},)",
                   "SOLVER.WARMUP_ITERS", min(20, p["pretrain_iters"] // 4)]
                + self.size_args() + self.pool_args() + self.model_args()
                + (["MODEL.CLIP.TEACHER_CLIP_WEIGHTS", os.path.join(self.teacher_dir(), "world_clip.pt"),
                    "MODEL.CLIP.TEACHER_CONCEPT_POOL_EMB", os.path.join(self.teacher_dir(), "concept_embeddings.pth")]
                   if p["teacher_clip_seed_offset"] > 0 else []))

    def teacher_knowledge(self):
        """Accuracy of the teacher's pseudo labels (argmax over the concept pool, the concept's
        head noun compared with the class name) on the RPN regions of the test split that
        overlap a ground-truth box with IoU >= 0.5."""
        import torch

        from detectron2.data import DatasetCatalog, MetadataCatalog
        from detectron2.modeling import build_model

        from regionclip_d2 import get_regionclip_cfg
        from regionclip_d2.data.datasets import register_coco_format
        from regionclip_d2.data.mappers import build_test_mapper
        from regionclip_d2.evaluation.region_classification import pseudo_label_accuracy

        self._quiet_logs()
        name = f"world_test_{os.getpid()}_{id(self)}"
        register_coco_format(name, self.ann("test"), os.path.join(self.world, "test"))
        args = self.pretrain_args(os.path.join(self.out, "teacher"))
        opts = [str(v) for v in args[args.index("OUTPUT_DIR"):]] + ["MODEL.DEVICE", "cpu"]
        cfg = get_regionclip_cfg("configs/synthetic/pretrain_world.yaml", opts)
        torch.manual_seed(self.seed)
        model = build_model(cfg)
        with open(os.path.join(self.out, "concepts", "concepts.txt")) as f:
            concepts = [line.split("\t")[0] for line in f if line.strip()]
        gt_cfg = cfg.clone()
        gt_cfg.defrost()
        gt_cfg.MODEL.CLIP.CROP_REGION_TYPE = "GT"
        return pseudo_label_accuracy(model, DatasetCatalog.get(name), build_test_mapper(gt_cfg), concepts,
                                     MetadataCatalog.get(name).thing_classes, self.names()[1])

    def pretrain(self, tag: str = "pretrain"):
        out = os.path.join(self.out, tag)
        self.tool("train_net.py", self.pretrain_args(out), "pretrain", log_name=tag)
        return os.path.join(out, "model_final.pth")

    @staticmethod
    def _quiet_logs():
        for name in ("fvcore", "detectron2", "d2", "regionclip_d2"):  # keep the console to the progress lines
            logging.getLogger(name).setLevel(logging.ERROR)

    def zero_shot(self, student_weights, eval_tool: bool = True, teacher: bool = True, split: str = "test"):
        """Region classification on GT boxes of the test split (or ``split``): world CLIP
        (``teacher``) vs student; with ``eval_tool`` also zero-shot detection AP50 through
        tools/train_net.py (test split only)."""
        import torch

        from detectron2.data import DatasetCatalog, MetadataCatalog
        from detectron2.modeling import build_model

        from regionclip_d2 import get_regionclip_cfg
        from regionclip_d2.checkpoint import RegionCLIPCheckpointer
        from regionclip_d2.data.datasets import register_coco_format
        from regionclip_d2.data.mappers import build_test_mapper
        from regionclip_d2.evaluation.region_classification import region_classification_accuracy

        self._quiet_logs()
        if eval_tool and split != "test":
            raise ValueError("the zero-shot evaluation tool runs on the test split: use eval_tool=False")
        name = f"world_{split}_{os.getpid()}_{id(self)}"
        register_coco_format(name, self.ann(split), os.path.join(self.world, split))
        dicts = DatasetCatalog.get(name)
        names = MetadataCatalog.get(name).thing_classes
        _, novel, _ = self.names()
        opts = self.model_args() + self.size_args() + self.pool_args() + self.class_args(test_vocab=False)
        results = {}
        models = [("world CLIP", "")] if teacher else []
        for label, weights in models + [("RegionCLIP student", student_weights)]:
            cfg = get_regionclip_cfg("configs/synthetic/CLIP_fast_rcnn_world_zsinf_GT.yaml",
                                     [str(v) for v in opts] + ["MODEL.DEVICE", "cpu", "MODEL.CLIP.VOCABULARY", ""])
            torch.manual_seed(0)
            model = build_model(cfg)
            if weights:
                RegionCLIPCheckpointer(model).load(weights)
            results[label] = region_classification_accuracy(model, dicts, build_test_mapper(cfg), names, novel,
                                                            progress=False)
            if not eval_tool:
                continue
            # the same through the public evaluation tool: zero-shot detection AP50 with GT boxes
            out = os.path.join(self.out, "zeroshot", label.split()[0].lower())
            self.tool("train_net.py", ["--eval-only", "--config-file",
                                       "configs/synthetic/CLIP_fast_rcnn_world_zsinf_GT.yaml", "--register",
                                       f"world_test={self.ann('test')}:{os.path.join(self.world, 'test')}",
                                       "DATASETS.TEST", "('world_test',)", "OUTPUT_DIR", out, "MODEL.WEIGHTS", weights,
                                       "MODEL.CLIP.VOCABULARY", ""] + opts, "zeroshot",
                      log_name=f"zeroshot_{label.split()[0].lower()}")
            with open(os.path.join(out, "inference", "world_test", "results.json")) as f:
                results[label]["gt_boxes_bbox"] = json.load(f)["bbox"]
        return results

    def transfer_one(self, weights: str, tag: str, arch: str = "C4"):
        """One detector trained on base classes from ``weights`` ("" = the world CLIP);
        returns its novel/base/all AP50 on the test split."""
        self.wait_tools([self.start_transfer(weights, tag, arch)])
        return self.transfer_result(tag)

    def start_transfer(self, weights: str, tag: str, arch: str = "C4", threads: int = 0):
        """Start training one transfer detector (see :meth:`transfer_one`) without waiting."""
        return self.start_tool("train_net.py", self.transfer_args(weights, tag, arch), "transfer",
                               log_name=f"transfer_{tag}", threads=threads)

    def start_ensemble_eval(self, tag: str, arch: str, frozen_weights: str, threads: int = 0):
        """Start evaluating the trained transfer detector ``tag`` with its scores ensembled with
        the frozen model ``frozen_weights`` (:meth:`ensemble_weights`); results in
        ``transfer/<tag>_ensemble``."""
        det = os.path.join(self.out, "transfer", tag, "model_final.pth")
        return self.start_tool("train_net.py", ["--eval-only"] + self.transfer_args(det, tag + "_ensemble", arch)
                               + self.ensemble_opts(frozen_weights), "transfer", log_name=f"transfer_{tag}_ensemble",
                               threads=threads)

    def ensemble_weights(self, tag: str, student_weights: str) -> str:
        """The frozen model of the transfer row ``tag``'s ensemble: the one it started from (the
        student's pretraining checkpoint, or the world CLIP file)."""
        return self.transfer_weights(tag, student_weights) or self.clip_weights

    def ensemble_opts(self, frozen_weights: str) -> List[str]:
        return ["MODEL.CLIP.ENSEMBLE_WEIGHTS", frozen_weights, "MODEL.CLIP.ENSEMBLE_ALPHA", self.p["ensemble_alpha"],
                "MODEL.CLIP.ENSEMBLE_BETA", self.p["ensemble_beta"]]

    def transfer_args(self, weights: str, tag: str, arch: str) -> List[str]:
        """tools/train_net.py arguments of the transfer detector ``tag`` (output ``transfer/<tag>``)."""
        p = self.p
        out = os.path.join(self.out, "transfer", tag)
        config = TRANSFER_CONFIGS[arch]
        return (["--config-file", config] + self.register_args()
                + ["DATASETS.TRAIN", "('world_train',)", "DATASETS.TEST", "('world_test',)",
                   "OUTPUT_DIR", out, "MODEL.WEIGHTS", weights,
                   "MODEL.CLIP.BB_RPN_WEIGHTS", self.rpn_weights,
                   "MODEL.CLIP.TEXT_EMB_PATH", os.path.join(self.out, "classes", "base.pth"),
                   "MODEL.CLIP.OPENSET_TEST_TEXT_EMB_PATH", os.path.join(self.out, "classes", "all.pth"),
                   "MODEL.CLIP.FOCAL_SCALED_LOSS", p["focal"], "MODEL.CLIP.BG_CLS_LOSS_WEIGHT",
                   p["bg_weight"], "SOLVER.MAX_ITER", p["transfer_iters"], "SOLVER.IMS_PER_BATCH",
                   p["transfer_batch"], "SOLVER.BASE_LR", p["transfer_lr"], "SOLVER.STEPS",
                   f"({int(p['transfer_iters'] * 0.8)},)",
                   "SOLVER.WARMUP_ITERS", min(30, p["transfer_iters"] // 4)]
                + self.size_args() + (self.pool_args() if arch == "C4" else []) + self.class_args()
                + self.model_args())

    def transfer_result(self, tag: str, ensemble_weights: str = None) -> Dict:
        """AP50 (novel/base/all), weights and top-label breakdown of a trained transfer detector;
        with ``ensemble_weights`` (the frozen model, :meth:`ensemble_weights`) of the detector ``tag`` with
        the ensemble (evaluated into ``transfer/<tag>_ensemble``)."""
        out = os.path.join(self.out, "transfer", tag + ("_ensemble" if ensemble_weights is not None else ""))
        with open(os.path.join(out, "inference", "world_test", "results.json")) as f:
            res = json.load(f)["bbox"]
        res["weights"] = os.path.join(self.out, "transfer", tag, "model_final.pth")
        if ensemble_weights is not None:
            res["ensemble_weights"] = ensemble_weights
        res["top_labels"] = self.top_labels(os.path.join(out, "inference", "world_test", "coco_instances_results.json"))
        return res

    def top_labels(self, detections_json: str) -> Dict:
        """What the detector calls each test object (its top-scoring detection at IoU >= 0.5)."""
        from regionclip_d2.evaluation.top_labels import top_label_breakdown

        with open(self.ann("test")) as f:
            gt = json.load(f)
        with open(detections_json) as f:
            return top_label_breakdown(gt, json.load(f))

    def transfer_rows(self):
        """(label, tag, arch) of the transfer detectors: the profile's ``transfer_arch`` for
        both initialisations, and C4 rows ("<label>, C4") when ``c4_rows`` asks for them."""
        arch = self.p["transfer_arch"]
        if arch not in TRANSFER_CONFIGS:
            raise ValueError(f"transfer_arch={arch!r}: use one of {list(TRANSFER_CONFIGS)}")
        rows = [(label, tag if arch == "C4" else f"{tag}_{arch.lower()}", arch) for label, tag in INITS]
        if self.p["c4_rows"] and arch != "C4":
            rows += [(f"{label}, C4", tag, "C4") for label, tag in INITS]
        return rows

    def transfer(self, student_weights):
        """All transfer detectors, ``transfer_jobs`` at a time (each job gets an equal share of
        the CPU threads: these detectors scale poorly with threads, so two one-thread jobs
        finish sooner than two two-thread jobs one after the other)."""
        rows = self.transfer_rows()
        jobs = max(1, min(self.p["transfer_jobs"], len(rows)))
        threads = max(1, (os.cpu_count() or 1) // jobs) if jobs > 1 else 0
        for i in range(0, len(rows), jobs):
            self.wait_tools([self.start_transfer(self.transfer_weights(tag, student_weights), tag, arch,
                                                 threads=threads) for _, tag, arch in rows[i:i + jobs]])
        out = {label: self.transfer_result(tag) for label, tag, _ in rows}
        if self.p.get("ensemble"):  # profiles of other pipelines (CLIPSelf's F-ViT) have no ensemble
            out.update(self.ensemble_results(student_weights, reuse=False))
        return out

    def ensemble_results(self, student_weights: str, reuse: bool = True) -> Dict:
        """The main transfer detectors (both initialisations) evaluated again with their scores
        ensembled with the frozen model each started from (:meth:`start_ensemble_eval`); with
        ``reuse`` a finished evaluation is read, not repeated (for runs finished before the
        ensemble existed): ``{"<label> + ensemble": result}``."""
        main = self.transfer_rows()[:len(INITS)]
        todo = [(tag, arch) for _, tag, arch in main
                if not reuse or not os.path.isfile(os.path.join(self.out, "transfer", f"{tag}_ensemble", "inference",
                                                                "world_test", "results.json"))]
        jobs = max(1, min(self.p["transfer_jobs"], len(todo) or 1))
        threads = max(1, (os.cpu_count() or 1) // jobs) if jobs > 1 else 0
        for i in range(0, len(todo), jobs):
            self.wait_tools([self.start_ensemble_eval(tag, arch, self.ensemble_weights(tag, student_weights),
                                                      threads=threads) for tag, arch in todo[i:i + jobs]])
        return {f"{label} + ensemble": self.transfer_result(tag, self.ensemble_weights(tag, student_weights))
                for label, tag, _ in main}

    @staticmethod
    def transfer_weights(tag: str, student_weights: str) -> str:
        """MODEL.WEIGHTS of the transfer row ``tag``: the student's, or "" (the world CLIP)."""
        return student_weights if tag.startswith("regionclip") else ""

    def demo_image_files(self) -> List[str]:
        """The test images the demo draws: in file order, half of them (rounded up) among the
        images that hold a novel shape and the rest among those that do not, so that the
        pictures show both kinds (chosen by the ground truth alone, never by the detections)."""
        with open(self.ann("test")) as f:
            gt = json.load(f)
        novel_ids = {c["id"] for c in gt["categories"] if c["name"] in set(self.names()[1])}
        has_novel = {a["image_id"] for a in gt["annotations"] if a["category_id"] in novel_ids}
        files = sorted((im["file_name"], im["id"] in has_novel) for im in gt["images"])
        n = self.p["demo_images"]
        with_novel = [f for f, nov in files if nov][: (n + 1) // 2]
        without = [f for f, nov in files if not nov][: n - len(with_novel)]
        chosen = set(with_novel + without)
        return [os.path.join(self.world, "test", f) for f, _ in files if f in chosen]

    def detector_opts(self, detector_weights: str, arch: str, ensemble_weights: str = "") -> List[str]:
        """Config overrides of a transfer detector of this run (``arch``: C4 or FPN) for the tools and
        the API: its weights, the RPN branch, the world's CLIP, sizes and class counts; with
        ``ensemble_weights`` its scores ensembled with that frozen model."""
        opts = (["MODEL.WEIGHTS", detector_weights, "MODEL.CLIP.BB_RPN_WEIGHTS", self.rpn_weights] + self.size_args()
                + (self.pool_args() if arch == "C4" else []) + self.class_args() + self.model_args())
        if ensemble_weights:
            opts += self.ensemble_opts(ensemble_weights)
        return [str(o) for o in opts]

    def demo(self, detector_weights, arch: str = "C4", ensemble_weights: str = ""):
        _, novel, all_names = self.names()
        images = self.demo_image_files()
        out = os.path.join(self.out, "demo")
        self.tool("demo.py", ["--config-file", TRANSFER_CONFIGS[arch], "--input"]
                  + images
                  + ["--output", out, "--vocabulary", "custom", "--custom-vocabulary", ",".join(all_names),
                     "--confidence-threshold", self.p["demo_threshold"], "--cpu", "--opts"]
                  + self.detector_opts(detector_weights, arch, ensemble_weights), "demo")
        return out

    def exemplar_examples(self, shots: int, names=None) -> Dict[str, List]:
        """For each shape of ``names`` (default: the novel ones), ``shots`` example boxes from the
        val split (its first annotations in file order; the test split is never used):
        ``{name: [(image path, [x0, y0, x1, y1]), ...]}``."""
        with open(self.ann("val")) as f:
            gt = json.load(f)
        files = {im["id"]: os.path.join(self.world, "val", im["file_name"]) for im in gt["images"]}
        cats = {c["id"]: c["name"] for c in gt["categories"]}
        out = {n: [] for n in (names if names is not None else self.names()[1])}
        for a in sorted(gt["annotations"], key=lambda a: (files[a["image_id"]], a["id"])):
            name = cats[a["category_id"]]
            if name in out and len(out[name]) < shots:
                x, y, w, h = a["bbox"]
                out[name].append((files[a["image_id"]], [x, y, x + w, y + h]))
        short = [n for n, ex in out.items() if len(ex) < shots]
        if short:
            raise ValueError(f"the val split has fewer than {shots} boxes of {short}: use fewer shots")
        return out

    def exemplar_eval(self, detector_weights: str, arch: str, shots: int = 5) -> Dict:
        """Novel shapes given by image exemplars instead of names (OWL-ViT's image-guided
        detection through ``regionclip_d2.Exemplar``). The detector trained on base boxes is
        evaluated on the test split (AP50 as ``tools/train_net.py --eval-only`` computes it) with
        three test vocabularies: all 12 names; the base names + each novel shape as the mean
        embedding of ``shots`` val-split boxes (raw cosines); the same with the exemplar
        calibration (``Detector.calibrate_exemplars``) fitted on the base shapes' val boxes
        (``shots`` each, at least 2). Returns {"names", "exemplars", "exemplars, calibrated": AP50s,
        "calibration": its statistics (or {"error": why it could not be fitted}, and then no
        calibrated row), "shots": shots}."""
        import torch

        from detectron2.data import DatasetCatalog

        from regionclip_d2 import Detector, Exemplar
        from regionclip_d2.data.datasets import register_coco_format
        from regionclip_d2.engine.trainer import RegionCLIPTrainer

        base, novel, all_names = self.names()
        opts = self.detector_opts(detector_weights, arch)
        out = os.path.join(self.out, "exemplars")
        os.makedirs(out, exist_ok=True)
        name = f"world_test_exemplars_{os.getpid()}"
        if name not in DatasetCatalog.list():
            register_coco_format(name, self.ann("test"), os.path.join(self.world, "test"))
        det = Detector.from_config(os.path.join(ROOT, TRANSFER_CONFIGS[arch]), device="cpu",
                                   opts=opts + ["DATASETS.TEST", f"('{name}',)", "OUTPUT_DIR", out])
        self._quiet_logs()

        def as_exemplar(n, examples):
            return Exemplar(n, image=[path for path, _ in examples[n]], boxes=[[box] for _, box in examples[n]])

        novel_ex = self.exemplar_examples(shots)
        mixed = [n if n not in novel else as_exemplar(n, novel_ex) for n in all_names]
        base_ex = self.exemplar_examples(max(2, shots), base)  # a reference needs 2 boxes (leave-one-out)
        results = {"shots": shots}
        for label, classes, calibrate in (("names", list(all_names), False), ("exemplars", mixed, False),
                                          ("exemplars, calibrated", mixed, True)):
            if calibrate:
                try:
                    results["calibration"] = det.calibrate_exemplars([as_exemplar(n, base_ex) for n in base])
                except ValueError as e:  # e.g. an untrained detector whose regions do not separate classes
                    results["calibration"] = {"error": str(e)}
                    continue
            emb, names = det.vocabulary(classes)
            affine = det.logit_affine(classes)
            torch.save({"embeddings": emb, "names": names, "logit_affine": affine},
                       os.path.join(out, label.replace(", ", "_") + ".pth"))
            det.model.set_vocabulary(emb, names, logit_affine=affine)
            cfg = det.cfg.clone()
            cfg.defrost()
            cfg.OUTPUT_DIR = os.path.join(out, label.replace(", ", "_"))
            results[label] = RegionCLIPTrainer.test(cfg, det.model)[name]["bbox"]
        det.exemplar_calibration = None
        with open(os.path.join(out, "results.json"), "w") as f:
            json.dump(results, f, indent=1)
        return results

    # ------------------------------------------------------------------ all
    def run(self) -> Dict:
        t0 = time.time()
        self._stage("1/11 world: generating images, boxes and captions", self.make_world)
        clip_metrics = self._stage("2/11 clip: training the world's CLIP from scratch", self.train_clip)
        rpn = self.start_rpn()  # the RPN trains while stages 3 and 4 run
        concepts = self._stage("3/11 concepts: extracting the concept pool", self.concepts)
        self._stage("4/11 classes: embedding base and all class names", self.class_embeddings)
        if self.p["teacher_clip_seed_offset"] > 0:
            self._stage("4b/11 teacher: a second world CLIP (seed + teacher_clip_seed_offset)", self.train_teacher_clip)
        self._stage("5/11 rpn: training the RPN on base boxes (started before stage 3)", lambda: self.train_rpn(rpn))
        teacher = self._stage("6/11 teacher: pseudo labels on RPN regions", self.teacher_knowledge)
        student = self._stage("7/11 pretrain: region-text pretraining", self.pretrain)
        zs = self._stage("8/11 zero-shot: region classification on GT boxes", lambda: self.zero_shot(student))
        tr = self._stage("9/11 transfer: detectors on base classes", lambda: self.transfer(student))
        # the pictures show the RegionCLIP student's detector (with the ensemble when it was measured)
        shown = "RegionCLIP student + ensemble" if "RegionCLIP student + ensemble" in tr else "RegionCLIP student"
        demo_dir = self._stage("10/11 demo: DefaultPredictor with novel classes",
                               lambda: self.demo(tr[shown]["weights"], self.p["transfer_arch"],
                                                 tr[shown].get("ensemble_weights", "")))
        results = {"profile": self.p, "seed": self.seed, "world_clip": clip_metrics, "concepts": len(concepts),
                   "teacher": teacher, "zero_shot": zs, "transfer": tr, "demo_dir": demo_dir, "demo_detector": shown,
                   "timings_s": self.timings, "total_s": time.time() - t0}
        self._stage("11/11 report: table and plot", lambda: self.report(results))
        results["total_s"] = time.time() - t0
        with open(os.path.join(self.out, "results.json"), "w") as f:
            json.dump(results, f, indent=1, default=str)
        return results

    def ablation(self, tag: str, overrides: Dict, transfer_only: bool = False,
                 zero_shot_only: bool = False) -> Dict:
        """Stages 7-9 again with ``overrides`` on this run's world, CLIP, RPN and concepts (which
        must exist); outputs go to ``<out>/ablations/<tag>``. ``transfer_only``: only the transfer
        detector from this run's student; ``zero_shot_only``: pretraining and zero-shot, no
        transfer. Returns the zero-shot and/or transfer results of the changed setting."""
        sub = Pipeline(os.path.join(self.out, "ablations", tag), seed=self.seed, overrides=dict(self.p, **overrides),
                       python=self.python)
        sub.world, sub.clip_dir, sub.clip_cfg, sub.clip_weights, sub.rpn_weights = (
            self.world, self.clip_dir, self.clip_cfg, self.clip_weights, self.rpn_weights)
        for name in ("concepts", "classes"):
            link = os.path.join(sub.out, name)
            if not os.path.exists(link):
                os.symlink(os.path.join(self.out, name), link)
        if transfer_only:
            return {"transfer": sub.transfer_one(os.path.join(self.out, "pretrain", "model_final.pth"),
                                                 "regionclip", self.p["transfer_arch"])}
        extra = {}
        if sub.p["teacher_clip_seed_offset"] > 0:  # a second world CLIP teaches: train it, and measure it too
            extra["teacher_clip"] = {k: v for k, v in sub.train_teacher_clip().items() if k != "loss_history"}
            other = Pipeline(os.path.join(sub.out, "teacher_eval"), seed=self.seed, overrides=sub.p, python=self.python)
            other.world, other.clip_dir = self.world, sub.teacher_dir()
            other.clip_cfg = os.path.join(sub.teacher_dir(), "world_clip.json")
            other.clip_weights = os.path.join(sub.teacher_dir(), "world_clip.pt")
            extra["teacher_zero_shot"] = other.zero_shot("", eval_tool=False, teacher=False)["RegionCLIP student"]
        student = sub.pretrain()
        zs = sub.zero_shot(student, eval_tool=False, teacher=False)["RegionCLIP student"]
        if zero_shot_only:
            return dict(extra, zero_shot=zs)
        return dict(extra, zero_shot=zs, transfer=sub.transfer_one(student, "regionclip", self.p["transfer_arch"]))

    def report(self, results):
        md = report_markdown(results, self.p, self.seed)
        with open(os.path.join(self.out, "results.md"), "w") as f:
            f.write("\n".join(md) + "\n")
        plot_results(results, os.path.join(self.out, "results.png"))
        print("\n".join(md))


def _pct(x) -> str:
    return f"{100 * x:.1f}" if x == x else "n/a"


def report_markdown(results: Dict, p: Dict, seed: int) -> List[str]:
    zs, tr, clip = results["zero_shot"], results["transfer"], results["world_clip"]
    arch = p["transfer_arch"]
    rows = []
    for label in ("world CLIP", "RegionCLIP student"):
        z, t = zs[label], tr[label]
        rows.append(f"| {label} | {z['acc-novel']:.1f} | {z['acc-base']:.1f} | {z['acc-all']:.1f} | "
                    f"{t['AP50-novel']:.1f} | {t['AP50-base']:.1f} | {t['AP50-all']:.1f} |")
    for label in ("world CLIP + ensemble", "RegionCLIP student + ensemble", "world CLIP, C4",
                  "RegionCLIP student, C4"):
        if label in tr:
            t = tr[label]
            rows.append(f"| {label} detector | - | - | - | {t['AP50-novel']:.1f} | {t['AP50-base']:.1f} | "
                        f"{t['AP50-all']:.1f} |")
    n_base = len(p["categories"].split(",")) - len(p["novel"].split(","))
    n_all = len(p["categories"].split(","))
    z = clip.get("zero_shot", {})
    teacher = results.get("teacher", {})
    return ["# RegionCLIP in the synthetic world", "",
            f"World: {p['num_train']} training images of {p['image_size']} px, {n_all} shapes ({n_base} base, "
            f"{n_all - n_base} novel without training boxes: {p['novel'].replace(',', ', ')}); seed {seed}. "
            f"Total time {results['total_s'] / 60:.1f} min.", "",
            "| initialisation | zero-shot GT-box acc. novel | base | all | "
            f"transfer AP50 ({arch}) novel | base | all |",
            "|---|---|---|---|---|---|---|"] + rows + [
            "", f"Zero-shot: top-1 accuracy of classifying the test split's ground-truth boxes among all {n_all} "
            "shapes with RoI features (C4: RoIAlign on res4, res5, attention pool; mean of per-class accuracy, "
            f"chance {100 / n_all:.1f}%). Transfer: {arch} detectors trained {p['transfer_iters']} iterations on "
            f"base-class boxes with the frozen RPN branch, evaluated on all {n_all} classes (mean of per-class "
            "AP50).", "",
            "What the teacher knows:",
            f"- whole-image shape accuracy {_pct(z.get('accuracy', float('nan')))}% on {z.get('n', 0)} held-out "
            f"single-object images (novel shapes {_pct(z.get('accuracy_novel', float('nan')))}%); image-to-caption "
            f"retrieval top-1 {_pct(clip.get('retrieval_top1', float('nan')))}% (chance "
            f"{_pct(clip.get('retrieval_chance', float('nan')))}%);",
            f"- on ground-truth RoIs (RoIAlign on res4, res5, attention pool): "
            f"{zs['world CLIP']['acc-all']:.1f}% (novel {zs['world CLIP']['acc-novel']:.1f}%);",
            f"- its pseudo labels on {teacher.get('regions', 0)} RPN regions overlapping a ground-truth box "
            f"(IoU >= 0.5): {teacher.get('accuracy', float('nan')):.1f}% name the right shape "
            f"(novel {teacher.get('accuracy-novel', float('nan')):.1f}%, base "
            f"{teacher.get('accuracy-base', float('nan')):.1f}%).", ""] + top_label_lines(tr) + [
            "", f"Concept pool: {results['concepts']} concepts.", "",
            "Stage times (s): " + ", ".join(f"{k.split(':')[0]} {v:.0f}" for k, v in results["timings_s"].items()),
            "", f"Visualised detections ({results.get('demo_detector', 'RegionCLIP student')} {arch} detector, "
            f"score >= {p['demo_threshold']}): {results['demo_dir']}"]


def top_label_lines(transfer: Dict) -> List[str]:
    """What each transfer detector calls the test objects (the label of the top-scoring
    detection overlapping each ground-truth box): the pictures show these labels."""
    lines = ["What the transfer detectors call the test objects (label of the top-scoring detection at "
             "IoU >= 0.5; the pictures show these):"]
    for label, t in transfer.items():
        tl = t.get("top_labels")
        if not tl:
            continue
        parts = []
        for split, other in (("base", "novel"), ("novel", "base")):
            row = tl.get(split)
            if not row or not row["objects"]:
                continue
            n = row["objects"]
            stolen = ", ".join(f"{k} {v}" for k, v in tl["other_split_labels"].get(split, {}).items())
            parts.append(f"{split} objects ({n}): right {100 * row['right'] / n:.0f}%, another {split} class "
                         f"{100 * row['wrong_same_split'] / n:.0f}%, a {other} class "
                         f"{100 * row['other_split'] / n:.0f}%" + (f" ({stolen})" if stolen else ""))
        lines.append(f"- {label}: " + "; ".join(parts) + f"; no detection {tl['missed']}.")
    return lines


def plot_results(results: Dict, path: str):
    zs, tr = results["zero_shot"], results["transfer"]
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
        fig.savefig(path, dpi=100)
        plt.close(fig)
    except Exception as e:  # the table is the result; the plot is a convenience
        logger.warning("could not draw the plot: %s", e)


def finished_run_settings(run_dir: str, tool: str = "app", detector: str = None, ensemble: bool = True) -> dict:
    """What ``tools/synthetic_pipeline.py``'s demo stage passes to ``tools/demo.py`` for a finished
    run: the transfer config, the shown detector's weights (or ``detector``'s: "world CLIP" or
    "RegionCLIP student"), the RPN branch and the world's CLIP, sizes and class counts; plus the
    world's class names, the demo threshold and test images, the run's ``pipeline`` and the
    detector's ``weights`` and ``label``. ``tool`` names the caller in error messages
    (``--synthetic`` is its option); ``ensemble=False``: the shown detector without its score
    ensemble, where it has one."""
    results_path = os.path.join(run_dir, "results.json")
    if not os.path.isfile(results_path):
        raise SystemExit(f"{tool}: --synthetic {run_dir}: {results_path} not found: run `make demo` first (it writes "
                         "output/synthetic_demo), or give the folder of a finished run")
    with open(results_path) as f:
        results = json.load(f)
    pipe = Pipeline(run_dir, seed=int(results.get("seed", 0)), overrides=results["profile"])
    arch = pipe.p["transfer_arch"]
    shown = detector or results.get("demo_detector", "RegionCLIP student")
    if not ensemble:  # the same detector without the score ensemble (e.g. for ONNX export, which has none)
        shown = shown.replace(" + ensemble", "")
    weights = results["transfer"][shown]["weights"]
    if not os.path.isfile(weights):  # the run was moved: the same file under this folder
        weights = os.path.join(pipe.out, "transfer", os.path.basename(os.path.dirname(weights)), "model_final.pth")
    for path in (weights, pipe.rpn_weights, pipe.clip_weights, pipe.clip_cfg):
        if not os.path.isfile(path):
            raise SystemExit(f"{tool}: --synthetic {run_dir}: {path} is missing: the run is incomplete; "
                             "run `make demo`")
    _, _, all_names = pipe.names()
    ensemble = results["transfer"][shown].get("ensemble_weights", "")
    if ensemble and not os.path.isfile(ensemble):  # the run was moved: the same file under this folder
        ensemble = os.path.join(pipe.out, os.path.basename(os.path.dirname(ensemble)), os.path.basename(ensemble))
    return {"config": os.path.join(ROOT, TRANSFER_CONFIGS[arch]), "opts": pipe.detector_opts(weights, arch, ensemble),
            "pipeline": pipe, "weights": weights, "label": shown,
            "vocabulary": ", ".join(all_names), "threshold": float(pipe.p["demo_threshold"]),
            "world_test": os.path.join(pipe.world, "test"),
            "about": f"the synthetic demo's {shown} detector ({arch}) from {run_dir}"}
