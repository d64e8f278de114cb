import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The Triton head kernels (tests/test_head_triton.py) run on CPU through Triton's interpreter. Triton reads this
# when its own helper functions are decorated, i.e. at its import: it must be set before anything imports it.
if not __import__("torch").cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Every process a test starts inherits this marker, so the session can find the ones still running at its end
# (an orphan keeps its environment after its parent dies; a process-tree walk would miss it).
SESSION_MARK = f"PREFPIPE_TEST_SESSION={os.getpid()}-{__import__('uuid').uuid4().hex}"
os.environ["PREFPIPE_TEST_SESSION"] = SESSION_MARK.split("=", 1)[1]


def _parent(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return 0


def _owned(pid: int) -> bool:
    """Whether this process is an ancestor of `pid` (it still owns it: e.g. an in-process Prefect server)."""
    while pid > 1:
        pid = _parent(pid)
        if pid == os.getpid():
            return True
    return False


def _marked_processes() -> list[tuple[int, int, str]]:
    """(pid, parent pid, command line) of the processes other than this one that carry the session marker."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            if SESSION_MARK.encode() not in (d / "environ").read_bytes().split(b"\0"):
                continue
            ppid = _parent(int(d.name))
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:200]
        except (OSError, ValueError, IndexError):  # gone meanwhile, or not ours to read
            continue
        if ppid != 0:  # zombies and kernel threads aside
            found.append((int(d.name), ppid, cmd))
    return found


@__import__("pytest").fixture(scope="session", autouse=True)
def no_process_left_behind():
    """After the session, no process a test started may still run unless this process still owns it (a
    descendant, e.g. an in-process Prefect server stopped at exit): an orphan means a test leaked it."""
    yield
    import time
    if not Path("/proc").is_dir():
        return
    deadline = time.time() + 10  # a process killed at the end of the last test may take a moment to go
    while True:
        orphans = [p for p in _marked_processes() if not _owned(p[0])]
        if not orphans or time.time() > deadline:
            break
        time.sleep(0.2)
    for pid, _, _ in orphans:  # reported below; stopped here so one leaky run does not pile up on the machine
        try:
            os.kill(pid, __import__("signal").SIGKILL)
        except OSError:
            pass
    assert not orphans, f"processes started by the tests are still running: {orphans}"
