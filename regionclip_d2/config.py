"""Configuration keys of regionclip_d2.

``add_regionclip_config(cfg)`` only adds keys. The ``MODEL.CLIP.*`` names are those
of the official RegionCLIP code, so published commands and yaml files translate.
"""
from detectron2.config import CfgNode as CN

CLIP_PIXEL_MEAN = [0.48145466, 0.4578275, 0.40821073]  # on 0..1 RGB
CLIP_PIXEL_STD = [0.26862954, 0.26130258, 0.27577711]


def add_regionclip_config(cfg):
    """Add the RegionCLIP keys to a detectron2 config (in place) and return it."""
    if "CLIP" in cfg.MODEL:
        return cfg  # already added
    _C = cfg
    _C.MODEL.CLIP = CN()
    c = _C.MODEL.CLIP
    # --- the CLIP model (recognition branch and language encoder) ---
    c.OPENCLIP_MODEL = "RN50-quickgelu"  # open_clip model name; OpenAI weights need -quickgelu
    c.OPENCLIP_MODEL_CONFIG = ""  # optional open_clip model-config JSON for a custom architecture
    c.CLIP_WEIGHTS = ""  # OpenAI .pt / OpenCLIP checkpoint to initialise backbone + text encoder
    c.TRUST_CHECKPOINTS = False  # allow pickled (non-weights-only) checkpoint files; only for files you trust
    # --- localization branch ---
    c.CROP_REGION_TYPE = "RPN"  # where regions come from: GT | RPN | GRID | RANDOM
    c.OFFLINE_RPN_CONFIG = ""  # detectron2 yaml of the separate (frozen) RPN branch
    c.BB_RPN_WEIGHTS = ""  # weights of the RPN branch (offline_backbone + offline_proposal_generator)
    c.OFFLINE_RPN_NMS_THRESH = 0.0  # override the RPN branch's NMS threshold (0 = keep its config)
    c.OFFLINE_RPN_POST_NMS_TOPK_TEST = 0  # override its post-NMS top-k at test time (0 = keep)
    c.TRAIN_OFFLINE_RPN = False  # train the RPN branch with the detector (default: frozen)
    c.GRID_REGIONS = [3, 3]  # GRID regions: rows, columns of the grid over the image
    c.RANDOM_REGIONS = 100  # RANDOM regions: boxes drawn per image
    # --- open-vocabulary classifier ---
    c.USE_TEXT_EMB_CLASSIFIER = True  # classifier = frozen text embeddings (the only classifier; False is an error)
    c.TEXT_EMB_PATH = ""  # [C, D] .pth of class text embeddings used in training (and test if no OPENSET)
    c.TEXT_EMB_DIM = 1024  # D, the CLIP joint embedding dimension (1024 RN50, 640 RN50x4)
    c.VOCABULARY = ""  # builtin vocabulary name or names file, embedded on the fly (instead of TEXT_EMB_PATH)
    c.OPENSET_TEST_NUM_CLASSES = 0  # number of test classes when the test vocabulary differs (0 = same)
    c.OPENSET_TEST_TEXT_EMB_PATH = ""  # [C_test, D] .pth used at test time
    c.OPENSET_TEST_VOCABULARY = ""  # builtin name or names file for test time (instead of the .pth)
    c.PROMPT_TEMPLATES = "imagenet80"  # templates for on-the-fly embedding: imagenet80 | single
    c.CLSS_TEMP = 0.01  # temperature of the cosine-similarity logits
    c.NO_BOX_DELTA = False  # inference uses the regions as boxes (no regression deltas)
    c.BG_CLS_LOSS_WEIGHT = 1.0  # weight of the background class in the classification loss
    c.FOCAL_SCALED_LOSS = 0.0  # focal scaling gamma of the cross entropy (0 = plain CE)
    c.MULTIPLY_RPN_SCORE = False  # score = sqrt(sigmoid(objectness) * p_cls)
    c.MULTIPLY_RPN_SCORE_LEGACY = False  # official behaviour: sqrt(raw_logit * p); NaN regions dropped
    c.ONLY_SAMPLE_FG_PROPOSALS = False  # train on foreground proposals only
    c.REGION_CHUNK_SIZE = 100  # pool + encode (res5, attention pool) at most this many regions at once (0 = all)
    c.INFERENCE_DTYPE = "float32"  # inference compute type: float32 | bfloat16 (opt-in, CPU autocast or CUDA)
    # the CLIP backbone itself in channels-last memory format, in training too (opt-in; inference's folded copies,
    # FOLD_BATCHNORM, are channels-last on CPU anyway, and follow this option on other devices)
    c.CHANNELS_LAST = False
    # inference runs copies of both backbones with their fixed BatchNorms folded into the convolutions, channels-last
    # on CPU (same detections within 1e-4; bench/run.py: RPN mode, 100 regions, 1.5x the official compute; README)
    c.FOLD_BATCHNORM = True
    # scores ensembled with a frozen CLIP region classifier at inference (not official; ViLD / F-VLM; opt-in):
    # class c scores p_det^(1-l) * p_zs^l, l = ALPHA for training-vocabulary classes, BETA for the others
    c.ENSEMBLE_WEIGHTS = ""  # the frozen model: a CLIP file or a RegionCLIP checkpoint (e.g. the pretrained student)
    c.ENSEMBLE_ALPHA = 0.35
    c.ENSEMBLE_BETA = 0.65
    # --- region-text pretraining ---
    c.PRETRAIN_IMG_TXT_LEVEL = True  # add the image-text contrastive loss
    c.PRETRAIN_RPN_REGIONS = 300  # regions kept per image after the RPN branch's NMS
    c.PRETRAIN_SAMPLE_REGIONS = 100  # regions sampled per image for the losses
    c.GATHER_GPUS = False  # gather image-text pairs across processes for the contrastive loss
    c.CONCEPT_POOL_EMB = ""  # [M, D] .pth of concept embeddings (student side)
    c.CONCEPT_THRES = 0.1  # drop regions whose best teacher concept probability is below this
    c.TEACHER_RESNETS_DEPTH = 50  # official depth flag of the teacher (50 RN50, 200 RN50x4); checked, not used
    c.TEACHER_OPENCLIP_MODEL = ""  # open_clip name of the teacher (empty = same as OPENCLIP_MODEL)
    c.TEACHER_CLIP_WEIGHTS = ""  # teacher weights (empty = CLIP_WEIGHTS)
    c.TEACHER_CONCEPT_POOL_EMB = ""  # [M, D_teacher] concept embeddings for the teacher (empty = CONCEPT_POOL_EMB)
    c.TEACHER_POOLER_RESOLUTION = 14  # RoIAlign output size of the teacher
    c.PRETRAIN_LOSS_WEIGHTS = [1.0, 1.0, 1.0]  # region contrastive, region distillation, image-text
    c.PRETRAIN_CONTRASTIVE_FORM = "official"  # region contrastive loss: official (softmax over regions) | paper
    c.LEGACY_PADDED_IMAGE_BOX = False  # official: image-text box covers the padded batch tensor, padding included
    # --- CLIPSelf: self-distillation of a CLIP ViT's dense features (docs/method.md, "CLIPSelf") ---
    _C.MODEL.CLIPSELF = CN()
    cs = _C.MODEL.CLIPSELF
    cs.REGION_TYPE = "GRID"  # GRID (an m x n grid per image, m, n in 1..MAX_GRID) | PROPOSALS (given boxes)
    cs.MAX_GRID = 6  # M: the grid's rows and columns are drawn uniformly from 1..M per image
    cs.MAX_PROPOSALS = 36  # PROPOSALS: at most this many boxes per image, a random subset when more (0 = all)
    cs.POOLER_RESOLUTION = 1  # student: RoIAlign of the dense map to k x k bins, then the mean of the bins
    cs.POOLER_SAMPLING_RATIO = 0  # student RoIAlign samples per bin side (0 = adaptive, ceil(bin size))
    cs.TEACHER_INPUT_SIZE = 0  # side of the crops the teacher sees (0 = the ViT's native image size)
    cs.TEACHER_SAMPLING_RATIO = 0  # crop resizing (RoIAlign on the image) samples per pixel side (0 = adaptive)
    # --- grounding head (GLIP): the box predictor scores regions against a prompt's tokens ---
    _C.MODEL.GROUNDING = CN()
    g = _C.MODEL.GROUNDING
    g.ENABLED = False  # the CLIP detectors' box predictor becomes regionclip_d2.grounding.GroundingPredictor
    g.TEXT_DIM = 0  # width of the token features (0 = MODEL.CLIP.TEXT_EMB_DIM)
    g.FUSION_LAYERS = 1  # L bidirectional cross-attention layers between regions and tokens (0 = late fusion)
    g.ALIGN_DIM = 256  # width of the alignment space and of the fusion attention (0 = the token features' width)
    g.FUSION_HEADS = 8
    g.PRIOR_PROB = 0.01  # initial token probability (the alignment bias)
    g.REDUCE = "mean"  # a class's score from its tokens' probabilities: mean | max | last (the phrase's last token)
    g.FOCAL_ALPHA = 0.25  # sigmoid focal loss over tokens
    g.FOCAL_GAMMA = 2.0
    g.TRAIN_TEXT = False  # the text tower learns (default: frozen token features)
    # each phrase's tokens also carry the phrase's own CLIP embedding (read alone: its end-of-text output, the one
    # CLIP aligns with images; CLIP's causal text tower trains no other token for that)
    g.PHRASE_EMBEDDINGS = "none"  # none | add (to the phrase's tokens) | replace (the phrase's tokens)
    g.ALIGN_INIT = "random"  # random | identity (both projections start as the identity: needs ALIGN_DIM = widths)
    # --- optimiser ---
    _C.SOLVER.OPTIMIZER = "SGD"  # SGD (detectron2's, momentum SOLVER.MOMENTUM) | ADAMW (betas 0.9/0.999)
    # --- reliability of training runs ---
    # skip unreadable training samples; error once more than max(MAX_BAD_SAMPLE_FRACTION x data set size,
    # MIN_BAD_SAMPLES_TOLERATED) have failed in one loader process (the floor: a data set under a few hundred
    # images does not stop at its first bad image; both 0 = stop at the first); a data set whose every sample
    # fails always stops
    _C.DATALOADER.MAX_BAD_SAMPLE_FRACTION = 0.01
    _C.DATALOADER.MIN_BAD_SAMPLES_TOLERATED = 5
    # evaluation skips images it cannot read (logged, counted in the results, AP over the rest); error when every
    # image fails or more than max(MAX_UNREADABLE_FRACTION x images, 1) do
    _C.TEST.MAX_UNREADABLE_FRACTION = 0.05
    _C.SOLVER.NONFINITE_LOSS = "error"  # on a NaN/inf loss term: error (stop, naming it) | skip (the batch)
    _C.SOLVER.MAX_NONFINITE_SKIPS = 100  # with NONFINITE_LOSS skip: error after skipping more batches than this
    # SOLVER.AMP.ENABLED trains under autocast on the model's device, in this type: float16 (CUDA only, with a
    # gradient scaler) | bfloat16 (CUDA, or CPUs with bf16 instructions; emulated and slower on others; README)
    _C.SOLVER.AMP.DTYPE = "float16"
    _C.SOLVER.CHECKPOINT_KEEP_LAST = 0  # keep the last N periodic checkpoints (0 = all; model_final is kept)
    return cfg


