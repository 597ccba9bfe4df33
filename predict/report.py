"""A self-contained HTML report of a batch prediction: per image the thumbnail with the lesion contour, the crop, the
Grad-CAM, the probability bars, any input-quality warnings and, when the input gave it, the truth and whether the
prediction is right; sortable by class and confidence, with a summary on top.

It opens on what needs a human: the images to refer first, then the wrongly predicted ones, then the rest, each group
in input order (``review_rank``; ``ReviewSelection`` keeps the first ``report_max_images`` of that order while a batch
streams)."""

from __future__ import annotations

import html
import json
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from dermpipe.engine.files import write_text_atomic
from dermpipe.segmentation.prediction import THUMBNAIL_SIDE as THUMB


@dataclass
class ReportRow:
    image_id: str
    probabilities: dict[str, float]
    predicted: str
    confidence: float
    refer: bool
    fallback: str
    images: dict[str, str] = field(default_factory=dict)  # kind -> path relative to the report
    quality: tuple[str, ...] = ()  # why the models may not judge this image (dermpipe.data.quality); () = fine
    truth: str = ""  # the true class when the input gave one
    correct: bool | None = None  # whether ``predicted`` is the truth; None without truth
    refer_reason: str = ""  # why it is referred (low confidence, input quality); "" when not referred
    gradcam_of: str = ""  # the backbone whose Grad-CAM of the predicted class is shown


REVIEW_GROUPS: tuple[str, ...] = ("to refer", "wrong", "the rest")


def review_rank(refer: bool, correct: bool | None) -> int:
    """Where an image goes in the report: 0 to refer, 1 wrongly predicted (not referred), 2 the rest."""
    if refer:
        return 0
    return 1 if correct is False else 2


def review_order(rows: Sequence[ReportRow]) -> list[ReportRow]:
    """The rows to refer, then the wrong ones, then the rest, each group in the given (input) order."""
    return sorted(rows, key=lambda r: review_rank(r.refer, r.correct))  # sorted is stable


class ReviewSelection:
    """The first ``limit`` images of the review order, chosen while a batch streams in input order.

    ``wants(rank)`` says whether an image of that rank would be shown (so its thumbnails are worth making); ``add``
    keeps it and returns the row it pushes out of the first ``limit`` (the last of the lowest-priority group), whose
    files the caller removes, or ``None``.
    """

    def __init__(self, limit: int) -> None:
        self.limit = max(0, int(limit))
        self._groups: tuple[list[ReportRow], ...] = tuple([] for _ in REVIEW_GROUPS)

    def wants(self, rank: int) -> bool:
        return sum(len(g) for g in self._groups[: rank + 1]) < self.limit

    def add(self, row: ReportRow) -> ReportRow | None:
        self._groups[review_rank(row.refer, row.correct)].append(row)
        if sum(len(g) for g in self._groups) <= self.limit:
            return None
        return next(g for g in reversed(self._groups) if g).pop()

    @property
    def rows(self) -> list[ReportRow]:
        return [row for group in self._groups for row in group]


def prune_report_files(out: Path, rows: Sequence[ReportRow]) -> int:
    """Remove every file under ``out/report_files`` that no row of the report just written shows (an earlier run's
    pictures of another input, or of images no longer in the report); returns how many went."""
    keep = {os.path.normpath(out / rel) for row in rows for rel in row.images.values()}
    folder = out / "report_files"
    removed = 0
    for path in sorted(folder.rglob("*")) if folder.is_dir() else []:
        if not path.is_dir() and os.path.normpath(path) not in keep:
            path.unlink(missing_ok=True)
            removed += 1
    return removed


