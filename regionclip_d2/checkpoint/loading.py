"""Loading weights into regionclip_d2 models, whatever the file's format.

``adapt_state_dict`` maps a state dict onto a model's keys. Detector meta-
architectures install it as a load hook (``install_load_hook``), so every loader
(detectron2's ``DetectionCheckpointer`` inside ``DefaultPredictor``, our
``RegionCLIPCheckpointer``, a plain ``load_state_dict``) gets the same conversion.
"""
import logging
import os
from collections import defaultdict
from typing import Dict, List

import torch
from torch import nn

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.layers import FrozenBatchNorm2d

from .formats import (
    VOCABULARY_KEYS,
    CheckpointFormatError,
    clip_to_detector_keys,
    detect_format,
    load_state_dict_file,
    read_checkpoint,
    rpn_to_offline_keys,
    unwrap_state_dict,
)

logger = logging.getLogger(__name__)

_TOP = ("backbone.bottom_up.", "backbone.", "teacher_backbone.", "lang_encoder.", "roi_heads.",
        "offline_backbone.", "offline_proposal_generator.", "proposal_generator.")


def adapt_state_dict(sd: Dict[str, torch.Tensor], model_keys) -> Dict[str, torch.Tensor]:
    """Return ``sd`` with keys mapped onto ``model_keys`` (a set of the model's state-dict keys)."""
    model_keys = set(model_keys)
    fmt = detect_format(sd)
    if fmt == "clip":
        visual = [p for p in ("backbone.", "backbone.bottom_up.", "teacher_backbone.")
                  if p + "conv1.weight" in model_keys]
        text = "lang_encoder." if "lang_encoder.token_embedding.weight" in model_keys else None
        return clip_to_detector_keys(sd, visual, text)
    out = {}
    fpn = "backbone.bottom_up.conv1.weight" in model_keys and "backbone.conv1.weight" not in model_keys
    for k, v in sd.items():
        if k.startswith(VOCABULARY_KEYS):
            continue  # vocabulary comes from config / run time, not from weight files
        if fpn and k.startswith("backbone.") and not k.startswith(("backbone.bottom_up.", "backbone.fpn_")) \
                and "backbone.bottom_up." + k[len("backbone."):] in model_keys:
            k = "backbone.bottom_up." + k[len("backbone."):]
        out[k] = v
    return out


def protect_frozen_bn(sd: Dict[str, torch.Tensor], model: nn.Module):
    """Keep FrozenBN statistics of modules a file does not cover.

    detectron2's FrozenBatchNorm2d fills missing running mean/var with 0/1 when a state
    dict carries no version metadata; with torch 2 that silently resets every FrozenBN
    of a branch the file does not contain (the official code loses the CLIP backbone's
    statistics when it loads the separate RPN file). Insert the current values instead.
    """
    for name, m in model.named_modules():
        if isinstance(m, FrozenBatchNorm2d):
            p = name + "." if name else ""
            if p + "weight" not in sd and p + "running_mean" not in sd:
                sd[p + "running_mean"] = m.running_mean.detach().clone()
                sd[p + "running_var"] = m.running_var.detach().clone()


