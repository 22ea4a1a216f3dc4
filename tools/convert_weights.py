#!/usr/bin/env python
"""Convert weights into a regionclip_d2 checkpoint (a ``{"model": state_dict}`` .pth
that detectron2's checkpointer and ``DefaultPredictor`` load as MODEL.WEIGHTS).

Inputs: OpenAI CLIP .pt (TorchScript), OpenCLIP checkpoints (.pt/.pth/.bin state dicts,
training checkpoints, .safetensors), official RegionCLIP .pth, detectron2 RPN checkpoints
(--rpn). The keys are mapped onto the model built from --config-file, every weight of the
covered modules must be present with the right shape, and the result is verified by
loading it back.

Examples:
  python tools/convert_weights.py --input RN50.pt --output rn50_detector.pth
  python tools/convert_weights.py --input regionclip_pretrained-cc_rn50.pth --output ours.pth \\
      --rpn rpn_lvis_866.pth --config-file configs/LVISv1-InstanceSegmentation/CLIP_fast_rcnn_R_50_C4_zsinf.yaml
"""
import argparse
import os
import sys


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", required=True, help="weight file to convert")
    ap.add_argument("--output", required=True, help="output .pth")
    ap.add_argument("--rpn", default="", help="optional RPN-branch checkpoint to include (offline_*)")
    ap.add_argument("--config-file", default="configs/COCO-InstanceSegmentation/CLIP_fast_rcnn_R_50_C4_zsinf.yaml",
                    help="config of the model the weights are for (default: %(default)s)")
    ap.add_argument("--trust", action="store_true", help="allow pickled files (only for files you trust)")
    ap.add_argument("--opts", nargs=argparse.REMAINDER, default=[], help="config overrides")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from detectron2.modeling import build_model

    from regionclip_d2 import get_regionclip_cfg
    from regionclip_d2.checkpoint import RegionCLIPCheckpointer, load_rpn_weights
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
    _, fmt = load_state_dict_file(args.input, trusted=args.trust)
    print(f"{args.input}: {fmt} format")
    model = build_model(cfg)
    ckpt = RegionCLIPCheckpointer(model, trusted=args.trust)
    ckpt.load(args.input)
    if args.rpn:
        load_rpn_weights(args.rpn, model, trusted=args.trust)
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    tmp = args.output + ".tmp"
    torch.save({"model": sd, "__author__": "regionclip_d2 convert_weights", "source": os.path.basename(args.input),
                "source_format": fmt}, tmp)
    os.replace(tmp, args.output)
    # verify: a fresh model loads the file and gets the same weights
    check = build_model(cfg)
    RegionCLIPCheckpointer(check).load(args.output)
    for k, v in check.state_dict().items():
        if not torch.equal(v, sd[k]):
            raise SystemExit(f"verification failed: {k} differs after reloading {args.output}")
    print(f"wrote {args.output} ({len(sd)} tensors), verified by reloading")
    return 0


if __name__ == "__main__":
    sys.exit(main())
