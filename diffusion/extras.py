"""What train.py does at the start of a run, before anything is built (Lightning-Hydra-Template's `extras`).

The composed config as a plain-text tree (for the console, train.log and `<run folder>/config_tree.log`), the
run's tags checked and written one per line to `<run folder>/tags.log`, and metrics written as JSON. Plain
Python on plain dicts and lists: train.py turns the Hydra config into them (no Hydra here).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import yaml

from diffusion.errors import ConfigError
from diffusion.files import atomic_write

MAX_TAG_LENGTH = 64  # W&B refuses longer tags (when the run starts, far from the config key)


def config_tree(tree: Mapping, *, label: str = "config") -> str:
    """`tree` (nested dicts; lists and scalars as leaves) as an indented ASCII tree, one `key: value` per leaf.

    Leaves are written as YAML flow values (`[1, 2, 2]`, `null`, `{_target_: ...}`), so the text reads like the
    config files. ASCII, because the log file's encoding is the platform's.
    """
    lines = [label]

    def walk(node: Mapping, prefix: str) -> None:
        items = list(node.items())
        for i, (key, value) in enumerate(items):
            last = i == len(items) - 1
            branch, indent = ("`-- ", "    ") if last else ("|-- ", "|   ")
            if isinstance(value, Mapping) and value:
                lines.append(f"{prefix}{branch}{key}")
                walk(value, prefix + indent)
            else:
                lines.append(f"{prefix}{branch}{key}: {flow(value)}")

    walk(tree, "")
    return "\n".join(lines)


def flow(value) -> str:
    """A value in YAML flow style on one line (`[a, b]`, `null`, `'32'` for a string that reads as a number)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=1 << 30, allow_unicode=True).strip()
    return text.removesuffix("\n...").removesuffix("...").strip()


def run_tags(tags) -> list[str]:
    """The config's `tags` as a list of distinct non-empty strings (a single value becomes a one-item list).

    A ConfigError names `tags` for a tag that is empty, has a comma (the command line's list separator: write
    `tags=[a,b]`) or is longer than W&B takes.
    """
    if tags is None:
        return []
    if isinstance(tags, str | int | float):
        tags = [tags]
    if not isinstance(tags, Sequence) or any(isinstance(t, Mapping | list | tuple) for t in tags):
        raise ConfigError(f"tags={tags!r} must be a list of words, e.g. tags=[baseline,cosine]")
    out: list[str] = []
    for tag in map(str, tags):
        tag = tag.strip()
        if not tag or "," in tag:
            raise ConfigError(f"tags: {tag!r} is not a tag; give a list of words, e.g. tags=[baseline,cosine]")
        if len(tag) > MAX_TAG_LENGTH:
            raise ConfigError(f"tags: {tag[:20]!r}... has {len(tag)} characters; W&B takes at most {MAX_TAG_LENGTH}")
        if tag not in out:
            out.append(tag)
    return out


def write_text(path: str | Path, text: str) -> Path:
    """`text` (plus a final newline) into `path`, atomically, as UTF-8."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: f.write((text.rstrip("\n") + "\n").encode()), fsync=False)
    return path


def write_json(path: str | Path, data: Mapping) -> Path:
    """`data` as indented JSON into `path`, atomically."""
    return write_text(path, json.dumps(data, indent=2, sort_keys=False))
