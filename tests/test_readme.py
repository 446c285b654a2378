"""The README cannot rot: its config keys exist in conf/, and its shell commands run.

1. Every `group=option`, `a.b.c=value` and bare `group.key` the README names (in bash blocks and inline code)
   exists: each command's overrides are composed with Hydra exactly as the command would compose them (so a
   renamed key or option fails), inline keys are looked up in every option of their group. `+key=` is exempt.
2. Every command in a ```bash block runs on CPU with tiny overrides appended, as the README says, unless it
   carries a `# needs: <reason>` mark (then it is skipped with that reason; `# needs: dataset` commands run in
   tests/test_recipes.py instead, on datasets fabricated in their real file formats). The quick-start `python train.py`
   runs as a real subprocess and its run folder is the checkpoint the later commands use; the other
   train.py / sample.py / export.py commands run in-process on the same composed configs (subprocesses cost
   ~10 s of imports each). `pip install` parts are not run; the test-suite command must equal .ci/run's.
"""

from __future__ import annotations

import itertools
import os
import re
import shlex
from functools import cache
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

from tests.conftest import CONF, ROOT, TINY, compose_train, run_cli, write_image

README = (ROOT / "README.md").read_text()
MARKS = {"gpu", "network", "dataset", "slurm", "minutes"}
PLACEHOLDER_RUN = "outputs/train/2026-01-01_12-00-00"  # the README's example run folder
CONFIGS = ("train", "sample", "export", "report")
GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir())
KEY_ROOTS = {*GROUPS, "module", "init"} - {"experiment"}
FILE_SUFFIX = re.compile(r"\.(ya?ml|py|png|ckpt|csv|log|npz|npy|json|md|pt|pth|txt|safetensors)$")
ENV = re.compile(r"^[A-Z_][A-Z0-9_]*=")


# --- reading the README ---------------------------------------------------------------------------------
def bash_commands() -> list[tuple[str, str | None]]:
    """(command, mark) for every command line in the README's ```bash blocks, continuations joined."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            mark = re.search(r"\s#\s*needs:\s*(\w+)", line)
            command = re.sub(r"\s#.*$", "", line).strip()
            commands.append((command, mark.group(1) if mark else None))
    return commands


def split_parts(command: str) -> list[list[str]]:
    """The `&&`-separated parts of a command line, each as argv (environment assignments first)."""
    return [shlex.split(part) for part in command.split("&&")]


def inline_tokens() -> list[str]:
    """Whitespace-separated tokens of the README's inline code spans (outside fenced blocks)."""
    text = re.sub(r"```.*?```", "", README, flags=re.S)
    tokens = []
    for span in re.findall(r"`([^`\n]+)`", text):
        tokens += [tok.strip("(),;:'\"") for tok in span.split()]
    return tokens


def config_overrides(argv: list[str]) -> list[str]:
    """The Hydra overrides of `python script.py ...` argv (flags such as -m dropped)."""
    return [a for a in argv[2:] if "=" in a and not a.startswith("-")]


def sweep_points(argv: list[str]) -> list[list[str]]:
    """The override lists a command composes: one, or every point of a `-m` sweep (`k=a,b` outside brackets)."""
    overrides = config_overrides(argv)
    if "-m" not in argv and "--multirun" not in argv:
        return [overrides]
    choices = [
        [f"{o.split('=', 1)[0]}={v}" for v in o.split("=", 1)[1].split(",")] if "[" not in o else [o] for o in overrides
    ]
    return [list(point) for point in itertools.product(*choices)]


