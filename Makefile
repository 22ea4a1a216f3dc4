# regionclip_d2: set-up, demo and tests. Every target installs what it needs first.
PY := .venv/bin/python
SETUP_STAMP := .venv/.regionclip_d2_setup/package
export HF_HUB_OFFLINE := 1
export PYTHONWARNINGS := ignore::FutureWarning

.PHONY: setup demo test bench clean-venv

setup:
	bash tools/setup/install.sh

demo: setup
	$(PY) tools/demo.py --random-weights --input "$$($(PY) -c 'import skimage.data, os; print(os.path.join(os.path.dirname(skimage.data.__file__), "chelsea.png"))')" --output output/demo --vocabulary coco --opts MODEL.CLIP.OFFLINE_RPN_POST_NMS_TOPK_TEST 100 MODEL.CLIP.PROMPT_TEMPLATES single

test: setup
	$(PY) -m pytest -q tests

bench: setup
	$(PY) bench/run.py

clean-venv:
	rm -rf .venv .cache/setup
