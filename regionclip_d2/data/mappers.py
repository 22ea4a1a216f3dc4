"""Dataset mappers of the CLIP detector."""
from detectron2.data import DatasetMapper
from detectron2.data import transforms as T


def build_train_mapper(cfg):
    """detectron2's training mapper (resize, flip) in the config's input format."""
    return DatasetMapper(cfg, is_train=True)


def build_test_mapper(cfg):
    """The test-time mapper. In ``GT`` region mode the ground-truth boxes are the regions,
    so annotations are kept (non-crowd ones, resized with the image); otherwise detectron2's
    test mapper. Images are resized with the shortest side MIN_SIZE_TEST (bilinear on uint8)."""
    augs = [T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)]
    if cfg.MODEL.CLIP.CROP_REGION_TYPE == "GT":
        return DatasetMapper(is_train=True, augmentations=augs, image_format=cfg.INPUT.FORMAT,
                             use_instance_mask=False, recompute_boxes=False)
    return DatasetMapper(is_train=False, augmentations=augs, image_format=cfg.INPUT.FORMAT)
