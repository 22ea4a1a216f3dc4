from .clip_rcnn import CLIPFastRCNN
from .clipself import CLIPSelf
from .pretrain import PretrainFastRCNN
