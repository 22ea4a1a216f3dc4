from .formats import CheckpointFormatError, detect_format, load_state_dict_file, read_checkpoint, unwrap_state_dict
from .loading import RegionCLIPCheckpointer, adapt_state_dict, install_load_hook, load_clip_weights, load_rpn_weights
