#!/usr/bin/env python
"""Convert weights into a regionclip_d2 checkpoint (a ``{"model": state_dict}`` .pth
that detectron2's checkpointer and ``DefaultPredictor`` load as MODEL.WEIGHTS).

Inputs: OpenAI CLIP .pt (TorchScript), OpenCLIP checkpoints (.pt/.pth/.bin state dicts,
training checkpoints, .safetensors), a bare CLIP image tower (keys without ``visual.``),
official RegionCLIP .pth, detectron2 RPN checkpoints (--rpn). The keys are mapped onto the
model built from --config-file, every weight of the covered modules must be present with the
right shape, and the result is verified by loading it back.

--format auto (default) writes the whole model's state dict. --format clipself takes the image
tower of a CLIP ViT checkpoint (a CLIPSelf checkpoint of an OpenAI / OpenCLIP ViT:
``{"epoch", "name", "state_dict", "optimizer"}``, a raw state dict, ``module.`` prefixes, the
whole model or the image tower alone; or a regionclip_d2 CLIPSelf checkpoint) and writes it
alone, under the key names of the config's ViT: ``backbone.*`` (the student) for
configs/clipself/CLIPSelf_ViT-B-16.yaml, ``backbone.bottom_up.*`` for
configs/clipself/FViT_ViT-B-16_ovd.yaml. The text tower, the teacher and the detector heads
are not written: they come from MODEL.CLIP.CLIP_WEIGHTS (the original CLIP) or training.
EVA02-CLIP towers (the official CLIPSelf releases) are refused: the ViT backbone does not
implement them.

Examples:
  python tools/convert_weights.py --input RN50.pt --output rn50_detector.pth
  python tools/convert_weights.py --input regionclip_pretrained-cc_rn50.pth --output ours.pth \\
      --rpn rpn_lvis_866.pth --config-file configs/LVISv1-InstanceSegmentation/CLIP_fast_rcnn_R_50_C4_zsinf.yaml
  python tools/convert_weights.py --format clipself --input epoch_6.pt --output fvit_vit.pth \\
      --config-file configs/clipself/FViT_ViT-B-16_ovd.yaml
"""
import argparse
import os
import sys

FORMATS = ("auto", "clipself")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", required=True, help="weight file to convert")
    ap.add_argument("--output", required=True, help="output .pth")
    ap.add_argument("--format", default="auto", choices=FORMATS,
                    help="auto: the whole model (input format detected); clipself: a CLIP ViT checkpoint's image "
                         "tower onto the config's ViT only (default: %(default)s)")
    ap.add_argument("--rpn", default="", help="optional RPN-branch checkpoint to include (offline_*)")
    ap.add_argument("--config-file", default="configs/COCO-InstanceSegmentation/CLIP_fast_rcnn_R_50_C4_zsinf.yaml",
                    help="config of the model the weights are for (default: %(default)s)")
    ap.add_argument("--trust", action="store_true", help="allow pickled files (only for files you trust)")
    ap.add_argument("--opts", nargs=argparse.REMAINDER, default=[], help="config overrides")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from regionclip_d2.checkpoint import CheckpointFormatError

    try:
        return convert(args)
    except (CheckpointFormatError, FileNotFoundError) as e:
        print(f"convert_weights: error: {e}", file=sys.stderr)
        return 2


