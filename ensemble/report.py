"""A self-contained HTML report of a batch prediction: per image the thumbnail with the lesion contour, the crop, the
Grad-CAM, the probability bars and any input-quality warnings, sortable by class and confidence, with a summary on
top."""

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
    quality: tuple[str, ...] = ()  # why the models may not judge this image (dermpipe.data.quality); () = fine


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
tr.warn{background:#fff4d6}tr.warn td:first-child{border-left:4px solid #d08000}
.quality{color:#8a4b00;font-size:90%;margin:4px 0 0;padding-left:1.1em}.badge{background:#d08000;color:#fff;
border-radius:3px;padding:0 4px;font-size:80%;font-weight:bold}
"""

_SCRIPT = """
function sortBy(col, numeric){const t=document.getElementById('preds');const rows=[...t.tBodies[0].rows];
const dir=t.dataset.col==col&&t.dataset.dir=='desc'?'asc':'desc';t.dataset.col=col;t.dataset.dir=dir;
rows.sort((a,b)=>{let x=a.dataset[col],y=b.dataset[col];if(numeric){x=+x;y=+y}
return (x<y?-1:x>y?1:0)*(dir=='asc'?1:-1)});rows.forEach(r=>t.tBodies[0].appendChild(r))}
function applyFilter(){const c=document.getElementById('cls').value,w=document.getElementById('warn').checked;
for(const r of document.getElementById('preds').tBodies[0].rows)
r.style.display=((c==''||r.dataset.predicted==c)&&(!w||r.dataset.quality=='1'))?'':'none'}
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
    n_warn = sum(1 for r in rows if r.quality)
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
        badge, warn, quality = "", "", ""
        reasons = (r.quality,) if isinstance(r.quality, str) else tuple(r.quality)  # one reason passed as a str
        if reasons:
            badge = ' <span class="badge" title="input quality warning">quality</span>'
            warn = ' class="warn"'
            items = "".join(f"<li>{html.escape(reason)}</li>" for reason in reasons)
            quality = f'<ul class="quality" title="input quality warnings">{items}</ul>'
        body.append(
            f'<tr{warn} data-id="{html.escape(r.image_id)}" data-predicted="{html.escape(r.predicted)}" '
            f'data-quality="{int(bool(reasons))}" data-confidence="{r.confidence:.6f}" {data}>'
            f"<td>{html.escape(r.image_id)}{badge}{note}{quality}</td>{imgs}"
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
Images marked <b>refer</b> had a confidence below the threshold chosen for the target melanoma sensitivity.
Images marked <span class="badge">quality</span> are outside what the models can judge (too small, badly exposed,
blurred, no lesion found): their probabilities are not to be trusted.</p>
<table class="summary">{head}<tr><td>quality warnings</td><td>{n_warn}</td></tr></table>
<h2>Predicted classes</h2><table class="summary">{per_class}</table>
<p>Show class <select id="cls" onchange="applyFilter()"><option value="">all</option>{options}</select>
 &middot; <label><input type="checkbox" id="warn" onchange="applyFilter()"> only images with quality warnings
({n_warn})</label> &middot; click a column header to sort</p>
<table id="preds"><thead><tr><th onclick="sortBy('id',false)">image</th><th>image + lesion</th><th>crop</th>
<th>Grad-CAM</th><th onclick="sortBy('predicted',false)">predicted</th>
<th onclick="sortBy('confidence',true)">confidence</th>{sort_heads}</tr></thead>
<tbody>{"".join(body)}</tbody></table>{skipped_html}
<script>const meta={json.dumps({"images": len(rows)})};</script></body></html>"""
    write_text_atomic(path, page)
    return path
