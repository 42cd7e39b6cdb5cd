"""Trainer callbacks: IW calibration before optimizer step 0."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from typing import Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .importance import IMPORTANCE_FILE, importance_record, load_importance, save_importance
from .online import PARTIAL_FILE, OnlineSensitivity
from .sensitivity import LossFn, Sensitivities, compute_sensitivities, preserved_training_state
from .settings import IWSettings
from .targets import find_lora_targets

logger = logging.getLogger(__name__)


class SensitivityCallback(TrainerCallback):
    """Measure ``s_k`` on the first training batches before optimizer step 0 and derive ``w_k`` and ``(1−w_k)^β``.

    Works inside [`IWTrainer`] (installed by default) and in any plain ``Trainer(..., callbacks=[...])``
    pipeline: settings left as ``None`` are read from ``args`` (``IWTrainingArguments``) or take the defaults
    (150 steps, ``sum``, β=1). The result is in ``self.record`` (the content of ``iw_importance.json``),
    written to the run folder (``self.output_dir``, default ``None``: ``args.output_dir``; [`IWTrainer`] sets it to
    the trial's ``run-N`` folder during ``hyperparameter_search``) and to every checkpoint; a run resumed from a
    checkpoint reloads it instead of recalibrating.

    Calibration iterates the prepared training dataloader (so under data parallelism every rank measures its
    own shard and the ranks all-reduce), then restores all RNG states and the sampler position: training sees
    the same batches in the same order as without calibration.
    """

    def __init__(
        self,
        calib_steps: int | None = None,
        normalize: str | None = None,
        beta: float | None = None,
        adapter_name: str | None = None,
        loss_fn: LossFn | None = None,
        show_progress: bool = True,
    ):
        self.calib_steps = calib_steps
        self.normalize = normalize
        self.beta = beta
        self.adapter_name = adapter_name
        self.loss_fn = loss_fn
        self.show_progress = show_progress
        self.record: dict[str, Any] | None = None
        self.resume_dir: str | None = None
        self.output_dir: str | None = None  # the run folder; None: args.output_dir
        self.online: OnlineSensitivity | None = None  # iw_calibration="online" while the first N steps run
        self.iw: IWSettings | None = None  # an IWMixin trainer's iw=IWSettings(...): used instead of args' fields

    def run_dir(self, args: TrainingArguments) -> str:
        """The folder of this run: ``self.output_dir``, or ``args.output_dir`` when unset."""
        return self.output_dir if self.output_dir is not None else args.output_dir

    def settings(self, args: TrainingArguments) -> IWSettings:
        """``self.iw`` or ``args``' IW fields (``IWSettings`` defaults where ``args`` has none), with this callback's
        own values."""
        mine = {"beta": self.beta, "calib_steps": self.calib_steps, "normalize": self.normalize}
        if self.iw is not None:
            return self.iw.replace(**{k: v for k, v in mine.items() if v is not None})
        return IWSettings.from_args(args, **mine)

    @property
    def coefficients(self) -> dict[str, float]:
        if self.record is None:
            raise RuntimeError("SensitivityCallback: no importance yet (calibration runs at on_train_begin)")
        return {k: v["coefficient"] for k, v in self.record["modules"].items()}

    # -- events -------------------------------------------------------------------------------------------
    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: torch.nn.Module | None = None,
        train_dataloader: Any = None,
        **kwargs: Any,
    ) -> None:
        self.record = None
        self._stop_online()
        settings = self.settings(args)  # validated
        if not settings.active:
            return  # plain LoRA: nothing to measure
        if model is None or train_dataloader is None:
            raise RuntimeError("SensitivityCallback needs the Trainer's model and train_dataloader at on_train_begin")
        online = settings.calibrates and settings.calibration == "online"
        if online and args.fp16:
            raise ValueError(
                "iw_calibration='online' reads the training gradients, which fp16 scales by a changing loss scale; "
                "use bf16, or iw_calibration='separate'"
            )
        if state.global_step > 0:
            self._load_for_resume(args, state, model, online)
            return
        if online:  # measured by hooks during the first calib_steps training steps; the record follows at step N
            self.online = OnlineSensitivity(model, self.adapter_name, args.gradient_accumulation_steps)
            return
        start = time.perf_counter()
        if settings.normalize == "uniform":  # ΔL2: every coefficient is 1, nothing to measure
            sensitivities = dict.fromkeys((t.name for t in find_lora_targets(model, self.adapter_name)), None)
        else:
            sensitivities = self._measure(args, settings, model, train_dataloader)
        self._finish(args, state, settings, sensitivities, time.perf_counter() - start)

    @property
    def measuring(self) -> bool:
        """Whether online calibration is still running (the penalty waits for its record)."""
        return self.online is not None

    def _finish(
        self,
        args: TrainingArguments,
        state: TrainerState,
        settings: IWSettings,
        sensitivities: dict[str, float | None],
        seconds: float | None,
    ) -> None:
        """The importance record from measured sensitivities: kept, written to the run folder and logged."""
        recorded = settings.as_args()
        if self.iw is None and not hasattr(args, "iw_alpha"):  # a plain Trainer: alpha and penalty are the user's
            recorded.update(iw_alpha=None, iw_penalty=None)
        self.record = importance_record(sensitivities, settings.normalize, settings.beta, recorded)
        # Its cost, for users and benchmarks (sensitivities are floats read back from the device: already synced;
        # None online, where it is spread over the training steps), and what was measured: fewer batches than
        # iw_calib_steps when the data ran out, none for "uniform".
        self.record["calibration_seconds"] = seconds
        self.record["calibration_batches"] = getattr(sensitivities, "batches", 0)
        if state.is_world_process_zero:
            save_importance(self.record, self.run_dir(args))
        _log_summary(self.record)

    def _measure(
        self, args: TrainingArguments, settings: IWSettings, model: torch.nn.Module, train_dataloader: Any
    ) -> Sensitivities:
        autocast = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else None
        with preserved_training_state(train_dataloader):
            return compute_sensitivities(
                model,
                train_dataloader,
                num_steps=settings.calib_steps,
                gradient_accumulation_steps=args.gradient_accumulation_steps,
                loss_fn=self.loss_fn,
                adapter_name=self.adapter_name,
                autocast_dtype=autocast,
                show_progress=self.show_progress and not args.disable_tqdm,
                group=settings.calib_group,
            )

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        if self.online is None:
            return
        self.online.end_step()
        if self.online.steps >= self.settings(args).calib_steps:
            self._finish_online(args, state)

    def _finish_online(self, args: TrainingArguments, state: TrainerState) -> None:
        online, self.online = self.online, None
        online.remove()
        settings = self.settings(args)
        if online.steps < settings.calib_steps:
            logger.warning("iw_calib_steps=%d but training ran only %d steps", settings.calib_steps, online.steps)
        self._finish(args, state, settings, online.result(), None)

    def _stop_online(self) -> None:
        if self.online is not None:
            self.online.remove()
        self.online = None

    def on_train_end(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: torch.nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        """``iw_importance.png``: the weights and coefficients beside each matrix's final ``‖Δ_k‖_F``."""
        if self.online is not None and self.online.steps > 0:  # a run shorter than iw_calib_steps
            self._finish_online(args, state)
        self._stop_online()
        if self.record is None or model is None:
            return
        from .plot import PLOT_FILE, delta_norms_from_model, plot_panels

        norms = delta_norms_from_model(model)  # on every rank: under FSDP2 it gathers the factors (a collective)
        if not state.is_world_process_zero:
            return
        modules = self.record["modules"]
        panels = {
            "importance weight w_k": {n: m["weight"] for n, m in modules.items()},
            "coefficient (1-w_k)^beta": {n: m["coefficient"] for n, m in modules.items()},
            "final ||Delta_k||_F": norms,
        }
        plot_panels(panels, os.path.join(self.run_dir(args), PLOT_FILE), os.path.basename(self.run_dir(args)))

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if not state.is_world_process_zero:
            return
        folder = os.path.join(self.run_dir(args), f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if not os.path.isdir(folder):
            return
        if self.record is not None:
            save_importance(self.record, folder)
        elif self.online is not None:  # mid-calibration: the partial sums, so a resumed run measures on exactly
            torch.save(self.online.state_dict(), os.path.join(folder, PARTIAL_FILE))

    # -- resume -------------------------------------------------------------------------------------------
    def _load_for_resume(
        self, args: TrainingArguments, state: TrainerState, model: torch.nn.Module, online: bool = False
    ) -> None:
        candidates = [self.resume_dir]
        if isinstance(args.resume_from_checkpoint, str):
            candidates.append(args.resume_from_checkpoint)
        candidates.append(os.path.join(self.run_dir(args), f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"))
        for folder in candidates:
            partial = os.path.join(folder, PARTIAL_FILE) if folder else ""
            if online and os.path.isfile(partial) and not os.path.isfile(os.path.join(folder, IMPORTANCE_FILE)):
                self.online = OnlineSensitivity(model, self.adapter_name, args.gradient_accumulation_steps)
                self.online.load_state_dict(torch.load(partial, map_location="cpu", weights_only=True))
                logger.info("IW: continuing online calibration from %s (%d steps measured)", folder, self.online.steps)
                return
            if folder and os.path.isfile(os.path.join(folder, IMPORTANCE_FILE)):
                record = load_importance(folder)
                names = {t.name for t in find_lora_targets(model, self.adapter_name)}
                if set(record["modules"]) != names:
                    raise ValueError(
                        f"{os.path.join(folder, IMPORTANCE_FILE)}: its modules do not match the model's LoRA "
                        "targets; it was written for another model or target_modules"
                    )
                self.record = record
                logger.info("IW: reusing importance weights from %s (no recalibration)", folder)
                return
        raise FileNotFoundError(
            f"resuming at step {state.global_step} but no {IMPORTANCE_FILE}{' or ' + PARTIAL_FILE if online else ''} "
            "was found in "
            f"{[c for c in candidates if c]}; the importance weights must come from the original calibration"
        )


def _log_summary(record: Mapping[str, Any]) -> None:
    coefs = [m["coefficient"] for m in record["modules"].values()]
    logger.info(
        "IW calibration: %d matrices, coefficient (1-w)^beta min %.4f / max %.4f",
        len(coefs),
        min(coefs),
        max(coefs),
    )
