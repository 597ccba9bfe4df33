"""The Python API: a trained pipeline loaded once and called on photos, as the command line does.

::

    import dermpipe
    model = dermpipe.load("ham-v1")                  # a bundle folder or archive, or a trained run root
    rows = model.predict(["a.jpg", "b.png"])         # paths, RGB uint8 arrays or PIL images; batched; cached
    rows[0].predicted, rows[0].probabilities, rows[0].refer, rows[0].refer_reason, rows[0].box, rows[0].quality
    model.predict_folder("photos/", out="pred/")     # what `dermpipe predict --input photos/ --out pred/` writes

``dermpipe predict`` and ``dermpipe serve`` open their model through ``Model.from_config``; the records are the same
``Prediction`` rows they write and answer with.
"""

from __future__ import annotations

import os
import shutil
import tarfile
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import numpy as np

from dermpipe.bundle.store import CHECKSUMS, Bundle, BundleError, open_bundle
from dermpipe.configs.loader import load_config
from dermpipe.configs.schema import ROOT_LAYOUT
from dermpipe.data.listing import NothingReadableError, read_inputs
from dermpipe.data.manifest import Manifest
from dermpipe.data.reading import write_image
from dermpipe.engine.cache import user_cache_dir
from dermpipe.engine.cli import MissingInputError
from dermpipe.engine.confine import confine_output
from dermpipe.engine.files import check_output_file, check_output_folder, file_digest
from dermpipe.engine.run import check_run_folder, choose_device
from dermpipe.errors import DermpipeError
from dermpipe.predict.batch import predict_folder
from dermpipe.predict.config import PredictConfig
from dermpipe.predict.predictor import EnsemblePredictor
from dermpipe.predict.rows import Prediction
from dermpipe.predict.tally import BatchSummary
from dermpipe.segmentation.lesion import LesionBox
from dermpipe.segmentation.prediction import CropResult, SkipLog, Skipped

if TYPE_CHECKING:
    import pandas
    from PIL.Image import Image

#: What ``Model.predict`` takes per image: a path, an RGB (or RGBA, or grey) uint8 array, or a PIL image.
ImageInput = Union[str, os.PathLike, np.ndarray, "Image"]

__all__ = ["Explanation", "Model", "Prediction", "Segmentation", "Skipped", "load", "to_frame"]


class UnreadableImageError(DermpipeError):
    """``Model.predict`` was given an image it cannot read (``skip_unreadable=True`` returns a ``Skipped`` instead)."""


@dataclass(frozen=True)
class Segmentation:
    """One photo's lesion as the U-Net sees it: what batch prediction crops and classifies."""

    image_id: str
    mask: np.ndarray  # H x W uint8 (0/1) at the photo's size: the largest lesion region, holes filled
    probability: np.ndarray  # the U-Net's lesion probability x 255 (uint8) at its own input size
    box: LesionBox  # in the photo's pixels; ``box.fallback`` says why it is the whole image, if so
    crop: np.ndarray  # the square crop the classifiers see (uint8 RGB)
    quality: tuple[str, ...]  # why the models may not judge this photo well; empty: fine


@dataclass(frozen=True)
class Explanation:
    """Grad-CAM of the vote's predicted class on one classifier, over the lesion crop."""

    prediction: Prediction
    overlay: np.ndarray  # crop-size uint8 RGB: the class map over the crop
    crop: np.ndarray
    backbone: str  # the classifier whose gradients made the map
    target: str  # the class explained (the vote's prediction)


def _image_ids(images: Sequence[ImageInput]) -> list[str]:
    """A path's stem (its path as given where two stems agree); ``image-<i>`` for arrays and PIL images."""
    stems = [Path(x).stem if isinstance(x, (str, os.PathLike)) else None for x in images]
    counts: dict[str, int] = {}
    for s in stems:
        if s is not None:
            counts[s] = counts.get(s, 0) + 1
    return [f"image-{i}" if s is None else (s if counts[s] == 1 else os.fspath(images[i])) for i, s in enumerate(stems)]