# --- config keys -----------------------------------------------------------------------------------------
def _compose(config: str, overrides: list[str], cwd: Path = ROOT) -> DictConfig:
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose(config, overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.cwd = str(cwd)
        cfg.hydra.runtime.output_dir = str(cwd)
        cfg.hydra.job.num = 0
    HydraConfig().set_config(cfg)
    return cfg


@cache
def _load(path: Path) -> dict:
    return OmegaConf.to_container(OmegaConf.load(path), resolve=False)  # ??? and ${...} values stay as text


def _has(tree, dotted: str) -> bool:
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return False
        tree = tree[part]
    return True


def key_exists(key: str) -> bool:
    """`key` (dotted) is set in conf/: in a top-level config, or (group.rest) in some option file of the group."""
    if any(_has(_load(CONF / f"{config}.yaml"), key) for config in CONFIGS):
        return True
    group, _, rest = key.partition(".")
    return bool(rest) and (CONF / group).is_dir() and any(_has(_load(p), rest) for p in (CONF / group).glob("*.yaml"))


def option_exists(group: str, value: str) -> bool:
    options = value.strip("[]").split(",") if value.startswith("[") else [value]
    return all((CONF / group / f"{option.strip()}.yaml").is_file() for option in options if option.strip())


def check_token(token: str) -> str | None:
    """None if the config key or group option named by `token` exists; else what is wrong."""
    key, _, value = token.partition("=")
    if (CONF / key).is_dir():
        return None if option_exists(key, value) else f"{token}: no option {value!r} in conf/{key}/"
    return None if key_exists(key) else f"{token}: no key {key!r} in conf/"


def is_key_token(token: str) -> bool:
    if token.startswith("+") or ENV.match(token) or token.startswith("-"):
        return False
    key, eq, _ = token.partition("=")
    if not re.fullmatch(r"[a-z_][a-z0-9_]*(?:[./][a-z_][a-z0-9_]*)*", key) or FILE_SUFFIX.search(key):
        return False
    if eq:
        return True
    return "." in key and key.split(".")[0] in KEY_ROOTS


def test_readme_config_keys_exist():
    problems = []
    # commands: compose each with its own overrides, as `python <script> ...` would
    for command, _ in bash_commands():
        for argv in split_parts(command):
            while argv and ENV.match(argv[0]):
                argv = argv[1:]
            if len(argv) < 2 or argv[0] != "python" or argv[1] not in {f"{c}.py" for c in CONFIGS}:
                continue
            for overrides in sweep_points(argv):
                try:
                    _compose(argv[1].removesuffix(".py"), overrides)
                except Exception as e:  # Hydra's messages name the bad key or option
                    problems.append(f"{command}: {type(e).__name__}: {' '.join(str(e).split())[:200]}")
    # inline code: keys and options anywhere in the text
    tokens = [t for t in inline_tokens() if is_key_token(t)]
    assert len(tokens) > 100, "the README should name its config keys in inline code"
    problems += [p for p in map(check_token, dict.fromkeys(tokens)) if p]
    assert not problems, "README names config keys or options that conf/ lacks:\n" + "\n".join(problems)


def test_key_check_catches_renames():
    """The checks above fail for keys and options that do not exist."""
    assert check_token("process.min_snr_gamma=5") is None and check_token("callbacks=[default,fid]") is None
    assert check_token("process.min_snr_gama=5") and check_token("model=unet_huge")
    assert check_token("callbacks.ema.decy") and check_token("callbacks=[default,fdi]")
    assert check_token("model.pretrained=ID") is None  # diffusers_unet's key, found in that option
    with pytest.raises(Exception, match="min_snr_gama"):
        _compose("train", ["process.min_snr_gama=5"])


# --- running the commands --------------------------------------------------------------------------------
MARKED = [(c, m) for c, m in bash_commands()]


def test_marks_are_known_and_quickstart_matches_ci():
    assert {m for _, m in MARKED if m} <= MARKS, "use one of the marks the README explains"
    for mark in MARKS:
        assert f"`# needs: {mark}`" in README
    ci = (ROOT / ".ci" / "run").read_text()
    quick = [c for c, _ in MARKED if "pytest" in c]
    assert quick == ['pip install -e ".[dev]" && python -m pytest -q']
    assert quick[0] in ci.splitlines(), ".ci/run must run the README's test command verbatim"
    assert MARKED[0] == ("pip install -e . && python train.py", None)
    assert "<!-- lead:" not in README, "every figure the README promises is filled in"
    for image in re.findall(r"\]\((docs/images/[^)]+)\)", README):  # pictures the README shows exist
        assert (ROOT / image).is_file(), image


TINY_TRAIN = [*TINY, "trainer.max_steps=2", "data.num_workers=0"]
TINY_FOLDER = ["data.image_size=16", "data.channels=1"]  # the base checkpoint's shape, so init_from fits


class Session:
    """What the README's commands leave behind, as for a user following it: the runs, by kind."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.roots: dict[str, Path] = {}  # kind ("base", "cond", "diffusers") -> folder holding outputs/
        self.count = 0

    def new_root(self) -> Path:
        self.count += 1
        root = self.home / "runs" / str(self.count)
        root.mkdir(parents=True)
        return root

    def run_folder(self, kind: str) -> Path:
        if kind not in self.roots:
            raise AssertionError(f"no {kind} checkpoint yet: a README command that trains one must come first")
        (folder,) = (self.roots[kind] / "outputs" / "train").iterdir()
        return folder

    def images(self, name: str, labels: bool) -> Path:
        folder = self.home / name
        if not folder.exists():
            for i in range(8):
                sub = ("cats/" if i % 2 else "dogs/") if labels else ""
                write_image(folder / f"{sub}{i}.png", (24, 20), "RGB", seed=i)
        return folder

    def shards(self, name: str, labels: bool) -> Path:
        """The shard set `python -m diffusion.data.shards write` made (or makes) of the folder `name`."""
        from diffusion.data.shards import write_shards

        folder = self.home / "shards" / name
        if not folder.exists():
            write_shards(self.images(name.removesuffix("-shards"), labels), folder, labels=labels)
        return folder

    def substitute(self, args: list[str], kind: str) -> list[str]:
        """The README's paths made real: ~ -> a fabricated home, example run folders -> real ones."""
        out = []
        labeled = "data.labels=true" in args or any(a.startswith(("model.num_classes=", "--labels")) for a in args)
        for arg in args:
            key, eq, value = arg.partition("=")
            if eq and value.startswith(PLACEHOLDER_RUN):
                value = str(self.run_folder(kind)) + value[len(PLACEHOLDER_RUN) :]
            elif eq and key == "data.path" and "data=shards" in args:
                value = str(self.shards(Path(value).name, labels=labeled))
            elif eq and key in ("data.path",):
                value = str(self.images(Path(value).name, labels=labeled))
            elif eq and key in ("out",):
                value = str(self.home / "out" / f"{self.count}_{value}")
            out.append(f"{key}={value}" if eq else arg)
        return out


@pytest.fixture(scope="module")
def session(tmp_path_factory) -> Session:
    return Session(tmp_path_factory.mktemp("readme_home"))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on 2 cores shared with other jobs, 2 OpenMP threads made a tiny step ~50x slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"  # the quick-start subprocess
    yield
    os.environ.pop("OMP_NUM_THREADS", None)
    torch.set_num_threads(threads)


def kind_of(args: list[str]) -> str:
    if any(a.startswith("ema.sigma_rel=") for a in args):
        return "posthoc"
    if any(a.startswith(("prompt=", "prompts=")) for a in args):
        return "text"
    if any(a.startswith(("label=", "guidance=")) for a in args):
        return "cond"
    if "format=diffusers" in args:
        return "diffusers"
    return "base"


def run_quickstart(session: Session, argv: list[str]) -> None:
    """`python train.py` as a real subprocess (tiny overrides appended), from a fresh folder as cwd."""
    root = session.new_root()
    result = run_cli("train.py", *argv[2:], *TINY_TRAIN, cwd=root, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    # a newcomer's first screen: no warning they cannot act on (Hydra's callback error, Lightning's hints)
    screen = result.stdout + result.stderr
    for noise in ("Warning", "InterpolationResolutionError", "litlogger", "logging interval", "weights_only"):
        assert noise not in screen, f"the quick start prints {noise!r}:\n{screen[-3000:]}"
    (run,) = (root / "outputs" / "train").iterdir()
    # what the README's run-folder table promises
    for pattern in (
        ".hydra/config.yaml",
        ".hydra/overrides.yaml",
        ".hydra/hydra.yaml",
        "train.log",
        "checkpoints/last.ckpt",
        "checkpoints/step_*.ckpt",
        "samples/step_*.png",
        "csv/version_0/metrics.csv",
        "csv/version_0/hparams.yaml",
        "report.html",
        "report/loss.png",
        "report/samples.png",
    ):
        assert list(run.glob(pattern)), f"the quick-start run folder lacks {pattern}"
    metrics = (run / "csv/version_0/metrics.csv").read_text().splitlines()[0]
    for name in ("train/loss", "train/lr", "val/loss", "val/loss_t0-4"):
        assert name in metrics.split(","), name
    session.roots["base"] = root


def run_train_inprocess(session: Session, argv: list[str]) -> None:
    args = session.substitute(argv[2:], "base")
    model = next((a.split("=", 1)[1] for a in args if a.startswith("model=")), None)
    tiny = [t for t in TINY_TRAIN if not (model == "diffusers_unet" and t.startswith("model="))]
    if any(a in ("data=folder", "data=shards", "data=hf") for a in args):
        tiny += TINY_FOLDER
    if "data=shards" in args:  # the fabricated folder's 7 training images fill no batch of 16 (nothing is padded)
        tiny.append("data.batch_size=4")
    if "data=hf" in args:  # load_dataset's Arrow cache, inside the test's home
        tiny.append(f"data.cache_dir={session.home / 'hf_cache'}")
    if any(a.startswith("ckpt_path=") for a in args):
        tiny.append("trainer.max_steps=4")  # the base run ended at step 2: resuming trains 2 more
    root = session.new_root()
    cfg = compose_train(root / "outputs" / "train" / "run", [*args, *tiny], tiny=False)
    with open_dict(cfg):  # `last` and run folders resolve against the base run
        cfg.paths.runs_dir = str(session.roots["base"] / "outputs")
    import train

    train.train(cfg)
    out = Path(cfg.paths.output_dir)
    if cfg.get("validate_only"):  # evaluates a checkpoint: its metrics, no checkpoint of its own
        assert (out / train.VALIDATE_FILE).is_file()
    elif not cfg.trainer.get("fast_dev_run"):  # debug=fdr writes no checkpoint
        assert (out / "checkpoints" / "last.ckpt").is_file()
    saved = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])  # .hydra/config.yaml, as Hydra writes it
    (out / ".hydra").mkdir(exist_ok=True)
    OmegaConf.save(saved, out / ".hydra" / "config.yaml")
    kind = "diffusers" if "diffusers" in cfg.model._target_ else "cond" if cfg.model.get("num_classes") else None
    kind = "posthoc" if (cfg.get("callbacks") or {}).get("posthoc_ema") else kind
    kind = "text" if cfg.model.get("context_dim") else kind
    if kind:
        session.roots.setdefault(kind, root)


