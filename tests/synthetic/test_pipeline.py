"""The whole synthetic pipeline, tiny: every stage runs through the public tools and
writes what the next one reads."""
import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tools"))  # synthetic_pipeline: the tools' driver, not the library


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic_demo")
    r = subprocess.run([sys.executable, "tools/synthetic_demo.py", "--profile", "tiny", "--output", str(out)],
                       cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    return out, r.stdout


def test_every_stage_ran(tiny_run):
    out, stdout = tiny_run
    for i in range(1, 12):
        assert f"{i}/11" in stdout
    for path in ("world/world.json", "world_clip/world_clip.pt", "concepts/concepts.txt",
                 "concepts/concept_embeddings.pth", "classes/base.pth", "classes/all.pth", "rpn/model_final.pth",
                 "pretrain/model_final.pth", "transfer/world/model_final.pth", "transfer/regionclip/model_final.pth",
                 "transfer/world_fpn/model_final.pth", "transfer/regionclip_fpn/model_final.pth",
                 "results.md", "results.json", "results.png"):
        assert (out / path).is_file(), path
    assert len(list((out / "demo").glob("*.jpg"))) == 2


def test_profile_reaches_the_clip_and_the_rpn_overlaps_stages_3_and_4(tiny_run):
    from synthetic_pipeline import PROFILES

    out, stdout = tiny_run
    metrics = json.loads((out / "world_clip" / "world_clip_metrics.json").read_text())
    assert metrics["init_logit_scale"] == PROFILES["tiny"]["clip_logit_scale"] == 50.0
    assert metrics["steps"] == PROFILES["tiny"]["clip_steps"]
    timings = json.loads((out / "results.json").read_text())["timings_s"]
    # the RPN was started before stage 3, so it ran at least as long as stages 3-5 together
    overlap = sum(v for k, v in timings.items() if k.startswith(("3/11", "4/11", "5/11")))
    assert timings["rpn training (from its start)"] >= overlap - 1.0
    assert stdout.index("3/11 concepts") < stdout.index("5/11 rpn")


def test_results_table(tiny_run):
    out, _ = tiny_run
    res = json.loads((out / "results.json").read_text())
    for label in ("world CLIP", "RegionCLIP student"):
        z, t = res["zero_shot"][label], res["transfer"][label]
        for key in ("acc-novel", "acc-base", "acc-all"):
            assert 0.0 <= z[key] <= 100.0
        for key in ("AP50-novel", "AP50-base", "AP50-all"):
            assert math.isnan(t[key]) or 0.0 <= t[key] <= 100.0
        assert z["boxes"] > 0
    t = res["transfer"]["world CLIP, C4"]
    assert all(math.isnan(t[k]) or 0.0 <= t[k] <= 100.0 for k in ("AP50-novel", "AP50-base", "AP50-all"))
    teacher = res["teacher"]
    assert teacher["regions"] >= 0 and (math.isnan(teacher["accuracy"]) or 0 <= teacher["accuracy"] <= 100)
    table = (out / "results.md").read_text()
    for row in ("| world CLIP |", "| RegionCLIP student |", "| RegionCLIP student, C4 detector |", "(FPN)",
                "| world CLIP + ensemble detector |", "| RegionCLIP student + ensemble detector |"):
        assert row in table
    assert "pseudo labels on" in table


def test_ensemble_rows_use_the_frozen_model_each_detector_started_from(tiny_run):
    """The '+ ensemble' rows evaluate the same trained detectors (no training) with the scores
    ensembled with the world CLIP file / the pretrained student; the demo shows the student's."""
    out, _ = tiny_run
    res = json.loads((out / "results.json").read_text())
    for label, tag, frozen in (("world CLIP", "world_fpn", out / "world_clip" / "world_clip.pt"),
                               ("RegionCLIP student", "regionclip_fpn", out / "pretrain" / "model_final.pth")):
        row = res["transfer"][f"{label} + ensemble"]
        assert row["ensemble_weights"] == str(frozen)
        assert row["weights"] == res["transfer"][label]["weights"] == str(out / "transfer" / tag / "model_final.pth")
        assert not (out / "transfer" / f"{tag}_ensemble" / "model_final.pth").exists()  # evaluated, not trained
        cfg = (out / "transfer" / f"{tag}_ensemble" / "config.yaml").read_text()
        assert f"ENSEMBLE_WEIGHTS: {frozen}" in cfg and "ENSEMBLE_BETA: 0.65" in cfg
    assert res["demo_detector"] == "RegionCLIP student + ensemble"
    demo_log = (out / "logs" / "demo.log").read_text()
    assert "ensemble" in demo_log


def test_pretraining_moved_the_student_and_demo_names_novel_classes(tiny_run):
    import torch

    out, _ = tiny_run
    sd = torch.load(out / "pretrain" / "model_final.pth", weights_only=True)["model"]
    k = "backbone.layer3.0.conv1.weight"
    assert not torch.equal(sd[k], sd["teacher_" + k])
    dets = json.loads(next((out / "demo").glob("*.json")).read_text())
    names = {c["name"] for c in json.loads((out / "world" / "world.json").read_text())["categories"]}
    assert all(d["class_name"] in names for d in dets["detections"])
    assert not dets["random_weights"]


def test_overrides_are_typed_and_checked():
    from synthetic_pipeline import parse_overrides

    assert parse_overrides(["clip_steps=800", "clip_lr=0.001", "pretrain_regions=GRID"]) == {
        "clip_steps": 800, "clip_lr": 0.001, "pretrain_regions": "GRID"}
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_overrides(["no_such_key=1"])
    with pytest.raises(ValueError, match="must be of type int"):
        parse_overrides(["clip_steps=many"])


def test_ablation_reuses_the_run_and_changes_only_pretraining(tiny_run):
    from synthetic_pipeline import Pipeline

    out, _ = tiny_run
    run = Pipeline(str(out), "tiny", 0)
    res = run.ablation("grid", {"pretrain_regions": "GRID", "pretrain_loss_weights": "0,1,0"}, zero_shot_only=True)
    assert set(res) == {"zero_shot"} and 0.0 <= res["zero_shot"]["acc-all"] <= 100.0
    cfg = (out / "ablations" / "grid" / "pretrain" / "config.yaml").read_text()
    assert "CROP_REGION_TYPE: GRID" in cfg and "PRETRAIN_IMG_TXT_LEVEL: false" in cfg
    assert str(out / "world") in cfg  # the run's own world, CLIP and RPN: nothing regenerated
    assert not (out / "ablations" / "grid" / "world").exists()


def test_tools_started_together_get_their_threads_and_failures_name_the_log(tmp_path, monkeypatch):
    """Transfer detectors run as parallel jobs: each job's process sees its thread count, and
    a failing job raises with its log's tail after the others were waited for."""
    import synthetic_pipeline
    from synthetic_pipeline import Pipeline

    tools = tmp_path / "tools"
    tools.mkdir()
    (tools / "threads.py").write_text("import os, sys\nprint('threads', os.environ.get('OMP_NUM_THREADS'))\n"
                                      "sys.exit(int(sys.argv[1]))\n")
    monkeypatch.setattr(synthetic_pipeline, "ROOT", str(tmp_path))
    run = Pipeline(str(tmp_path / "out"), "tiny", 0)
    logs = run.wait_tools([run.start_tool("threads.py", ["0"], "a", threads=1),
                           run.start_tool("threads.py", ["0"], "b", threads=1)])
    assert [open(p).read().splitlines()[-1] for p in logs] == ["threads 1", "threads 1"]
    with pytest.raises(RuntimeError, match=r"(?s)stage 'bad' failed \(threads.py exited with 3\).*threads 1"):
        run.wait_tools([run.start_tool("threads.py", ["3"], "bad", threads=1),
                        run.start_tool("threads.py", ["0"], "good", threads=1)])
    assert open(tmp_path / "out" / "logs" / "good.log").read().splitlines()[-1] == "threads 1"


def test_reproduce_runs_ablations_as_parallel_processes_on_a_finished_seed(tiny_run, tmp_path):
    """make reproduce's --jobs 2: a finished seed is not run again; its ablations run as two
    processes at once, with one thread each, and the report gathers their results."""
    import shutil

    out, _ = tiny_run
    repro = tmp_path / "repro"
    shutil.copytree(out, repro / "seed0", symlinks=True)
    r = subprocess.run([sys.executable, "tools/synthetic_reproduce.py", "--profile", "tiny", "--output", str(repro),
                        "--seeds", "0", "--jobs", "2", "--ablations", "distillation only", "no focal scaling"],
                       cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert "seed 0: started" not in r.stdout  # finished before: not repeated
    started = [line for line in r.stdout.splitlines() if ": started (1 thread(s)" in line]
    assert len(started) == 2, r.stdout
    logs = sorted(os.listdir(repro / "logs"))
    assert logs == ["ablation_distillation_only_seed_0.log", "ablation_no_focal_scaling_seed_0.log"]
    md = (repro / "reproduce.md").read_text()
    assert "| distillation only |" in md and "| no focal scaling |" in md and "| grid regions |" not in md
    data = json.loads((repro / "reproduce.json").read_text())
    assert set(data["ablations"]) == {"distillation only", "no focal scaling (transfer)"}
    cfg = (repro / "seed0" / "ablations" / "distillation_only" / "pretrain" / "config.yaml").read_text()
    assert "PRETRAIN_LOSS_WEIGHTS:\n    - 0\n    - 1\n    - 0\n" in cfg  # the ablation's own setting


def test_demo_pictures_show_novel_and_base_only_images(tiny_run):
    """The demo draws, in file order, half its images among those holding a novel shape and
    the rest among those without one (chosen by the ground truth)."""
    from synthetic_pipeline import Pipeline

    out, _ = tiny_run
    run = Pipeline(str(out), "tiny", 0)
    gt = json.loads((out / "world" / "annotations" / "instances_test.json").read_text())
    novel_ids = {c["id"] for c in gt["categories"] if c["name"] in run.names()[1]}
    holds_novel = {im["file_name"]: any(a["image_id"] == im["id"] and a["category_id"] in novel_ids
                                        for a in gt["annotations"]) for im in gt["images"]}
    assert any(holds_novel.values()) and not all(holds_novel.values())  # the tiny world has both kinds
    files = [os.path.basename(f) for f in run.demo_image_files()]
    first_novel = sorted(f for f, nov in holds_novel.items() if nov)[0]
    first_base = sorted(f for f, nov in holds_novel.items() if not nov)[0]
    assert files == sorted([first_novel, first_base])
    drawn = sorted(f for f in os.listdir(out / "demo") if f.endswith(".jpg"))
    assert drawn == sorted(f.replace(".png", "_png.jpg") for f in files)


def test_second_world_clip_as_teacher(tiny_run):
    """teacher_clip_seed_offset: a second world CLIP (seed + offset) teaches in pretraining, with
    the concept pool embedded by its own text tower; the student still starts from the run's
    CLIP, and the teacher's own zero-shot accuracy is measured beside the student's."""
    import torch
    from synthetic_pipeline import Pipeline

    out, _ = tiny_run
    res = Pipeline(str(out), "tiny", 0).ablation("teacher2", {"teacher_clip_seed_offset": 1000}, zero_shot_only=True)
    assert set(res) == {"zero_shot", "teacher_zero_shot", "teacher_clip"}
    assert res["teacher_clip"]["seed"] == 1000
    teacher = out / "ablations" / "teacher2" / "teacher_clip"
    cfg = (out / "ablations" / "teacher2" / "pretrain" / "config.yaml").read_text()
    assert f"TEACHER_CLIP_WEIGHTS: {teacher / 'world_clip.pt'}" in cfg
    assert f"TEACHER_CONCEPT_POOL_EMB: {teacher / 'concept_embeddings.pth'}" in cfg
    assert f"CLIP_WEIGHTS: {out / 'world_clip' / 'world_clip.pt'}" in cfg  # the student's start is unchanged
    own = torch.load(out / "concepts" / "concept_embeddings.pth", weights_only=True)
    other = torch.load(teacher / "concept_embeddings.pth", weights_only=True)
    assert own.shape == other.shape and not torch.allclose(own, other)


def test_exemplars_tool_gives_novel_shapes_by_example_boxes_from_val(tiny_run):
    """tools/synthetic_exemplars.py: the test vocabulary's novel rows become the mean region
    embedding of val-split example boxes, the base rows stay the names; both are evaluated."""
    import torch
    from synthetic_pipeline import Pipeline

    out, _ = tiny_run
    run = Pipeline(str(out), "tiny", 0)
    r = subprocess.run([sys.executable, "tools/synthetic_exemplars.py", "--run", str(out), "--shots", "1"],
                       cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert "| exemplars |" in r.stdout and "| names |" in r.stdout
    res = json.loads((out / "exemplars" / "results.json").read_text())
    assert res["shots"] == 1 and {"AP50-novel", "AP50-base"} <= set(res["exemplars"])
    names = torch.load(str(out / "exemplars" / "names.pth"))["embeddings"]
    ex = torch.load(str(out / "exemplars" / "exemplars.pth"))["embeddings"]
    if "error" in res["calibration"]:  # the tiny run's detector is barely trained: refused, and said so
        assert "The calibration failed" in r.stdout and "exemplars, calibrated" not in res
    else:
        calibrated = torch.load(str(out / "exemplars" / "exemplars_calibrated.pth"))
        torch.testing.assert_close(calibrated["embeddings"], ex)  # the same classes, and a map for the exemplars
        assert calibrated["logit_affine"].shape == (12, 2) and res["calibration"]["scale"] > 0
    base, novel, all_names = run.names()
    is_novel = torch.tensor([n in novel for n in all_names])
    torch.testing.assert_close(ex[~is_novel], names[~is_novel])
    assert not torch.allclose(ex[is_novel], names[is_novel], atol=1e-3)
    examples = run.exemplar_examples(1)
    assert set(examples) == set(novel)
    assert all(os.sep + "val" + os.sep in path for ex_list in examples.values() for path, _ in ex_list)
    r = subprocess.run([sys.executable, "tools/synthetic_exemplars.py", "--run", str(out), "--shots", "1000"],
                       cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert r.returncode != 0 and "fewer than 1000 boxes" in r.stderr and "use fewer shots" in r.stderr


def test_export_of_the_runs_detector_agrees_with_pytorch_on_test_images(tiny_run):
    """tools/export.py --synthetic: the run's own detector and 12 shapes, exported and run by
    onnxruntime on test images with their GT boxes, gives PyTorch's detections."""
    out, _ = tiny_run
    r = subprocess.run([sys.executable, "tools/export.py", "--synthetic", str(out), "--output", str(out / "export"),
                        "--compare-test-images", "3"], cwd=ROOT, capture_output=True, text=True,
                       env=dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1"))
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert "3/3 test images with the same detections" in r.stdout
    info = json.loads((out / "export" / "recognition.json").read_text())
    assert len(info["class_names"]) == 12 and info["random_weights"] is False


def test_clipself_in_the_world_of_a_finished_run(tiny_run, tmp_path):
    """tools/synthetic_clipself.py --world-from: a ViT world CLIP on the run's world, CLIPSelf
    through tools/train_net.py, region classification before / after with the crops as a
    reference, the student's ViT converted for F-ViT, and F-ViT detectors from both ViTs."""
    import torch

    out, _ = tiny_run
    cs = tmp_path / "clipself"
    r = subprocess.run([sys.executable, "tools/synthetic_clipself.py", "--profile", "tiny", "--output", str(cs),
                        "--world-from", str(out), "--set", "clip_steps=10"],
                       cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert "1/8 world" not in r.stdout and "4/8 rpn" not in r.stdout  # the run's world and RPN: not made again
    clip_cfg = json.loads((cs / "world_clip" / "world_clip.json").read_text())
    assert clip_cfg["vision_cfg"]["patch_size"] == 8 and clip_cfg["vision_cfg"]["layers"] == 2
    res = json.loads((cs / "results.json").read_text())
    reg, tr = res["regions"], res["transfer"]
    for label in ("world CLIP ViT", "CLIPSelf student"):
        for key in ("dense", "crop"):
            assert 0.0 <= reg[label][key]["acc-all"] <= 100.0 and reg[label][key]["boxes"] > 0
        assert all(math.isnan(tr[label][k]) or 0.0 <= tr[label][k] <= 100.0 for k in ("AP50-novel", "AP50-all"))
    # the teacher is frozen: the crop reference is the same before and after CLIPSelf
    assert reg["world CLIP ViT"]["crop"]["per_class"] == reg["CLIPSelf student"]["crop"]["per_class"]
    # CLIPSelf moved the student; the teacher kept the world CLIP's tower; F-ViT got the student
    sd = torch.load(cs / "clipself" / "model_final.pth", weights_only=True)["model"]
    world = torch.load(cs / "world_clip" / "world_clip.pt", weights_only=True)
    k = "transformer.resblocks.0.attn.in_proj_weight"
    assert torch.equal(sd["teacher_backbone." + k], world["visual." + k])
    assert not torch.equal(sd["backbone." + k], world["visual." + k])
    vit = torch.load(cs / "clipself" / "fvit_vit.pth", weights_only=True)["model"]
    assert torch.equal(vit["backbone.bottom_up." + k], sd["backbone." + k])
    cfg = (cs / "transfer" / "clipself" / "config.yaml").read_text()
    assert f"WEIGHTS: {cs / 'clipself' / 'fvit_vit.pth'}" in cfg and "build_clip_vit_sfp_backbone" in cfg
    assert "WEIGHTS: ''" in (cs / "transfer" / "world_vit" / "config.yaml").read_text()
    table = (cs / "results.md").read_text()
    for row in ("| world CLIP ViT |", "| CLIPSelf student |", "| crops of the boxes, frozen ViT (reference) |"):
        assert row in table
    assert (cs / "results.png").is_file()


def test_clipself_resume_checks_the_clip_and_reads_the_last_runs_losses(tmp_path):
    """--resume reuses a world CLIP only when it was trained as the profile asks; the CLIPSelf
    losses are those of the last run in the (appended) metrics.json."""
    from synthetic_clipself import PROFILES, CLIPSelfPipeline

    pipe = CLIPSelfPipeline(str(tmp_path), "tiny")
    assert pipe.finished_clip() is None  # nothing there yet
    os.makedirs(pipe.clip_dir)
    open(pipe.clip_weights, "wb").close()
    p = PROFILES["tiny"]
    metrics = {"steps": p["clip_steps"], "lr": p["clip_lr"], "zoom_prob": p["clip_zoom_prob"]}
    (tmp_path / "world_clip" / "world_clip_metrics.json").write_text(json.dumps(metrics))
    assert pipe.finished_clip() == metrics
    (tmp_path / "world_clip" / "world_clip_metrics.json").write_text(json.dumps(dict(metrics, steps=7)))
    with pytest.raises(RuntimeError, match=r"trained with steps=7, the profile asks for 20: use another --output"):
        pipe.finished_clip()
    os.makedirs(tmp_path / "clipself")
    rows = [(19, 0.5), (39, 0.4), (19, 0.3), (39, 0.2), (59, 0.1)]  # two runs appended
    (tmp_path / "clipself" / "metrics.json").write_text(
        "\n".join(json.dumps({"iteration": i, "total_loss": v}) for i, v in rows) + "\n")
    assert pipe.clipself_losses() == [0.3, 0.2, 0.1]


def test_grounding_in_the_world_of_a_finished_run(tiny_run, tmp_path):
    """tools/synthetic_grounding.py: a grounding world whose captions name colours, grounding
    heads trained on its captions through tools/train_net.py from the run's world CLIP and
    student, the run's transfer detectors as the classifier baseline on the same test
    captions, recall by phrase group and AP50 through the class prompt; --report-only."""
    out, _ = tiny_run
    g = tmp_path / "grounding"
    cmd = [sys.executable, "tools/synthetic_grounding.py", "--run", str(out), "--output", str(g), "--iters", "2",
           "--num-test", "6"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    world = json.loads((g / "world" / "world.json").read_text())
    assert world["params"]["colour_prob"] == 0.5 and world["seed"] == 1000
    test = json.loads((g / "world" / "annotations" / "grounding_test.json").read_text())
    n_phrases = sum(len(im["tokens_positive_eval"]) for im in test["images"])
    res = json.loads((g / "results.json").read_text())
    assert len(res["rows"]) == 4 and res["iters"] == 2 and res["num_test"] == 6 and len(test["images"]) == 12
    for row in res["rows"].values():
        assert row["groups"]["all"]["phrases"] == n_phrases  # every test phrase, once, for every detector
        assert row["groups"]["novel"]["phrases"] + row["groups"]["base"]["phrases"] == n_phrases
        assert all(math.isnan(v["R@1"]) or 0.0 <= v["R@1"] <= v["R@5"] <= v["R@10"] <= 100.0
                   for v in row["groups"].values())
        assert set(row["detection"]) == {"AP50-novel", "AP50-base", "AP50-all"}
    cfg = (g / "grounding" / "regionclip" / "config.yaml").read_text()
    head = cfg.split("GROUNDING:")[1][:400]
    assert "ENABLED: true" in head and "PHRASE_EMBEDDINGS: replace" in head and "ALIGN_INIT: identity" in head
    assert f"WEIGHTS: {out / 'pretrain' / 'model_final.pth'}" in cfg
    base_cfg = (g / "baseline" / "regionclip" / "config.yaml").read_text()
    assert str(out / "transfer" / "regionclip_fpn" / "model_final.pth") in base_cfg
    table = (g / "results.md").read_text()
    assert table.count("| grounding head (FPN, trained on captions) |") == 2
    r2 = subprocess.run(cmd + ["--report-only"], cwd=ROOT, capture_output=True, text=True,
                        env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert r2.returncode == 0 and (g / "results.md").read_text() == table
