"""The project's yaml configs, shipped inside the package (``configs/`` of the repository,
linked here), so that an installed regionclip_d2 finds ``configs/...`` paths without a
checkout."""
import os

CONFIGS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


def get_config_file(path: str) -> str:
    """The packaged copy of ``path`` (``configs/X.yaml`` or ``X.yaml``, relative to ``configs/``)."""
    rel = path[len("configs/"):] if path.startswith("configs/") else path
    full = os.path.join(CONFIGS_DIR, rel)
    if not os.path.isfile(full):
        raise FileNotFoundError(f"{path!r} is not one of regionclip_d2's configs (looked in {CONFIGS_DIR})")
    return full
