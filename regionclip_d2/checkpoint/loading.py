"""Loading weights into regionclip_d2 models, whatever the file's format.

``adapt_state_dict`` maps a state dict onto a model's keys. Detector meta-
architectures install it as a load hook (``install_load_hook``), so every loader
(detectron2's ``DetectionCheckpointer`` inside ``DefaultPredictor``, our
``RegionCLIPCheckpointer``, a plain ``load_state_dict``) gets the same conversion.
"""
import functools
import logging
import math
import os
from collections import defaultdict
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.layers import FrozenBatchNorm2d

from .formats import (
    TEXT_PREFIXES,
    VOCABULARY_KEYS,
    CheckpointFormatError,
    clip_to_detector_keys,
    detect_format,
    load_state_dict_file,
    normalize_image_tower,
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
    sd = normalize_image_tower(sd)
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
    the file must cover all of ``model``). A CLIP ViT tower of another architecture is named
    as such (:func:`check_vit_towers`)."""
    model_sd = model.state_dict()
    check_vit_towers(sd, model_sd, source)
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


def vit_tower_shape(sd: Dict[str, torch.Tensor]) -> Optional[Dict[str, int]]:
    """The architecture of a CLIP ViT image tower read off its weights (keys relative to the
    tower): ``width``, ``patch``, ``positions`` (1 + grid cells), ``grid`` (the side of a square
    grid, 0 if not square), ``layers``, ``embed_dim`` (``proj``), ``mlp`` (hidden width); None
    without ``conv1.weight`` and ``positional_embedding``."""
    conv, pos = sd.get("conv1.weight"), sd.get("positional_embedding")
    if conv is None or pos is None or conv.dim() != 4 or pos.dim() != 2:
        return None
    n = int(pos.shape[0])
    g = math.isqrt(max(n - 1, 0))
    out = {"width": int(conv.shape[0]), "patch": int(conv.shape[-1]), "positions": n,
           "grid": g if g * g == n - 1 else 0,
           "layers": len({k.split(".")[2] for k in sd if k.startswith("transformer.resblocks.")})}
    proj = sd.get("proj")
    if proj is not None and proj.dim() == 2:
        out["embed_dim"] = int(proj.shape[1])
    fc = sd.get("transformer.resblocks.0.mlp.c_fc.weight")
    if fc is not None:
        out["mlp"] = int(fc.shape[0])
    return out


@functools.lru_cache(maxsize=None)
def _openclip_vit_shapes() -> Tuple[Tuple[str, Tuple], ...]:
    import open_clip

    from ..modeling.clip_model import vit_model_names  # here: modeling imports this module

    out = []
    for name in vit_model_names():
        cfg = open_clip.get_model_config(name)
        v = cfg["vision_cfg"]
        size, patch = v.get("image_size", 224), v.get("patch_size", 16)
        if not isinstance(size, int) or not isinstance(patch, int):
            continue
        width = v.get("width", 768)
        out.append((name, (width, patch, 1 + (size // patch) ** 2, v["layers"], cfg["embed_dim"],
                           int(width * v.get("mlp_ratio", 4.0)))))
    return tuple(out)


def openclip_vit_names(shape: Dict[str, int]) -> List[str]:
    """open_clip model names whose image tower has this shape (:func:`vit_tower_shape`): ``ViT-*`` names
    first, shortest first."""
    key = (shape["width"], shape["patch"], shape["positions"], shape["layers"], shape.get("embed_dim"),
           shape.get("mlp"))
    names = [n for n, s in _openclip_vit_shapes()
             if all(a is None or a == b for a, b in zip(key, s))]
    return sorted(names, key=lambda n: (not n.startswith("ViT-"), len(n), n))


def _describe_positions(shape: Dict[str, int]) -> str:
    names = openclip_vit_names(shape)
    if shape["grid"]:
        g, p = shape["grid"], shape["patch"]
        where = f"{g}x{g} patches of {p} px: " + (f"{names[0]} at {g * p} px" if names else f"a {g * p} px input")
    else:
        where = f"{shape['positions'] - 1} patch positions, not a square grid"
    return f"{shape['positions']} tokens ({where})"


def check_vit_towers(sd: Dict[str, torch.Tensor], model_sd: Dict[str, torch.Tensor], source: str):
    """Raise when the file's CLIP ViT image tower (for each ViT of the model: the keys under its
    prefix) differs from the model's in width, patch size, positional embedding, depth, joint
    dimension or MLP width; the error names both architectures (open_clip model names where one
    matches) and the setting that builds the file's."""
    for pre in sorted({k[:-len("class_embedding")] for k in model_sd if k.endswith("class_embedding")}):
        file_shape = vit_tower_shape({k[len(pre):]: v for k, v in sd.items() if k.startswith(pre)})
        model_shape = vit_tower_shape({k[len(pre):]: v for k, v in model_sd.items() if k.startswith(pre)})
        if file_shape is None or model_shape is None:
            continue
        diffs = []
        if file_shape["positions"] != model_shape["positions"]:
            diffs.append(f"positional embedding has {_describe_positions(file_shape)} but the config builds "
                         f"{_describe_positions(model_shape)}")
        for field, what in (("width", "width {}"), ("patch", "{} px patches"), ("layers", "{} transformer block{}"),
                            ("embed_dim", "a {}-d joint embedding (proj)"), ("mlp", "MLP width {}")):
            a, b = file_shape.get(field), model_shape.get(field)
            if a is not None and b is not None and a != b:
                diffs.append(f"{what.format(a, 's' if a != 1 else '')} but the config builds "
                             f"{what.format(b, 's' if b != 1 else '')}")
        if not diffs:
            continue
        names = openclip_vit_names(file_shape)
        if names:
            fix = f"To load it, set MODEL.CLIP.OPENCLIP_MODEL {names[0]}"
            quick = [n for n in names if n.endswith("-quickgelu")]
            if quick and not names[0].endswith("-quickgelu"):
                fix += f" ({quick[0]} for OpenAI's weights, which use QuickGELU)"
        else:
            fix = ("No open_clip model has this tower: to load it, give MODEL.CLIP.OPENCLIP_MODEL_CONFIG a model "
                   f"config with embed_dim {file_shape.get('embed_dim', '?')} and vision_cfg width "
                   f"{file_shape['width']}, layers {file_shape['layers']}, patch_size {file_shape['patch']}"
                   + (f", image_size {file_shape['grid'] * file_shape['patch']}" if file_shape["grid"] else ""))
        raise CheckpointFormatError(
            f"{source}: its CLIP ViT image tower is not the one the config builds{' for ' + pre[:-1] if pre else ''}: "
            + "; ".join(diffs) + f". {fix}")


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
            data["model"] = unwrap_state_dict(data["model"], source=repr(filename))
            return data
        return {"model": unwrap_state_dict(data, source=repr(filename))}

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