def _pixels(image: Any, index: int) -> np.ndarray:
    """An RGB uint8 array from an array or a PIL image, or a one-line error naming which input and the fix."""
    if hasattr(image, "convert") and hasattr(image, "size"):  # a PIL image
        return np.asarray(image.convert("RGB"))
    if not isinstance(image, np.ndarray):
        raise TypeError(f"image {index}: a path, a numpy array or a PIL image, not {type(image).__name__}")
    if image.dtype != np.uint8:
        raise DermpipeError(f"image {index}: an array of dtype {image.dtype}; give uint8 RGB (0-255), "
                            "e.g. (array * 255).astype(np.uint8) for floats in [0, 1]")  # fmt: skip
    if image.ndim == 2:
        return np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] not in (3, 4):
        raise DermpipeError(f"image {index}: an array of shape {image.shape}; give H x W x 3 RGB (or H x W grey)")
    return image[:, :, :3]


@contextmanager
def _as_files(images: Sequence[ImageInput]) -> Iterator[list[tuple[str, str]]]:
    """``(image_id, path)`` per image: paths as given, arrays and PIL images written losslessly (PNG) into a
    temporary folder for the length of the block, so the stage cache keys them by their pixels as it does files."""
    ids = _image_ids(images)
    with tempfile.TemporaryDirectory(prefix="dermpipe-") as tmp:
        items = []
        for i, (image, image_id) in enumerate(zip(images, ids)):
            if isinstance(image, (str, os.PathLike)):
                items.append((image_id, os.fspath(image)))
                continue
            path = Path(tmp) / f"{i}.png"
            write_image(path, _pixels(image, i))
            items.append((image_id, str(path)))
        yield items


