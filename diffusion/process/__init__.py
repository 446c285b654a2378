"""The diffusion processes: one interface (`Process`, base.py), three families.

- "discrete": `NoiseSchedule`, DDPM-style linear / cosine / sigmoid schedules over T integer timesteps with eps / v
  / x0 prediction (discrete.py);
- "edm": `EDM`, Karras et al. 2022's preconditioned variance-exploding process (edm.py);
- "flow": `Flow`, rectified flow with velocity prediction (flow.py).
A checkpoint stores `process.description()` ({"family": ..., **config}); `build_process` rebuilds it, and a
description without "family" (checkpoints written before there were families) is a discrete schedule.
"""

from __future__ import annotations

import inspect

from diffusion.errors import BadFileError
from diffusion.process.base import Process
from diffusion.process.discrete import NoiseSchedule
from diffusion.process.edm import EDM, karras_sigmas
from diffusion.process.flow import Flow, shift_time

DEFAULT_FAMILY = "discrete"


def families() -> dict[str, type[Process]]:
    """Family name -> class."""
    return {"discrete": NoiseSchedule, "edm": EDM, "flow": Flow}


def family_keys(family: str) -> frozenset[str]:
    """The keyword arguments of a family's class: the keys its description may hold besides "family"."""
    return frozenset(inspect.signature(families()[family].__init__).parameters) - {"self"}


def check_process_description(description, *, source: str) -> None:
    """A one-line BadFileError unless `description` names a known family with keys its class takes."""
    family = description.get("family", DEFAULT_FAMILY)
    if family not in families():
        raise BadFileError(f"{source}: the process description names family {family!r}, not one of "
                           f"{', '.join(families())}; refused")  # fmt: skip
    unknown = sorted(set(description) - {"family"} - family_keys(family))
    if unknown:
        cls = families()[family].__name__
        raise BadFileError(f"{source}: the process description has keys {cls} does not take: {unknown}")


def build_process(description: dict) -> Process:
    """The process a description (`Process.description()`, or an old checkpoint's NoiseSchedule kwargs) names."""
    kwargs = dict(description)
    return families()[kwargs.pop("family", DEFAULT_FAMILY)](**kwargs)


__all__ = [
    "DEFAULT_FAMILY",
    "EDM",
    "Flow",
    "NoiseSchedule",
    "Process",
    "build_process",
    "check_process_description",
    "families",
    "karras_sigmas",
    "shift_time",
]
