"""The set-up's own checks: the detectron2 patcher fails loudly on an unexpected sdist."""
import glob
import os
import subprocess
import sys
import tarfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SDIST = os.path.join(ROOT, ".cache", "setup", "pb1-detectron2-0.6.tar.gz")
PATCHER = os.path.join(ROOT, "tools", "setup", "patch_detectron2.py")


@pytest.fixture
def sdist(tmp_path):
    if not os.path.isfile(SDIST):
        pytest.skip("the detectron2 sdist is only cached after tools/setup/install.sh ran here")
    with tarfile.open(SDIST) as t:
        t.extractall(tmp_path, filter="data")
    return str(tmp_path / "pb1-detectron2-0.6")


def patch(path):
    return subprocess.run([sys.executable, PATCHER, path], capture_output=True, text=True)


def test_patch_applies_and_verifies(sdist):
    r = patch(sdist)
    assert r.returncode == 0, r.stderr
    assert os.path.isfile(os.path.join(sdist, "detectron2", "_C.py"))
    assert os.path.isdir(os.path.join(sdist, "configs", "COCO-Detection"))
    text = open(os.path.join(sdist, "setup.py")).read()
    assert 'name="detectron2"' in text and "ext_modules=[]" in text
    for f in glob.glob(os.path.join(sdist, "detectron2", "**", "*.py"), recursive=True):
        src = open(f).read()
        assert "Image.LINEAR" not in src and "pkg_resources" not in src, f
    # a second run on the patched tree must not silently succeed
    r = patch(sdist)
    assert r.returncode == 1 and "not the one this set-up was written for" in r.stderr


def test_patch_fails_loudly_on_a_changed_sdist(sdist):
    path = os.path.join(sdist, "detectron2", "structures", "masks.py")
    text = open(path).read()
    open(path, "w").write(text.replace("np.bool", "np.bool_", 1))
    r = patch(sdist)
    assert r.returncode == 1 and "masks.py: expected 3 numpy alias use(s), found 2" in r.stderr


def test_installed_detectron2_is_the_patched_pure_python_one():
    import detectron2
    from detectron2 import _C

    assert detectron2.__version__ == "0.6"
    with pytest.raises(NotImplementedError, match="box_iou_rotated is not available"):
        _C.box_iou_rotated(None, None)
    from detectron2 import model_zoo

    assert os.path.isfile(model_zoo.get_config_file("COCO-Detection/faster_rcnn_R_50_C4_1x.yaml"))


def test_nltk_data_is_usable():
    import nltk
    from nltk.stem import WordNetLemmatizer

    tokens = nltk.word_tokenize("Two red stars lie next to the blue rings.")
    tags = dict(nltk.pos_tag(tokens))
    assert tags["stars"] == "NNS" and tags["rings"] == "NNS"
    assert WordNetLemmatizer().lemmatize("geese") == "goose"
