# regionclip_d2: set-up, demo and tests. Every target installs what it needs first.
PY := .venv/bin/python
export HF_HUB_OFFLINE := 1
export PYTHONWARNINGS := ignore::FutureWarning

.PHONY: setup demo reproduce clipself grounding demo-photo app test bench clean-venv

setup:
	bash tools/setup/install.sh

# the main job: RegionCLIP end to end in the synthetic world (about 15 min on 2 CPU cores)
demo: setup
	$(PY) tools/synthetic_demo.py --output output/synthetic_demo

# the demo's claims over 3 seeds (mean and standard deviation) and the paper's ablations, two runs at a time
reproduce: setup
	$(PY) tools/synthetic_reproduce.py --output output/synthetic_reproduce

# CLIPSelf and F-ViT in a synthetic world: a ViT world CLIP, its dense features before / after, F-ViT transfer
clipself: setup
	$(PY) tools/synthetic_clipself.py --output output/synthetic_clipself

# phrase grounding after make demo: grounding heads trained on captions against the demo's classifier (about 15 min)
grounding: setup
	$(PY) tools/synthetic_grounding.py --run output/synthetic_demo

# the zero-shot detector on a real photo, with RANDOM weights (a smoke test of the app path)
demo-photo: setup
	$(PY) tools/demo.py --random-weights --input "$$($(PY) -c 'import skimage.data, os; print(os.path.join(os.path.dirname(skimage.data.__file__), "chelsea.png"))')" --output output/demo --vocabulary coco --opts MODEL.CLIP.OFFLINE_RPN_POST_NMS_TOPK_TEST 100 MODEL.CLIP.PROMPT_TEMPLATES single

# the web app on http://127.0.0.1:7860, with RANDOM weights unless APP_ARGS gives weights (the page says so);
# e.g. make app APP_ARGS="--synthetic output/synthetic_demo" (after make demo); tools/app.py --help lists the options
APP_ARGS ?= --opts MODEL.CLIP.OFFLINE_RPN_POST_NMS_TOPK_TEST 100 MODEL.CLIP.PROMPT_TEMPLATES single
app: setup
	$(PY) tools/app.py $(APP_ARGS)

test: setup
	.venv/bin/ruff check .
	$(PY) -m pytest -q tests

bench: setup
	$(PY) bench/run.py

clean-venv:
	rm -rf .venv .cache/setup
