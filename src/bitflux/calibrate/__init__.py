"""Data-free calibration of ternary FLUX transformers: prompts only, the full-precision model as its own
teacher. Stages (any subset, in this order): closed-form output-error scales, block-wise
reconstruction, end-to-end velocity distillation, and distillation on fresh and on the student's own
(on-policy) trajectories. See docs/CALIBRATION.md."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from ..checkpoint import architecture_config, write_text_atomic
from ..config import TernaryConfig
from ..errors import BitfluxError
from ..flux import build_transformer
from .blockwise import BlockRecord, reconstruct
from .config import LEVELS, STAGES, CalibrationConfig
from .distill import distill, stage_name
from .memory import PeakMemory
from .prompts import read_prompts
from .sources import FolderSource, ModelSource
from .teacher import TeacherData, collect, onpolicy_records

__all__ = ["LEVELS", "STAGES", "CalibrationConfig", "CalibrationReport", "FolderSource", "ModelSource",
           "TeacherData", "calibrate", "calibrate_transformer", "check_workdir", "measured", "onpolicy_data",
           "read_prompts", "teacher_data"]

_MANIFEST = "manifest.json"
_TEACHER = "teacher.safetensors"


@dataclass
class CalibrationReport:
    stages: tuple[str, ...]
    records: int = 0  # teacher transformer calls used as training records
    seconds: dict[str, float] = field(default_factory=dict)  # teacher, blocks, distill, total
    peak_host_bytes: int = 0  # largest resident memory of the process during calibration
    start_host_bytes: int = 0  # resident memory when calibration started
    peak_device_bytes: int = 0  # CUDA allocator peak (0 on CPU)
    blocks: list[BlockRecord] = field(default_factory=list)
    distill_error: tuple[float, float] | None = None  # relative velocity error before, after
    onpolicy_records: int = 0  # fresh teacher records and the student's own, of all the onpolicy stage's rounds
    onpolicy_error: list[tuple[float, float]] = field(default_factory=list)  # velocity error before, after a round
    teacher_streamed: bool | None = None  # quantize_calibrated's teacher: transformer streamed a block at a time

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        lines = [f"calibration ({', '.join(self.stages)}) on {self.records} teacher records: "
                 f"{self.seconds.get('total', 0):.1f} s, peak memory {self.peak_host_bytes / 2**20:.0f} MiB host"
                 + (f", {self.peak_device_bytes / 2**20:.0f} MiB device" if self.peak_device_bytes else "")
                 + (", the teacher's transformer streamed a block at a time" if self.teacher_streamed else "")]
        resumed = [b.name for b in self.blocks if b.resumed]
        if resumed:
            lines.append(f"  {len(resumed)} of {len(self.blocks)} blocks taken from the workdir, calibrated by an "
                         f"earlier run ({resumed[0]}{' ...' if len(resumed) > 1 else ''})")
        for b in self.blocks:
            if b.loss_before is not None:
                lines.append(f"  {b.name}: block output error {b.loss_before:.4f} -> {b.loss_after:.4f}")
            elif b.scale_errors:
                before = sum(e[0] for e in b.scale_errors.values()) / len(b.scale_errors)
                after = sum(e[1] for e in b.scale_errors.values()) / len(b.scale_errors)
                lines.append(f"  {b.name}: mean layer output error {before:.4f} -> {after:.4f}")
        if self.distill_error:
            lines.append(f"  distill: velocity error {self.distill_error[0]:.4f} -> {self.distill_error[1]:.4f}")
        if self.onpolicy_error:
            rounds = f", {len(self.onpolicy_error)} rounds" if len(self.onpolicy_error) > 1 else ""
            lines.append(f"  onpolicy ({self.onpolicy_records} fresh and own records{rounds}): velocity error "
                         + ", ".join(f"{before:.4f} -> {after:.4f}" for before, after in self.onpolicy_error))
        return "\n".join(lines)


def check_workdir(workdir: Path, config: TernaryConfig, calib: CalibrationConfig, source,
                  prompts: list[str]) -> Path:
    """A workdir belongs to one run (settings, prompts, the source's weights): its manifest must match before
    anything in it is reused."""
    workdir = Path(workdir)
    # workdir 2: the saved blocks hold their codes in the config's format (1: always tq2)
    manifest = {"workdir": 2, "ternary": {k: v for k, v in config.to_dict().items() if k != "bitflux_version"},
                "calibration": calib.to_dict(), "model": architecture_config(source.config),
                "weights": source.fingerprint(),
                "prompts_sha256": hashlib.sha256(json.dumps(prompts).encode()).hexdigest()}  # not joined: a newline
    text = json.dumps(manifest, indent=2, sort_keys=True, default=list)
    try:
        workdir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BitfluxError(f"--workdir {workdir}: cannot be a folder ({exc.strerror or exc})") from None
    path = workdir / _MANIFEST
    if path.exists():
        try:
            saved = json.loads(path.read_text())
        except (ValueError, OSError) as exc:
            raise BitfluxError(f"{path}: unreadable ({exc}); use a new --workdir or empty it") from None
        if not isinstance(saved, dict):
            raise BitfluxError(f"{path}: not a JSON object; use a new --workdir or empty it")
        # settings added since the workdir was written (e.g. onpolicy_steps) take their defaults there
        saved["calibration"] = {**json.loads(json.dumps(CalibrationConfig().to_dict(), default=list)),
                                **saved.get("calibration", {})}
        # workdirs written before the weights were recorded, and with the config's private keys
        saved.setdefault("weights", manifest["weights"])
        # and before the prompts were hashed as a list: joined by newlines, where a prompt holding one and two
        # prompts hashed alike (such a workdir is still taken for either)
        if saved.get("prompts_sha256") == hashlib.sha256("\n".join(prompts).encode()).hexdigest():
            saved["prompts_sha256"] = manifest["prompts_sha256"]
        saved["model"] = json.loads(json.dumps(architecture_config(saved.get("model", {})), default=list))
        current = json.loads(text)
        held = _stages_held(saved["calibration"], current["calibration"])
        # a round of the onpolicy stage does not depend on how many follow it: a workdir takes more rounds or fewer
        saved["calibration"]["onpolicy_rounds"] = calib.onpolicy_rounds
        differences = _differences(saved, current)
        if differences:
            raise BitfluxError(f"{workdir} holds a calibration run of other {', '.join(differences)}; use a new "
                               "--workdir or empty it")
        text = json.dumps({**current, "calibration": held}, indent=2, sort_keys=True)
    write_text_atomic(path, text)  # a resumed run's too: the manifest says how many rounds the workdir now holds
    return workdir


# Settings one stage alone reads; the stages that run after the blocks are calibrated.
_STAGE_SETTINGS = {"blockwise": ("steps",), "distill": ("distill_steps",),
                   "onpolicy": ("onpolicy_steps", "onpolicy_rounds")}
_LATER_STAGES = ("distill", "onpolicy")


def _stages_held(saved: dict, current: dict) -> dict:
    """A run that goes on past another's last stage (distill after blockwise, onpolicy after distill), or stops
    before it, takes up that run's workdir, whatever the stages left out were set to: `saved` is made to compare
    equal on those, and what is returned is the workdir's calibration once the current run is done, the longer
    run's. Both runs must calibrate the blocks alike: the scales and blockwise stages write the same files.
    Settings of a stage that neither run has are not compared."""
    for stage, settings in _STAGE_SETTINGS.items():
        if stage not in saved["stages"] and stage not in current["stages"]:
            for setting in settings:
                saved[setting] = current[setting]
    if saved["stages"] == current["stages"]:
        return current
    shorter, longer = sorted((saved, current), key=lambda settings: len(settings["stages"]))
    extra = longer["stages"][len(shorter["stages"]):]
    if longer["stages"][:len(shorter["stages"])] != shorter["stages"] or not set(extra) <= set(_LATER_STAGES):
        return current  # not one run going on from the other: the stages differ
    held = dict(longer)
    for stage in extra:
        for setting in _STAGE_SETTINGS[stage]:
            saved[setting] = current[setting]
    saved["stages"] = current["stages"]
    return held


def _differences(saved: dict, current: dict) -> list[str]:
    """What differs between two manifests, as the error names it: settings by name, then the rest."""
    named = {"weights": "source weights (same architecture)", "prompts_sha256": "prompts", "model": "architecture",
             "workdir": "workdir layout (an earlier bitflux's)"}
    found = []
    for key, value in current.items():
        if saved.get(key) == value:
            continue
        if isinstance(value, dict) and isinstance(saved.get(key), dict):
            found += [f"{key} {name} ({saved[key].get(name)!r}, now {value[name]!r})"
                      for name in value if saved[key].get(name) != value[name]]
        else:
            found.append(named.get(key, key))
    return found


@contextlib.contextmanager
def measured(report: CalibrationReport, device):
    """Record total time and peak memory of the enclosed work into the report."""
    start = time.perf_counter()
    with PeakMemory(device) as peak:
        yield report
    report.seconds["total"] = time.perf_counter() - start
    report.peak_host_bytes, report.start_host_bytes = peak.host_bytes, peak.host_start_bytes
    report.peak_device_bytes = peak.device_bytes


def teacher_data(pipeline, prompts: list[str], calib: CalibrationConfig, workdir: Path | None = None,
                 progress: bool = True, report: CalibrationReport | None = None, encode=None) -> TeacherData:
    """The teacher's records, read from `workdir` when a previous run of the same settings saved them.
    `encode`: for a pipeline without text encoders (teacher.collect)."""
    start = time.perf_counter()
    teacher = _saved(workdir, _TEACHER, lambda: collect(pipeline, prompts, calib.samples, calib.seed,
                                                        calib.batch_size, progress, encode, **calib.pipeline_kwargs))
    if report is not None:
        report.seconds["teacher"] = time.perf_counter() - start
    return teacher


def _saved(workdir: Path | None, name: str, make) -> TeacherData:
    """Records `make()` returns, read from workdir/name instead when an earlier run saved them there."""
    path = Path(workdir) / name if workdir else None
    if path is not None and path.exists():
        return TeacherData.load(path)
    records = make()
    if path is not None:
        records.save(path)
    return records


def onpolicy_data(pipeline, student: nn.Module, prompts: list[str], calib: CalibrationConfig, progress: bool = True,
                  encode=None, round_index: int = 0) -> TeacherData:
    """The records of the onpolicy stage's round `round_index` (teacher.onpolicy_records) at the calibration's
    settings: `calib.samples` fresh teacher trajectories and as many of the student's own, on noise seeds after
    those of the first records and of the rounds before."""
    seed = calib.seed + calib.samples * (1 + 2 * round_index)
    return onpolicy_records(pipeline, student, prompts, calib.samples, seed, calib.batch_size, progress, encode,
                            **calib.pipeline_kwargs)


def full_model(source, device) -> nn.Module:
    """The whole full-precision transformer from a source (for distillation without block-wise stages)."""
    model = build_transformer(source.config, "meta")
    for name, _ in list(model.named_children()):
        setattr(model, name, source.load(name, device))
    return model.eval()


def calibrate_transformer(source, teacher: TeacherData, config: TernaryConfig, calib: CalibrationConfig,
                          device="cpu", workdir: Path | None = None, progress: bool = True,
                          report: CalibrationReport | None = None,
                          onpolicy=None) -> tuple[nn.Module, CalibrationReport]:
    """The ternary transformer calibrated on teacher records, full-precision weights read from `source`
    (ModelSource or FolderSource) one submodule at a time. `onpolicy(student, round_index) -> TeacherData`, for
    the onpolicy stage: the records of onpolicy_data for the student as the stages and rounds before left it."""
    if "onpolicy" in calib.stages and onpolicy is None:
        raise BitfluxError("the onpolicy stage samples with the student and the teacher: give `onpolicy` "
                           "(calibrate and quantize_calibrated do)")
    report = report or CalibrationReport(calib.stages)
    report.records = len(teacher)
    start = time.perf_counter()
    if {"scales", "blockwise"} & set(calib.stages):
        model, report.blocks = reconstruct(source, teacher, config, calib, device, workdir, progress)
    else:
        model = full_model(source, device)
    report.seconds["blocks"] = time.perf_counter() - start
    if "distill" in calib.stages:
        start = time.perf_counter()
        report.distill_error = distill(model, teacher, config, calib, device, progress, workdir)
        report.seconds["distill"] = time.perf_counter() - start
    if "onpolicy" in calib.stages:
        start = time.perf_counter()
        records = None
        for round_index in range(calib.onpolicy_rounds):
            new = _saved(workdir, f"{stage_name('onpolicy', round_index)}.safetensors",
                         functools.partial(onpolicy, model, round_index))
            records = new if records is None else records.joined(new)
            del new  # the joined copy holds them
            report.onpolicy_error.append(distill(model, records, config, calib, device, progress, workdir, "onpolicy",
                                                 round_index))
        report.onpolicy_records = len(records)
        report.seconds["onpolicy"] = time.perf_counter() - start
    return model, report


def calibrate(pipeline, prompts: list[str], config: TernaryConfig | None = None,
              calibration: CalibrationConfig | None = None, *, source: str | Path | None = None,
              workdir: str | Path | None = None, device=None, progress: bool = True) -> tuple[nn.Module, CalibrationReport]:
    """Quantize the pipeline's transformer to ternary, calibrated with the full-precision pipeline as teacher.

    prompts: calibration prompts (text only). source: a diffusers transformer folder with the same
    full-precision weights, read block by block; without it, blocks are copied one at a time from
    pipeline.transformer, which is left untouched. workdir: teacher records and finished blocks are
    saved there, and a repeated call with the same settings resumes where the last one stopped.
    Returns the ternary transformer (a FluxTransformer2DModel with TernaryLinear layers) and a report
    with per-stage objectives, time and peak memory.
    """
    from .quantize import teacher_settings

    config = config or TernaryConfig()
    calib = calibration or CalibrationConfig()
    # the teacher samples as `bitflux generate` would unless told (diffusers' own defaults: 1024 x 1024, 512 tokens)
    calib = replace(calib, pipeline_kwargs=teacher_settings(pipeline, **calib.pipeline_kwargs))
    device = torch.device(device or pipeline._execution_device)
    # the folder's blocks in the dtype the pipeline's teacher computes in (a bf16 folder beside an fp32 pipeline)
    source = (FolderSource(source, pipeline.transformer.dtype) if source is not None
              else ModelSource(pipeline.transformer))
    if workdir is not None:
        workdir = check_workdir(workdir, config, calib, source, prompts)
    with measured(CalibrationReport(calib.stages), device) as report:
        teacher = teacher_data(pipeline, prompts, calib, workdir, progress, report)
        model, report = calibrate_transformer(
            source, teacher, config, calib, device, workdir, progress, report,
            onpolicy=lambda student, round_index: onpolicy_data(pipeline, student, prompts, calib, progress,
                                                                round_index=round_index))
    return model, report
