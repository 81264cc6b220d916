"""Train zoo models into a local object store at the lowest CPU priority.

conftest starts two of these in the background at the start of the session, so the training
(about two and a half minutes on two cores) uses the CPU the first tests leave idle instead of
holding up the first test that needs the zoo. Usage: ``python -m tests._zoo_train STORE_ROOT NAME[,NAME...]``.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from app.config import Settings
from app.storage import Store, open_store
from workers.engine import zoo
from workers.engine.diffusion.teacher import teacher

TRAIN: dict[str, Callable[[Store], Any]] = {
    "digits-cnn": zoo.digits_cnn,
    "char-gpt": zoo.char_gpt,
    "teacher": teacher,
}


def _exit_with(parent: int) -> None:
    """In its own session this process gets no Ctrl-C: it ends when pytest does, however."""
    while os.getppid() == parent:
        time.sleep(1)
    os._exit(1)


def main(argv: list[str]) -> None:
    root, names = Path(argv[0]), argv[1].split(",")
    threading.Thread(target=_exit_with, args=(os.getppid(),), daemon=True).start()
    # The tests in the foreground come first; this takes what they leave. Where the kernel groups
    # CPU time by session (autogroup), a process's nice value only ranks it within its session,
    # so conftest starts this in a session of its own and the session's weight is lowered too.
    os.nice(19)
    with contextlib.suppress(OSError):  # no autogroup: the nice value above is what counts
        Path("/proc/self/autogroup").write_text("19")
    # One thread: with two of these on two cores none waits on another's thread, where a niced
    # two-thread process mostly spins at its barriers while the tests hold a core. (The weights
    # differ in their last bits from a two-thread training's; the tests allow for that.)
    torch.set_num_threads(1)
    store = open_store(Settings(store_url=root.as_uri()))
    for name in names:
        TRAIN[name](store)


if __name__ == "__main__":
    main(sys.argv[1:])
