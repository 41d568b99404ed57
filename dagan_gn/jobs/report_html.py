"""The release card's page: figures as embedded PNGs and one HTML document written with f-strings.

Every text that comes from data goes through :func:`html.escape`; every image is a ``data:image/png;base64`` URI, so
the page opens from a file or an e-mail attachment and asks no server for anything (no script, no font, no link).
"""

from __future__ import annotations

import base64
import html
import io
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["tile_grid", "histogram_png", "render_card"]

_TILE = 112  # px per tile on the page
_GAP = 4


def tile_grid(rows: Sequence[Sequence[np.ndarray]], *, tile: int = _TILE, gap_after: Sequence[int] = (),
              columns: int | None = None) -> bytes:
    """A PNG of image rows: each image ``[C, H, W]`` in [0, 1] (1 or 3 channels) scaled to ``tile`` px; a wider
    gap follows each column in ``gap_after`` (``(0,)``: a source apart from its variants; ``(1, 3)``: pairs)."""
    from PIL import Image

    ncol = columns or max((len(r) for r in rows), default=1)
    wide = 4 * _GAP
    offsets = [_GAP + c * (tile + _GAP) + wide * sum(1 for g in gap_after if g < c) for c in range(ncol)]
    width = offsets[-1] + tile + _GAP
    height = len(rows) * (tile + _GAP) + _GAP
    sheet = Image.new("RGB", (width, max(height, 1)), (255, 255, 255))
    for r, row in enumerate(rows):
        for c, img in enumerate(row):
            a = np.asarray(img, np.float32)
            a = a[0] if a.shape[0] == 1 else np.moveaxis(a[:3], 0, -1)
            pil = Image.fromarray((np.clip(a, 0, 1) * 255 + 0.5).astype(np.uint8))
            pil = pil.convert("RGB").resize((tile, tile), Image.Resampling.LANCZOS
                                            if pil.width > tile else Image.Resampling.NEAREST)
            sheet.paste(pil, (offsets[c], _GAP + r * (tile + _GAP)))
    buf = io.BytesIO()
    sheet.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def histogram_png(members: np.ndarray, nonmembers: np.ndarray, *, xlabel: str, labels: tuple[str, str]) -> bytes:
    """Overlaid histograms of a score for members and non-members (a small PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.0, 2.6), dpi=100)
    both = np.concatenate([members, nonmembers])
    bins = np.linspace(float(both.min()), float(both.max()) + 1e-9, 30)
    ax.hist(members, bins=bins, alpha=0.6, density=True, label=labels[0], color="#c0392b")
    ax.hist(nonmembers, bins=bins, alpha=0.6, density=True, label=labels[1], color="#2e86c1")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("density")
    ax.legend(fontsize=8, frameon=False)
    fig.tight_layout()
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png")
    finally:
        plt.close(fig)
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------ HTML
_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; max-width: 980px; margin: 24px auto;
       padding: 0 16px; color: #222; line-height: 1.4; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: 4px; }
table { border-collapse: collapse; margin: 8px 0; font-size: 0.92em; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f4f4f4; } td.n { text-align: right; font-variant-numeric: tabular-nums; }
.verdict { padding: 8px 12px; border-left: 6px solid #999; background: #f7f7f7; margin: 10px 0; }
.pass { border-color: #27ae60; } .fail { border-color: #c0392b; } .warn { border-color: #e67e22; }
.s-pass { color: #1e8449; } .s-fail { color: #c0392b; } .s-warn { color: #ca6f1e; }
.status { font-weight: bold; text-transform: uppercase; margin-right: 6px; }
.threshold { color: #666; font-size: 0.85em; display: block; margin-top: 2px; }
.small { color: #555; font-size: 0.88em; } figure { margin: 8px 0; } figcaption { font-size: 0.85em; color: #555; }
code { background: #f0f0f0; padding: 0 3px; }
"""


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _num(x: Any, digits: int = 3) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, (int, np.integer)) and not isinstance(x, bool):
        return str(int(x))
    try:
        return f"{float(x):.{digits}f}"
    except (TypeError, ValueError):
        return _e(x)


