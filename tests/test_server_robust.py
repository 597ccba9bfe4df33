"""dermpipe serve under bad clients: a malformed multipart body, a client that disconnects mid-upload, a part in
another field than ``files``, and a bundle whose ONNX file passes its checksum but is no ONNX model."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import logging

import pytest
from conftest import write_untrained_bundle
from fastapi.testclient import TestClient

from dermpipe.bundle.store import CHECKSUMS, open_bundle
from dermpipe.pipeline.demo import write_photo_folder
from dermpipe.predict import cli as predict_script
from dermpipe.serve import main as serve_main
from dermpipe.serve.app import Limits, create_app

BOUNDARY = "b0undary"
MULTIPART = f"multipart/form-data; boundary={BOUNDARY}"


class Untouched:
    """A service no request below may reach: every refusal happens while the body is read, before any photo is
    predicted."""

    model_id, classes, card = "m@sha256:0", ["mel", "nv"], {}

    def submit(self, job):
        raise AssertionError("a refused request reached the models")


@pytest.fixture
def app(tmp_path):
    (tmp_path / "uploads").mkdir()
    return create_app(Untouched(), Limits(upload_dir=str(tmp_path / "uploads")))


def _records(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno >= logging.WARNING]


def _part(field: str, filename: str, data: bytes) -> bytes:
    head = f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{field}"; filename="{filename}"\r\n\r\n'
    return head.encode() + data + b"\r\n"


def test_a_malformed_multipart_body_is_a_400_with_one_log_line(app, tmp_path, caplog):
    client = TestClient(app, raise_server_exceptions=False)
    bodies = [
        b"not a multipart body at all",  # no boundary where the first one should be
        f"--{BOUNDARY}\r\nContent Disposition; form-data\r\n\r\nx\r\n--{BOUNDARY}--\r\n".encode(),  # a broken header
    ]
    for body in bodies:
        caplog.clear()
        with caplog.at_level(logging.INFO):
            answer = client.post("/v1/predict", content=body, headers={"content-type": MULTIPART})
        assert answer.status_code == 400, answer.text
        assert "multipart" in answer.json()["detail"]
        (record,) = _records(caplog)  # one line: no parser warning besides it, no traceback
        assert record.exc_info is None and "400" in record.getMessage()
    assert list((tmp_path / "uploads").iterdir()) == []  # the request's folder removed


def test_a_part_in_another_field_is_refused_naming_the_field(app, caplog):
    client = TestClient(app, raise_server_exceptions=False)
    answer = client.post("/v1/predict", files=[("file", ("a.jpg", b"\xff\xd8\xff\xe0", "image/jpeg"))])
    assert answer.status_code == 422
    assert "unexpected multipart field 'file'" in answer.json()["detail"] and "'files'" in answer.json()["detail"]
    after_a_photo = client.post("/v1/predict", files=[("files", ("a.jpg", b"\xff\xd8\xff", "image/jpeg")),
                                                      ("photo", ("b.jpg", b"\xff\xd8\xff", "image/jpeg"))])  # fmt: skip
    assert after_a_photo.status_code == 422 and "'photo'" in after_a_photo.json()["detail"]
    note = client.post("/v1/predict", data={"note": "hello"}, files=[("files", ("a.jpg", b"x", "image/jpeg"))])
    assert note.status_code == 422 and "'note'" in note.json()["detail"]


def test_a_client_that_disconnects_mid_upload_is_one_log_line(app, tmp_path, caplog):
    """The ASGI server tells the app the client is gone (``http.disconnect``) halfway through the body."""
    messages = [
        {
            "type": "http.request",
            "body": _part("files", "a.jpg", b"\xff\xd8\xff" + b"\0" * 1000)[:-200],
            "more_body": True,
        },  # fmt: skip
        {"type": "http.disconnect"},
    ]

    async def receive():
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    sent = []

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/predict", "raw_path": b"/v1/predict", "root_path": "", "query_string": b"",
             "headers": [(b"content-type", MULTIPART.encode())], "server": ("127.0.0.1", 8000),
             "client": ("127.0.0.1", 5000)}  # fmt: skip
    with caplog.at_level(logging.INFO):
        asyncio.run(app(scope, receive, send))  # before: ClientDisconnect raised out of the app, a 500 and a traceback
    (record,) = _records(caplog)
    assert record.exc_info is None and "disconnected" in record.getMessage()
    assert sent[0]["status"] != 500
    assert list((tmp_path / "uploads").iterdir()) == []


def _run(main, argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def test_a_bundle_file_that_claims_to_be_onnx_but_is_not_is_refused_in_one_line(tmp_path):
    bundle = write_untrained_bundle(tmp_path, ["test_resnet"], ["mel", "nv"])
    garbage = b"this is not an ONNX model\n" * 40
    networks = ["segmentation/best.onnx", "classification/test_resnet/best.onnx", "ensemble/meta.onnx"]
    sums = (bundle / CHECKSUMS).read_text()
    for rel in networks:  # the checksums updated too: only the content can tell
        (bundle / rel).write_bytes(garbage)
        sums += f"{hashlib.sha256(garbage).hexdigest()}  {rel}\n"
    (bundle / CHECKSUMS).write_text(sums)
    open_bundle(bundle)  # it passes the checksum
    photos = tmp_path / "photos"
    write_photo_folder(photos, 1, 64, seed=0)
    predict = ["--model", str(bundle), "--input", str(photos), "--out", str(tmp_path / "out"), "--device", "cpu",
               "--engine", "onnxruntime", "--set", f"run.cache_dir={tmp_path / 'cache'}"]  # fmt: skip
    serve = ["--model", str(bundle), "--device", "cpu", "--port", "0", "--engine", "onnxruntime",
             "--root", str(tmp_path / "root")]  # fmt: skip
    for main, argv in ((predict_script.main, predict), (serve_main.main, serve)):
        code, _, err = _run(main, argv)
        assert code == 2 and err.count("\n") == 1 and err.startswith("error: "), err
        assert "is not a valid ONNX model" in err and "dermpipe export --model BUNDLE --format onnx" in err
        assert any(str(bundle / rel) in err for rel in networks)
