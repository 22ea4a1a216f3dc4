from setuptools import find_packages, setup

setup(
    name="regionclip_d2",
    version="0.1.0",
    description="RegionCLIP (region-based language-image pretraining) on stock detectron2",
    packages=find_packages(include=["regionclip_d2", "regionclip_d2.*"]),
    # the repository's configs/ ship inside the package (regionclip_d2/model_zoo/configs links to it)
    package_data={"regionclip_d2.model_zoo": ["configs/*.yaml", "configs/*/*.yaml", "configs/*/*/*.yaml"],
                  "regionclip_d2.app": ["page.html"]},
    python_requires=">=3.9",
    install_requires=[
        "detectron2",  # 0.6; installed by tools/setup/install.sh (patched PyPI sdist)
        "torch>=2.0",
        "torchvision",
        "open_clip_torch>=2.20",
        "nltk",
        "pycocotools",
        "lvis",
        "fvcore",
        "tqdm",
    ],
    # the web app (regionclip_d2.app, tools/app.py); tools/setup/install.sh installs these pinned
    extras_require={"app": ["fastapi>=0.110", "uvicorn>=0.29"],
                    "export": ["onnx>=1.16", "onnxscript>=0.2", "onnxruntime>=1.18"]},
)
