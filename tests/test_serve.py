"""dermpipe serve: the JSON API and the page over one loaded bundle, upload limits and abuse, batching, and a load test
against a real server on 127.0.0.1."""

from __future__ import annotations

import concurrent.futures
import csv
import io
import os
import re
import struct
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import served, write_untrained_bundle
from fastapi.testclient import TestClient

from dermpipe.data.generator import make_sample
from dermpipe.data.reading import write_image
from dermpipe.predict import cli as ensemble_predict
from dermpipe.serve.app import create_app
from dermpipe.serve.main import build_parser, open_service
from dermpipe.serve.service import Batcher, Job
from dermpipe.serve.uploads import Upload, UploadError, display_name

BACKBONES = ["test_resnet", "test_efficientnet"]
CLASSES = ["mel", "nv", "bkl"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    folder = tmp_path_factory.mktemp("serve")
    bundle = write_untrained_bundle(folder, BACKBONES, CLASSES)
    photos = folder / "photos"
    photos.mkdir()
    rng = np.random.default_rng(7)
    for i in range(6):
        image, _ = make_sample(rng, CLASSES[i % 3], 96)
        write_image(photos / f"photo_{i}.jpg", image)
    (folder / "uploads").mkdir()
    return folder, bundle, photos


def _service(world, *extra):
    folder, bundle, _ = world
    argv = ["--model", str(bundle), "--device", "cpu", "--root", str(folder / "root-serve"),
            "--upload-dir", str(folder / "uploads"), *extra]  # fmt: skip
    return open_service(build_parser().parse_args(argv))


@pytest.fixture(scope="module")
def client(world):
    service, limits = _service(world, "--max-upload-mb", "1")
    with TestClient(create_app(service, limits)) as c:
        yield c
    service.close()


def _files(*paths, names=None):
    names = names or [p.name for p in paths]
    return [("files", (name, p.read_bytes(), "application/octet-stream")) for name, p in zip(names, paths)]


def _uploads_left(world):
    return sorted((world[0] / "uploads").rglob("*"))


def _bomb_png(width=40000, height=40000):
    """A valid PNG header declaring 1.6 gigapixels, in a few dozen bytes."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_api_answers_what_batch_prediction_writes(world, client, tmp_path):
    folder, bundle, photos = world
    out = tmp_path / "batch"
    assert ensemble_predict.main(["--model", str(bundle), "--input", str(photos), "--out", str(out), "--device", "cpu",
                                  "--root", str(folder / "root-serve")]) == 0  # fmt: skip
    with open(out / "predictions.csv", newline="") as f:
        batch = {row["image_id"]: row for row in csv.DictReader(f)}
    paths = sorted(photos.glob("*.jpg"))
    answer = client.post("/v1/predict?format=csv", files=_files(*paths))
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/csv")
    served = list(csv.DictReader(io.StringIO(answer.text)))
    assert [r["image_id"] for r in served] == [p.stem for p in paths]
    for row in served:  # the same columns and values; only the path is the upload's name, not a file on disk
        expected = batch[row["image_id"]]
        assert row["path"] == row["image_id"] + ".jpg"
        assert {k: v for k, v in row.items() if k != "path"} == {k: v for k, v in expected.items() if k != "path"}
    typed = client.post("/v1/predict", files=_files(paths[0])).json()
    (prediction,) = typed["predictions"]
    row = batch[paths[0].stem]
    assert prediction["model"] == row["model"] == typed["model"]
    # the API's numbers are the record's own (not parsed back from the CSV's six decimals)
    assert [prediction[c] for c in CLASSES] == pytest.approx([float(row[c]) for c in CLASSES], abs=5e-7)
    assert prediction["box"] == [int(v) for v in row["box"].split()]
    assert prediction["refer"] == bool(int(row["refer"])) and prediction["quality"] == []
    if prediction["refer"]:
        assert "below the refer threshold" in prediction["refer_reason"]
    assert _uploads_left(world) == []  # every request's folder is gone


def test_model_card_health_and_schema(client, world):
    card = client.get("/v1/model").json()
    assert card["classes"] == CLASSES and card["backbones"] == BACKBONES
    assert card["model"].startswith("bundle@sha256:") and card["sha256"].startswith(card["model"].split(":")[1])
    assert "versions" in card and "not a medical device" in card["model_card"].lower()
    assert client.get("/healthz").json()["status"] == "ok"
    schema = client.get("/openapi.json").json()
    body = schema["paths"]["/v1/predict"]["post"]["requestBody"]["content"]
    assert "files" in body["multipart/form-data"]["schema"]["properties"]
    page = client.get("/").text
    assert 'id="files"' in page and 'id="preds"' in page and card["model"] in page


def test_type_is_decided_by_content_not_name(client, world, tmp_path):
    _, _, photos = world
    jpeg = sorted(photos.glob("*.jpg"))[0]
    renamed = client.post("/v1/predict", files=_files(jpeg, names=["lesion.gif"]))
    assert renamed.status_code == 200 and renamed.json()["predictions"][0]["image_id"] == "lesion"
    gif = tmp_path / "x.gif"
    gif.write_bytes(b"GIF89a" + b"\0" * 200)
    refused = client.post("/v1/predict", files=_files(gif, names=["photo.jpg"]))
    assert refused.status_code == 415
    assert refused.json()["detail"].startswith("photo.jpg: ")


def test_a_bad_upload_gets_the_reason_batch_prediction_gives(world, client, tmp_path):
    folder, bundle, _ = world
    bad = tmp_path / "in" / "notes.jpg"
    bad.parent.mkdir()
    bad.write_text("this is not a photo")
    out = tmp_path / "out"
    assert ensemble_predict.main(["--model", str(bundle), "--input", str(bad.parent), "--out", str(out),
                                  "--device", "cpu", "--root", str(folder / "root-serve")]) == 2  # fmt: skip
    with open(out / "skipped.csv", newline="") as f:  # nothing readable: status 2, the reason in skipped.csv
        (skipped,) = list(csv.DictReader(f))
    answer = client.post("/v1/predict", files=_files(bad))
    assert answer.status_code == 415
    assert answer.json()["detail"] == skipped["reason"].replace(str(bad.resolve()), "notes.jpg")
    assert "\n" not in answer.json()["detail"]


def test_one_bad_photo_among_good_ones_is_listed_the_rest_predicted(world, client, tmp_path):
    _, _, photos = world
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    answer = client.post("/v1/predict", files=_files(sorted(photos.glob("*.jpg"))[1], bad))
    assert answer.status_code == 200
    body = answer.json()
    assert len(body["predictions"]) == 1
    (skipped,) = body["skipped"]
    assert skipped["file"] == "broken.png" and skipped["status"] == 422 and skipped["reason"].startswith("broken.png: ")


def test_oversized_file_is_refused_while_it_streams(client, world):
    big = b"\xff\xd8\xff" + os.urandom(2 * 2**20)  # over the fixture's 1 MB limit
    answer = client.post("/v1/predict", files=[("files", ("huge.jpg", big, "image/jpeg"))])
    assert answer.status_code == 413
    assert answer.json()["detail"] == (
        "huge.jpg: file is over the 1 MB limit on one upload (downscale or re-export it; the server's --max-upload-mb)"
    )
    assert _uploads_left(world) == []


def test_image_bomb_is_refused_from_its_header(client, world):
    answer = client.post("/v1/predict", files=[("files", ("bomb.png", _bomb_png(), "image/png"))])
    assert answer.status_code == 413
    detail = answer.json()["detail"]
    assert detail.startswith("bomb.png: image is ") and "decompression bomb" in detail


def test_path_like_names_never_leave_the_request_folder(client, world, tmp_path):
    _, _, photos = world
    jpeg = sorted(photos.glob("*.jpg"))[2]
    names = ["../../../../escaped.jpg", "/etc/cron.d/evil.jpg", "..\\..\\win.jpg", "\x1b[31mred.jpg"]
    before = set(Path("/").glob("*")) | set(tmp_path.parent.glob("*"))
    answer = client.post("/v1/predict", files=_files(*[jpeg] * len(names), names=names))
    assert answer.status_code == 200
    ids = [p["path"] for p in answer.json()["predictions"]]
    assert ids == ["escaped.jpg", "evil.jpg", "win.jpg", "[31mred.jpg"]
    assert set(Path("/").glob("*")) | set(tmp_path.parent.glob("*")) == before
    assert not list(Path("/").glob("escaped*")) and _uploads_left(world) == []
    assert display_name("...", 3) == "upload-4"


def test_requests_without_photos_or_multipart_are_refused(client):
    assert client.post("/v1/predict", content=b"{}", headers={"content-type": "application/json"}).status_code == 415
    empty = client.post("/v1/predict", files=[("files", (None, b"a value, no file", "text/plain"))])
    assert empty.status_code == 400 and "no photo in the request" in empty.json()["detail"]
    other = client.post("/v1/predict", data={"note": "no file"}, files=[("other", ("", b"", "text/plain"))])
    assert other.status_code == 422 and "unexpected multipart field 'note'" in other.json()["detail"]
    too_many = client.post("/v1/predict", files=[("files", (f"{i}.jpg", b"\xff\xd8\xff", "image/jpeg"))
                                                 for i in range(40)])  # fmt: skip
    assert too_many.status_code == 413 and "more than 32 files" in too_many.json()["detail"]
    fields = [("files", (None, os.urandom(2**19), "text/plain"))] * 80  # no file, but 40 MB of form values
    flooded = client.post("/v1/predict", files=fields)
    assert flooded.status_code == 413 and "the request is over 33 MB" in flooded.json()["detail"]


def test_onnxruntime_engine_serves_what_pytorch_serves(world, client, tmp_path):
    import shutil

    from dermpipe.predict import export

    _, bundle, photos = world
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    assert export.main(["--model", str(copy), "--format", "onnx"]) == 0
    service, limits = open_service(build_parser().parse_args(
        ["--model", str(copy), "--device", "cpu", "--root", str(tmp_path / "root"), "--engine", "onnxruntime"]
    ))  # fmt: skip
    paths = sorted(photos.glob("*.jpg"))
    with TestClient(create_app(service, limits)) as onnx_client:
        assert onnx_client.get("/v1/model").json()["engine"] == "onnxruntime"
        served = onnx_client.post("/v1/predict?format=page", files=_files(*paths)).json()
    service.close()
    reference = client.post("/v1/predict", files=_files(*paths)).json()["predictions"]
    assert served["model"] == reference[0]["model"]  # the same model: exporting does not change the identity
    for got, want in zip(served["predictions"], reference):
        assert got["image_id"] == want["image_id"] and got["box"] == want["box"]
        assert max(abs(got[c] - want[c]) for c in CLASSES) <= 1e-4
    assert served["html"].count('src="data:image/jpeg;base64,') == 3 * len(paths)  # Grad-CAM on PyTorch still


def test_page_rows_are_the_reports_rendering(client, world):
    _, _, photos = world
    jpeg = sorted(photos.glob("*.jpg"))[3]
    body = client.post("/v1/predict?format=page", files=_files(jpeg)).json()
    (prediction,) = body["predictions"]
    row = body["html"]
    assert row.startswith("<tr") and f'data-id="{jpeg.stem}"' in row
    for i, c in enumerate(CLASSES):
        assert f'data-p{i}="{prediction[c]:.6f}"' in row
    assert row.count('src="data:image/jpeg;base64,') == 3  # contour on the photo, the crop, the Grad-CAM
    assert "Grad-CAM of " + prediction["predicted"] in row
    assert body["csv"].splitlines()[0].startswith("image_id,path,mel,nv,bkl,predicted")


def test_queue_refuses_beyond_its_bound_and_batches_what_waits(tmp_path):
    release = threading.Event()
    seen: list[int] = []

    def run(jobs):
        release.wait(10)
        seen.append(sum(len(j.uploads) for j in jobs))
        for j in jobs:
            j.future.set_result(len(j.uploads))

    batcher = Batcher(run, max_images=8, wait_s=0.05, max_pending=5)
    job = lambda n: Job([Upload(f"{i}.jpg", tmp_path / f"{i}") for i in range(n)], tmp_path)  # noqa: E731
    first = batcher.submit(job(2))
    time.sleep(0.2)  # the worker has taken the first job and waits in run
    waiting = [batcher.submit(job(1)) for _ in range(3)]
    with pytest.raises(UploadError) as refused:
        batcher.submit(job(1))  # 2 + 3 waiting: a sixth photo is over the bound
    assert refused.value.status == 503 and "busy" in str(refused.value)
    release.set()
    assert first.result(10) == 2 and [w.result(10) for w in waiting] == [1, 1, 1]
    assert seen == [2, 3]  # the three that waited went through in one batch
    assert batcher.pending == 0
    batcher.close()


def _rss_mb(pid: int, field: str) -> float:
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+) kB", text).group(1)) / 1024


@pytest.mark.e2e
@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads the server's memory from /proc")
def test_load_fifty_concurrent_uploads_on_a_real_server(world, tmp_path):
    import httpx

    folder, bundle, photos = world
    paths = sorted(photos.glob("*.jpg"))
    service, limits = _service(world)  # the reference, in this process, with its own cache
    with TestClient(create_app(service, limits)) as c:
        expected = {p["image_id"]: p for p in c.post("/v1/predict", files=_files(*paths)).json()["predictions"]}
    service.close()
    uploads = tmp_path / "uploads"
    uploads.mkdir()
    flags = ["--model", bundle, "--device", "cpu", "--root", tmp_path / "root", "--upload-dir", uploads, "--no-gradcam"]
    with served(*flags) as (url, server):
        with httpx.Client(timeout=120) as http:
            assert http.get(f"{url}/healthz").json()["waiting"] == 0
        before = _rss_mb(server.pid, "VmRSS")

        def one(i: int):
            path = paths[i % len(paths)]
            with httpx.Client(timeout=120) as http:
                return path.stem, http.post(f"{url}/v1/predict", files=_files(path))

        start = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(50) as pool:
            answers = list(pool.map(one, range(50)))
        elapsed = time.monotonic() - start
        for stem, answer in answers:
            assert answer.status_code == 200, answer.text
            (got,) = answer.json()["predictions"]
            for c in CLASSES:
                assert abs(got[c] - expected[stem][c]) < 2e-6
            assert got["predicted"] == expected[stem]["predicted"]
        with httpx.Client(timeout=30) as http:
            health = http.get(f"{url}/healthz").json()
        assert health["waiting"] == 0
        assert health["batches"] < 50  # concurrent uploads shared batches
        peak = _rss_mb(server.pid, "VmHWM")
        assert peak - before < 500, f"server memory grew from {before:.0f} MB to a {peak:.0f} MB peak"
        assert list(uploads.iterdir()) == []
        print(f"50 concurrent uploads in {elapsed:.1f} s, {health['batches']} batches, peak {peak:.0f} MB")
