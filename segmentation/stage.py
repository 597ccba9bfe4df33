"""The segmentation stage as library calls: ``train(cfg) -> SegmentationRun``, ``crop(cfg, manifest, ...) -> Crops``.

``python segmentation/train.py`` parses its flags into a ``SegmentationConfig``, calls ``train`` and prints the
result; ``dermpipe run`` calls it with the config of the experiment file's ``segmentation`` section.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from dermpipe.data.listing import NothingReadableError
from dermpipe.data.manifest import Manifest, ManifestError
from dermpipe.engine.cli import MissingInputError
from dermpipe.engine.confine import confine_output
from dermpipe.engine.files import check_output_folder
from dermpipe.engine.lineage import file_sha256, write_lineage
from dermpipe.engine.run import choose_device, setup_logging, start_stage_run
from dermpipe.segmentation.config import SegmentationConfig
from dermpipe.segmentation.crops import write_crops
from dermpipe.segmentation.prediction import SegmentationPredictor
from dermpipe.segmentation.training import train_segmentation


@dataclass(frozen=True)
class SegmentationRun:
    """A trained (or reused) U-Net: its run folder and what validation chose."""

    run_dir: Path
    checkpoint: Path  # best.safetensors: the epoch of the best val Jaccard
    best_epoch: int
    best_val_jaccard: float
    epochs_run: int

    def line(self) -> str:
        return (f"segmentation: best val Jaccard {self.best_val_jaccard:.4f} at epoch {self.best_epoch} "
                f"({self.epochs_run} epochs run); checkpoint {self.checkpoint}")  # fmt: skip


def train(cfg: SegmentationConfig, *, resume: bool = False) -> SegmentationRun | None:
    """Train the U-Net of ``cfg`` into ``cfg.run.out_dir`` (a finished run with the same settings and data is
    reused; one of other settings is refused unless ``cfg.run.force``); ``resume`` continues an interrupted one.
    ``None`` on a process other than rank 0 under torchrun (rank 0 reports)."""
    if not cfg.data.manifest:
        raise ManifestError("no manifest: pass --manifest FILE.csv (make one with `python data/convert.py`)")
    Manifest.read(cfg.data.manifest)  # fail on a wrong path before a run folder is made
    run = start_stage_run(cfg, "segmentation")
    result = train_segmentation(cfg, run, resume=resume)
    if "rank" in result:
        return None
    return SegmentationRun(run.dir, Path(result["checkpoint"]), int(result["best_epoch"]),
                           float(result["best_val_jaccard"]), int(result["epochs_run"]))  # fmt: skip


@dataclass(frozen=True)
class Crops:
    """A cropped manifest: ``crops.csv`` (what the classifiers train on) and what cropping it did."""

    out: Path
    manifest: Path  # out/crops.csv
    cropped: int
    fallbacks: int  # whole-image crops: no lesion box found
    skipped: int
    reused: int  # cache entries read back
    computed: int
    corrupt: int  # cache entries that failed to verify, recomputed

    def line(self) -> str:
        corrupt = f", {self.corrupt} corrupt recomputed" if self.corrupt else ""
        return (f"segmentation/predict: {self.cropped} cropped ({self.fallbacks} whole-image fallbacks), "
                f"{self.skipped} skipped; cache: {self.reused} reused, {self.computed} computed{corrupt}; "
                f"wrote {self.out}")  # fmt: skip


def crop(
    cfg: SegmentationConfig,
    manifest: Manifest,
    out: str | os.PathLike,
    checkpoint: str | os.PathLike,
    *,
    excluded: Sequence[Mapping[str, str]] = (),
    source: str | os.PathLike = "",
    manifest_file: str | os.PathLike | None = None,
    strict: bool = True,
) -> Crops:
    """Masks, boxes and square crops of ``manifest``'s images by the U-Net in ``checkpoint``, into ``out`` (every
    stage output through the cache). ``strict``: ``cfg`` must agree with what the checkpoint was trained with;
    ``source`` names the input (manifest or folder) in the error when nothing could be read; ``manifest_file``, the
    manifest the rows came from, is recorded in the crops' lineage. ``out`` is refused, before any work, where it
    is a file, inside the input folder, or another stage's output (a crops folder is its own rerun)."""
    check_output_folder(out, "--out", [source] if source and Path(source).is_dir() else [])
    confine_output(out, "--out", own="crops")
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise MissingInputError(
            f"no trained U-Net at {checkpoint}: train one with `python segmentation/train.py --manifest FILE "
            f"--root {cfg.run.root}`, or pass --run FOLDER (a segmentation run) or --checkpoint FILE"
        )
    device = choose_device(cfg.run.device)
    predictor = SegmentationPredictor(checkpoint, cfg, device, force=cfg.run.force, strict=strict,
                                      workers=cfg.run.num_workers)  # fmt: skip
    setup_logging(Path(out))  # everything validated: from here on the output folder is written
    s = write_crops(manifest, predictor, out, cfg.predict.write_masks, cfg.predict.write_crops, excluded)
    if not s["cropped"]:
        raise NothingReadableError(source or out, s["skipped"], out)
    consumed = {"unet": file_sha256(checkpoint)}
    if manifest_file:
        consumed["manifest"] = file_sha256(manifest_file)
    write_lineage(Path(out), "crops", consumed, {"crops_manifest": file_sha256(Path(out) / "crops.csv")})
    return Crops(Path(out), Path(out) / "crops.csv", s["cropped"], s["fallback"], s["skipped"], s["reused"],
                 s["computed"], s["corrupt"])  # fmt: skip