def run_sample_or_export(session: Session, argv: list[str]) -> None:
    script = argv[1].removesuffix(".py")
    kind = kind_of(argv)
    args = session.substitute(argv[2:], kind)
    if script == "sample":
        tiny = ["n=2", "batch_size=2", "sampler.steps=2", "progress=false", "device=cpu"]
        if not any(a.startswith("out=") for a in args):
            tiny.append(f"out={session.home / 'out' / f'{session.count}_default'}")
    else:
        tiny = [] if any(a.startswith("out=") for a in args) else [f"out={session.home / 'out' / 'export'}"]
    session.count += 1
    cfg = _compose(script, [*args, *tiny], cwd=session.roots[kind])
    module = __import__(script)
    (module.sample if script == "sample" else module.run)(cfg)
    out = Path(str(cfg.out))
    assert out.is_dir() and any(out.iterdir()), f"{argv}: nothing written to {out}"


@pytest.mark.parametrize("command,mark", MARKED, ids=[f"{i}:{c[:60]}" for i, (c, _) in enumerate(MARKED)])
def test_readme_command_runs(command: str, mark: str | None, session: Session, monkeypatch):
    if mark == "dataset":
        pytest.skip("needs: dataset (marked in the README); tests/test_recipes.py runs it on fabricated files")
    if mark:
        pytest.skip(f"needs: {mark} (marked in the README)")
    for argv in split_parts(command):
        while argv and ENV.match(argv[0]):
            name, _, value = argv.pop(0).partition("=")
            monkeypatch.setenv(name, value)
        if argv[:2] == ["pip", "install"]:
            continue
        if argv[:3] == ["python", "-m", "pytest"]:
            continue  # the suite itself: CI runs it (checked against .ci/run above)
        assert argv[0] == "python", f"{command!r}: teach tests/test_readme.py to run it, or mark it # needs: ..."
        if argv[1] == "train.py" and "base" not in session.roots:
            run_quickstart(session, argv)
        elif argv[1] == "train.py" and "-m" not in argv:
            run_train_inprocess(session, argv)
        elif argv[1] in ("sample.py", "export.py"):
            run_sample_or_export(session, argv)
        elif argv[1] == "report.py":
            import report

            cfg = _compose("report", session.substitute(argv[2:], "base"), cwd=session.roots["base"])
            assert report.report(cfg).is_file()
        elif argv[1:3] == ["-m", "diffusion.data.shards"]:
            from diffusion.data.shards import main

            write, src, dst, *flags = argv[3:]  # the folder and the shard folder made real, as data.path is
            labeled = "--labels" in flags
            target = session.home / "shards" / Path(dst).name
            assert main([write, str(session.images(Path(src).name, labeled)), str(target), *flags]) == 0
        else:
            raise AssertionError(f"{command!r}: teach tests/test_readme.py to run it, or mark it # needs: ...")


