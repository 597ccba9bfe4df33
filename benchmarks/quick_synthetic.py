"""The quick measurement set behind ``make bench``: the benchmarks here at a small size, offline, on the CPU.

    python benchmarks/quick_synthetic.py --out runs/bench/quick

Writes a small synthetic data set (``OUT/data``), then runs each script as ``python benchmarks/NAME.py ...`` in a
process of its own: the bare classification and segmentation reference loops on that set, the segmentation
prediction throughput, the classification training throughput, the whole pipeline's batch prediction throughput
(the five default backbones at their native sizes, random weights) and the same with ONNX Runtime against PyTorch
eager (``onnx_speed``). Each writes its JSON under ``OUT``;
``OUT/summary.json`` gathers them with the equivalent commands and their seconds. Small sizes, few epochs: this checks
that the benchmarks run end to end and shows their order of magnitude on this machine; the figures in BENCHMARKS.md
come from the full-size commands there.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch
from memory_flat import peak_rss_mb  # its neighbour, on sys.path when this script runs by path

from dermpipe.data.generator import generate_dataset
from dermpipe.engine.files import write_text_atomic

HERE = Path(__file__).resolve().parent


def steps(out: Path, manifest: Path, threads: int) -> list[tuple[str, list[str], Path]]:
    """(script name, arguments, JSON it writes) for each measurement, in the order they run."""
    t = ["--threads", str(threads)]
    return [
        (
            "classification_bare",
            ["--manifest", str(manifest), "--out", str(out / "classification_bare"), "--size", "32", "--epochs", "2",
             "--batch-size", "16", *t],
            out / "classification_bare" / "metrics_test.json",
        ),
        (
            "segmentation_bare",
            ["--manifest", str(manifest), "--out", str(out / "segmentation_bare"), "--size", "64", "--epochs", "2",
             "--batch-size", "8", *t],
            out / "segmentation_bare" / "scores_test.json",
        ),
        (
            "segmentation_prediction_throughput",
            ["--size", "128", "--images", "16", "--batch", "8", "--encoder", "resnet18", *t,
             "--json", str(out / "segmentation_prediction_throughput.json")],
            out / "segmentation_prediction_throughput.json",
        ),
        (
            "classification_training_throughput",
            ["--models", "test_resnet", "resnet18", "--size", "64", "--batch-size", "16", "--steps", "3",
             "--repeats", "3", *t, "--json", str(out / "classification_training_throughput.json")],
            out / "classification_training_throughput.json",
        ),
        (
            "pipeline_throughput",
            ["--images", "4", "--batch", "4", "--seg-size", "128", "--encoder", "resnet18", *t,
             "--json", str(out / "pipeline_throughput.json")],
            out / "pipeline_throughput.json",
        ),
        (
            "onnx_speed",
            ["--images", "4", "--batch", "4", "--seg-size", "128", "--encoder", "resnet18", "--repeats", "1", *t,
             "--out", str(out / "onnx_speed")],
            out / "onnx_speed" / "onnx_speed.json",
        ),
        (
            "ddp_scaling",
            ["--processes", "2", "--images", "96", "--epochs", "2", "--json", str(out / "ddp_scaling.json")],
            out / "ddp_scaling.json",
        ),
        (
            "memory_flat",
            ["--sizes", "200", "2000", "--out", str(out / "memory")],
            out / "memory" / "memory.json",
        ),
    ]  # fmt: skip


BEGIN, END = "<!-- make bench: begin -->", "<!-- make bench: end -->"


def _joined(*parts: str) -> str:
    return "; ".join(p for p in parts if p)


def _segmentation_rows(x: dict, mem: str) -> list[tuple[str, ...]]:
    return [("segmentation prediction, cold cache", f"{x['pipeline_img_s']:.1f} img/s",
             f"{x['bare_forward_img_s'] / x['pipeline_img_s']:.2f}x the bare forward's time",
             _joined(f"warm cache {x['warm_cache_img_s']:.0f} img/s ({x['warm_speedup']:.0f}x)", mem))]  # fmt: skip


def _training_rows(x: dict, mem: str) -> list[tuple[str, ...]]:
    return [(f"classification training, {name}", f"{m['ours_img_s']:.1f} img/s",
             f"{1 / m['ratio']:.2f}x the bare timm loop's time", mem) for name, m in x["models"].items()]  # fmt: skip


def _pipeline_rows(x: dict, mem: str) -> list[tuple[str, ...]]:
    first = f"first prediction {x['first_prediction_s']:.1f} s" if "first_prediction_s" in x else ""
    return [("batch prediction, whole pipeline, cold cache", f"{x['pipeline_img_s']:.2f} img/s",
             f"{x['bare_img_s'] / x['pipeline_img_s']:.2f}x the six bare forwards' time",
             _joined(f"warm cache {x['warm_img_s']:.0f} img/s ({x['warm_speedup']:.0f}x)", first, mem))]  # fmt: skip


def _onnx_rows(x: dict, mem: str) -> list[tuple[str, ...]]:
    f, p = x["forward"], x["predict"]
    rows = [("batch prediction, `--engine onnxruntime`, cold cache", f"{p['onnxruntime_img_s']:.2f} img/s",
             f"{p['ratio']:.2f}x PyTorch eager's speed ({p['pytorch_img_s']:.2f} img/s) on the same images",
             _joined(f"forward passes alone {f['ratio']:.2f}x",
                     f"final probabilities within {p['max_abs_probability_difference']:.1e}", mem)),
            ("batch prediction, `--engine onnxruntime-int8`, cold cache", f"{p['onnxruntime-int8_img_s']:.2f} img/s",
             f"{p['int8_ratio']:.2f}x PyTorch eager's speed on the same images",
             _joined(f"forward passes alone {f['int8_ratio']:.2f}x",
                     f"predicted class as float32 on {p['int8_class_agreement']:.0%} (random weights)"))]  # fmt: skip
    for engine, c in (x.get("cold_start") or {}).items():
        rows.append((f"cold start, `{engine}`", f"predict {c['predict_first_s']:.1f} s to the first row",
                     f"{c['predict_later_s']:.1f} s once its graphs are cached; serve {c['serve_first_answer_s']:.1f} "
                     "s to the first answer", f"peak {c['predict_peak_mb']:.0f} MB"))  # fmt: skip
    return rows


def _ddp_rows(x: dict, mem: str) -> list[tuple[str, ...]]:
    return [(f"training on {x['many']['processes']} gloo processes ({x['backbone']}, global batch "
             f"{x['global_batch']})", f"{x['many']['train_img_s']:.1f} img/s",
             f"{x['ratio']:.2f}x one process ({x['one']['train_img_s']:.1f} img/s) on the same cores",
             f"val balanced accuracy {x['many']['val_balanced_accuracy']:.3f} vs "
             f"{x['one']['val_balanced_accuracy']:.3f}")]  # fmt: skip


def _memory_rows(x: dict, mem: str) -> list[tuple[str, ...]]:
    runs = ", ".join(f"{run['images']} images {run['peak_rss_mb']:.0f} MB" for run in x["runs"])
    return [("batch prediction peak memory", runs, f"ratio {x['ratio']:.3f}", "tiny models")]


# each measurement's rows of the machine table, in the table's order
TABLE_ROWS = {
    "segmentation_prediction_throughput": _segmentation_rows,
    "classification_training_throughput": _training_rows,
    "pipeline_throughput": _pipeline_rows,
    "onnx_speed": _onnx_rows,
    "ddp_scaling": _ddp_rows,
    "memory_flat": _memory_rows,
}


def machine_table(summary: dict) -> str:
    """The quick set's figures as Markdown: machine, date and command first, then one row per measurement."""
    rows = []
    for name, make_rows in TABLE_ROWS.items():
        step = summary["results"].get(name)
        if step is not None:
            peak = step.get("peak_rss_mb")
            rows += make_rows(step["result"], f"peak {peak:.0f} MB" if peak else "")
    m = summary["machine"]
    lines = [
        BEGIN,
        f"Machine: {m['platform']}, {m.get('cpus', '?')} CPUs, Python {m['python']}, torch {m['torch']}, "
        f"{m['torch_threads']} torch thread(s); {summary.get('date', '')}; `make bench` "
        f"(`python benchmarks/quick_synthetic.py --out {summary.get('out', 'runs/bench/quick')}`), "
        f"{summary['seconds']:.0f} s in all. Small sizes on synthetic data: orders of magnitude, not the figures "
        "above.",
        "",
        "| measurement | figure | against the floor | more |",
        "|---|---|---|---|",
        *(f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows),
        END,
    ]  # fmt: skip
    return "\n".join(lines)


