from .clip_rcnn import CLIPFastRCNN
from .pretrain import PretrainFastRCNN
