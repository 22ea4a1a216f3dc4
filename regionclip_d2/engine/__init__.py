from .launch import launch
from .trainer import RegionCLIPTrainer, match_vocabulary