# the official TEACHER_RESNETS_DEPTH of each CLIP ResNet (the official code's flag; 200 means RN50x4)
_TEACHER_DEPTHS = {"RN50": 50, "RN101": 101, "RN50x4": 200, "RN50x16": 300, "RN50x64": 400}


def check_config(cfg):
    """Raise ``ValueError`` for RegionCLIP keys set to values this implementation would ignore.

    Keys kept only so that official yaml files merge (``USE_TEXT_EMB_CLASSIFIER``,
    ``TEACHER_RESNETS_DEPTH``) must agree with what the model actually does."""
    c = cfg.MODEL.CLIP
    if not c.USE_TEXT_EMB_CLASSIFIER:
        raise ValueError("MODEL.CLIP.USE_TEXT_EMB_CLASSIFIER False: only the text-embedding classifier is "
                         "implemented; remove the key or set it True")
    teacher = (c.TEACHER_OPENCLIP_MODEL or c.OPENCLIP_MODEL).replace("-quickgelu", "")
    depth = _TEACHER_DEPTHS.get(teacher)
    if depth is not None and not (c.OPENCLIP_MODEL_CONFIG and not c.TEACHER_OPENCLIP_MODEL) \
            and c.TEACHER_RESNETS_DEPTH != depth:
        raise ValueError(f"MODEL.CLIP.TEACHER_RESNETS_DEPTH {c.TEACHER_RESNETS_DEPTH} does not match the teacher "
                         f"{teacher} (depth flag {depth}): the teacher is chosen by MODEL.CLIP.TEACHER_OPENCLIP_MODEL "
                         f"(empty = MODEL.CLIP.OPENCLIP_MODEL); set TEACHER_RESNETS_DEPTH {depth} or name the "
                         "teacher you want")
    return cfg
