"""Serve a model bundle on this machine: ``dermpipe serve --model BUNDLE [--port 8000]``.

A page at ``http://127.0.0.1:PORT/`` (drop photos, see each one as the batch report shows it, download the rows as
CSV) and a JSON API: ``POST /v1/predict`` (multipart field ``files``), ``GET /v1/model``, ``GET /healthz``, the
OpenAPI schema at ``/openapi.json`` and ``/docs``. The models load once at start-up; predictions go through the same
predictor and cache as ``dermpipe predict``, in batches gathered from concurrent requests. Binds to 127.0.0.1 unless
``--host`` says otherwise: put it behind a reverse proxy with TLS and authentication before opening it to a network.
"""

from __future__ import annotations

import argparse
import signal
import socket
import sys
from pathlib import Path
from typing import Any

from dermpipe.bundle.store import Bundle, open_bundle
from dermpipe.engine.cli import resolve_config, run_cli, stage_parser
from dermpipe.engine.confine import confine_output
from dermpipe.engine.onnx_runtime import ENGINES
from dermpipe.errors import DermpipeError
from dermpipe.predict.api import Model
from dermpipe.predict.cli import bundle_cache_dir
from dermpipe.predict.config import PredictConfig
from dermpipe.predict.int8_export import int8_card, int8_record
from dermpipe.serve.app import Limits, create_app
from dermpipe.serve.service import Service

DEFAULT_PORT = 8000


class ServeError(DermpipeError):
    """The server cannot start as asked (the address is taken, a setting out of range)."""


def model_card(bundle: Bundle, engine: str) -> dict[str, Any]:
    """What ``GET /v1/model`` answers: the bundle's identity and hash, its bundle.json, the test scores of every
    method its vote compared (the meta-network's as ``metrics``), every metric block (``scores``) with the sha256 of
    the model(s) it scored (verified to be the bundle's weights when the bundle was opened), and its MODEL_CARD.md."""
    info = bundle.info
    scores = info.get("metrics") or {}
    summary = scores.get("vote") or {}
    methods = summary.get("methods") or []
    metrics = next((m for m in methods if m.get("method") == "meta_network"), None)
    card_path = bundle.path / "MODEL_CARD.md"
    int8 = int8_record(bundle)
    card = card_path.read_text() if card_path.is_file() else ""
    return {
        "model": bundle.identity,
        "sha256": bundle.digest,
        "engine": engine,
        "name": bundle.name,
        "created": info.get("created"),
        "classes": info.get("classes"),
        "backbones": info.get("backbones"),
        "metrics": metrics,
        "methods": methods,
        "n_test": summary.get("n_test"),
        "scores": scores,
        "calibration": info.get("calibration"),
        "segmentation": info.get("segmentation"),
        "classifiers": info.get("classifiers"),
        "training_data": info.get("training_data"),
        "versions": info.get("versions"),
        "int8": int8,  # the int8 export's gate figures and calibration images, where the bundle has one
        "model_card": card + ("\n" + int8_card(int8) if int8 else ""),
    }


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (0: a free port), or one line saying why not."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        raise ServeError(f"cannot listen on {host}:{port}: {error.strerror or error} (pass another --port, or stop "
                         "the program using it)") from None  # fmt: skip
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def build_parser() -> argparse.ArgumentParser:
    parser = stage_parser("predict", __doc__)
    parser.add_argument("--model", required=True, help="the model bundle folder to serve (dermpipe bundle)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}; 0: any free)")
    parser.add_argument("--max-upload-mb", type=float, default=25.0, help="largest file one upload may be (MB)")
    parser.add_argument("--max-files", type=int, default=32, help="most photos in one request")
    parser.add_argument("--max-queue", type=int, default=256, help="photos that may wait; more are refused with 503")
    parser.add_argument("--batch-wait-ms", type=float, default=10.0,
                        help="how long the first waiting photo waits for others to share its batch")  # fmt: skip
    parser.add_argument("--upload-dir", default=None, help="where requests' temporary folders go (default: system's)")
    parser.add_argument("--gradcam", action=argparse.BooleanOptionalAction, default=True, help="Grad-CAM on the page")
    parser.add_argument(
        "--engine",
        choices=ENGINES,
        default=None,
        help="run the networks with PyTorch (default), ONNX Runtime (dermpipe export first) or ONNX Runtime's int8 "
        "networks (dermpipe export --quantize int8 first)",
    )
    return parser


def open_service(args: argparse.Namespace) -> tuple[Service, Limits]:
    """The bundle verified, the models loaded once, the queue started; the request limits. Errors are one line."""
    if args.max_upload_mb <= 0 or args.max_files < 1 or args.max_queue < 1:
        raise ServeError("--max-upload-mb, --max-files and --max-queue must be positive")
    if args.upload_dir and not Path(args.upload_dir).is_dir():
        raise ServeError(f"--upload-dir {args.upload_dir} is not a folder: create it or pass another")
    if args.upload_dir:
        confine_output(args.upload_dir, "--upload-dir")  # never inside a bundle or a finished run
    bundle = open_bundle(args.model)  # verified against its sha256 manifest before anything is read
    flags: dict[str, Any] = {**bundle.stage_paths(), "outputs.gradcam": args.gradcam}
    flags["run.cache_dir"] = bundle_cache_dir(args)  # the user's cache folder unless --root or run.cache_dir
    if args.engine:
        flags["engine"] = args.engine
    cfg = resolve_config(PredictConfig, args, flags)
    model = Model.from_config(cfg, bundle)
    engine = cfg.engine
    service = Service(
        model,
        model_card(bundle, engine),
        gradcam=args.gradcam,
        max_batch_images=cfg.batch_size,
        wait_s=args.batch_wait_ms / 1000,
        max_pending=args.max_queue,
    )
    return service, Limits(int(args.max_upload_mb * 2**20), args.max_files, args.upload_dir)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))

    def body() -> int:
        sock = bind(args.host, args.port)  # before the models load: a taken port fails at once
        try:
            service, limits = open_service(args)
        except BaseException:
            sock.close()
            raise
        return serve(sock, service, limits)

    return run_cli(body)


def _stop(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def serve(sock: socket.socket, service: Service, limits: Limits) -> int:
    """Answer on ``sock`` until interrupted (Ctrl-C, SIGTERM); then stop the queue."""
    import uvicorn

    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"serve: {service.model_id} ({service.card['engine']}) on http://{shown}:{port}/ (API /v1/predict, "
          "/v1/model, /healthz; schema /docs); Ctrl-C stops", flush=True)  # fmt: skip
    config = uvicorn.Config(create_app(service, limits), log_level="warning", access_log=False)
    signal.signal(signal.SIGTERM, _stop)  # uvicorn stops gracefully on SIGINT/SIGTERM, then raises the signal again
    try:
        uvicorn.Server(config).run(sockets=[sock])
    except KeyboardInterrupt:  # the normal way a server stops
        pass
    finally:
        service.close()
        sock.close()
    print("serve: stopped", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
