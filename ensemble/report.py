"""A self-contained HTML report of a batch prediction: per image the thumbnail with the lesion contour, the crop, the
Grad-CAM and the probability bars, sortable by class and confidence, with a summary on top."""

from __future__ import annotations

import html
import json
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from dermpipe.data.reading import write_image
from dermpipe.engine.files import write_text_atomic

THUMB = 160


@dataclass
class ReportRow:
    image_id: str
    probabilities: dict[str, float]
    predicted: str
    confidence: float
    refer: bool
    fallback: str
    images: dict[str, str] = field(default_factory=dict)  # kind -> path relative to the report


def save_thumbnail(image: np.ndarray, path: Path, mask: np.ndarray | None = None, side: int = THUMB) -> Path:
    """A small JPEG of an RGB image, with the lesion mask's contour drawn in green when given."""
    h, w = image.shape[:2]
    scale = side / max(h, w)
    thumb = cv2.resize(image, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    if mask is not None:
        small = cv2.resize(mask.astype(np.uint8), thumb.shape[1::-1], interpolation=cv2.INTER_NEAREST)
        contours, _ = cv2.findContours(small, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        thumb = np.ascontiguousarray(thumb)
        cv2.drawContours(thumb, contours, -1, (0, 255, 0), 2)
    return write_image(path, thumb, [cv2.IMWRITE_JPEG_QUALITY, 85])


_STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}table{border-collapse:collapse}
td,th{border-bottom:1px solid #ddd;padding:4px 8px;vertical-align:middle;text-align:left}
th{cursor:pointer;background:#f4f4f4;position:sticky;top:0}img{display:block}
.bar{height:10px;background:#4a7fb5;display:inline-block}.refer{color:#b00;font-weight:bold}
.summary td{border:none;padding:2px 10px}.small{color:#666;font-size:90%}
"""

_SCRIPT = """
function sortBy(col, numeric){const t=document.getElementById('preds');const rows=[...t.tBodies[0].rows];
const dir=t.dataset.col==col&&t.dataset.dir=='desc'?'asc':'desc';t.dataset.col=col;t.dataset.dir=dir;
rows.sort((a,b)=>{let x=a.dataset[col],y=b.dataset[col];if(numeric){x=+x;y=+y}
return (x<y?-1:x>y?1:0)*(dir=='asc'?1:-1)});rows.forEach(r=>t.tBodies[0].appendChild(r))}
function filterClass(c){for(const r of document.getElementById('preds').tBodies[0].rows)
r.style.display=(c==''||r.dataset.predicted==c)?'':'none'}
"""


def write_report(
    path: str | os.PathLike,
    rows: Sequence[ReportRow],
    classes: Sequence[str],
    summary: dict,
    skipped: Sequence[dict[str, str]] = (),
) -> Path:
    """Write ``report.html`` (images referenced by relative path, so the page stays small for big batches)."""
    path = Path(path)
    counts = Counter(r.predicted for r in rows)
    head = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(str(v))}</td></tr>" for k, v in summary.items())
    per_class = "".join(f"<tr><td>{html.escape(c)}</td><td>{counts.get(c, 0)}</td></tr>" for c in classes)
    options = "".join(f'<option value="{html.escape(c)}">{html.escape(c)}</option>' for c in classes)
    sort_heads = "".join(f"<th onclick=\"sortBy('p{i}',true)\">{html.escape(c)}</th>" for i, c in enumerate(classes))
    body = []
    for r in rows:
        data = " ".join(f'data-p{i}="{r.probabilities.get(c, 0.0):.6f}"' for i, c in enumerate(classes))
        imgs = "".join(
            f'<td><img src="{html.escape(r.images[k])}" width="{THUMB}" alt="{k}"></td>'
            if k in r.images
            else "<td></td>"
            for k in ("thumbnail", "crop", "gradcam")
        )
        bars = "".join(
            f'<td><span class="bar" style="width:{60 * r.probabilities.get(c, 0.0):.0f}px"></span> '
            f"{r.probabilities.get(c, 0.0):.3f}</td>"
            for c in classes
        )
        refer = '<span class="refer">refer</span>' if r.refer else ""
        note = f'<div class="small">{html.escape(r.fallback)}</div>' if r.fallback else ""
        body.append(
            f'<tr data-id="{html.escape(r.image_id)}" data-predicted="{html.escape(r.predicted)}" '
            f'data-confidence="{r.confidence:.6f}" {data}><td>{html.escape(r.image_id)}{note}</td>{imgs}'
            f"<td>{html.escape(r.predicted)} {refer}</td><td>{r.confidence:.3f}</td>{bars}</tr>"
        )
    skipped_html = ""
    if skipped:
        items = "".join(f"<li>{html.escape(s['path'])}: {html.escape(s['reason'])}</li>" for s in skipped)
        skipped_html = f"<h2>Skipped ({len(skipped)})</h2><ul>{items}</ul>"
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>Lesion predictions</title>
<style>{_STYLE}</style><script>{_SCRIPT}</script></head><body>
<h1>Lesion predictions</h1>
<p class="small">Research software, not a medical device: every call needs a clinician's review.
Images marked <b>refer</b> had a confidence below the threshold chosen for the target melanoma sensitivity.</p>
<table class="summary">{head}</table><h2>Predicted classes</h2><table class="summary">{per_class}</table>
<p>Show class <select onchange="filterClass(this.value)"><option value="">all</option>{options}</select>
 &middot; click a column header to sort</p>
<table id="preds"><thead><tr><th onclick="sortBy('id',false)">image</th><th>image + lesion</th><th>crop</th>
<th>Grad-CAM</th><th onclick="sortBy('predicted',false)">predicted</th>
<th onclick="sortBy('confidence',true)">confidence</th>{sort_heads}</tr></thead>
<tbody>{"".join(body)}</tbody></table>{skipped_html}
<script>const meta={json.dumps({"images": len(rows)})};</script></body></html>"""
    write_text_atomic(path, page)
    return path
