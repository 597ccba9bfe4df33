"""The web app (FastAPI): the page at ``/``, ``POST /v1/predict``, ``GET /v1/model``, ``GET /healthz``; the OpenAPI
schema at ``/openapi.json`` and its browsable form at ``/docs``."""

from __future__ import annotations

import asyncio
import io
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.requests import ClientDisconnect

from dermpipe.engine import csvsafe
from dermpipe.predict.report import render_rows
from dermpipe.serve.page import page_html
from dermpipe.serve.service import Answer, Job, Service
from dermpipe.serve.uploads import FIELD, MultipartUploads, UploadError, check_upload
from dermpipe.version import __version__

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Limits:
    """What one request may send, and where its temporary folder goes (``None``: the system's temporary folder)."""

    max_file_bytes: int = 25 * 2**20
    max_files: int = 32
    upload_dir: str | None = None


_UPLOAD_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {FIELD: {"type": "array", "items": {"type": "string", "format": "binary"}}},
                    "required": [FIELD],
                }
            }
        },
    }
}


def csv_text(columns: list[str], rows: list[dict[str, Any]]) -> str:
    """The rows as predictions.csv writes them (formula-like text escaped)."""
    out = io.StringIO()
    writer = csvsafe.DictWriter(out, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def create_app(service: Service, limits: Limits) -> FastAPI:
    """The app over a started ``Service``."""
    app = FastAPI(
        title="dermpipe",
        version=__version__,
        description=f"Lesion segmentation, classification and the ensemble's vote over uploaded dermoscopy photos. "
        f"Model {service.model_id}. Research software, not a medical device.",
    )

    @app.exception_handler(UploadError)
    async def refused(request: Request, error: UploadError) -> JSONResponse:
        logger.warning("refused %s %s: %d %s", request.method, request.url.path, error.status, error)
        return JSONResponse({"detail": str(error)}, status_code=error.status)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> str:
        return page_html(service.model_id, service.classes, service.card, limits.max_file_bytes / 2**20)

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        """Alive, with the model it serves, the photos waiting for the networks and the batches run so far."""
        return {"status": "ok", "model": service.model_id, "waiting": service.batcher.pending,
                "batches": service.batcher.batches}  # fmt: skip

    @app.get("/v1/model")
    def model() -> dict[str, Any]:
        """The bundle's card: identity and sha256, classes, backbones, test metrics, calibration, library versions."""
        return service.card

    @app.post("/v1/predict", openapi_extra=_UPLOAD_BODY)
    async def predict(
        request: Request,
        format: Literal["json", "csv", "page"] = Query(
            "json", description="json: one object per photo; csv: predictions.csv; page: json with the page's rows"
        ),
    ) -> Response:
        """One or many photos (multipart field ``files``) -> per photo the fields of a predictions.csv row, with the
        box as ``[x0, y0, x1, y1]``, the quality warnings as a list and the refer flag's reason. A photo the pipeline
        cannot read is listed under ``skipped`` with the reason batch prediction gives; when none can be read, the
        request is refused (413 too large, 415 not an image it takes, 422 unreadable) with that reason."""
        folder = Path(tempfile.mkdtemp(prefix="dermpipe-request-", dir=limits.upload_dir))
        try:
            answer, refused = await _receive_and_predict(request, folder, service, limits, page=format == "page")
        except ClientDisconnect:  # nobody is left to answer: one line, no traceback
            logger.warning("%s %s: the client disconnected before its upload ended; nothing was predicted",
                           request.method, request.url.path)  # fmt: skip
            return Response(status_code=400)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        if format == "csv":
            return Response(csv_text(service.columns, answer.rows), media_type="text/csv")
        body: dict[str, Any] = {
            "model": service.model_id,
            "predictions": answer.predictions,
            "skipped": refused + answer.skipped,
        }
        if format == "page":
            body["html"] = render_rows(answer.report_rows, service.classes, False)
            body["csv"] = csv_text(service.columns, answer.rows)
        return JSONResponse(body)

    return app


async def _receive_and_predict(
    request: Request, folder: Path, service: Service, limits: Limits, page: bool
) -> tuple[Answer, list[dict[str, Any]]]:
    receiver = MultipartUploads(request.headers.get("content-type", ""), folder, limits.max_file_bytes,
                                limits.max_files)  # fmt: skip
    try:
        async for chunk in request.stream():
            receiver.write(chunk)
        uploads = receiver.close()
    finally:
        receiver.abort()
    if not uploads:
        raise UploadError(400, f"no photo in the request: send one or more files in the multipart field '{FIELD}'")
    refused: list[dict[str, Any]] = []
    accepted = []
    for upload in uploads:
        problem = check_upload(upload)
        if problem is None:
            accepted.append(upload)
        else:
            refused.append({"file": upload.name, "status": problem[0], "reason": problem[1]})
    if not accepted:
        raise UploadError(refused[0]["status"], refused[0]["reason"])
    answer = await asyncio.wrap_future(service.submit(Job(accepted, folder, page)))
    if not answer.predictions:  # the headers passed, the pixels did not
        first = answer.skipped[0]
        raise UploadError(first["status"], first["reason"])
    return answer, refused
