"""The served page: drop photos, see each one as the batch report shows it (the same rows, from
``dermpipe.predict.report``), download the rows as CSV."""

from __future__ import annotations

import html
import json
from collections.abc import Mapping, Sequence
from typing import Any

from dermpipe.predict.report import SCRIPT, STYLE, table_head

_PAGE_STYLE = """
#drop{border:2px dashed #4a7fb5;border-radius:8px;padding:1.5em;text-align:center;margin:1em 0;background:#f7fafd}
#drop.over{background:#e3eefa}#status{min-height:1.2em}.error{color:#b00}
"""

_PAGE_SCRIPT = """
let csvText = '';
function setStatus(text, error){const s=document.getElementById('status');s.textContent=text;
s.className=error?'error':'small'}
async function send(files){
  if(!files.length) return;
  const form = new FormData();
  for(const f of files) form.append('files', f, f.name);
  setStatus(`predicting ${files.length} photo(s)...`, false);
  let answer, response;
  try { response = await fetch('v1/predict?format=page', {method: 'POST', body: form});
        answer = await response.json(); }
  catch(e){ setStatus('error: the server did not answer (' + e + ')', true); return; }
  if(!response.ok){ setStatus('error: ' + answer.detail, true); return; }
  document.getElementById('preds').tBodies[0].insertAdjacentHTML('beforeend', answer.html);
  const list = document.getElementById('skipped');
  for(const s of answer.skipped){
    const li = document.createElement('li'); li.textContent = s.reason; list.appendChild(li); }
  document.getElementById('skipped-head').hidden = !list.children.length;
  csvText = csvText ? csvText + answer.csv.slice(answer.csv.indexOf('\\n') + 1) : answer.csv;
  const link = document.getElementById('download');
  link.href = URL.createObjectURL(new Blob([csvText], {type: 'text/csv'}));
  link.style.display = '';
  applyFilter();
  setStatus(`${answer.predictions.length} predicted, ${answer.skipped.length} not readable`, false);
  document.body.dataset.done = String(+(document.body.dataset.done || 0) + 1);
}
window.addEventListener('DOMContentLoaded', () => {
  const drop = document.getElementById('drop'), input = document.getElementById('files');
  input.addEventListener('change', () => { send([...input.files]); input.value = ''; });
  drop.addEventListener('dragover', e => { e.preventDefault(); drop.classList.add('over'); });
  drop.addEventListener('dragleave', () => drop.classList.remove('over'));
  drop.addEventListener('drop', e => { e.preventDefault(); drop.classList.remove('over');
    send([...e.dataTransfer.files]); });
});
"""


def page_html(model_id: str, classes: Sequence[str], card: Mapping[str, Any], max_upload_mb: float) -> str:
    """The upload page: the model's name and test score, a drop zone, and the report's table (empty until photos
    come)."""
    metrics = card.get("metrics") or {}
    score = ""
    if metrics.get("balanced_accuracy") is not None:
        score = f"; test balanced accuracy {metrics['balanced_accuracy']:.3f}"
    options = "".join(f'<option value="{html.escape(c)}">{html.escape(c)}</option>' for c in classes)
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>Lesion predictions</title>
<style>{STYLE}{_PAGE_STYLE}</style><script>{SCRIPT}{_PAGE_SCRIPT}</script>
<script>const model={json.dumps({"model": model_id, "classes": list(classes)})};</script></head><body>
<h1>Lesion predictions</h1>
<p class="small">Model <b>{html.escape(model_id)}</b> (classes {html.escape(", ".join(classes))}{score}).
Research software, not a medical device: every call needs a clinician's review. Images marked <b>refer</b> go to a
dermatologist (the reason is under the flag); images marked <span class="badge">quality</span> are outside what the
models can judge. Photos are kept only while they are predicted. API: <a href="docs">docs</a>,
<a href="v1/model">model card</a>.</p>
<div id="drop"><p>Drop dermoscopy photos here, or <input type="file" id="files" name="files" multiple
accept="image/jpeg,image/png,image/bmp,image/tiff"></p>
<p class="small">JPEG, PNG, BMP or TIFF, up to {max_upload_mb:g} MB each.</p></div>
<p id="status" class="small"></p>
<p>Show class <select id="cls" onchange="applyFilter()"><option value="">all</option>{options}</select>
 &middot; <label><input type="checkbox" id="warn" onchange="applyFilter()"> only images with quality warnings</label>
 &middot; click a column header to sort &middot;
<a id="download" download="predictions.csv" style="display:none">download the rows as CSV</a></p>
<table id="preds">{table_head(classes, False)}<tbody></tbody></table>
<h2 id="skipped-head" hidden>Not readable</h2><ul id="skipped"></ul>
</body></html>"""
