#!/usr/bin/env python
"""Build the concept pool of region-text pretraining from image captions
(docs/method.md, "Pretraining"): parse the captions with NLTK into nouns and noun phrases
(lower-case, head noun singular), count each concept once per caption, keep those seen
in at least --min-count captions, and embed them with the CLIP text encoder (mean over
prompt templates, the project's embed_class_names).

Outputs in --output-dir:
  concepts.txt             one 'concept<TAB>count' per line, most frequent first
  concept_embeddings.pth   [C, D] float tensor, row i = concept i of concepts.txt
                           (unless --no-embed; use it as MODEL.CLIP.CONCEPT_POOL_EMB)
  concept_stats.json       what was read, skipped and kept

Caption formats (--format auto picks by extension / content):
  coco   COCO Captions JSON {"images": [...], "annotations": [{"image_id", "caption"}]}
  jsonl  JSON Lines, one {"file_name": ..., "caption": ...} per line
  tsv    image_path<TAB>caption per line
Empty, non-English and over-long captions and malformed records are skipped and
counted; bytes that are not UTF-8 are replaced (and counted).

Examples:
  python tools/extract_concepts.py --captions coco/annotations/captions_train2017.json \\
      --output-dir output/concepts_coco --clip-weights RN50.pt --workers 8
  python tools/extract_concepts.py --captions cc3m.tsv --min-count 100 --no-embed --output-dir out/
"""
import argparse
import json
import logging
import os
import sys
import time


def build_parser():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_argument_group("captions")
    g.add_argument("--captions", nargs="+", required=True, metavar="PATH",
                   help="one or more caption files (.json COCO Captions, .jsonl, .tsv; .gz allowed)")
    g.add_argument("--format", default="auto", choices=["auto", "coco", "jsonl", "tsv"],
                   help="caption file format (default: %(default)s = from the extension / content)")
    g.add_argument("--min-count", type=int, default=100,
                   help="keep concepts found in at least this many captions (default: %(default)s, as in "
                        "the paper)")
    g.add_argument("--max-captions", type=int, default=None,
                   help="read at most this many (valid) captions over all files, e.g. for a quick trial")
    g.add_argument("--max-caption-chars", type=int, default=1000,
                   help="skip captions longer than this many characters (default: %(default)s; 0 = no limit)")
    g.add_argument("--workers", type=int, default=0,
                   help="parser processes (default: %(default)s = parse in this process)")
    g.add_argument("--output-dir", required=True, help="folder for concepts.txt, concept_embeddings.pth and "
                                                       "concept_stats.json (created if needed)")
    e = ap.add_argument_group("embedding (skipped with --no-embed)")
    e.add_argument("--no-embed", action="store_true", help="only write concepts.txt")
    e.add_argument("--model", default="RN50-quickgelu",
                   help="open_clip model name of the text encoder (default: %(default)s)")
    e.add_argument("--model-config", default="", help="open_clip model-config JSON (custom architectures; "
                                                      "overrides --model)")
    e.add_argument("--clip-weights", default="",
                   help="CLIP weights: OpenAI .pt, OpenCLIP checkpoint or a regionclip_d2 checkpoint")
    e.add_argument("--random-weights", action="store_true",
                   help="allow embedding without --clip-weights (random text encoder: smoke tests only)")
    e.add_argument("--trust", action="store_true", help="allow pickled checkpoint files (only if trusted)")
    e.add_argument("--templates", default="imagenet80",
                   help="prompt templates: imagenet80 (default) | single | none | 'a {} template'")
    e.add_argument("--device", default="auto", help="device for the text encoder: auto | cpu | cuda[:i]")
    e.add_argument("--no-cache", action="store_true", help="do not read or write the embedding cache")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    return ap


def main(argv=None):
    ap = build_parser()
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(levelname)s] %(message)s")
    for p in args.captions:
        if not os.path.isfile(p):
            ap.error(f"caption file {p!r} does not exist")
    if args.min_count < 1:
        ap.error("--min-count must be at least 1")
    if args.workers < 0:
        ap.error("--workers must be 0 or more")
    if not args.no_embed and not args.clip_weights and not args.random_weights:
        ap.error("--clip-weights is required to embed the concepts (or --no-embed to skip embedding, or "
                 "--random-weights for a smoke test)")
    if args.clip_weights and not os.path.isfile(args.clip_weights):
        ap.error(f"--clip-weights {args.clip_weights!r} does not exist")
    if args.model_config and not os.path.isfile(args.model_config):
        ap.error(f"--model-config {args.model_config!r} does not exist")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from regionclip_d2.data.concepts import (
        CaptionFormatError,
        NLTKDataError,
        build_concept_pool,
        format_stats,
        write_concepts,
    )

    t0 = time.time()
    try:
        pool, counts, stats = build_concept_pool(
            args.captions, fmt=args.format, min_count=args.min_count, workers=args.workers,
            max_captions=args.max_captions, progress=not args.quiet, max_chars=args.max_caption_chars or None)
    except (CaptionFormatError, NLTKDataError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"read {stats['captions']} captions in {time.time() - t0:.1f}s: {format_stats(stats)}")
    print(f"{len(counts)} distinct concepts, {len(pool)} seen in >= {args.min_count} captions")
    if not pool:
        top = counts.most_common(3)
        hint = f"the most frequent are {', '.join(f'{c!r} ({n})' for c, n in top)}" if top else \
            "no concept was found at all (are the captions empty or not English?)"
        print(f"error: no concept reaches --min-count {args.min_count}: {hint}. Lower --min-count or give more "
              "captions", file=sys.stderr)
        return 1
    os.makedirs(args.output_dir, exist_ok=True)
    concepts_path = os.path.join(args.output_dir, "concepts.txt")
    write_concepts(concepts_path, pool)
    with open(os.path.join(args.output_dir, "concept_stats.json"), "w", encoding="utf-8") as f:
        json.dump({"captions_files": args.captions, "format": args.format, "min_count": args.min_count,
                   "max_captions": args.max_captions, "distinct_concepts": len(counts), "kept_concepts": len(pool),
                   "stats": stats}, f, indent=2)
    print(f"wrote {concepts_path} ({len(pool)} concepts)")
    if args.no_embed:
        return 0

    import torch

    from regionclip_d2.checkpoint import load_clip_weights
    from regionclip_d2.modeling.text import build_language_encoder, embed_class_names

    encoder = build_language_encoder(args.model, args.model_config)
    if args.clip_weights:
        load_clip_weights(args.clip_weights, lang_encoder=encoder, trusted=args.trust)
    else:
        bar = "!" * 78
        print(f"{bar}\nWARNING: RANDOM TEXT-ENCODER WEIGHTS (--random-weights): concept_embeddings.pth is "
              f"MEANINGLESS.\nUse it for smoke tests only; pass --clip-weights for real embeddings.\n{bar}",
              file=sys.stderr)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    encoder = encoder.to(device).eval()
    names = [c for c, _ in pool]
    emb = embed_class_names(names, encoder, templates=args.templates, use_cache=not args.no_cache,
                            progress=not args.quiet)
    emb_path = os.path.join(args.output_dir, "concept_embeddings.pth")
    torch.save(emb.cpu(), emb_path)
    print(f"wrote {emb_path}: {tuple(emb.shape)} (templates={args.templates}"
          f"{', RANDOM WEIGHTS' if not args.clip_weights else ''})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
