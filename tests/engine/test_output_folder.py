"""The output folder: one run at a time, a full disk fails cleanly, old checkpoints pruned."""
import os
import subprocess
import sys

import pytest
import torch
from helpers import tiny_model

from regionclip_d2.checkpoint import RegionCLIPCheckpointer
from regionclip_d2.checkpoint.loading import CheckpointWriteError
from regionclip_d2.engine.trainer import OutputDirInUseError, lock_output_dir, periodic_checkpoints

C4_GT = "configs/COCO-InstanceSegmentation/CLIP_fast_rcnn_R_50_C4_zsinf_GT.yaml"


def test_a_second_run_in_the_same_output_folder_is_refused(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import sys; from regionclip_d2.engine.trainer import "
                               "lock_output_dir; f = lock_output_dir(sys.argv[1]); print('locked', flush=True); "
                               "sys.stdin.read()", str(tmp_path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(OutputDirInUseError, match=f"in use by process {holder.pid} .*another OUTPUT_DIR"):
            lock_output_dir(str(tmp_path))
    finally:
        holder.communicate("")  # the holder exits: the OS releases its lock
    f = lock_output_dir(str(tmp_path))  # free again
    f.close()


def test_a_full_disk_leaves_no_partial_file_and_the_last_checkpoint_intact(tiny_clip_config, tmp_path, monkeypatch):
    model = tiny_model(C4_GT, tiny_clip_config)
    tmp_path = tmp_path / "out"
    tmp_path.mkdir()
    ckpt = RegionCLIPCheckpointer(model, str(tmp_path))
    ckpt.save("model_0000001")
    good = (tmp_path / "model_0000001.pth").read_bytes()

    def full(obj, f, *a, **k):
        f.write(b"half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(CheckpointWriteError, match="could not write .*model_0000002.pth .*No space left.*--resume"):
        ckpt.save("model_0000002")
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000001.pth"]
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000001.pth"
    assert (tmp_path / "model_0000001.pth").read_bytes() == good


def test_periodic_checkpoints_are_listed_oldest_first(tmp_path):
    for n in ("model_0000009.pth", "model_0000003.pth", "model_final.pth", "model_0000005.pth.tmp.12", "x.pth"):
        (tmp_path / n).write_bytes(b"")
    assert [os.path.basename(p) for p in periodic_checkpoints(str(tmp_path))] == ["model_0000003.pth",
                                                                                   "model_0000009.pth"]
