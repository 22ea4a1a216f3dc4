#!/usr/bin/env python
"""Patch the unpacked ``pb1-detectron2==0.6`` sdist so it installs as pure Python.

The sdist is upstream detectron2 v0.6 without its C++ sources. Every edit below
is checked: an edit that no longer finds exactly what it expects stops the
set-up with a message, so a changed sdist fails loudly instead of silently.

Usage: python tools/setup/patch_detectron2.py <unpacked sdist folder>
"""
import os
import re
import shutil
import sys

_C_STANDIN = '''"""Stand-in for detectron2's C++ extension, written by regionclip_d2's set-up.

The PyPI sdist of detectron2 0.6 ships without C++ sources. RoIAlign and NMS come
from torchvision and work; the ops below live only in the extension.
"""


def _missing(op):
    def _raise(*args, **kwargs):
        raise NotImplementedError(
            f"detectron2._C.{op} is not available: this detectron2 was installed as pure "
            "Python (no C++ extension). Rotated boxes, deformable convolution and the fast "
            "COCO evaluator need a compiled detectron2; use COCOEvaluator(use_fast_impl=False)."
        )

    return _raise


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    return _missing(name)


def get_compiler_version():
    return "none (pure-Python install)"


def get_cuda_version():
    return "none (pure-Python install)"


def has_cuda():
    return False
'''


class PatchError(RuntimeError):
    pass


def _read(root, rel):
    with open(os.path.join(root, rel), encoding="utf-8") as f:
        return f.read()


def _write(root, rel, text):
    with open(os.path.join(root, rel), "w", encoding="utf-8") as f:
        f.write(text)


def replace_exact(root, rel, old, new, count):
    """Replace ``old`` by ``new`` in file ``rel``; it must occur exactly ``count`` times."""
    text = _read(root, rel)
    found = text.count(old)
    if found != count:
        raise PatchError(f"{rel}: expected {count} occurrence(s) of {old!r}, found {found}")
    _write(root, rel, text.replace(old, new))


_NP_ALIAS = re.compile(r"\bnp\.(int|float|bool)(?![\w.])")


def patch(root):
    if not os.path.isfile(os.path.join(root, "setup.py")):
        raise PatchError(f"{root} does not look like the unpacked sdist (no setup.py)")
    # 1. no extension modules
    replace_exact(root, "setup.py", "ext_modules=get_extensions(),", "ext_modules=[],", 1)
    replace_exact(
        root, "setup.py",
        'cmdclass={"build_ext": torch.utils.cpp_extension.BuildExtension},', "", 1)
    # 2. distribution name "detectron2"
    replace_exact(root, "setup.py", 'name="pb1-detectron2",', 'name="detectron2",', 1)
    # black is only used by detectron2's lazy-config pretty printer; its pinned
    # 2021 beta does not matter at run time, so do not pin it.
    replace_exact(root, "setup.py", '"black==21.4b2",', '"black",', 1)
    # 3. a Python stand-in for the missing extension
    c_path = os.path.join(root, "detectron2", "_C.py")
    if os.path.exists(c_path):
        raise PatchError("detectron2/_C.py already exists: is this sdist already patched?")
    _write(root, "detectron2/_C.py", _C_STANDIN)
    # 4. Pillow 10 removed Image.LINEAR
    replace_exact(root, "detectron2/data/transforms/transform.py",
                  "Image.LINEAR", "Image.BILINEAR", 1)
    # 5. numpy aliases removed in numpy 1.24
    expected = {
        "detectron2/evaluation/pascal_voc_evaluation.py": 2,
        "detectron2/evaluation/sem_seg_evaluation.py": 7,
        "detectron2/structures/masks.py": 3,
        "detectron2/data/build.py": 2,
        "detectron2/utils/visualizer.py": 3,
        "detectron2/utils/video_visualizer.py": 1,
    }
    for rel, count in expected.items():
        text = _read(root, rel)
        new, n = _NP_ALIAS.subn(lambda m: m.group(1), text)
        if n != count:
            raise PatchError(f"{rel}: expected {count} numpy alias use(s), found {n}")
        _write(root, rel, new)
    leftovers = []
    for dirpath, _, files in os.walk(os.path.join(root, "detectron2")):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(dirpath, name)
                with open(path, encoding="utf-8") as f:
                    if _NP_ALIAS.search(f.read()):
                        leftovers.append(path)
    if leftovers:
        raise PatchError(f"numpy aliases left in: {leftovers}")
    # 6. model-zoo configs where setup.py looks for them
    src = os.path.join(root, "detectron2", "model_zoo", "configs")
    dst = os.path.join(root, "configs")
    if not os.path.isdir(src) or os.path.exists(dst):
        raise PatchError("expected detectron2/model_zoo/configs and no top-level configs/")
    shutil.move(src, dst)
    # 7. no pkg_resources (gone from current setuptools)
    rel = "detectron2/model_zoo/model_zoo.py"
    replace_exact(root, rel, "import pkg_resources\n", "", 1)
    replace_exact(
        root, rel,
        'cfg_file = pkg_resources.resource_filename(\n'
        '        "detectron2.model_zoo", os.path.join("configs", config_path)\n'
        '    )',
        'cfg_file = os.path.join(os.path.dirname(__file__), "configs", config_path)',
        1,
    )


def main(argv):
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    try:
        patch(argv[1])
    except PatchError as e:
        print(f"patch_detectron2: {e}", file=sys.stderr)
        print("The detectron2 sdist is not the one this set-up was written for.", file=sys.stderr)
        return 1
    print("patch_detectron2: all edits applied and verified")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
