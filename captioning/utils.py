"""Small shared pieces: the user-facing error, atomic file writes, console, progress bars, the exit.

Kept free of torch so that `--help` and the menu's first screen stay fast.
"""
import errno
import json
import os
import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)

# Messages and progress go to stderr so that `caption --json` keeps stdout clean.
console = Console(stderr=True, highlight=False, soft_wrap=True)


class CaptioningError(Exception):
    """A failure the user can act on. Its message is one plain sentence, shown without a traceback."""


def printable(text):
    """`text` for a terminal with control and format characters shown as escapes (\\n, \\x1b, \\u202e): a
    file name or caption can never move the cursor, recolour the screen or forge a line of output."""
    return "".join(c if c.isprintable() or c == " " else c.encode("unicode_escape").decode("ascii")
                   for c in str(text))


def failure_message(exc, batch_option="--batch-size"):
    """One line for any failure, for the CLI and the menu alike: a CaptioningError as it is, resource and file
    system errors as what to do about them, anything else as its type and first line (a bug: --debug)."""
    if isinstance(exc, CaptioningError):
        return str(exc)
    name, text = type(exc).__name__, str(exc)
    if isinstance(exc, ModuleNotFoundError) and exc.name in ("torch", "torchvision"):
        return ("This needs PyTorch, which is not installed here: pip install -r requirements.txt (an environment "
                "from requirements-onnx.txt captions with an ONNX export folder only: caption PHOTO --model DIR).")
    if isinstance(exc, MemoryError):
        return f"Out of memory; try a smaller {batch_option}."
    if "OutOfMemoryError" in name or "out of memory" in text.lower():   # torch.cuda.OutOfMemoryError, MPS
        return f"The GPU ran out of memory; try a smaller {batch_option} (or --device cpu)."
    if isinstance(exc, OSError) and exc.errno is not None:
        # os.replace(tmp, path) names both: the user's file is the second, the temporary name means nothing to them.
        target = getattr(exc, "filename2", None) or exc.filename
        where = f" {target}" if target else ""
        if exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
            return (f"The disk is full{' (writing' + where + ')' if where else ''}; free some space and run again. "
                    "Files finished before are intact.")
        if exc.errno in (errno.EACCES, errno.EPERM):
            return f"No permission to read or write{where or ' a file'}."
        if exc.errno == errno.EROFS:
            return f"Cannot write{where}: the disk is read-only."
        if exc.errno in (errno.ENOTDIR, errno.EEXIST):
            return f"A file is in the way where a folder is needed:{where or ' (unknown path)'}."
        if exc.errno == errno.EISDIR:
            return f"Expected a file but found a folder:{where}."
        if exc.errno == errno.ENOENT and where:
            return f"No such file or folder:{where}."
    first = (text.strip().splitlines() or [""])[0][:200]
    return f"unexpected {name}: {first} (run with --debug for the details)"


def _file_mode():
    """The permissions a plain open() would give a new file (0o644 under the usual umask 022). mkstemp makes
    its files 0o600, which os.replace would carry over: a PNG or checkpoint others cannot read."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


FILE_MODE = _file_mode()


def _mkstemp_beside(path):
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, FILE_MODE)
    except OSError:
        pass  # e.g. a file system without permissions; the write itself still works
    return fd, tmp


def atomic_write(path, write_fn, mode="wb"):
    """Write a file so that readers see either the old file or the whole new one, never a half.

    `write_fn(f)` writes into a temporary file in the same directory; it is flushed to disk and then
    renamed over `path` (os.replace is atomic on POSIX and Windows)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _mkstemp_beside(path)
    try:
        with os.fdopen(fd, mode) as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        # Whatever went wrong (disk full, Ctrl-C), the previous file at `path` is untouched.
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def atomic_write_text(path, text):
    return atomic_write(path, lambda f: f.write(text), mode="w")


def atomic_write_json(path, obj):
    return atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def temp_path_for(path):
    """A fresh temporary file name beside `path`, for writers (e.g. torch.save, matplotlib) that want a name.
    Pair it with `os.replace(tmp, path)`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _mkstemp_beside(path)
    os.close(fd)
    return Path(tmp)


def clean_user_path(text):
    """A path as a person types or drags it into a terminal: quotes stripped, `~` expanded."""
    text = str(text).strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        text = text[1:-1]
    # Drag-and-drop on some terminals escapes spaces with backslashes.
    if "\\ " in text and os.sep == "/":
        text = text.replace("\\ ", " ")
    return Path(os.path.expanduser(text))


IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff"}


def collect_images(inputs):
    """Files and folders (searched one level, sorted) → image paths. A bad path raises one clear error."""
    paths = []
    for raw in inputs:
        p = Path(raw)
        try:
            if p.is_dir():
                found = sorted(q for q in p.iterdir() if q.suffix.lower() in IMAGE_SUFFIXES and q.is_file())
                if not found:
                    raise CaptioningError(f"No images (jpg, png, gif, webp, bmp, tiff) in folder: {p}")
                paths += found
            elif p.exists():
                paths.append(p)
            else:
                raise CaptioningError(f"Image not found: {p}")
        except PermissionError:
            raise CaptioningError(f"No permission to read: {p}") from None
    return paths


def make_progress(transient=False):
    """A rich progress bar that shows how far, how fast and how long is left."""
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TaskProgressColumn(),
        TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        console=console, transient=transient, disable=not console.is_terminal)


def add_task(progress, description, total, unit="it"):
    """Add a task whose rate column reads e.g. '35.2 img/s'; update with `advance_task`."""
    return progress.add_task(description, total=total, rate=f"- {unit}/s", info="", unit=unit)


def advance_task(progress, task_id, n=1, info=None):
    progress.advance(task_id, n)
    task = next(t for t in progress.tasks if t.id == task_id)
    unit = task.fields["unit"]
    fields = {"rate": f"{task.speed:.1f} {unit}/s" if task.speed else f"- {unit}/s"}
    if info is not None:
        fields["info"] = info
    progress.update(task_id, **fields)


def exit_process(code):
    """End the process with `code` once a command is over. After torch is imported, Python's own teardown
    (freeing torch's and torchvision's modules object by object) takes about a second on a laptop CPU: a
    third of a cold `caption` (bench/caption_latency.py). Everything the tool writes is written and renamed
    into place by now, so flush what was printed, run the exit hooks libraries registered (temporary
    folders, logs), and skip the rest. While threads that Python would wait for, or child processes, are
    still running, exit normally."""
    import threading
    waited_for = [t for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon]
    children = "multiprocessing" in sys.modules and sys.modules["multiprocessing"].active_children()
    if "torch" not in sys.modules or waited_for or children:
        sys.exit(code)
    import atexit
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):   # a closed pipe: nothing more can be shown anyway
            pass
    os._exit(code)


def registry(table):
    """A class decorator factory that adds classes to `table` by name (the training objectives):
    `@register("name")` makes a class available to every command, the menu and the tests."""
    def register(name):
        def add(cls):
            cls.name = name
            table[name] = cls
            return cls
        return add
    return register