def _adapt_on_load(model, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    """The load hook (see :func:`install_load_hook`): a function of the module it is called
    with, not a closure, so that a deep copy or a pickle of the model keeps a working hook."""
    if prefix:
        return
    adapted = adapt_state_dict(dict(state_dict), _model_keys(model))
    rpn_file = getattr(model, "rpn_weights_file", "")
    if rpn_file:  # the RPN branch came from MODEL.CLIP.BB_RPN_WEIGHTS: it wins over the checkpoint's
        dropped = [k for k in adapted if k.startswith(("offline_backbone.", "offline_proposal_generator."))]
        for k in dropped:
            del adapted[k]
        if dropped:
            logger.info("RPN branch weights come from MODEL.CLIP.BB_RPN_WEIGHTS (%s); ignoring the "
                        "%d offline_* keys of this checkpoint", rpn_file, len(dropped))
    protect_frozen_bn(adapted, model)
    state_dict.clear()
    state_dict.update(adapted)


def install_load_hook(model: nn.Module):
    """Make ``model.load_state_dict`` accept any supported format (see module docstring).
    A model with a non-empty ``rpn_weights_file`` attribute keeps its RPN branch (the
    ``offline_*`` keys of a loaded file are ignored)."""
    model.register_load_state_dict_pre_hook(_adapt_on_load)


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (full or read-only disk); the previous one stays good."""


def _atomic_write(path: str, write, mode: str):
    """Write to ``<path>.tmp.<pid>``, fsync, rename into place. On failure the temporary file is
    removed and :class:`CheckpointWriteError` names the file and the fix."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise CheckpointWriteError(
            e.errno, f"could not write {path} ({e.strerror or e}): free space in (or fix the permissions "
            "of) the output folder, or lower SOLVER.CHECKPOINT_KEEP_LAST; the previous checkpoint and "
            "last_checkpoint are unchanged, so --resume continues from it") from e


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (ours counts as alive)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True


def _model_keys(model):
    return set(model.state_dict().keys())


def check_compatible(sd: Dict[str, torch.Tensor], model: nn.Module, source: str, whole: bool = False):
    """Raise on shape mismatches and on modules the file covers only in part (``whole``:
    the file must cover all of ``model``)."""
    model_sd = model.state_dict()
    bad = [(k, tuple(v.shape), tuple(model_sd[k].shape)) for k, v in sd.items()
           if k in model_sd and tuple(v.shape) != tuple(model_sd[k].shape)]
    if bad:
        lines = "\n".join(f"  {k}: checkpoint {a} vs model {b}" for k, a, b in bad[:10])
        raise CheckpointFormatError(
            f"{source}: {len(bad)} weight(s) have the wrong shape:\n{lines}\nThe file is for a different "
            "architecture: set MODEL.CLIP.OPENCLIP_MODEL (or OPENCLIP_MODEL_CONFIG) to the model the "
            "weights were trained with")
    covered = defaultdict(int)
    for k in sd:
        if k in model_sd:
            covered[_top(k)] += 1
    missing = defaultdict(list)
    for k in model_sd:
        if k.endswith("num_batches_tracked"):
            continue
        top = "" if whole else _top(k)
        if (whole or covered.get(top)) and k not in sd:
            missing[top].append(k)
    if missing:
        top, keys = max(missing.items(), key=lambda kv: len(kv[1]))
        raise CheckpointFormatError(
            f"{source} provides {top + '*' if top else 'weights'} but lacks {len(keys)} of its weights "
            f"(e.g. {keys[:5]}): the file is "
            "incomplete or from a different architecture; set MODEL.CLIP.OPENCLIP_MODEL to match it")
    matched = sum(covered.values())
    if sd and not matched:
        raise CheckpointFormatError(
            f"{source}: none of its {len(sd)} keys match the model (first: {list(sd)[:3]}); "
            "it is not a checkpoint for this architecture")
    unexpected = [k for k in sd if k not in model_sd and not k.endswith("num_batches_tracked")]
    if unexpected:
        logger.warning("%s: %d key(s) not used by the model, e.g. %s", source, len(unexpected), unexpected[:5])


def _top(key):
    for p in _TOP:
        if key.startswith(p):
            return p
    return key.split(".")[0] + "."


