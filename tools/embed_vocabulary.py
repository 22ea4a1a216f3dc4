#!/usr/bin/env python
"""Embed a vocabulary of class names with a CLIP text encoder into a [C, D] .pth file
(for MODEL.CLIP.TEXT_EMB_PATH / OPENSET_TEST_TEXT_EMB_PATH / CONCEPT_POOL_EMB).

Examples:
  python tools/embed_vocabulary.py --vocabulary coco_ovd_all --clip-weights RN50.pt --output coco_65.pth
  python tools/embed_vocabulary.py --vocabulary my_classes.txt --model RN50x4-quickgelu \\
      --clip-weights RN50x4.pt --templates single --output mine.pth
"""
import argparse
import os
import sys


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocabulary", required=True,
                    help="builtin name (coco, coco_ovd_base, coco_ovd_novel, coco_ovd_all, lvis), a .txt "
                         "(one name per line) or .json file of names, or 'a,b,c'")
    ap.add_argument("--output", required=True, help="output .pth ([C, D] float tensor)")
    ap.add_argument("--model", default="RN50-quickgelu", help="open_clip model name (default: %(default)s)")
    ap.add_argument("--model-config", default="", help="open_clip model-config JSON (custom architectures)")
    ap.add_argument("--clip-weights", default="", help="CLIP weights: OpenAI .pt, OpenCLIP checkpoint or a "
                                                       "regionclip_d2 checkpoint")
    ap.add_argument("--random-weights", action="store_true", help="allow running without --clip-weights")
    ap.add_argument("--templates", default="imagenet80", help="imagenet80 | single | none | 'a {} template'")
    ap.add_argument("--trust", action="store_true", help="allow pickled checkpoint files (only if trusted)")
    ap.add_argument("--no-cache", action="store_true", help="do not read or write the embedding cache")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from regionclip_d2.checkpoint import load_clip_weights
    from regionclip_d2.data.vocabularies import load_vocabulary
    from regionclip_d2.modeling.text import build_language_encoder, embed_class_names

    if not args.clip_weights and not args.random_weights:
        ap.error("--clip-weights is required (or --random-weights for a smoke test)")
    names = load_vocabulary(args.vocabulary)
    encoder = build_language_encoder(args.model, args.model_config)
    if args.clip_weights:
        load_clip_weights(args.clip_weights, lang_encoder=encoder, trusted=args.trust)
    else:
        print("WARNING: random text-encoder weights: the embeddings are meaningless", file=sys.stderr)
    emb = embed_class_names(names, encoder, templates=args.templates, use_cache=not args.no_cache,
                            progress=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    torch.save(emb, args.output)
    with open(os.path.splitext(args.output)[0] + ".txt", "w", encoding="utf-8") as f:
        f.write("\n".join(names) + "\n")
    print(f"wrote {args.output}: {tuple(emb.shape)} ({len(names)} classes, templates={args.templates}) "
          f"and the class names beside it (.txt)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