def split_towers(sd: Dict[str, torch.Tensor], fmt: str) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
    """(image tower, text tower) of a state dict of format ``fmt``, keys relative to each tower:
    ``visual.*`` and the text keys of a CLIP file, ``backbone[.bottom_up].*`` and ``lang_encoder.*``
    of a regionclip / detectron2 checkpoint."""
    if fmt == "clip":
        vis = {k[len("visual."):]: v for k, v in sd.items() if k.startswith("visual.")}
        txt = {k: v for k, v in sd.items() if k.startswith(TEXT_PREFIXES)}
    else:
        pre = "backbone.bottom_up." if any(k.startswith("backbone.bottom_up.") for k in sd) else "backbone."
        vis = {k[len(pre):]: v for k, v in sd.items() if k.startswith(pre)}
        txt = {k[len("lang_encoder."):]: v for k, v in sd.items() if k.startswith("lang_encoder.")}
    return vis, txt


def load_clip_state_dict(sd: Dict[str, torch.Tensor], fmt: str, source: str, backbone: nn.Module = None,
                         lang_encoder: nn.Module = None):
    """:func:`load_clip_weights` for a state dict already read (``fmt`` from :func:`detect_format`)."""
    vis, txt = split_towers(sd, fmt)
    if backbone is not None and lang_encoder is None and txt:
        logger.info("%s: its text tower (%d tensors) is not loaded: only the image tower is asked for here", source,
                    len(txt))
    for module, part, what in ((backbone, vis, "image tower"), (lang_encoder, txt, "text tower")):
        if module is None:
            continue
        if not part:
            hint = ""
            if module is lang_encoder and vis:
                hint = (": it holds an image tower only. Give a whole CLIP file (both towers) as "
                        "MODEL.CLIP.CLIP_WEIGHTS and the image tower as MODEL.WEIGHTS (convert it with "
                        "tools/convert_weights.py --format clipself)")
            raise CheckpointFormatError(f"{source} has no {what} weights{hint}")
        if module is backbone:
            check_tower_kind(part, module, source)
        check_compatible(part, module, f"{source} ({what})", whole=True)
        module.load_state_dict(part, strict=False)


def load_clip_weights(path: str, backbone: nn.Module = None, lang_encoder: nn.Module = None,
                      trusted: bool = False):
    """Load an OpenAI / OpenCLIP file, a bare image tower, or a regionclip checkpoint's backbone /
    lang_encoder into a CLIP backbone (ResNet or ViT) and/or language encoder, strictly; returns
    the file's format."""
    sd, fmt = load_state_dict_file(path, trusted=trusted)
    load_clip_state_dict(sd, fmt, repr(path), backbone=backbone, lang_encoder=lang_encoder)
    return fmt


def load_rpn_weights(path: str, model: nn.Module, trusted: bool = False):
    """Load the localization branch (``offline_backbone`` + ``offline_proposal_generator``)
    from a detectron2 RPN checkpoint or a full regionclip checkpoint, strictly."""
    data = read_checkpoint(path, trusted=trusted)
    sd = rpn_to_offline_keys(unwrap_state_dict(data, source=repr(path)))
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
                            else data, source=f"{key} {path!r}")
    if detect_format(raw) == "unknown":
        raise CheckpointFormatError(f"{key} {path!r}: unknown checkpoint format (first keys: {list(raw)[:5]})")
    sd = adapt_state_dict(raw, _model_keys(model))
    check_compatible(sd, model, f"{key} {path!r}")
    if not has_clip_weights and not any(k.startswith("backbone.") for k in sd):
        raise CheckpointFormatError(
            f"{key} {path!r} holds no recognition-branch weights (backbone.*) and MODEL.CLIP.CLIP_WEIGHTS is "
            "empty: the detector would run a randomly initialised CLIP backbone. Give a detector or "
            "RegionCLIP checkpoint, or set MODEL.CLIP.CLIP_WEIGHTS")
