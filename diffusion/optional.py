"""Optional heavy dependencies, imported where they are used, with an error that says what to install."""

from __future__ import annotations


def import_diffusers():
    """The diffusers module, or an ImportError saying how to install it."""
    try:
        import diffusers
    except ImportError as e:
        raise ImportError(
            "model=diffusers_unet and export format=diffusers need diffusers: pip install 'diffusers>=0.30' safetensors"
        ) from e
    return diffusers
