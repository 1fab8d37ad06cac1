"""The report page's jinja2 template: one self-contained HTML file (inline CSS, images as data URIs, no script)."""

from __future__ import annotations

DET_HOW_TO_READ = (
    "Each line shows, over all thresholds, the share of impostor pairs accepted (FAR, x axis) against the share "
    "of genuine pairs rejected (FRR, y axis), both on log scales, so lower-left is better. Compare the lines at the "
    "FAR you operate at: the gap between baseline and unsure_as_reject / sure_only is what answering 'unsure' for "
    "pairs with an image below gamma buys, paid for by the unsure rate in the verification table."
)
EDC_HOW_TO_READ = (
    "Each line shows the false non-match rate (y axis) at a threshold fixed once, as the lowest-quality share of "
    "pairs (x axis) is discarded, ranked by ERS, by the raw feature norm, or at random. The faster a line falls the "
    "better that measure finds the pairs that cause errors: ERS should fall below norm, and both below random (the "
    "table's partial areas say the same in one number each)."
)

PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{ c.title }}</title>
<style>
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0 auto; max-width: 1100px;
       padding: 0 1.2em 3em; color: #1d1d1f; line-height: 1.45; }
h1 { margin-bottom: 0.2em; }
h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2em; margin-top: 2em; }
nav a { margin-right: 1em; }
.meta { color: #555; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.92em; }
th, td { border: 1px solid #ddd; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #f4f4f6; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.band { margin: 0.8em 0 1.4em; }
.thumbs { display: flex; flex-wrap: wrap; gap: 8px; }
figure { margin: 0; text-align: center; font-size: 0.78em; }
figure img { display: block; border: 3px solid; border-radius: 3px; }
figure.rec img { border-color: #2f6fbf; }
figure.unrec img { border-color: #e07b14; }
figcaption { max-width: {{ thumbnail_px + 6 }}px; overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
.undecodable { width: {{ thumbnail_px }}px; height: {{ thumbnail_px }}px; border: 3px dashed #999;
               display: flex; align-items: center; justify-content: center; color: #777; }
img.plot { max-width: 100%; height: auto; }
.note { background: #f7f7f9; border-left: 4px solid #bbb; padding: 0.5em 0.9em; }
pre { white-space: pre-wrap; font-size: 0.85em; margin: 0; }
details summary { cursor: pointer; }
</style>
</head>
<body>
<h1>{{ c.title }}</h1>
<p class="meta">Generated {{ c.generated_at }} from the lake at <code>{{ c.storage_root }}</code>
(catalog database <code>{{ c.database }}</code>).
Model <code>{{ s.model_name }}</code> version <code>{{ s.model_version }}</code>,
UIC <code>{{ s.uic_id }}</code>{% if s.uic_method %} ({{ s.uic_method }}{% if s.eps is not none %}, eps {{ "%.3g"|format(s.eps) }}{% endif %}){% endif %},
gamma <strong>{{ "%.4f"|format(s.gamma) }}</strong>{% if s.gamma_method %} ({{ s.gamma_method }}){% endif %}.</p>
<nav><a href="#counts">Counts</a><a href="#histogram">ERS histogram</a><a href="#crops">Crops by ERS</a>
<a href="#map">Embedding map</a><a href="#evaluation">Evaluation</a><a href="#runs">Runs</a></nav>

<section id="counts">
<h2>Counts</h2>
<table>
<tr><th>table</th><th>rows</th></tr>
<tr><td>crops</td><td class="num" id="count-crops">{{ n.crops }}</td></tr>
<tr><td>embeddings (this model)</td><td class="num" id="count-embeddings">{{ n.embeddings }}</td></tr>
<tr><td>scored (this UIC)</td><td class="num" id="count-scored">{{ n.scored }}</td></tr>
<tr><td>&nbsp;&nbsp;recognizable (ERS &ge; gamma)</td><td class="num" id="count-recognizable">{{ n.recognizable }}</td></tr>
<tr><td>&nbsp;&nbsp;unrecognizable (ERS &lt; gamma)</td><td class="num" id="count-unrecognizable">{{ n.unrecognizable }}</td></tr>
<tr><td>UI members (this UIC)</td><td class="num" id="count-ui-members">{{ n.ui_members }}</td></tr>
<tr><td>cleaned</td><td class="num" id="count-cleaned">{{ "not written yet (run clean)" if n.cleaned is none else n.cleaned }}</td></tr>
<tr><td>quarantined</td><td class="num" id="count-quarantined">{{ n.quarantined }}</td></tr>
</table>
<h3>Quarantined, by stage and reason</h3>
{% if n.quarantine %}
<table id="quarantine">
<tr><th>stage</th><th>reason</th><th>rows</th></tr>
{% for q in n.quarantine %}<tr><td>{{ q.stage }}</td><td>{{ q.reason }}</td><td class="num">{{ q.rows }}</td></tr>
{% endfor %}</table>
{% else %}<p class="note">Nothing quarantined.</p>{% endif %}
</section>

<section id="histogram">
<h2>ERS histogram</h2>
<img class="plot" alt="ERS histogram, recognizable and unrecognizable crops, gamma marked" src="{{ histogram_uri }}">
</section>

<section id="crops">
<h2>Crops by ERS band</h2>
<p>Borders: <span style="color:#e07b14">orange</span> = unrecognizable (ERS &lt; gamma),
<span style="color:#2f6fbf">blue</span> = recognizable. Up to {{ thumbnails_per_band }} crops per band.</p>
{% for band in bands %}
<div class="band" id="band-{{ band.name }}">
<h3>{{ band.title }}</h3>
{% if band.cells %}<div class="thumbs">
{% for cell in band.cells %}<figure class="{{ 'rec' if cell.crop.recognizable else 'unrec' }}" title="{{ cell.tooltip }}">
{% if cell.uri %}<img alt="crop {{ cell.crop.image_id }}" src="{{ cell.uri }}">{% elif cell.crop.image_bytes is none %}<div class="undecodable">no image (imported vector)</div>{% else %}<div class="undecodable">cannot decode</div>{% endif %}
<figcaption>{{ "%.4f"|format(cell.crop.ers) }}{% if cell.crop.identity %} · {{ cell.crop.identity }}{% endif %}</figcaption>
</figure>
{% endfor %}</div>{% else %}<p class="note">No crop in this band.</p>{% endif %}
</div>
{% endfor %}
</section>

<section id="map">
<h2>Embedding map</h2>
{% if map_uri %}<img class="plot" alt="PCA map of sampled embeddings, UI members highlighted" src="{{ map_uri }}">
<p>PCA of {{ map_points }} embeddings sampled from {{ map_total }} (seeded); ringed points are members of the
unrecognizable-identity cluster, the cross is its centroid.</p>
{% else %}<p class="note">Too few embeddings for a map ({{ map_points }}).</p>{% endif %}
</section>

<section id="evaluation">
<h2>Evaluation</h2>
{% if e %}
<p>Newest <code>evaluate</code> run <code>{{ e.run.run_id }}</code> ({{ e.run.started_at }}): model <code>{{ e.run.model }}</code>,
UIC <code>{{ e.run.uic_id }}</code>{% if e.run.gamma is not none %}, gamma {{ "%.4f"|format(e.run.gamma) }}{% endif %}{% if e.run.pairs_source %}, pairs from {{ e.run.pairs_source }}{% endif %}.</p>
<details><summary>parameters and input versions</summary><pre>{{ eval_params_json }}</pre></details>
{% if det_uri %}<div id="det"><h3>DET curves, with and without unsure</h3>
<img class="plot" alt="DET curves" src="{{ det_uri }}"><p class="note">{{ det_how_to_read }}</p></div>{% endif %}
{% if edc_uri %}<div id="edc"><h3>Error versus discard (EDC): ERS, feature norm, random</h3>
<img class="plot" alt="EDC curves" src="{{ edc_uri }}"><p class="note">{{ edc_how_to_read }}</p></div>{% endif %}
{% for table in metric_tables %}
<div id="metrics-{{ table.protocol }}"><h3>{{ protocol_titles[table.protocol] }}</h3>
<table><tr><th>method</th>{% for col in table.columns %}<th>{{ col }}</th>{% endfor %}</tr>
{% for method, cells in table.rows %}<tr><td>{{ method }}</td>{% for cell in cells %}<td class="num"{% if cell.count is not none %} title="n = {{ cell.count }}"{% endif %}>{{ cell.text }}</td>{% endfor %}</tr>
{% endfor %}</table></div>
{% endfor %}
{% else %}
<p class="note" id="no-evaluation">No <code>evaluate</code> run in this lake. <code>ers-spark evaluate</code> (crops with
identities, or a pairs file) adds DET and EDC curves, identification and set-pooling tables here.</p>
{% endif %}
</section>

<section id="runs">
<h2>Runs and table versions</h2>
<table id="run-table">
<tr><th>stage</th><th>started</th><th>seconds</th><th>counts</th><th>read versions</th><th>wrote versions</th><th>parameters</th></tr>
{% for r in c.runs %}<tr><td>{{ r.stage }}</td><td>{{ r.started_at }}</td><td class="num">{{ "%.1f"|format(r.seconds) }}</td>
<td>{% for k, v in r.counts.items() %}{{ k }}={{ v }}<br>{% endfor %}</td>
<td>{% for k, v in r.input_versions.items() %}{{ k }} v{{ v }}<br>{% endfor %}</td>
<td>{% for k, v in r.output_versions.items() %}{{ k }} v{{ v }}<br>{% endfor %}</td>
<td><details><summary>{{ r.params|length }} keys</summary><pre>{{ r.params|tojson(indent=1) }}</pre></details></td></tr>
{% endfor %}</table>
<h3>Current table versions</h3>
<table id="version-table"><tr><th>table</th><th>Delta version</th></tr>
{% for name, version in c.table_versions.items() %}<tr><td>{{ name }}</td><td class="num">{{ "absent" if version is none else version }}</td></tr>
{% endfor %}</table>
</section>
</body>
</html>
"""