def _img(png: bytes | None, alt: str, caption: str = "") -> str:
    if png is None:
        return ""
    uri = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
    cap = f"<figcaption>{_e(caption)}</figcaption>" if caption else ""
    return f'<figure><img src="{uri}" alt="{_e(alt)}">{cap}</figure>'


def _table(header: Sequence[str] | None, rows: Sequence[Sequence[Any]]) -> str:
    head = "<tr>" + "".join(f"<th>{_e(h)}</th>" for h in header) + "</tr>" if header else ""
    body = "".join("<tr>" + "".join(_cell(c) for c in r) + "</tr>" for r in rows)
    return f"<table>{head}{body}</table>"


class _Raw(str):
    """Already-escaped HTML for a table cell."""


_NUMERIC = re.compile(r"[-+]?[\d.]+( ?%)?( \(\d+\))?( ± [\d.]+| ± n/a)?|n/a|\[[-\d., ]+\]")


def _cell(c: Any) -> str:
    text = c if isinstance(c, _Raw) else _e(c)
    numeric = isinstance(c, (int, float, np.integer, np.floating)) or bool(_NUMERIC.fullmatch(str(c)))
    return f"<td class='n'>{text}</td>" if numeric else f"<td>{text}</td>"


def _verdict(v: dict[str, str]) -> str:
    status = v["status"]
    css = status if status in ("pass", "fail", "warn") else ""
    return (f'<div class="verdict {css}"><span class="status">{_e(status)}</span>{_e(v["text"])}'
            f'<span class="threshold">threshold: {_e(v["threshold"])}</span></div>')


def _what(d: dict[str, Any]) -> str:
    w = d["what"]
    classes = w["class_names"]
    splits = list(next(iter(w["real"]["counts"].values()), {}))
    rows = []
    for name in ("real", "synthetic"):
        counts = w[name]["counts"]
        for c in classes:
            rows.append([name, c] + [counts.get(c, {}).get(s, 0) for s in splits])
    ck = w["checkpoint"]
    gen = ", ".join(f"{k} {v}" for k, v in w["generator"].items())
    versions = ", ".join(f"{k} {v}" for k, v in w["tool"]["versions"].items())
    facts = [
        ["real patches", f"{w['real']['file']} · sha256 {w['real']['sha256']}… · salt fingerprint "
                         f"{w['real']['salt_fingerprint'] or 'n/a'} · {w['real']['patches']} patches of "
                         f"{w['real']['channels']}×{w['real']['patch_size']} px"],
        ["synthetic set", f"{w['synthetic']['file']} · sha256 {w['synthetic']['sha256']}… · "
                          f"{w['synthetic']['patches']} patches · {w['synthetic']['variants_per_source']} variants "
                          f"per source of the {w['synthetic']['source_split']} split · truncation "
                          f"{w['synthetic']['truncation']}"],
        ["rejected as off-class", "n/a (not recorded in the synthetic file)" if w["synthetic"]["rejected_share"]
         is None else f"{100 * w['synthetic']['rejected_share']:.1f} % of generated variants"],
        ["checkpoint", f"step {ck.get('step')} · sha256 {str(ck.get('sha256'))[:16]}… · EMA weights "
                       f"{ck.get('used_ema')}" + (f" · given: {ck['given_file']} (sha256 "
                                                  f"{ck['given_sha256'][:16]}…)" if ck.get("given_sha256") else "")],
        ["generator", gen or "n/a"],
        ["figures computed with", f"{versions}; device {w['tool']['device']}; seed {w['tool']['seed']}"],
        ["synthetic set made by", f"dagan-gn {w['tool']['synthetic_made_by']}"],
    ]
    return (_verdict(d["sections"]["what"]["verdict"]) + _table(None, facts)
            + "<p class='small'>Patches per class and split (no path, patient pseudonym or DICOM identifier appears "
              "on this page):</p>" + _table(["file", "class", *splits], rows))


