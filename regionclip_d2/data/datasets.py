"""Registering data sets."""
import os

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances


def register_coco_format(name: str, json_file: str, image_root: str, **metadata):
    """Register a COCO-format detection data set in one line (evaluated with COCO AP).

    ``register_coco_format("my_val", "ann.json", "images/")``, then ``DATASETS.TEST ("my_val",)``.
    """
    if not os.path.isfile(json_file):
        raise FileNotFoundError(f"annotation file {json_file!r} for data set {name!r} does not exist")
    if not os.path.isdir(image_root):
        raise FileNotFoundError(f"image folder {image_root!r} for data set {name!r} does not exist")
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    register_coco_instances(name, metadata, json_file, image_root)
    return name