class RegionCLIPCheckpointer(DetectionCheckpointer):
    """detectron2's checkpointer with every regionclip_d2 format, weights-only loading
    unless ``trusted``, and clear errors for mismatched files."""

    def __init__(self, model, save_dir="", *, trusted: bool = False, **checkpointables):
        super().__init__(model, save_dir, **checkpointables)
        self.trusted = trusted

    def save(self, name: str, **kwargs):
        """Write ``<name>.pth`` atomically (a temporary file renamed into place), then point
        ``last_checkpoint`` at it (also atomically): a crash never leaves a partial file
        that ``--resume`` would pick up."""
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        path = os.path.join(self.save_dir, basename)
        self.logger.info("Saving checkpoint to %s", path)
        _atomic_write(path, lambda f: torch.save(data, f), "wb")
        self.tag_last_checkpoint(basename)

    def remove_stale_temporaries(self) -> List[str]:
        """Delete the temporary files of interrupted saves (``*.tmp.<pid>`` whose process is
        gone) from ``save_dir``; returns their paths."""
        removed = []
        if not self.save_dir or not os.path.isdir(self.save_dir):
            return removed
        for name in os.listdir(self.save_dir):
            stem, sep, pid = name.rpartition(".tmp.")
            if not sep or not pid.isdigit() or process_alive(int(pid)):
                continue
            path = os.path.join(self.save_dir, name)
            try:
                os.remove(path)
            except OSError:
                continue
            removed.append(path)
            self.logger.info("removed %s, the partial file of an interrupted checkpoint save", path)
        return removed

    def tag_last_checkpoint(self, last_filename_basename: str):
        _atomic_write(os.path.join(self.save_dir, "last_checkpoint"),
                      lambda f: f.write(last_filename_basename), "w")

    def _load_file(self, filename):
        data = read_checkpoint(filename, trusted=self.trusted)
        if isinstance(data, dict) and isinstance(data.get("model"), dict):
            data = dict(data)
            data["model"] = unwrap_state_dict(data["model"])
            return data
        return {"model": unwrap_state_dict(data)}

    def _load_model(self, checkpoint):
        model = self.model.module if hasattr(self.model, "module") else self.model
        sd = adapt_state_dict(checkpoint["model"], _model_keys(model))
        if detect_format(checkpoint["model"]) == "unknown":
            raise CheckpointFormatError(
                f"unknown checkpoint format (first keys: {list(checkpoint['model'])[:5]})")
        check_compatible(sd, model, "checkpoint")
        checkpoint["model"] = sd
        checkpoint.pop("matching_heuristics", None)
        return super()._load_model(checkpoint)


_BACKBONE_NAMES = {"ViT": "build_clip_vit_backbone (or build_clip_vit_sfp_backbone)",
                   "ResNet": "build_clip_resnet_backbone (or build_clip_resnet_fpn_backbone)"}


def tower_kind(keys=None, module: nn.Module = None):
    """``"ViT"``, ``"ResNet"`` or None: the kind of CLIP image tower a state dict's keys (relative
    to the tower) or a backbone module describe."""
    if module is not None:
        module = getattr(module, "bottom_up", module)
        keys = [k for k, _ in module.named_parameters()]
    keys = list(keys or ())
    if any(k == "class_embedding" or k.startswith("transformer.resblocks.") for k in keys):
        return "ViT"
    if any(k.startswith(("attnpool.", "layer1.")) for k in keys):
        return "ResNet"
    return None


def check_tower_kind(part: Dict[str, torch.Tensor], backbone: nn.Module, path: str):
    """Raise when an image tower's weights are for the other kind of CLIP (ViT vs ResNet)."""
    have, want = tower_kind(part), tower_kind(module=backbone)
    if have and want and have != want:
        raise CheckpointFormatError(
            f"{path!r} holds a CLIP {have} image tower but the backbone is a CLIP {want}: to use these weights "
            f"set MODEL.BACKBONE.NAME {_BACKBONE_NAMES[have]} and MODEL.CLIP.OPENCLIP_MODEL to the file's "
            f"{have} architecture; to keep the {want}, give {want} weights")