class Model:
    """A trained pipeline (the U-Net, the classifiers, the vote) loaded once; ``dermpipe.load`` makes one."""

    def __init__(self, predictor: EnsemblePredictor, model_id: str, bundle: Bundle | None = None) -> None:
        self.predictor = predictor
        self.model_id = model_id  # what every row's ``model`` column says
        self.bundle = bundle
        self.classes: list[str] = list(predictor.classes)
        self.backbones: list[str] = list(predictor.backbones)
        self.refer_threshold: float = predictor.refer_threshold

    @classmethod
    def from_config(cls, cfg: PredictConfig, bundle: Bundle | None = None, device: str | None = None) -> Model:
        """The model of a resolved prediction config (the command line's path in), every trained stage checked
        first; a row names the bundle, or the run folder and the digest of each stage model that made it."""
        check_trained_stages(cfg)
        predictor = EnsemblePredictor(cfg, choose_device(device or cfg.run.device))
        model_id = bundle.identity if bundle is not None else f"{Path(cfg.ensemble_run)} [{predictor.stage_digests}]"
        return cls(predictor, model_id, bundle)

    def __repr__(self) -> str:
        return f"Model({self.model_id!r}, classes={self.classes}, backbones={self.backbones})"

    def _stream(self, items: Sequence[tuple[str, str]]) -> tuple[dict[str, tuple[CropResult, np.ndarray]], SkipLog]:
        skipped = SkipLog()
        results = {crop.image_id: (crop, probs) for crop, probs in self.predictor.predict(items, skipped)}
        return results, skipped

    def predict(
        self, images: ImageInput | Iterable[ImageInput], *, skip_unreadable: bool = False
    ) -> list[Prediction | Skipped]:
        """One ``Prediction`` per image, in order, from batched forward passes through the stage cache (a photo
        predicted before is read back, not recomputed). An image that cannot be read raises
        ``UnreadableImageError`` naming it, or with ``skip_unreadable`` takes its place as a ``Skipped`` record."""
        batch = [images] if _is_one_image(images) else list(images)  # type: ignore[list-item]
        with _as_files(batch) as items:
            results, skipped = self._stream(items)
        reasons = {row["image_id"]: row["reason"] for row in skipped.rows}
        if reasons and not skip_unreadable:
            image_id, reason = next(iter(reasons.items()))
            path = dict(items)[image_id]
            more = f" (and {len(reasons) - 1} more)" if len(reasons) > 1 else ""
            raise UnreadableImageError(f"{path}: {reason}{more}; pass skip_unreadable=True to skip such images")
        out: list[Prediction | Skipped] = []
        for (image_id, _), given in zip(items, batch):
            shown = os.fspath(given) if isinstance(given, (str, os.PathLike)) else ""
            if image_id in reasons:
                out.append(Skipped(image_id, shown, reasons[image_id]))
                continue
            crop, probs = results[image_id]
            out.append(Prediction.of(replace(crop, path=shown), probs, self.classes, self.refer_threshold,
                                     self.model_id))  # fmt: skip
        return out

    def predict_folder(
        self,
        folder: str | os.PathLike,
        out: str | os.PathLike,
        *,
        output: str | os.PathLike | None = None,
        follow_links: bool = False,
    ) -> BatchSummary:
        """What ``dermpipe predict --input FOLDER --out OUT`` writes (``OUT/predictions.csv`` or ``output``,
        ``skipped.csv``, the report and the outputs the config asks for), checked as the command checks it."""
        out_dir, table = check_outputs(out, output, folder, flags=("out", "output"))
        listing = read_inputs(None, folder, follow_links, outputs=[out_dir, table])
        summary = self.predict_manifest(listing.manifest, out_dir, output=table, excluded=listing.excluded)
        if not summary.images:
            raise NothingReadableError(folder, summary.skipped, out_dir)
        return summary

    def predict_manifest(
        self,
        manifest: Manifest,
        out: str | os.PathLike,
        *,
        output: str | os.PathLike | None = None,
        excluded: Sequence[Mapping[str, str]] = (),
    ) -> BatchSummary:
        """A manifest's images (scored against its labels and masks where it gives them) into ``out``."""
        table = Path(output) if output is not None else Path(out) / "predictions.csv"
        return predict_folder(manifest, self.predictor, table, out, excluded, model_id=self.model_id)

    def _one(self, image: ImageInput) -> tuple[CropResult, np.ndarray]:
        with _as_files([image]) as items:
            results, skipped = self._stream(items)
        if skipped.rows:
            raise UnreadableImageError(f"{items[0][1]}: {skipped.rows[0]['reason']}")
        return results[items[0][0]]

    def segment(self, image: ImageInput) -> Segmentation:
        """The U-Net's lesion in one photo: the full-size mask, the box and the crop the classifiers see."""
        with _as_files([image]) as items:
            results = list(self.predictor.segmenter.crop(items))
        (result,) = results
        if isinstance(result, Skipped):
            raise UnreadableImageError(f"{items[0][1]}: {result.reason}")
        threshold = self.predictor.segmenter.predict_cfg.threshold
        return Segmentation(result.image_id, result.full_mask(threshold), result.probability, result.box,
                            result.crop, tuple(result.quality))  # fmt: skip

    def explain(self, image: ImageInput, backbone: str | None = None) -> Explanation:
        """Grad-CAM of the vote's predicted class on ``backbone`` (default: the first classifier, as the report's)."""
        from dermpipe.classification.gradcam import gradcam_overlays

        names = [c.name for c in self.predictor.classifiers]
        if backbone is not None and backbone not in names:
            raise DermpipeError(f"backbone {backbone!r} is not in this model: choose one of {', '.join(names)}")
        classifier = self.predictor.classifiers[names.index(backbone) if backbone else 0]
        crop, probs = self._one(image)
        top = int(np.argmax(probs))
        overlay = gradcam_overlays(classifier.model, [crop.crop], [top], classifier.predictor.preprocess_cfg)[0]
        shown = os.fspath(image) if isinstance(image, (str, os.PathLike)) else ""
        prediction = Prediction.of(replace(crop, path=shown), probs, self.classes, self.refer_threshold,
                                   self.model_id)  # fmt: skip
        return Explanation(prediction, overlay, crop.crop, classifier.name, self.classes[top])


def _is_one_image(images: Any) -> bool:
    return isinstance(images, (str, os.PathLike, np.ndarray)) or (
        hasattr(images, "convert") and hasattr(images, "size")
    )


def check_outputs(
    out: str | os.PathLike,
    output: str | os.PathLike | None,
    folder: str | os.PathLike | None,
    flags: tuple[str, str] = ("--out", "--output"),
) -> tuple[Path, Path]:
    """The output folder and predictions table of a batch prediction, checked before anything is read or written:
    neither is the input folder nor inside it, a bundle or a finished run; ``flags`` name them in the error."""
    inputs = [folder] if folder else []
    out_dir = check_output_folder(out, flags[0], inputs)
    table = check_output_file(output if output else out_dir / "predictions.csv", flags[1])
    if folder and Path(folder).resolve() in table.resolve().parents:
        check_output_folder(table.parent, flags[1], inputs)
    confine_output(out_dir, flags[0])  # never inside a bundle or a finished run (symlinks followed)
    confine_output(table, flags[1], is_file=True)
    return out_dir, table