def convert(args):
    import torch

    from detectron2.modeling import build_model

    from regionclip_d2 import get_regionclip_cfg
    from regionclip_d2.checkpoint import CheckpointFormatError, RegionCLIPCheckpointer, load_rpn_weights
    from regionclip_d2.checkpoint.formats import load_state_dict_file

    cfg = get_regionclip_cfg(args.config_file, args.opts)
    cfg.defrost()
    cfg.MODEL.DEVICE = "cpu"
    for key in ("VOCABULARY", "OPENSET_TEST_VOCABULARY", "TEXT_EMB_PATH", "OPENSET_TEST_TEXT_EMB_PATH",
                "CLIP_WEIGHTS", "BB_RPN_WEIGHTS"):
        setattr(cfg.MODEL.CLIP, key, "")
    # without --rpn the output holds no RPN branch (never random offline_* weights)
    cfg.MODEL.CLIP.CROP_REGION_TYPE = "RPN" if args.rpn else "GT"
    cfg.freeze()
    if args.format == "clipself" and args.rpn:
        raise CheckpointFormatError("--rpn is not taken with --format clipself: give the RPN branch at training "
                                    "or test time with MODEL.CLIP.BB_RPN_WEIGHTS")
    sd, fmt = load_state_dict_file(args.input, trusted=args.trust)
    print(f"{args.input}: {fmt} format")
    model = build_model(cfg)
    if args.format == "clipself":
        prefix, sd = clipself_tower(sd, fmt, model, args)
        source_format = "clipself"
    else:
        ckpt = RegionCLIPCheckpointer(model, trusted=args.trust)
        ckpt.load(args.input)
        if args.rpn:
            load_rpn_weights(args.rpn, model, trusted=args.trust)
        prefix, sd = "", {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        source_format = fmt
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    tmp = args.output + ".tmp"
    torch.save({"model": sd, "__author__": "regionclip_d2 convert_weights", "source": os.path.basename(args.input),
                "source_format": source_format}, tmp)
    os.replace(tmp, args.output)
    # verify: a fresh model loads the file and gets the same weights
    check = build_model(cfg)
    RegionCLIPCheckpointer(check).load(args.output)
    reloaded = check.state_dict()
    for k, v in sd.items():
        if not torch.equal(reloaded[k], v):
            raise SystemExit(f"verification failed: {k} differs after reloading {args.output}")
    print(f"wrote {args.output} ({len(sd)} tensors{', ' + prefix + '*' if prefix else ''}), verified by reloading")
    return 0


def clipself_tower(sd, fmt, model, args):
    """(key prefix, state dict): the image tower of ``sd`` loaded strictly into the model's CLIP
    ViT (the student ``backbone`` of CLIPSelf, ``backbone.bottom_up`` of the F-ViT pyramid), under
    the model's key names."""
    from regionclip_d2.checkpoint import CheckpointFormatError
    from regionclip_d2.checkpoint.loading import load_clip_state_dict, split_towers
    from regionclip_d2.modeling.backbone.clip_vit import CLIPViT, CLIPViTSimpleFeaturePyramid

    backbone = getattr(model, "backbone", None)
    if isinstance(backbone, CLIPViTSimpleFeaturePyramid):
        prefix, vit = "backbone.bottom_up.", backbone.bottom_up
    elif isinstance(backbone, CLIPViT):
        prefix, vit = "backbone.", backbone
    else:
        raise CheckpointFormatError(
            f"--format clipself: {args.config_file} builds a {type(backbone).__name__} backbone, not a CLIP ViT: use "
            "configs/clipself/CLIPSelf_ViT-B-16.yaml or configs/clipself/FViT_ViT-B-16_ovd.yaml (or a config with "
            "MODEL.BACKBONE.NAME build_clip_vit_backbone / build_clip_vit_sfp_backbone)")
    if fmt not in ("clip", "regionclip", "detectron2"):
        raise CheckpointFormatError(f"--format clipself: {args.input!r} is not a CLIP checkpoint ({fmt} format)")
    vis, txt = split_towers(sd, fmt)
    if not vis:
        raise CheckpointFormatError(
            f"--format clipself: {args.input!r} holds no image tower (no visual.* or backbone.* keys; first keys: "
            f"{list(sd)[:5]})")
    load_clip_state_dict(sd, fmt, repr(args.input), backbone=vit)
    if txt:
        print(f"note: the file's text tower ({len(txt)} tensors) is not written: the text encoder comes from "
              "MODEL.CLIP.CLIP_WEIGHTS (the original CLIP; CLIPSelf does not train it)")
    if hasattr(model, "teacher_backbone"):
        print("note: only the student (backbone.*) is written: CLIPSelf's teacher comes from MODEL.CLIP.CLIP_WEIGHTS "
              "(the original CLIP), which must be set alongside MODEL.WEIGHTS")
    return prefix, {prefix + k: v.detach().cpu().contiguous() for k, v in vit.state_dict().items()}


if __name__ == "__main__":
    sys.exit(main())