def load_clip_weights(path: str, backbone: nn.Module = None, lang_encoder: nn.Module = None,
                      trusted: bool = False):
    """Load an OpenAI / OpenCLIP file (or a regionclip checkpoint's backbone/lang_encoder)
    into a CLIP ResNet backbone and/or language encoder, strictly."""
    sd, fmt = load_state_dict_file(path, trusted=trusted)
    if fmt == "clip":
        vis = {k[len("visual."):]: v for k, v in sd.items() if k.startswith("visual.")}
        txt = {k: v for k, v in sd.items() if k.startswith(tuple(
            ("token_embedding.", "positional_embedding", "transformer.", "ln_final.", "text_projection")))}
    else:
        pre = "backbone.bottom_up." if any(k.startswith("backbone.bottom_up.") for k in sd) else "backbone."
        vis = {k[len(pre):]: v for k, v in sd.items() if k.startswith(pre)}
        txt = {k[len("lang_encoder."):]: v for k, v in sd.items() if k.startswith("lang_encoder.")}
    for module, part, what in ((backbone, vis, "image tower"), (lang_encoder, txt, "text tower")):
        if module is None:
            continue
        if not part:
            raise CheckpointFormatError(f"{path!r} has no {what} weights")
        if module is backbone:
            check_tower_kind(part, module, path)
        check_compatible(part, module, f"{path!r} ({what})", whole=True)
        module.load_state_dict(part, strict=False)
    return fmt


def load_rpn_weights(path: str, model: nn.Module, trusted: bool = False):
    """Load the localization branch (``offline_backbone`` + ``offline_proposal_generator``)
    from a detectron2 RPN checkpoint or a full regionclip checkpoint, strictly."""
    data = read_checkpoint(path, trusted=trusted)
    sd = rpn_to_offline_keys(unwrap_state_dict(data))
    if not sd:
        raise CheckpointFormatError(
            f"MODEL.CLIP.BB_RPN_WEIGHTS={path!r} holds no backbone.* / proposal_generator.* weights: "
            "give the checkpoint of the RPN branch (e.g. trained with configs/LVISv1-RPN or COCO-RPN)")
    for name in ("offline_backbone", "offline_proposal_generator"):
        module = getattr(model, name)
        part = {k[len(name) + 1:]: v for k, v in sd.items() if k.startswith(name + ".")}
        if not part:
            raise CheckpointFormatError(f"{path!r} has no weights for the RPN branch's {name}")
        check_compatible(part, module, f"MODEL.CLIP.BB_RPN_WEIGHTS {path!r} ({name})", whole=True)
        module.load_state_dict(part, strict=False)


def check_weights_file(path: str, model: nn.Module, *, trusted: bool = False, has_clip_weights: bool = False,
                       key: str = "MODEL.WEIGHTS"):
    """Check a detector checkpoint against ``model`` before anyone loads it, with the rules of
    :class:`RegionCLIPCheckpointer`: weights only unless ``trusted`` (``.pkl`` files are refused),
    a damaged file is an error, shapes must match (errors name keys and shapes), a module the
    file covers must be covered whole, and the recognition branch (``backbone.*``) must come
    from the file or from ``MODEL.CLIP.CLIP_WEIGHTS``.

    ``build_model`` runs this for ``cfg.MODEL.WEIGHTS``, so that paths that load the weights
    with detectron2's own checkpointer (``DefaultPredictor``) get the same checks. Paths that
    are not local files (``detectron2://``, URLs) are left to detectron2."""
    if not path or not os.path.isfile(path):
        return
    data = read_checkpoint(path, trusted=trusted)
    raw = unwrap_state_dict(data["model"] if isinstance(data, dict) and isinstance(data.get("model"), dict)
                            else data)
    if detect_format(raw) == "unknown":
        raise CheckpointFormatError(f"{key} {path!r}: unknown checkpoint format (first keys: {list(raw)[:5]})")
    sd = adapt_state_dict(raw, _model_keys(model))
    check_compatible(sd, model, f"{key} {path!r}")
    if not has_clip_weights and not any(k.startswith("backbone.") for k in sd):
        raise CheckpointFormatError(
            f"{key} {path!r} holds no recognition-branch weights (backbone.*) and MODEL.CLIP.CLIP_WEIGHTS is "
            "empty: the detector would run a randomly initialised CLIP backbone. Give a detector or "
            "RegionCLIP checkpoint, or set MODEL.CLIP.CLIP_WEIGHTS")
