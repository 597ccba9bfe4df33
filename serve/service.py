"""The served model: one ``Model`` (what ``dermpipe.load`` gives, loaded once at start-up, with batch prediction's
cache) behind a queue that gathers the photos of concurrent requests into batches for the networks.

One worker thread owns the networks: every forward pass, Grad-CAM and picture of the page runs there, so requests
never share a model concurrently. Requests wait on a future; when more than ``max_pending`` photos wait, a request is
refused with 503 rather than letting memory grow.
"""

from __future__ import annotations

import base64
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from dermpipe.predict.api import Model
from dermpipe.predict.report import ReportRow
from dermpipe.predict.rows import Prediction, prediction_columns, report_row_of
from dermpipe.segmentation.prediction import CropResult, SkipLog
from dermpipe.serve.uploads import Upload, UploadError, upload_reason

logger = logging.getLogger(__name__)


@dataclass
class Job:
    """One request's accepted photos, its folder (the page's pictures go there too) and where its answer goes."""

    uploads: list[Upload]
    folder: Path
    page: bool = False
    future: Future = field(default_factory=Future)


@dataclass
class Answer:
    """What one request gets back: predictions.csv rows (as text), their typed API form, the page's rows, the photos
    the pipeline could not read."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    predictions: list[dict[str, Any]] = field(default_factory=list)
    report_rows: list[ReportRow] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)


class Batcher:
    """A queue of jobs and the one thread that runs them: it takes the first waiting job, then whatever else arrives
    within ``wait_s`` up to ``max_images`` photos, and hands the batch to ``run``."""

    def __init__(self, run: Callable[[list[Job]], None], max_images: int, wait_s: float, max_pending: int) -> None:
        self._run, self.max_images, self.wait_s, self.max_pending = run, max(1, max_images), wait_s, max_pending
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._lock = threading.Lock()
        self.pending = 0  # photos submitted and not yet answered
        self.batches = 0
        self._thread = threading.Thread(target=self._loop, name="dermpipe-batcher", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> Future:
        with self._lock:
            if self.pending + len(job.uploads) > self.max_pending:
                raise UploadError(503, f"the server is busy: {self.pending} photos are waiting; retry in a moment "
                                       f"(the server's --max-queue is {self.max_pending})")  # fmt: skip
            self.pending += len(job.uploads)
        self._queue.put(job)
        return job.future

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()

    def _loop(self) -> None:
        while (job := self._queue.get()) is not None:
            batch, photos = [job], len(job.uploads)
            deadline = time.monotonic() + self.wait_s
            while photos < self.max_images:
                try:
                    more = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if more is None:
                    self._queue.put(None)  # stop after this batch
                    break
                batch.append(more)
                photos += len(more.uploads)
            try:
                self._run(batch)
            except Exception as error:  # a real bug: every request of the batch gets it (500), the server goes on
                logger.exception("a batch of %d photos failed", photos)
                for j in batch:
                    if not j.future.done():
                        j.future.set_exception(error)
            finally:
                self.batches += 1
                with self._lock:
                    self.pending -= photos


def inline_jpeg(name: str, jpeg: bytes) -> str:
    """A picture of the served page, as a ``data:`` URI (nothing written to disk)."""
    return f"data:image/jpeg;base64,{base64.b64encode(jpeg).decode('ascii')}"


class Service:
    """The predictor behind the queue, and what the API says about the model."""

    def __init__(
        self,
        model: Model,
        card: dict[str, Any],
        *,
        gradcam: bool = True,
        max_batch_images: int = 32,
        wait_s: float = 0.01,
        max_pending: int = 256,
    ) -> None:
        self.model, self.card = model, card
        self.predictor, self.model_id = model.predictor, model.model_id
        self.classes = list(model.classes)
        self.columns = prediction_columns(self.classes)
        # Grad-CAM runs on the PyTorch network whichever engine predicts (ONNX Runtime has no gradients)
        self.gradcam_model = model.predictor.classifiers[0] if gradcam else None
        self.batcher = Batcher(self._run, max_batch_images, wait_s, max_pending)

    def submit(self, job: Job) -> Future:
        return self.batcher.submit(job)

    def close(self) -> None:
        self.batcher.close()

    def _run(self, jobs: list[Job]) -> None:
        """Predict every job's photos as one stream through the pipeline, then answer each job."""
        items = [(f"{j}/{k}", str(u.path)) for j, job in enumerate(jobs) for k, u in enumerate(job.uploads)]
        skipped = SkipLog()
        results: dict[str, tuple[CropResult, np.ndarray]] = {}
        for crop, probs in self.predictor.predict(items, skipped):
            results[crop.image_id] = (crop, probs)
        reasons = {row["image_id"]: row["reason"] for row in skipped.rows}
        for j, job in enumerate(jobs):
            try:
                job.future.set_result(self._answer(j, job, results, reasons))
            except Exception as error:  # e.g. the request went away and its folder with it: only this job fails
                job.future.set_exception(error)

    def _answer(
        self, j: int, job: Job, results: dict[str, tuple[CropResult, np.ndarray]], reasons: dict[str, str]
    ) -> Answer:
        answer = Answer()
        threshold = self.predictor.refer_threshold
        for k, upload in enumerate(job.uploads):
            key = f"{j}/{k}"
            if key not in results:
                reason = upload_reason(reasons.get(key, "not predicted"), upload)
                answer.skipped.append({"file": upload.name, "status": 422, "reason": reason})
                continue
            crop, probs = results[key]
            named = replace(crop, image_id=upload.image_id, path=upload.name)
            record = Prediction.of(named, probs, self.classes, threshold, self.model_id)
            answer.rows.append(record.csv_row())
            answer.predictions.append(record.as_json())
            if job.page:
                answer.report_rows.append(report_row_of(crop, record, inline_jpeg, self.gradcam_model))
        return answer
