"""Optional packages, imported where they are used: `require` imports one or stops with one line that names the
feature that needs it and the extra of pyproject.toml that installs it (`pip install -e ".[text]"`).

EXTRAS maps each optional import name to its extra; tests/test_imports.py checks that every package imported in
diffusion/ is a base dependency or is listed here under an extra that declares it, and that each feature's
message appears when its package is absent.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from diffusion.errors import MissingPackageError

EXTRAS = {  # import name -> the extra that installs it
    "gradio": "demo",
    "diffusers": "diffusers",
    "transformers": "text",
    "peft": "text",
    "tensorboard": "tensorboard",
    "torch_fidelity": "fid",
    "obstore": "stream",
    "datasets": "hf",
    "bitsandbytes": "bnb",
}


def require(name: str, *, feature: str, extra: str | None = None) -> ModuleType:
    """Module `name` (e.g. "peft" or "diffusers.utils"); a MissingPackageError naming `feature` (what the user
    asked for, e.g. "finetune=lora") and the extra to install when its package is absent: `extra` where the
    feature needs more than this package (a pipeline: diffusers and transformers, the "text" extra), else the
    package's own (`EXTRAS`)."""
    package = name.split(".")[0]
    try:
        return importlib.import_module(name)
    except ImportError as e:
        if str(getattr(e, "name", None) or package).split(".")[0] != package:
            raise  # the package is there but one of its own dependencies is broken: a real traceback
        extra = extra or EXTRAS[package]
        raise MissingPackageError(f'{feature} needs {package}: pip install -e ".[{extra}]"') from e


def import_diffusers(
    feature: str = "model=diffusers_unet, export.py format=diffusers", *, extra: str | None = None
) -> ModuleType:
    """The diffusers module (see `require`)."""
    return require("diffusers", feature=feature, extra=extra)
