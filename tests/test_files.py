"""Files: every write goes through diffusion/files.py (a scan of the source finds any that does not), and paths we
read are regular files (a named pipe given as a checkpoint or a LoRA base is refused in one line, not waited on)."""

from __future__ import annotations

import ast
import contextlib
import os
import re
import signal

import pytest

from diffusion.checkpoint import read_checkpoint
from diffusion.finetune import init_from_checkpoint, load_base
from tests.conftest import ROOT, run_train, tiny_unet
from tests.test_safety import one_line_error


@contextlib.contextmanager
def deadline(seconds: int = 20):
    """A TimeoutError instead of a test that hangs (opening a named pipe blocks until a writer comes)."""

    def expire(signum, frame):
        raise TimeoutError(f"still blocked after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_a_named_pipe_as_a_checkpoint_or_lora_base_is_refused_unopened(tmp_path):
    pipe = tmp_path / "model.ckpt"
    os.mkfifo(pipe)
    readers = {
        "checkpoint": lambda: read_checkpoint(pipe),  # sample.py ckpt=, export.py ckpt=, resume
        "init_from": lambda: init_from_checkpoint(tiny_unet(), pipe),
        "LoRA base": lambda: load_base(tiny_unet(), {"kind": "checkpoint", "path": str(pipe), "use_ema": True}),
    }
    for what, read in readers.items():
        with deadline():
            message = one_line_error(read)
        assert str(pipe) in message and "named pipe" in message and "\n" not in message, (what, message)


@pytest.mark.parametrize("kind", ["folder", "missing"])
def test_regular_file_names_what_is_wrong(tmp_path, kind):
    from diffusion.files import regular_file

    path = tmp_path / "x.ckpt"
    if kind == "folder":
        path.mkdir()
    message = one_line_error(regular_file, path, "checkpoint")
    assert message == f"checkpoint {path} " + ("is a folder, not a file" if kind == "folder" else "does not exist")
    (tmp_path / "ok.ckpt").write_bytes(b"x")
    (tmp_path / "link.ckpt").symlink_to(tmp_path / "ok.ckpt")
    assert regular_file(tmp_path / "link.ckpt", "checkpoint") == tmp_path / "link.ckpt"


def test_the_sample_grid_never_writes_through_a_planted_link(tmp_path):
    """A link planted where a grid goes is replaced by the grid; the file it points to is left as it was."""
    run, victim = tmp_path / "run", tmp_path / "victim.txt"
    victim.write_text("the user's file")
    (run / "samples").mkdir(parents=True)
    for step in (2, 4):
        (run / "samples" / f"step_{step:06d}.png").symlink_to(victim)
    run_train(run)
    assert victim.read_text() == "the user's file"
    grids = sorted((run / "samples").iterdir())
    assert [p.name for p in grids] == ["step_000002.png", "step_000004.png"]
    assert all(not p.is_symlink() and p.read_bytes().startswith(b"\x89PNG") for p in grids)


# --- every write goes through diffusion/files.py ------------------------------------------------------------------
# files.py's writers (and extras' on top of them; write_folder: a fresh folder that files.move_tree empties):
# a call inside their arguments (`atomic_write(path, lambda f: torch.save(obj, f))`) writes into their temp file.
WRITERS = {"atomic_write", "write_bytes", "write_text", "write_json", "write_folder"}
SAVES = {"save_image", "torch.save", "np.save", "np.savez", "np.savez_compressed", "np.lib.format.open_memmap"}
MOVES = {"os.replace", "os.rename", "os.link", "os.symlink", "shutil.move", "shutil.copytree", "shutil.copy"}
MOVES |= {"shutil.copy2", "shutil.copyfile", "np.memmap"}
PATH_WRITES = {"write_text", "write_bytes", "tofile", "save_pretrained", "save_lora_weights"}
PATH_MOVES = {"rename", "replace", "symlink_to", "hardlink_to"}  # Path's, with one argument (str.replace has two)
WRITE_FLAGS = {"O_WRONLY", "O_RDWR", "O_CREAT", "O_APPEND", "O_TRUNC"}


def dotted(node) -> str:
    """`a.b.c` for a Name / Attribute chain (`numpy` spelled `np`), else ''."""
    if isinstance(node, ast.Name):
        return {"numpy": "np"}.get(node.id, node.id)
    if isinstance(node, ast.Attribute):
        base = dotted(node.value)
        return f"{base}.{node.attr}" if base else ""
    return ""


def writing_mode(call: ast.Call) -> bool:
    """Whether an `open`-like call's mode (second positional or `mode=`; the first for `Path.open`) writes."""
    candidates = [k.value for k in call.keywords if k.arg == "mode"] + list(call.args[:2])
    modes = [c.value for c in candidates if isinstance(c, ast.Constant) and isinstance(c.value, str)]
    return any(re.fullmatch(r"[rwaxbt+]+([:|]\w*)?", m) and re.search(r"[wax+]", m) for m in modes)


def write_call(call: ast.Call, in_memory: set[str]) -> str | None:
    """What `call` writes to a path, or None: open for writing, write flags, a save, a rename or copy."""
    name = dotted(call.func)
    method = call.func.attr if isinstance(call.func, ast.Attribute) else None
    short = method or name
    flags = {a.attr for a in ast.walk(call) if isinstance(a, ast.Attribute)} & WRITE_FLAGS
    target = [a.id for a in call.args if isinstance(a, ast.Name)]
    into_file = any(k.arg == "fileobj" for k in call.keywords)  # into a file opened elsewhere (and checked there)
    if short in ("open", "fdopen") and writing_mode(call) and not into_file or name == "os.open" and flags:
        return f"{name or short}(... for writing)"
    if (name in SAVES or short == "save_image") and not set(target) & in_memory:  # not into an io.BytesIO
        return f"{name}()"
    if name in MOVES or method in PATH_WRITES or method in PATH_MOVES and len(call.args) == 1 and not call.keywords:
        return f"{name or method}()"
    if method == "save" and not set(target) & in_memory:  # (an image saved into a BytesIO writes no file)
        if any(k.arg == "format" for k in call.keywords) or "im" in dotted(call.func.value):
            return f"{name or method}() (an image's save)"
    return None


def write_calls(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, call) of each write in `tree` that does not go through files.py (see WRITERS)."""
    in_memory = {  # names bound to io.BytesIO(): a save into one writes no file
        t.id
        for node in ast.walk(tree)
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call) and dotted(node.value.func) == "io.BytesIO"
        for t in node.targets
        if isinstance(t, ast.Name)
    }
    found = []

    def visit(node, inside_writer: bool) -> None:
        if isinstance(node, ast.Call):
            what = None if inside_writer else write_call(node, in_memory)
            if what is not None:
                found.append((node.lineno, what))
            inside_writer = inside_writer or dotted(node.func).rsplit(".", 1)[-1] in WRITERS
        for child in ast.iter_child_nodes(node):
            visit(child, inside_writer)

    visit(tree, False)
    return found


SOURCES = [ROOT / "train.py", ROOT / "sample.py", ROOT / "export.py", *sorted((ROOT / "diffusion").rglob("*.py"))]


def test_every_write_goes_through_files_py():
    """A scan of diffusion/ and the entry points for writes outside diffusion/files.py (open for writing,
    write_text / write_bytes, torch.save / np.save / save_image / an image's save to a path, renames and copies):
    each one may follow a planted link, leave a half-written file or overwrite what we did not write."""
    bypass = []
    for path in SOURCES:
        if path == ROOT / "diffusion" / "files.py":
            continue
        for line, call in write_calls(ast.parse(path.read_text(), str(path))):
            bypass.append(f"{path.relative_to(ROOT)}:{line}: {call}")
    assert not bypass, "writes outside diffusion/files.py:\n" + "\n".join(bypass)


def test_the_scan_finds_each_kind_of_write():
    source = """
open(p, "w"); open(p, mode="ab"); p.open("w"); gzip.open(p, "wb"); tarfile.open(p, "w"); os.open(p, os.O_WRONLY)
p.write_text(t); p.write_bytes(b); torch.save(x, p); np.save(p, a); np.savez(p, a=a); save_image(g, p)
image.save(p); img.save(p, format="PNG"); shutil.copy(a, b); shutil.move(a, b); os.replace(a, b); tmp.rename(p)
np.lib.format.open_memmap(p, mode="w+"); unet.save_pretrained(p)
"""
    assert len(write_calls(ast.parse(source))) == 20
    fine = """
open(p); open(p, "rb"); Image.open(p); s.replace("a", "b"); resume.save(trainer); torch.load(p)
buffer = io.BytesIO(); torch.save(state, buffer); tarfile.open(fileobj=f, mode="w"); image.save(buffer, format="PNG")
atomic_write(p, lambda f: torch.save(x, f)); atomic_write(p, partial(image.save, format="PNG")); write_bytes(p, b)
"""
    assert write_calls(ast.parse(fine)) == []
