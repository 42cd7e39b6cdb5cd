"""Never continue someone else's run: a checkpoint is resumed only when it was written with this run's settings."""

from __future__ import annotations

import json
import shutil

from helpers import base_args, e2e, read, user_error

from iwtrainer.glue.resume import RUN_SETTINGS_FILE
from iwtrainer.glue.run import main

pytestmark = e2e
SAVE = ["--do_train", "--save_strategy", "steps", "--save_steps", "2", "--iw_alpha", "1e-3"]


def snapshot(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_foreign_checkpoint_is_refused_and_the_same_settings_resume(tmp_path, caplog):
    out = tmp_path / "run"
    main(base_args(out, "rte", *SAVE))
    assert (out / "checkpoint-4" / RUN_SETTINGS_FILE).is_file()
    settings = read(out / "checkpoint-4" / RUN_SETTINGS_FILE)
    assert (settings["adapter"], settings["max_steps"], settings["iw_alpha"]) == ("lora", 4, 1e-3)
    before = snapshot(out)

    message = user_error(base_args(out, "rte", *SAVE, "--max_steps", "8", "--learning_rate", "1e-3"))
    assert "the last checkpoint in --output_dir" in message and "(checkpoint-4)" in message
    assert "learning_rate: 5e-05 there, 0.001 now" in message and "max_steps: 4 there, 8 now" in message
    assert "--overwrite_output_dir" in message
    assert snapshot(out) == before  # nothing written

    other = user_error(base_args(out, "rte", *SAVE, "--adapter", "gradnorm", "--rank_warmup_steps", "1"))
    assert "adapter: 'lora' there, 'gradnorm' now" in other

    written = out / "checkpoint-4" / RUN_SETTINGS_FILE  # as an older iwtrainer wrote it: no iw_calibration yet
    written.write_text(json.dumps({k: v for k, v in read(written).items() if k != "iw_calibration"}))
    caplog.set_level("INFO")
    main(base_args(out, "rte", *SAVE))  # the same flags: resumes, reusing the importance record
    assert "reusing importance weights" in caplog.text and "resuming training at" in caplog.text
    assert read(out / "trainer_state.json")["global_step"] == 4


def test_overwrite_output_dir_starts_fresh(tmp_path, caplog):
    out = tmp_path / "run"
    main(base_args(out, "rte", *SAVE))
    caplog.set_level("INFO")
    main(base_args(out, "rte", *SAVE, "--max_steps", "6", "--overwrite_output_dir"))
    assert "resuming training" not in caplog.text and "reusing importance" not in caplog.text
    state = read(out / "trainer_state.json")
    assert state["global_step"] == 6 and read(out / "checkpoint-6" / RUN_SETTINGS_FILE)["max_steps"] == 6


def test_checkpoints_that_are_missing_or_not_ours(tmp_path, glue_for):
    rte = glue_for("rte")
    message = user_error(
        base_args(tmp_path / "a", "rte", *SAVE, "--resume_from_checkpoint", str(tmp_path / "none"), glue=rte)
    )
    assert "--resume_from_checkpoint" in message and "does not exist" in message
    assert not (tmp_path / "a").exists()
    out = tmp_path / "b"
    main(base_args(out, "rte", *SAVE, glue=rte))
    foreign = tmp_path / "foreign"
    shutil.copytree(out / "checkpoint-4", foreign)
    (foreign / RUN_SETTINGS_FILE).unlink()
    message = user_error(base_args(tmp_path / "c", "rte", *SAVE, "--resume_from_checkpoint", str(foreign), glue=rte))
    assert f"has no {RUN_SETTINGS_FILE}" in message and "not written by run_glue_iw.py" in message
    assert not (tmp_path / "c").exists()
    assert json.loads((out / "checkpoint-4" / RUN_SETTINGS_FILE).read_text())["task_name"] == "rte"
