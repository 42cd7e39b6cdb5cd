"""``run_glue_iw.py`` that SIGKILLs itself right after writing checkpoint ``KILL_AT_STEP`` (a real crash mid-run).

python tests/scripts/killed_run.py KILL_AT_STEP <run_glue_iw.py flags>
"""

from __future__ import annotations

import os
import signal
import sys

from transformers import TrainerCallback

import iwtrainer.glue.run as run


class KillAfterSave(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no atexit: as a lost machine


if __name__ == "__main__":
    step, argv = int(sys.argv[1]), sys.argv[2:]
    original = run.GlueTrainer

    class Killed(original):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.add_callback(KillAfterSave(step))  # last: after every callback that writes into the checkpoint

    run.GlueTrainer = Killed
    run.main(argv)