def write_tables(
    path: Path, table: str, begin: str = BEGIN, end: str = END, heading: str = "## Machine tables (`make bench`)"
) -> None:
    """Replace what lies between the markers in ``path`` (appended under ``heading`` when they are missing)."""
    text = path.read_text() if path.is_file() else ""
    if begin in text and end in text:
        text = text[: text.index(begin)] + table + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip("\n") + f"\n\n{heading}\n\n" + table + "\n"
    write_text_atomic(path, text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/bench/quick", help="folder for the data set and the JSON results")
    parser.add_argument("--images", type=int, default=80, help="synthetic images for the bare loops (default 80)")
    parser.add_argument("--tables", help="also write the machine table into this Markdown file (BENCHMARKS.md)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads of every step (default 1, steadier on a shared machine; 0 = torch's default)",
    )
    args = parser.parse_args(argv)
    out = Path(args.out)
    start = time.perf_counter()
    manifest = generate_dataset(out / "data", n_images=args.images, size=64, seed=0)
    summary = {
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torch_threads": args.threads or torch.get_num_threads(),
            "cpus": os.cpu_count(),
        },
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "out": str(out),
        "data": {"manifest": str(manifest), "images": args.images, "size": 64, "seconds": time.perf_counter() - start},
        "results": {},
    }
    for name, arguments, result in steps(out, manifest, args.threads):
        command = shlex.join(["python", f"benchmarks/{name}.py", *arguments])
        print(f"== {command}", flush=True)
        began = time.perf_counter()
        peak, _ = peak_rss_mb([sys.executable, str(HERE / f"{name}.py"), *arguments])
        summary["results"][name] = {
            "command": command,
            "seconds": time.perf_counter() - began,
            "peak_rss_mb": peak,
            "result": json.loads(result.read_text()),
        }
    summary["seconds"] = time.perf_counter() - start
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    if args.tables:
        write_tables(Path(args.tables), machine_table(summary))
        print(f"wrote the machine table into {args.tables}")
    print(f"wrote {out / 'summary.json'} ({summary['seconds']:.0f} s in all)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