def _looks(d: dict[str, Any], figures: dict[str, bytes]) -> str:
    parts = [_verdict(d["sections"]["looks"]["verdict"])]
    for c in d["what"]["class_names"]:
        if f"contact_{c}" in figures:
            parts.append(f"<h3>{_e(c)}</h3>" + _img(figures[f"contact_{c}"], f"contact sheet {c}",
                                                    "first column: a real source patch; then its DAGAN variants"))
    parts.append("<h3>Random real (top) vs synthetic (bottom)</h3>"
                 + _img(figures.get("real_vs_synthetic"), "random real and synthetic patches",
                        "top row: random real training patches; bottom row: random synthetic patches"))
    return "".join(parts)


def _quality(d: dict[str, Any]) -> str:
    q = d["sections"]["quality"]
    parts = [_verdict(q["verdict"])]
    a = q.get("assess")
    if a:
        names = {"pixel": "pixel L1", "ms_ssim": "1 − MS-SSIM", "feature": "classifier features (L2)"}
        rows = [[names.get(s, s), _Raw(f"{_num(v['diversity'])} ± {_num(v['diversity_ci95'])}"),
                 _Raw(f"{_num(v['source_distance'])} ± {_num(v['source_distance_ci95'])}")]
                for s, v in a["spaces"].items()]
        parts.append(f"<p>From <code>dagan assess</code>: {a['sources']} sources × {a['variants_per_source']} "
                     "variants; ratios to the distance between random real patches of the same class (1 = as varied "
                     "as real data, 0 = copies), mean ± 95 % CI.</p>"
                     + _table(["space", "diversity", "distance to source"], rows))
        cc = a.get("class_consistency")
        if cc:
            parts.append(_table(["set", "n", "accuracy", "balanced accuracy"],
                                [["variants", cc["variants"]["n"], _num(cc["variants"]["accuracy"]),
                                  _num(cc["variants"]["balanced_accuracy"])],
                                 ["held-out real", cc["heldout"]["n"], _num(cc["heldout"]["accuracy"]),
                                  _num(cc["heldout"]["balanced_accuracy"])]]))
        fd = a.get("fidelity")
        if fd:
            parts.append(_table(["KID vs held-out", "mean", "std over subsets"],
                                [["variants", _num(fd.get("kid_mean"), 5), _num(fd.get("kid_std"), 5)],
                                 ["real floor", _num(fd.get("floor_kid_mean"), 5), _num(fd.get("floor_kid_std"), 5)]]))
    ev = q.get("evaluate")
    if ev:
        parts.append("<p>From <code>dagan evaluate</code>:</p>"
                     + _table(["measure", "value"], [[k, _num(v, 5) if not isinstance(v, str) else v]
                                                     for k, v in ev.items()]))
    return "".join(parts)


def _usefulness(d: dict[str, Any]) -> str:
    u = d["sections"]["usefulness"]
    parts = [_verdict(u["verdict"])]
    if u.get("table"):
        metrics = sorted({m for r in u["table"].values() for m in r})
        rows = [[regime] + [_Raw(f"{_num(r[m]['mean'])} ± {_num(r[m]['ci95'])}")
                            if m in r and r[m]["mean"] is not None else "n/a"
                            for m in metrics] for regime, r in u["table"].items()]
        parts.append(f"<p>From <code>dagan evaluate-augmentation</code>: the same classifier trained under each regime "
                     f"on {u.get('n_train')} real training patches, tested on {u.get('n_test')} held-out patches; "
                     f"mean ± 95 % CI over {u.get('seeds')} seeds.</p>" + _table(["regime", *metrics], rows))
    return "".join(parts)