# --- what the README says the defaults are -----------------------------------------------------------------
STATED = re.compile(r"`([a-z_]+(?:\.[a-z_]+)+)` = ([0-9][0-9.e+-]*(?:/[0-9]+)?)")


def stated_value(cfg: DictConfig, key: str):
    """`key`'s default: in the composed train config, or in the option file of a group the default leaves out
    (`callbacks.posthoc_ema.every_n_steps` in conf/callbacks/posthoc_ema.yaml)."""
    value = OmegaConf.select(cfg, key)
    group, option, *_ = key.split(".") + [""]
    if value is None and (CONF / group / f"{option}.yaml").is_file():
        value = OmegaConf.select(OmegaConf.create(_load(CONF / group / f"{option}.yaml")), key.split(".", 1)[1])
    return value


def test_stated_defaults_are_the_defaults():
    """Every "`key` = value" the README states is the default config's value (the numbers cannot drift again:
    the README said `optim.lr` = 2e-3 and `trainer.val_check_interval` = 200 after both had changed)."""
    cfg = _compose("train", [])
    stated = STATED.findall(README)
    assert len(stated) >= 5, "the README states defaults as `key` = value"
    wrong = []
    for key, value in stated:
        actual = stated_value(cfg, key)
        number = value.rstrip(".")
        number = float(number.split("/")[0]) / float(number.split("/")[1]) if "/" in number else float(number)
        if actual is None or abs(float(actual) - number) > 1e-12 * max(1.0, abs(number)):
            wrong.append(f"`{key}` = {value} (the config has {actual})")
    assert not wrong, "the README states stale defaults: " + "; ".join(wrong)


