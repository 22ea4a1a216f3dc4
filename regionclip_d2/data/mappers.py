"""Dataset mappers of the CLIP detector."""
import copy

import numpy as np
import torch

from detectron2.data import DatasetMapper
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T

from .images import annotated_size, check_image_size, read_image


class RegionCLIPDatasetMapper(DatasetMapper):
    """detectron2's ``DatasetMapper`` reading images with :func:`regionclip_d2.data.images.read_image`:
    every pixel mode as 8-bit RGB (16-bit images scaled, not clipped), and an EXIF-rotated
    image in the orientation its annotated size says (stored or upright), the same in
    training and evaluation. The rest is detectron2's (0.6) ``__call__``."""

    def __call__(self, dataset_dict):
        dataset_dict = copy.deepcopy(dataset_dict)
        image = read_image(dataset_dict["file_name"], format=self.image_format,
                           expected_size=annotated_size(dataset_dict))
        check_image_size(dataset_dict, image)
        if "sem_seg_file_name" in dataset_dict:
            sem_seg_gt = utils.read_image(dataset_dict.pop("sem_seg_file_name"), "L").squeeze(2)
        else:
            sem_seg_gt = None
        aug_input = T.AugInput(image, sem_seg=sem_seg_gt)
        transforms = self.augmentations(aug_input)
        image, sem_seg_gt = aug_input.image, aug_input.sem_seg
        image_shape = image.shape[:2]
        dataset_dict["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        if sem_seg_gt is not None:
            dataset_dict["sem_seg"] = torch.as_tensor(sem_seg_gt.astype("long"))
        if self.proposal_topk is not None:
            utils.transform_proposals(dataset_dict, image_shape, transforms, proposal_topk=self.proposal_topk)
        if not self.is_train:
            dataset_dict.pop("annotations", None)
            dataset_dict.pop("sem_seg_file_name", None)
            return dataset_dict
        if "annotations" in dataset_dict:
            self._transform_annotations(dataset_dict, transforms, image_shape)
        return dataset_dict


def _mapper_class(cfg, grounding: bool):
    if grounding:
        from ..grounding.mapper import GroundingDatasetMapper

        return GroundingDatasetMapper
    return RegionCLIPDatasetMapper


def build_train_mapper(cfg):
    """detectron2's training mapper (resize, flip) in the config's input format, reading
    images with :func:`regionclip_d2.data.images.read_image`; with ``MODEL.GROUNDING.ENABLED``
    it also passes on grounding data's captions and phrases
    (:class:`~regionclip_d2.grounding.mapper.GroundingDatasetMapper`)."""
    return _mapper_class(cfg, cfg.MODEL.GROUNDING.ENABLED)(cfg, is_train=True)


def build_test_mapper(cfg, grounding: bool = False):
    """The test-time mapper. In ``GT`` region mode the ground-truth boxes are the regions,
    so annotations are kept (non-crowd ones, resized with the image); otherwise detectron2's
    test mapper. Images are resized with the shortest side MIN_SIZE_TEST (bilinear on uint8)
    and read as in training (:func:`regionclip_d2.data.images.read_image`). ``grounding``:
    a grounding data set, each input with its caption's phrases
    (:class:`~regionclip_d2.grounding.mapper.GroundingDatasetMapper`)."""
    augs = [T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)]
    mapper = _mapper_class(cfg, grounding)
    if cfg.MODEL.CLIP.CROP_REGION_TYPE == "GT":
        return mapper(is_train=True, augmentations=augs, image_format=cfg.INPUT.FORMAT,
                      use_instance_mask=False, recompute_boxes=False)
    return mapper(is_train=False, augmentations=augs, image_format=cfg.INPUT.FORMAT)
