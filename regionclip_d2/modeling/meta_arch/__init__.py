from .clip_rcnn import CLIPFastRCNN