def test_group_table_lists_every_option_and_the_defaults():
    """The group table names every conf/<group>/*.yaml as an option of its group, and each "(default)" is the
    option train.yaml picks."""
    rows = dict(re.findall(r"^\| `([a-z_]+)` \| (.*?) \|", README, flags=re.M))
    cfg = _compose("train", [])
    choices = cfg.hydra.runtime.choices
    missing = []
    for group in GROUPS:
        if group == "local":  # your own, git-ignored (its example is named in the row)
            continue
        row = rows.get(group)
        if row is None:
            missing.append(f"{group}: no row")
            continue
        for path in sorted((CONF / group).glob("*.yaml")):
            if f"`{path.stem}`" not in row:
                missing.append(f"{group}={path.stem}")
        for default in re.findall(r"`([a-z_0-9]+)` \(default", row):
            if choices.get(group) != default:
                missing.append(
                    f"{group}: the README says {default} is the default, train.yaml picks {choices.get(group)}"
                )
    assert not missing, "the group table is out of date: " + ", ".join(missing)


def test_a_prompt_with_a_comma_and_quotes_is_one_string():
    """What the README says about prompts with commas: `'prompt="a cat, sitting"'` reaches sample.py whole."""
    assert """`'prompt="a cat, sitting"'`""" in README
    (override,) = shlex.split("""'prompt="a cat, sitting"'""")  # what the shell passes
    assert _compose("sample", [override]).prompt == "a cat, sitting"
    quotes = shlex.split("""'prompt="the \\"best\\" cat, sitting"'""")[0]
    assert _compose("sample", [quotes]).prompt == 'the "best" cat, sitting'
