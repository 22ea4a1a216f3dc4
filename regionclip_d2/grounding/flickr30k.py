"""Flickr30k Entities -> the MDETR grounding format that :mod:`regionclip_d2.grounding.data` reads.

MDETR's released ``final_flickr_separateGT_{train,val,test}.json`` already are in that format
and need no conversion. This converts the data set's own files instead::

    <root>/Sentences/<image id>.txt    five captions, phrases marked "[/EN#18/people A man]"
    <root>/Annotations/<image id>.xml  PASCAL-VOC-style boxes; an <object> names the entities
                                       (<name>18</name>, one or more) its box belongs to
    <root>/{train,val,test}.txt        the image ids of each split

Each caption becomes one image entry: the caption is the sentence's words without the
markup, joined by single spaces (as the Flickr30k Entities tools write it); each entity
that has boxes gets one annotation per box, with ``tokens_positive`` = the spans of all its
phrases in that caption and ``phrase_ids`` = its index in the entry's
``tokens_positive_eval`` (one list of spans per boxed entity, in order of first mention).
Entities without boxes (id 0 "notvisual", ``nobndbox``, ``scene``) get no annotation.
Boxes: VOC coordinates are 1-based and inclusive, so ``[xmin - 1, ymin - 1, xmax - xmin + 1,
ymax - ymin + 1]`` in COCO's ``[x, y, w, h]``.
"""
import json
import os
import re
import xml.etree.ElementTree as ET
from typing import Dict, List, Tuple

_PHRASE = re.compile(r"\[/EN#(\d+)((?:/[^\s\]]+)*)\s+([^\]]*)\]")


def parse_sentence(line: str) -> Tuple[str, List[dict]]:
    """``"[/EN#18/people A man] with [/EN#0/notvisual it] ."`` -> the caption ``"A man with it ."``
    and its phrases ``{"start", "end", "entity", "types", "text"}`` (``caption[start:end] == text``)."""
    caption, phrases, pos = [], [], 0
    out_len = 0

    def emit(text):
        nonlocal out_len
        words = text.split()
        if not words:
            return None
        if caption:
            out_len += 1
        start = out_len
        caption.append(" ".join(words))
        out_len += len(caption[-1])
        return start

    for m in _PHRASE.finditer(line):
        emit(line[pos:m.start()])
        start = emit(m.group(3))
        if start is not None:
            phrases.append({"start": start, "end": out_len, "entity": m.group(1),
                            "types": [t for t in m.group(2).split("/") if t], "text": " ".join(m.group(3).split())})
        pos = m.end()
    emit(line[pos:])
    return " ".join(caption), phrases


def parse_annotation(xml_text: str) -> Tuple[int, int, Dict[str, List[List[float]]]]:
    """An ``Annotations/<id>.xml`` -> ``(width, height, {entity id: [[x, y, w, h], ...]})``."""
    root = ET.fromstring(xml_text)
    size = root.find("size")
    width, height = int(size.find("width").text), int(size.find("height").text)
    boxes: Dict[str, List[List[float]]] = {}
    for obj in root.findall("object"):
        box = obj.find("bndbox")
        if box is None:
            continue  # nobndbox / scene: the entity has no box
        x0, y0, x1, y1 = (int(box.find(k).text) for k in ("xmin", "ymin", "xmax", "ymax"))
        for name in obj.findall("name"):
            boxes.setdefault(name.text.strip(), []).append([float(x0 - 1), float(y0 - 1), float(x1 - x0 + 1),
                                                            float(y1 - y0 + 1)])
    return width, height, boxes


def convert_flickr30k_entities(root: str, split: str, output_json: str) -> Dict[str, int]:
    """Write ``output_json`` (MDETR format) for the images of ``<root>/<split>.txt``; returns
    counts. Images are named ``<image id>.jpg`` (register with the ``flickr30k-images``
    folder as ``image_root``)."""
    ids_file = os.path.join(root, f"{split}.txt")
    if not os.path.isfile(ids_file):
        raise FileNotFoundError(f"{ids_file} does not exist: root must hold Flickr30k Entities' Sentences/, "
                                "Annotations/ and {train,val,test}.txt")
    with open(ids_file) as f:
        image_ids = [line.strip() for line in f if line.strip()]
    entries, annotations = [], []
    for image_id in image_ids:
        with open(os.path.join(root, "Annotations", f"{image_id}.xml"), encoding="utf-8") as f:
            width, height, boxes = parse_annotation(f.read())
        with open(os.path.join(root, "Sentences", f"{image_id}.txt"), encoding="utf-8") as f:
            sentences = [line.strip() for line in f if line.strip()]
        for k, line in enumerate(sentences):
            caption, phrases = parse_sentence(line)
            entry = {"id": len(entries) + 1, "file_name": f"{image_id}.jpg", "height": height, "width": width,
                     "caption": caption, "original_img_id": int(image_id) if image_id.isdigit() else image_id,
                     "sentence_id": k, "dataset_name": "flickr", "tokens_positive_eval": []}
            entities: Dict[str, List[List[int]]] = {}
            for p in phrases:
                if p["entity"] != "0" and p["entity"] in boxes:
                    entities.setdefault(p["entity"], []).append([p["start"], p["end"]])
            for entity, spans in entities.items():
                phrase_id = len(entry["tokens_positive_eval"])
                entry["tokens_positive_eval"].append(spans)
                for box in boxes[entity]:
                    annotations.append({"id": len(annotations) + 1, "image_id": entry["id"], "category_id": 1,
                                        "bbox": box, "area": box[2] * box[3], "iscrowd": 0,
                                        "tokens_positive": spans, "phrase_ids": phrase_id})
            entries.append(entry)
    data = {"info": {"description": f"Flickr30k Entities {split}, converted to the MDETR grounding format"},
            "images": entries, "annotations": annotations,
            "categories": [{"id": 1, "name": "object", "supercategory": "object"}]}
    os.makedirs(os.path.dirname(os.path.abspath(output_json)), exist_ok=True)
    with open(output_json, "w") as f:
        json.dump(data, f)
    return {"images": len(image_ids), "captions": len(entries), "annotations": len(annotations)}
