#!/usr/bin/env python
"""Train a small CLIP from scratch on a synthetic world's image-caption pairs.

Writes into --output-dir:
  world_clip.pt             open_clip state dict (torch.save(model.state_dict()))
  world_clip.json           its open_clip model config (embed_dim, quick_gelu, vision_cfg, text_cfg)
  world_clip_metrics.json   losses, timings, held-out retrieval top-1 and zero-shot shape accuracy

Use the result in the detector with
  MODEL.CLIP.OPENCLIP_MODEL_CONFIG <dir>/world_clip.json  and the weights <dir>/world_clip.pt
(e.g. tools/embed_vocabulary.py --model-config <dir>/world_clip.json --clip-weights <dir>/world_clip.pt).

Examples:
  python tools/make_synthetic_ovd.py --output-dir datasets/synthetic_ovd
  python tools/train_world_clip.py --world-dir datasets/synthetic_ovd --output-dir output/world_clip
  python tools/train_world_clip.py --world-dir /tmp/w --output-dir /tmp/clip --steps 50 --batch-size 32 --no-bf16
  python tools/train_world_clip.py --world-dir datasets/synthetic_ovd --output-dir output/world_vit --image-tower vit
"""
import argparse
import json
import logging
import os
import sys


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world-dir", required=True, help="folder written by tools/make_synthetic_ovd.py")
    ap.add_argument("--output-dir", required=True, help="where the checkpoint, config and metrics go")
    ap.add_argument("--steps", type=int, default=1000, help="optimiser steps (default: %(default)s)")
    ap.add_argument("--batch-size", type=int, default=128, help="image-caption pairs per step (default: %(default)s)")
    ap.add_argument("--lr", type=float, default=2e-3, help="AdamW peak learning rate, cosine schedule "
                                                           "(default: %(default)s)")
    ap.add_argument("--weight-decay", type=float, default=0.1, help="default: %(default)s")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up steps (default: 5%% of --steps)")
    ap.add_argument("--context-length", type=int, default=24, help="text context in tokens (default: %(default)s)")
    ap.add_argument("--model-config", default="", help="open_clip model-config JSON to train instead of the "
                                                       "default small ResNet CLIP for the world's image size")
    ap.add_argument("--image-tower", choices=("resnet", "vit"), default="resnet",
                    help="the default model's image tower: a ModifiedResNet (width 16, one block per stage) or a "
                         "ViT (--patch-size, --vision-width, --vision-layers: what CLIPSelf trains) "
                         "(default: %(default)s)")
    ap.add_argument("--patch-size", type=int, default=8, help="ViT patch side in pixels (default: %(default)s)")
    ap.add_argument("--vision-width", type=int, default=None,
                    help="image tower width (default: 16 for the ResNet, 64 for the ViT)")
    ap.add_argument("--vision-layers", type=int, default=4, help="ViT blocks (default: %(default)s)")
    ap.add_argument("--zoom-prob", type=float, default=0.0,
                    help="share of training images replaced by a random zoomed-in crop (default: %(default)s)")
    ap.add_argument("--zoom-min-scale", type=float, default=0.6,
                    help="smallest crop side, as a fraction of the image side (default: %(default)s)")
    ap.add_argument("--init-logit-scale", type=float, default=None,
                    help="starting logit scale (1 / temperature) of the contrastive loss, learned from there "
                         "(default: open_clip's 1/0.07 = 14.3)")
    ap.add_argument("--seed", type=int, default=0, help="default: %(default)s")
    ap.add_argument("--bf16", choices=("auto", "on", "off"), default="auto",
                    help="bfloat16 autocast: ~1.9x faster on CPUs with native bf16 (AVX-512 BF16, AMX), ~14x "
                         "slower elsewhere; auto uses it only where it is native (default: %(default)s)")
    ap.add_argument("--no-bf16", action="store_true", help="same as --bf16 off")
    ap.add_argument("--no-channels-last", action="store_true", help="keep the image tower NCHW")
    ap.add_argument("--no-math-attention", action="store_true",
                    help="let torch pick the attention kernel (its CPU flash backward is slower here)")
    ap.add_argument("--max-train-images", type=int, default=None, help="use only the first N training images")
    ap.add_argument("--eval-split", default="val", help="held-out split for metrics, or 'none' (default: %(default)s)")
    ap.add_argument("--max-eval-images", type=int, default=1000, help="default: %(default)s")
    ap.add_argument("--log-every", type=int, default=50, help="log the mean loss every N steps (default: %(default)s)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--omp-passive", action="store_true",
                    help="idle OpenMP threads sleep instead of spinning (OMP_WAIT_POLICY=PASSIVE): measured on 2 "
                         "cores, a step is ~30%% slower when the machine is otherwise idle, but 5-10x faster "
                         "when other processes compete for the cores; --threads 1 is another remedy")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.omp_passive:  # must be set before torch loads
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if args.steps < 1:
        ap.error("--steps must be >= 1")
    if args.batch_size < 2:
        ap.error("--batch-size must be >= 2 (the contrastive loss needs negatives)")
    if not os.path.isfile(os.path.join(args.world_dir, "world.json")):
        ap.error(f"--world-dir {args.world_dir!r} holds no world.json: generate it first with "
                 f"tools/make_synthetic_ovd.py --output-dir {args.world_dir}")
    import torch

    from regionclip_d2.synthetic.clip_training import train_world_clip

    if args.threads:
        torch.set_num_threads(args.threads)
    model_cfg = None
    if args.model_config:
        from regionclip_d2.modeling.clip_model import get_clip_model_config

        model_cfg = get_clip_model_config("", args.model_config)
    elif args.image_tower == "vit" or args.vision_width:
        from regionclip_d2.synthetic.clip_training import world_clip_config
        from regionclip_d2.synthetic.world import load_world

        size = load_world(args.world_dir)["image_size"]
        vit = args.image_tower == "vit"
        try:
            model_cfg = world_clip_config(size, args.context_length, vision_width=args.vision_width,
                                          **(dict(patch_size=args.patch_size, vision_layers=args.vision_layers)
                                             if vit else {}))
        except ValueError as e:
            ap.error(str(e))
    metrics = train_world_clip(
        args.world_dir, args.output_dir, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
        weight_decay=args.weight_decay, warmup=args.warmup, seed=args.seed,
        bf16=False if args.no_bf16 else {"auto": None, "on": True, "off": False}[args.bf16],
        channels_last=not args.no_channels_last, math_attention=not args.no_math_attention,
        zoom_prob=args.zoom_prob, zoom_min_scale=args.zoom_min_scale, init_logit_scale=args.init_logit_scale,
        context_length=args.context_length, model_cfg=model_cfg,
        max_train_images=args.max_train_images,
        eval_split=None if args.eval_split.lower() == "none" else args.eval_split,
        max_eval_images=args.max_eval_images, log_every=args.log_every, progress=not args.no_progress)
    metrics.pop("model")
    summary = {k: metrics[k] for k in ("steps", "batch_size", "seconds", "sec_per_step", "loss_first", "loss_last")}
    if "retrieval_top1" in metrics:
        summary["retrieval_top1"] = metrics["retrieval_top1"]
        summary["retrieval_chance"] = metrics["retrieval_chance"]
    if "zero_shot" in metrics:
        zs = metrics["zero_shot"]
        summary["zero_shot_shape"] = {k: zs[k] for k in ("accuracy", "accuracy_base", "accuracy_novel",
                                                          "accuracy_novel_among_novel", "chance", "n")}
    print(json.dumps(summary, indent=1))
    print(f"wrote {metrics['checkpoint']} and {metrics['model_config_file']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