def thumbnail_jpeg(image: np.ndarray, mask: np.ndarray | None = None, side: int = THUMB) -> bytes:
    """A small JPEG of an RGB image, with the lesion mask's contour drawn in green when given, as bytes: written
    beside the report, or inlined into the served page without touching the disk."""
    h, w = image.shape[:2]
    scale = side / max(h, w)
    thumb = cv2.resize(image, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    if mask is not None:
        small = cv2.resize(mask.astype(np.uint8), thumb.shape[1::-1], interpolation=cv2.INTER_NEAREST)
        contours, _ = cv2.findContours(small, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        thumb = np.ascontiguousarray(thumb)
        cv2.drawContours(thumb, contours, -1, (0, 255, 0), 2)
    ok, data = cv2.imencode(".jpg", np.ascontiguousarray(thumb[..., ::-1]), [cv2.IMWRITE_JPEG_QUALITY, 85])
    if not ok:
        raise ValueError(f"could not encode a JPEG of shape {thumb.shape}")
    return data.tobytes()


# The report's look and its sort and filter functions, shared with the served page (dermpipe.serve.page).
STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}table{border-collapse:collapse}
td,th{border-bottom:1px solid #ddd;padding:4px 8px;vertical-align:middle;text-align:left}
th{cursor:pointer;background:#f4f4f4;position:sticky;top:0}img{display:block}
.bar{height:10px;background:#4a7fb5;display:inline-block}.refer{color:#b00;font-weight:bold}
.summary td{border:none;padding:2px 10px}.small{color:#666;font-size:90%}
tr.warn{background:#fff4d6}tr.warn td:first-child{border-left:4px solid #d08000}
.quality{color:#8a4b00;font-size:90%;margin:4px 0 0;padding-left:1.1em}.badge{background:#d08000;color:#fff;
border-radius:3px;padding:0 4px;font-size:80%;font-weight:bold}
tr.wrong td:first-child{border-left:4px solid #b00}.right{color:#2a7a2a;font-weight:bold}
.wrong-mark{color:#b00;font-weight:bold}
"""

SCRIPT = """
function sortBy(col, numeric){const t=document.getElementById('preds');const rows=[...t.tBodies[0].rows];
const dir=t.dataset.col==col&&t.dataset.dir=='desc'?'asc':'desc';t.dataset.col=col;t.dataset.dir=dir;
rows.sort((a,b)=>{let x=a.dataset[col],y=b.dataset[col];if(numeric){x=+x;y=+y}
return (x<y?-1:x>y?1:0)*(dir=='asc'?1:-1)});rows.forEach(r=>t.tBodies[0].appendChild(r))}
function applyFilter(){const c=document.getElementById('cls').value,w=document.getElementById('warn').checked;
const x=document.getElementById('wrong'),o=x!==null&&x.checked;
for(const r of document.getElementById('preds').tBodies[0].rows)
r.style.display=((c==''||r.dataset.predicted==c)&&(!w||r.dataset.quality=='1')&&(!o||r.dataset.correct=='0'))?'':'none'}
"""


def table_head(classes: Sequence[str], with_truth: bool) -> str:
    """The ``<thead>`` of the table ``render_rows`` fills (click a header to sort by it)."""
    sort_heads = "".join(f"<th onclick=\"sortBy('p{i}',true)\">{html.escape(c)}</th>" for i, c in enumerate(classes))
    truth_head = "<th onclick=\"sortBy('truth',false)\">truth</th>" if with_truth else ""
    return (
        "<thead><tr><th onclick=\"sortBy('id',false)\">image</th><th>image + lesion</th><th>crop</th>"
        "<th>Grad-CAM</th><th onclick=\"sortBy('predicted',false)\">predicted</th>"
        f"{truth_head}<th onclick=\"sortBy('confidence',true)\">confidence</th>{sort_heads}</tr></thead>"
    )


def render_rows(rows: Sequence[ReportRow], classes: Sequence[str], with_truth: bool) -> str:
    """The table rows (``<tr>``) of ``rows`` in the given order: what the report and the served page both show."""
    body = []
    for r in rows:
        data = " ".join(f'data-p{i}="{r.probabilities.get(c, 0.0):.6f}"' for i, c in enumerate(classes))
        titles = {"gradcam": f"Grad-CAM of {r.predicted} on {r.gradcam_of}" if r.gradcam_of else "Grad-CAM"}
        imgs = "".join(
            f'<td><img src="{html.escape(r.images[k])}" width="{THUMB}" alt="{k}" '
            f'title="{html.escape(titles.get(k, k))}"></td>'
            if k in r.images
            else "<td></td>"
            for k in ("thumbnail", "crop", "gradcam")
        )
        bars = "".join(
            f'<td><span class="bar" style="width:{60 * r.probabilities.get(c, 0.0):.0f}px"></span> '
            f"{r.probabilities.get(c, 0.0):.3f}</td>"
            for c in classes
        )
        refer = ""
        if r.refer:
            why = f'<div class="small">{html.escape(r.refer_reason)}</div>' if r.refer_reason else ""
            refer = f'<span class="refer" title="{html.escape(r.refer_reason)}">refer</span>{why}'
        note = f'<div class="small">{html.escape(r.fallback)}</div>' if r.fallback else ""
        badge, quality = "", ""
        css: list[str] = []
        reasons = (r.quality,) if isinstance(r.quality, str) else tuple(r.quality)  # one reason passed as a str
        if reasons:
            badge = ' <span class="badge" title="input quality warning">quality</span>'
            css.append("warn")
            items = "".join(f"<li>{html.escape(reason)}</li>" for reason in reasons)
            quality = f'<ul class="quality" title="input quality warnings">{items}</ul>'
        truth_cell, truth_data = "", ""
        if with_truth:
            mark = ""
            if r.correct is True:
                mark = ' <span class="right" title="the prediction is the truth">&#10003; right</span>'
            elif r.correct is False:
                mark = ' <span class="wrong-mark" title="the prediction is not the truth">&#10007; wrong</span>'
                css.append("wrong")
            truth_cell = f"<td>{html.escape(r.truth)}{mark}</td>"
            correct = "" if r.correct is None else str(int(r.correct))
            truth_data = f' data-truth="{html.escape(r.truth)}" data-correct="{correct}"'
        attrs = f' class="{" ".join(css)}"' if css else ""
        body.append(
            f'<tr{attrs} data-id="{html.escape(r.image_id)}" data-predicted="{html.escape(r.predicted)}" '
            f'data-quality="{int(bool(reasons))}" data-confidence="{r.confidence:.6f}"{truth_data} {data}>'
            f"<td>{html.escape(r.image_id)}{badge}{note}{quality}</td>{imgs}"
            f"<td>{html.escape(r.predicted)} {refer}</td>{truth_cell}<td>{r.confidence:.3f}</td>{bars}</tr>"
        )
    return "".join(body)


def write_report(
    path: str | os.PathLike,
    rows: Sequence[ReportRow],
    classes: Sequence[str],
    summary: Mapping[str, object],
    skipped: Sequence[dict[str, str]] = (),
    predicted_counts: Mapping[str, int] | None = None,
    quality_warnings: int | None = None,
) -> Path:
    """Write ``report.html`` (images referenced by relative path, so the page stays small for big batches).

    ``rows`` are shown in review order (``review_order``: to refer, wrong, the rest). ``predicted_counts`` and
    ``quality_warnings`` are over every image of the batch when the report shows only some of them (default: over
    ``rows``).
    """
    path = Path(path)
    rows = review_order(rows)
    counts = Counter(r.predicted for r in rows) if predicted_counts is None else Counter(predicted_counts)
    n_warn = sum(1 for r in rows if r.quality)
    all_warn = n_warn if quality_warnings is None else quality_warnings
    with_truth = any(r.correct is not None for r in rows)
    n_wrong = sum(1 for r in rows if r.correct is False)
    head = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(str(v))}</td></tr>" for k, v in summary.items())
    per_class = "".join(f"<tr><td>{html.escape(c)}</td><td>{counts.get(c, 0)}</td></tr>" for c in classes)
    options = "".join(f'<option value="{html.escape(c)}">{html.escape(c)}</option>' for c in classes)
    body = render_rows(rows, classes, with_truth)
    skipped_html = ""
    if skipped:
        items = "".join(f"<li>{html.escape(s['path'])}: {html.escape(s['reason'])}</li>" for s in skipped)
        skipped_html = f"<h2>Skipped ({len(skipped)})</h2><ul>{items}</ul>"
    order = "the images to refer first, then " + ("the wrongly predicted ones, then " if with_truth else "")
    truth_note = (
        "\nWhere the input gave the truth, each image shows it and is marked <b>right</b> or <b>wrong</b>."
        if with_truth
        else ""
    )
    wrong_filter = (
        f' &middot; <label><input type="checkbox" id="wrong" onchange="applyFilter()"> only wrong predictions '
        f"({n_wrong})</label>"
        if with_truth
        else ""
    )
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>Lesion predictions</title>
<style>{STYLE}</style><script>{SCRIPT}</script></head><body>
<h1>Lesion predictions</h1>
<p class="small">Research software, not a medical device: every call needs a clinician's review.
Images marked <b>refer</b> had a confidence below the threshold chosen for the target melanoma sensitivity.
Images marked <span class="badge">quality</span> are outside what the models can judge (too small, badly exposed,
blurred, no lesion found): their probabilities are not to be trusted.{truth_note}
The table opens on {order}the rest, each in input order.</p>
<table class="summary">{head}<tr><td>quality warnings</td><td>{all_warn}</td></tr></table>
<h2>Predicted classes</h2><table class="summary">{per_class}</table>
<p>Show class <select id="cls" onchange="applyFilter()"><option value="">all</option>{options}</select>
 &middot; <label><input type="checkbox" id="warn" onchange="applyFilter()"> only images with quality warnings
({n_warn})</label>{wrong_filter} &middot; click a column header to sort</p>
<table id="preds">{table_head(classes, with_truth)}
<tbody>{body}</tbody></table>{skipped_html}
<script>const meta={json.dumps({"images": len(rows)})};</script></body></html>"""
    write_text_atomic(path, page)
    return path