def check_trained_stages(cfg: PredictConfig) -> None:
    """Each trained stage prediction needs is there and of its stage, or one line naming the command that makes it
    and the flag."""
    check_run_folder(Path(cfg.segmentation_run), "segmentation")
    check_run_folder(Path(cfg.ensemble_run), "ensemble")
    root = cfg.run.root
    needed = [
        (Path(cfg.segmentation_run) / "best.safetensors", "the U-Net",
         f"python segmentation/train.py --manifest FILE --root {root}", "--segmentation-run"),
        (Path(cfg.ensemble_run) / "meta.safetensors", "the vote",
         f"python ensemble/vote.py --root {root}", "--ensemble-run"),
    ]  # fmt: skip
    for path, what, command, flag in needed:
        if not path.is_file():
            raise MissingInputError(
                f"{what} is not trained: {path} not found; make it with `{command}`, or pass {flag} FOLDER "
                "(or --root, or --model BUNDLE)"
            )


def _unpacked(archive: Path) -> Path:
    """A bundle archive (``dermpipe bundle --archive``) unpacked once into the user's cache, keyed by its sha256;
    the folder inside is what ``open_bundle`` then verifies file by file."""
    digest = file_digest(archive)  # read in chunks: an archive can be large
    dest = user_cache_dir() / "bundles" / digest[:16]
    if not dest.is_dir():
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".unpacking-", dir=dest.parent))
        try:
            with tarfile.open(archive, "r:gz") as tar:
                tar.extractall(tmp, filter="data")  # no links out, no absolute paths, no devices
            os.replace(tmp, dest)
        except (tarfile.TarError, OSError) as error:
            shutil.rmtree(tmp, ignore_errors=True)
            if not dest.is_dir():  # not another process that unpacked the same archive first
                raise BundleError(
                    f"{archive} cannot be unpacked ({error}): make it again with `dermpipe bundle`"
                ) from None
    folders = [p for p in dest.iterdir() if p.is_dir()]
    if len(folders) != 1:
        raise BundleError(
            f"{archive} holds {len(folders)} folders, not one bundle: make it again with `dermpipe bundle`"
        )
    return folders[0]


def load(
    source: str | os.PathLike,
    *,
    engine: str = "pytorch",
    device: str = "auto",
    tta: bool | None = None,
    batch_size: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    settings: Sequence[str] = (),
) -> Model:
    """A trained pipeline from a bundle folder (verified against its SHA256SUMS, as ``dermpipe predict --model``
    verifies it), a bundle archive (unpacked once into the user's cache, then verified), or a trained run root.

    ``engine``: ``pytorch``, ``onnxruntime`` (the bundle's ONNX export) or ``onnxruntime-int8`` (its int8 networks,
    ``dermpipe export --quantize int8``); ``cache_dir``: the stage cache (default:
    the user's cache folder for a bundle, ``ROOT/cache`` for a run root); ``settings``: more ``PredictConfig``
    values as ``--set`` takes them (``"refer=false"``)."""
    path = Path(source)
    flags: dict[str, Any] = {"engine": engine, "run.device": device, "tta": tta, "batch_size": batch_size}
    bundle = None
    if path.is_file() and path.name.endswith((".tar.gz", ".tgz")):
        path = _unpacked(path)
    if path.is_dir() and (path / ROOT_LAYOUT["ensemble"]).is_dir() and not (path / CHECKSUMS).is_file():
        flags["run.root"] = str(path)
    else:
        bundle = open_bundle(path)
        flags.update(bundle.stage_paths())
        flags["run.cache_dir"] = str(user_cache_dir())
    if cache_dir is not None:
        flags["run.cache_dir"] = os.fspath(cache_dir)
    cfg = load_config(PredictConfig, None, settings, flags)
    return Model.from_config(cfg, bundle)


def to_frame(rows: Iterable[Prediction | Skipped]) -> pandas.DataFrame:
    """The records as a pandas table: the columns of predictions.csv with numbers as numbers (``pip install
    pandas``); skipped images keep their row with the reason."""
    try:
        import pandas
    except ImportError:
        raise DermpipeError("to_frame needs pandas: pip install pandas") from None
    table = []
    for row in rows:
        if isinstance(row, Skipped):
            table.append({"image_id": row.image_id, "path": row.path, "skipped": row.reason})
            continue
        record = row.as_json()
        record["box"] = tuple(record["box"])
        record["quality"] = "; ".join(record["quality"])
        table.append(record)
    return pandas.DataFrame(table)