def _privacy(d: dict[str, Any], figures: dict[str, bytes]) -> str:
    p = d["sections"]["privacy"]
    m, mia = p["memorization"], p["membership"]
    parts = [_verdict(p["verdict"]), "<h3>Memorization</h3>", _verdict(m["verdict"]),
             f"<p>Each of {m['n_synthetic']} synthetic patches against its nearest of {m['n_train']} training "
             f"patches; baseline: {m['n_heldout']} held-out real patches of other patients.</p>"]
    rows = [[s, _num(v["threshold"], 4), _num(v["heldout_median"], 4), _num(v["synthetic_median"], 4),
             _num(v["median_ratio"]), f"{100 * v['near_copy_fraction']:.2f} % ({v['near_copies']})",
             f"{100 * v['source_copy_fraction']:.2f} %", v["patient_copies"]] for s, v in m["spaces"].items()]
    parts.append(_table(["space", "near-copy threshold", "held-out NN median", "synthetic NN median",
                         "median ratio", "near-copies", "copies of own source", "patient copies"], rows))
    if m["failures"]:
        parts.append("<ul>" + "".join(f"<li>{_e(f)}</li>" for f in m["failures"]) + "</ul>")
    if "closest_pairs" in figures:
        pairs = m["closest_pairs"]
        desc = "; ".join(f"pair {i + 1}: synthetic row {pair['synthetic_row']}, distance {pair['distance']:.3g}"
                         + (" (patient copy)" if pair["patient_copy"] else "") for i, pair in enumerate(pairs))
        space = pairs[0]["space"] if pairs else "pixel"
        parts.append(_img(figures["closest_pairs"], "closest synthetic and training pairs",
                          f"each pair: a synthetic patch, then its nearest training patch ({space} space); "
                          f"offending pairs first, then the closest ones. {desc}"))
    parts.append("<h3>Membership inference</h3>")
    parts.append(_verdict(mia["verdict"]))
    parts.append(
        f"<p>Can someone who holds the synthetic set tell whether a real patch was used for training? "
        f"{mia['n_members']} training patches (members) against {mia['n_nonmembers']} held-out patches of other "
        "patients (non-members). <b>Distance</b>: a patch is judged a member the closer it lies to its nearest "
        "synthetic patch (Chen et al., GAN-Leaks, CCS 2020). <b>DOMIAS</b> (van Breugel et al., AISTATS 2023): "
        "judged a member where the synthetic data are denser than real data "
        f"(kernel density ratio; reference: {mia['n_reference']} other held-out patches). AUC 0.5: no better than "
        "chance; 1: every member found. A DAGAN makes variants of training patches, so a high distance AUC says "
        "its variants stay close to their sources.</p>")
    rows = [[a["attack"], a["space"], _num(a["auc"]), f"[{_num(a['ci_low'])}, {_num(a['ci_high'])}]",
             a["n_members"], a["n_nonmembers"]] for a in mia["attacks"]]
    if rows:
        parts.append(_table(["attack", "space", "AUC", "95 % bootstrap CI", "members", "non-members"], rows))
    parts.append(_img(figures.get("membership_hist"), "distance to the nearest synthetic patch",
                      "distance of members and non-members to their nearest synthetic patch"))
    return "".join(parts)


def render_card(data: dict[str, Any], figures: dict[str, bytes]) -> str:
    """The release card as one HTML document (UTF-8, no external resource)."""
    sections = data["sections"]
    summary = "".join(
        f"<tr><td>{_e(name)}</td><td class='s-{_e(sections[name]['verdict']['status'].replace(' ', '-'))}'>"
        f"<b>{_e(sections[name]['verdict']['status'])}</b></td><td style='text-align:left'>"
        f"{_e(sections[name]['verdict']['text'])}</td></tr>"
        for name in ("what", "looks", "quality", "usefulness", "privacy"))
    notes = "".join(f"<li>{_e(n)}</li>" for n in data.get("notes", []))
    body = [
        f"<h1>{_e(data['title'])}</h1>",
        f"<p class='small'>{_e(data['what']['synthetic']['file'])} from {_e(data['what']['real']['file'])}; "
        "every figure is on this page (nothing is loaded from elsewhere); the numbers are in card.json.</p>",
        f"<table><tr><th>section</th><th>verdict</th><th>in plain words</th></tr>{summary}</table>",
        "<h2>What it is</h2>", _what(data),
        "<h2>Looks</h2>", _looks(data, figures),
        "<h2>Quality</h2>", _quality(data),
        "<h2>Usefulness</h2>", _usefulness(data),
        "<h2>Privacy</h2>", _privacy(data, figures),
    ]
    if notes:
        body.append(f"<h2>Notes</h2><ul>{notes}</ul>")
    return ("<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
            f"<title>{_e(data['title'])}</title><style>{_CSS}</style></head>\n<body>\n"
            + "\n".join(body) + "\n</body></html>\n")
