"""Train zoo models into a local object store at the lowest CPU priority.

conftest starts two of these in the background at the start of the session, so the training
(about two and a half minutes on two cores) uses the CPU the first tests leave idle instead of
holding up the first test that needs the zoo.
Usage: ``python -m tests._zoo_train PARENT_PID STORE_ROOT NAME[,NAME...]``.
"""

from __future__ import annotations

import errno
import os
import sys
import threading
import time
from pathlib import Path


def _exit_with(parent: int) -> None:
    """In its own session this process gets no Ctrl-C: it ends when pytest does, however."""
    while os.getppid() == parent:
        time.sleep(1)
    os._exit(1)


def _lowest_priority() -> str:
    """The tests in the foreground come first; this takes what they leave. Where the kernel
    groups CPU time by session (autogroup), a process's nice value only ranks it within its
    session, so conftest starts this in a session of its own and the session's weight is
    lowered too. Returns what the kernel reports, for the log."""
    os.nice(19)
    group = Path("/proc/self/autogroup")
    for _ in range(20):
        try:
            group.write_text("19")
            break
        except FileNotFoundError:
            return "no autogroup: nice 19"
        except OSError as e:  # without CAP_SYS_ADMIN, one such write per 100 ms system-wide
            if e.errno != errno.EAGAIN:
                return f"autogroup not lowered ({e}); nice 19"
            time.sleep(0.15)
    return group.read_text().strip()


def main(argv: list[str]) -> None:
    parent, root, names = int(argv[0]), Path(argv[1]), argv[2].split(",")
    threading.Thread(target=_exit_with, args=(parent,), daemon=True).start()
    print(f"priority: {_lowest_priority()}", flush=True)  # before the imports' CPU time

    import torch

    from app.config import Settings
    from app.storage import open_store
    from workers.engine import zoo
    from workers.engine.diffusion.teacher import teacher

    train = {"digits-cnn": zoo.digits_cnn, "char-gpt": zoo.char_gpt, "teacher": teacher}
    # One thread: with two of these on two cores none waits on another's thread, where a niced
    # two-thread process mostly spins at its barriers while the tests hold a core. (The weights
    # differ in their last bits from a two-thread training's; the tests allow for that.)
    torch.set_num_threads(1)
    store = open_store(Settings(store_url=root.as_uri()))
    for name in names:
        t0 = time.perf_counter()
        train[name](store)
        print(f"{name}: {time.perf_counter() - t0:.1f} s", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
