"""The standalone QC page of a dataset: one self-contained HTML file (no scripts, no external files).

:func:`render_page` turns the entries that :func:`sct_deepseg_epi.qc.build_entry` makes into
the page; :mod:`sct_deepseg_epi.qc` decides where it goes and writes it.
"""
from __future__ import annotations

import html
from pathlib import Path

# in every page this program writes: a page without it is someone else's and is never replaced
PAGE_MARK = b'<meta name="generator" content="sct_deepseg_epi">'

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px;background:#111;color:#ddd}
h1{font-size:20px;margin:0 0 4px} h2{font-size:17px;margin:28px 0 6px;border-top:1px solid #444;padding-top:14px}
h3{font-size:14px;margin:14px 0 6px;color:#aaa} a{color:#7cf} .meta{color:#999;font-size:13px}
table{border-collapse:collapse;font-size:13px} td,th{border:1px solid #444;padding:3px 7px;text-align:right}
th{background:#222} td.l,th.l{text-align:left} .warn{color:#fb4} .ok{color:#7d7}
.mosaic{display:flex;flex-wrap:wrap;gap:6px} figure{margin:0;text-align:center;font-size:12px}
figure img{display:block;image-rendering:pixelated;border:2px solid #3a3} figure.nocord img{border-color:#a33}
figure.flag img{border:3px dashed #fb4} figure.flag figcaption{color:#fb4}
figure.prompt img{border:3px solid #3d5} figure.prompt figcaption{color:#3d5}
.legend{font-size:12px;color:#aaa;margin:4px 0} .sw{display:inline-block;width:10px;height:10px;margin:0 3px 0 10px}
svg text{fill:#aaa;font-size:10px}
"""


def _area_chart(areas: list[float]) -> str:
    w, h, top = 22, 80, max(max(areas), 1e-6)
    bars = []
    for i, a in enumerate(areas):
        bh = h * a / top
        colour = "#5a5" if a > 0 else "#a33"
        bars.append(f'<rect x="{i * w + 2}" y="{h - bh + 4:.1f}" width="{w - 4}" height="{max(bh, 1):.1f}" fill="{colour}"/>'
                    f'<text x="{i * w + w / 2}" y="{h + 16}" text-anchor="middle">{i}</text>')
    return (f'<svg width="{len(areas) * w + 4}" height="{h + 22}" role="img" aria-label="cord area per slice">'
            + "".join(bars) + "</svg>")


def entry_html(e: dict, anchor: str) -> str:
    esc = html.escape
    gaps = [i for i, n in enumerate(e["slices_with_cord"]) if n < e["n_slices"]]
    status = ('<span class="ok">cord in every slice</span>' if not gaps else
              f'<span class="warn">slices without cord in {len(gaps)} of {e["n_volumes"]} volume(s)</span>')
    if max(e["slices_with_cord"]) == 0:
        status = '<span class="warn">no cord found</span>'
    if e.get("flagged"):
        status += (f' &middot; <span class="warn">{len(e["flagged"])} slice(s) to check first: z='
                   + ", ".join(map(str, e["flagged"])) + "</span>")
    out = [f'<h2 id="{anchor}">{esc(e["subject"])} &middot; {esc(Path(e["input"]).name)}</h2>',
           f'<div class="meta">mask {esc(e["mask"])}' + (f' &middot; model {esc(e["model"])}' if e["model"] else "")
           + f' &middot; {esc(e["date"])}<br>voxel {" x ".join(map(str, e["voxel_mm"]))} mm &middot; '
           f'{e["n_slices"]} slices &middot; {e["n_volumes"]} volume(s) &middot; cord volume {e["cord_volume_mm3"]} mm&sup3; '
           f'&middot; {status}'
           + (f'<br>command: <code>{esc(e["command"])}</code>' if e["command"] else "") + "</div>"]
    for v in e["volumes"]:
        areas = [s["area_mm2"] for s in v["slices"]]
        n_cord = sum(s["cord"] for s in v["slices"])
        dis = "" if v["mean_disagreement"] is None else f' &middot; mean disagreement in the mask {v["mean_disagreement"]}'
        out.append(f'<h3>{esc(v["label"])}: cord in {n_cord} of {len(areas)} slices{dis}</h3>')
        out.append('<div class="legend">each slice: the image with the mask outline (red); under it, the ensemble '
                   'disagreement from <span class="sw" style="background:#fd2"></span>low to <span class="sw" '
                   'style="background:#f31"></span>high, with the outline in blue. Anterior up, patient\'s right on '
                   'the left; a red frame marks a slice without cord, a dashed orange frame a slice to check '
                   '(reasons under it; the mask\'s sidecar lists them per slice), a green frame a slice corrected by '
                   'points (-prompt: a green cross on the cord, a magenta one on what is not cord).</div>'
                   '<div class="mosaic">')
        for s in v["slices"]:
            flag = s.get("flag")
            cls = ' class="flag"' if flag else "" if s["cord"] else ' class="nocord"'
            cap = f'z={s["z"]} &middot; {s["area_mm2"]:g} mm&sup2;' if s["cord"] else f'z={s["z"]} &middot; no cord'
            if flag:
                cap += "<br>check: " + esc(", ".join(flag["reasons"]).replace("_", " ")) + (
                    f' (file slice {flag["slice"]})' if flag["slice"] != s["z"] else "")
            for pt in s.get("prompts", []):
                cap += "<br>point: " + ("cord" if pt["value"] == 1 else "not cord") + f' ({esc(pt["effect"])})'
            if s.get("prompts"):
                cls = ' class="prompt"'  # corrected by the user: their points say more than the flags
            out.append(f'<figure{cls}><img alt="slice {s["z"]}" src="data:image/png;base64,{s["png"]}">'
                       f"<figcaption>{cap}</figcaption></figure>")
        out.append("</div>")
        out.append('<h3>cord area per slice (mm&sup2;)</h3>' + _area_chart(areas))
        out.append('<table><tr><th class="l">slice</th>' + "".join(f"<th>{s['z']}</th>" for s in v["slices"])
                   + '</tr><tr><td class="l">area</td>' + "".join(f"<td>{a:g}</td>" for a in areas) + "</tr></table>")
    return "\n".join(out)


def render_page(dataset: str, entries: list[dict]) -> str:
    """The self-contained HTML page of one dataset."""
    from . import __version__

    esc = html.escape
    entries = sorted(entries, key=lambda e: (e["subject"], e["input"]))
    rows = []
    for i, e in enumerate(entries):
        n_cord = min(e["slices_with_cord"])
        cls = "ok" if n_cord == e["n_slices"] else "warn"
        n_flag = len(e.get("flagged", []))
        rows.append(f'<tr><td class="l"><a href="#e{i}">{esc(e["subject"])}</a></td><td class="l">{esc(Path(e["input"]).name)}</td>'
                    f'<td class="{cls}">{n_cord}/{e["n_slices"]}</td><td class="{"warn" if n_flag else "ok"}">{n_flag}</td>'
                    f'<td>{e["cord_volume_mm3"]}</td><td class="l">{esc(e["date"])}</td></tr>')
    body = "\n".join(entry_html(e, f"e{i}") for i, e in enumerate(entries))
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"{PAGE_MARK.decode()}"
            f"<title>QC {esc(dataset)} - sct_deepseg_epi</title><style>{_CSS}</style></head><body>\n"
            f"<h1>Spinal cord segmentation QC: {esc(dataset)}</h1>"
            f'<div class="meta">sct_deepseg_epi {esc(__version__)} &middot; {len(entries)} image(s)</div>\n'
            '<table><tr><th class="l">subject</th><th class="l">image</th><th>slices with cord (min over volumes)</th>'
            '<th>slices to check</th>'
            f'<th>cord volume (mm&sup3;)</th><th class="l">date</th></tr>{"".join(rows)}</table>\n{body}\n</body></html>\n')
