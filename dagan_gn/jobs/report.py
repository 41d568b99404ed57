"""The ``report`` job: one self-contained HTML release card for a synthetic set, and the same figures as JSON.

A data-governance board and the clinicians who must accept a synthetic set get one page: what it is (tool, versions,
device, checkpoint, counts), how it looks (contact sheets per class, random real vs synthetic tiles), its quality
(``dagan assess`` / ``dagan evaluate`` figures when given), its usefulness (``dagan evaluate-augmentation`` when
given) and its privacy (the memorization check and two black-box membership-inference attacks, computed here), each
section closed by a verdict line that names its threshold.

The page is meant to leave the hospital: it names inputs by base name or hash only, shows pseudonymous fingerprints,
never a path, a patient pseudonym or a DICOM identifier, and loads nothing from outside (images are embedded as
``data:`` URIs). ``card.html`` and ``card.json`` are written atomically.

The sections what, looks, quality and usefulness are built here, the privacy section (which runs the memorization
check and the membership attacks) in ``report_privacy.py``; the HTML is rendered in ``report_html.py`` and the
metrics themselves live in ``metrics/`` (membership, memorization, diversity).
"""

from __future__ import annotations

import json
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dagan_gn.errors import DaganError
from dagan_gn.jobs.report_verdicts import THRESHOLDS, as_unit as _as_unit, verdict as _verdict

__all__ = ["ReportError", "ReleaseCard", "release_card", "THRESHOLDS"]


class ReportError(DaganError, ValueError):
    """Inputs the release card cannot be made from (not a synthetic file, mismatched files, unreadable JSON)."""


@dataclass
class ReleaseCard:
    """What :func:`release_card` wrote: the card as a JSON-ready dict, the HTML text and the output paths."""

    data: dict[str, Any]
    html: str
    files: dict[str, Path] = field(default_factory=dict)

    @property
    def verdicts(self) -> dict[str, dict[str, str]]:
        return {k: v["verdict"] for k, v in self.data["sections"].items()}

    def summary(self) -> str:
        lines = [f"release card for {self.data['what']['synthetic']['file']}:"]
        for name, v in self.verdicts.items():
            lines.append(f"  {name:<11} {v['status']:<13} {v['text']}")
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ small helpers
def _versions() -> dict[str, str]:
    from importlib import metadata

    import dagan_gn

    out = {"dagan-gn": dagan_gn.__version__, "python": platform.python_version()}
    for pkg in ("torch", "numpy", "scipy", "h5py", "monai", "torch-fidelity", "pydicom", "scikit-image", "typer"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def _device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda})"
    return f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"


def _base_names(value: Any) -> Any:
    """``value`` with every path-like string reduced to its base name (a folder may name a patient)."""
    if isinstance(value, dict):
        return {k: _base_names(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_base_names(v) for v in value]
    if isinstance(value, str) and ("/" in value or "\\" in value):
        return Path(value.replace("\\", "/")).name
    return value


def _read_json(path: Path | None, what: str) -> dict[str, Any] | None:
    if path is None:
        return None
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ReportError(f"{what} {path}: cannot read it as JSON ({exc})") from exc


def _finite(x: Any) -> float | None:
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return x if np.isfinite(x) else None


def _json_ready(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return _finite(value)
    if isinstance(value, np.ndarray):
        return _json_ready(value.tolist())
    return value


def _counts(pf: Any) -> dict[str, dict[str, int]]:
    """Class → split → number of patches."""
    labels, split = np.asarray(pf.labels[:]), np.asarray(pf.split[:])
    return {c: {s: int(((labels == ci) & (split == si)).sum()) for si, s in enumerate(pf.split_names)}
            for ci, c in enumerate(pf.class_names)}


# ------------------------------------------------------------------------------------------------ sections
def _what(real: Any, syn: Any, real_path: Path, syn_path: Path, checkpoint: Path | None, device: torch.device,
          seed: int) -> tuple[dict[str, Any], list[str]]:
    from dagan_gn.fileio import sha256_file

    notes: list[str] = []
    attrs = syn.attrs
    ckpt: dict[str, Any] = {"sha256": attrs.get("checkpoint_sha256"), "step": attrs.get("checkpoint_step"),
                            "used_ema": attrs.get("used_ema")}
    if checkpoint is not None:
        from dagan_gn.training.checkpoint import checkpoint_step, resolve_checkpoint

        path = resolve_checkpoint(checkpoint)
        given = sha256_file(path)
        ckpt.update(given_sha256=given, given_step=checkpoint_step(path), given_file=path.name)
        if ckpt["sha256"] and given != ckpt["sha256"]:
            notes.append(f"the checkpoint given ({path.name}, sha256 {given[:12]}…) is not the one that made the "
                         f"synthetic set (sha256 {str(ckpt['sha256'])[:12]}…)")
    config = {}
    if attrs.get("generator_config"):
        try:
            config = _base_names(json.loads(attrs["generator_config"]))
        except ValueError:
            notes.append("the synthetic file's generator_config attribute is not JSON")
    params = _base_names(syn.parameters)
    rejected = _finite(attrs.get("rejected_share"))
    what = {
        "tool": {"versions": _versions(), "device": _device_description(device), "seed": seed,
                 "synthetic_made_by": attrs.get("tool_version")},
        "checkpoint": ckpt,
        "generator": {k: config.get("model", {}).get(k) for k in ("name", "image_size", "num_classes", "g_width",
                                                                 "z_dim", "norm") if k in config.get("model", {})},
        "generator_config": config,
        "real": {"file": real_path.name, "sha256": sha256_file(real_path)[:16],
                 "salt_fingerprint": real.attrs.get("salt_fingerprint"), "patches": len(real),
                 "patch_size": int(real.patch_size), "channels": int(real.channels), "counts": _counts(real)},
        "synthetic": {"file": syn_path.name, "sha256": sha256_file(syn_path)[:16], "patches": len(syn),
                      "variants_per_source": params.get("n_per_source"), "truncation": params.get("truncation"),
                      "source_split": params.get("split"), "counts": _counts(syn), "rejected_share": rejected},
        "class_names": list(real.class_names),
    }
    return what, notes


def _looks(real: Any, syn: Any, rng: np.random.Generator, *, sources_per_class: int = 4,
           variants_shown: int = 6, tiles: int = 8) -> tuple[dict[str, Any], dict[str, bytes]]:
    from dagan_gn.jobs.report_html import tile_grid

    src = syn.provenance("source_index").astype(np.int64) if "source_index" in syn.provenance_columns else None
    syn_labels = np.asarray(syn.labels[:])
    figures: dict[str, bytes] = {}
    sheets: dict[str, Any] = {}
    if src is not None:
        for ci, name in enumerate(real.class_names):
            rows = np.flatnonzero(syn_labels == ci)
            if len(rows) == 0:
                continue
            sources = np.unique(src[rows])
            chosen = np.sort(rng.choice(sources, min(sources_per_class, len(sources)), replace=False))
            grid, layout = [], []
            for s in chosen:
                var_rows = rows[src[rows] == s][:variants_shown]
                grid.append([_as_unit(real.read_patches([int(s)], signed=True)[0])]
                            + list(_as_unit(syn.read_patches(var_rows, signed=True))))
                layout.append({"source_row": int(s), "synthetic_rows": var_rows.tolist()})
            figures[f"contact_{name}"] = tile_grid(grid, gap_after=(0,))
            sheets[name] = layout
    real_train = real.split_indices("train") if "train" in real.split_names else np.arange(len(real))
    pick_real = np.sort(rng.choice(real_train, min(tiles, len(real_train)), replace=False))
    pick_syn = np.sort(rng.choice(len(syn), min(tiles, len(syn)), replace=False))
    figures["real_vs_synthetic"] = tile_grid([list(_as_unit(real.read_patches(pick_real, signed=True))),
                                              list(_as_unit(syn.read_patches(pick_syn, signed=True)))])
    return {"contact_sheets": sheets, "random_tiles": {"real_rows": pick_real.tolist(),
                                                       "synthetic_rows": pick_syn.tolist()}}, figures


def _quality(assess: dict[str, Any] | None, evaluate: dict[str, Any] | None) -> dict[str, Any]:
    t = THRESHOLDS
    out: dict[str, Any] = {"assess": None, "evaluate": None}
    verdicts = []
    if assess is not None:
        div, dist = assess.get("diversity", {}), assess.get("source_distance", {})
        out["assess"] = {
            "sources": assess.get("n_sources"), "variants_per_source": assess.get("variants_per_source"),
            "spaces": {s: {"diversity": div[s].get("mean"), "diversity_ci95": div[s].get("ci95"),
                           "source_distance": dist.get(s, {}).get("mean"),
                           "source_distance_ci95": dist.get(s, {}).get("ci95")} for s in div},
            "class_consistency": assess.get("class_consistency"), "fidelity": assess.get("fidelity"),
            "notes": assess.get("notes", []),
        }
        pix = div.get("pixel", {}).get("mean")
        to_src = dist.get("pixel", {}).get("mean")
        if pix is not None:
            if pix >= t["diversity_ok"]:
                verdicts.append(("pass", f"variants of one source are varied (pixel diversity {pix:.2f} of real "
                                         "same-class pairs)"))
            elif pix >= t["diversity_copies"]:
                verdicts.append(("warn", f"variants of one source are less varied than real data (pixel diversity "
                                         f"{pix:.2f})"))
            else:
                verdicts.append(("fail", f"variants of one source are near-copies of each other (pixel diversity "
                                         f"{pix:.2f})"))
        if to_src is not None and to_src < t["source_distance_copy"]:
            verdicts.append(("fail", f"variants are copies of their source (distance to source {to_src:.2f})"))
        cc = assess.get("class_consistency")
        if cc:
            v, h = cc["variants"].get("balanced_accuracy"), cc["heldout"].get("balanced_accuracy")
            if v is not None and h is not None:
                ok = v >= h - t["class_consistency_drop"]
                verdicts.append(("pass" if ok else "warn",
                                 f"a classifier trained on real patches finds the variants' class "
                                 f"{'about as well as' if ok else 'less well than'} held-out real patches' "
                                 f"(balanced accuracy {v:.2f} vs {h:.2f})"))
        fd = assess.get("fidelity")
        if fd and fd.get("kid_mean") is not None and fd.get("floor_kid_mean") is not None:
            k, f = fd["kid_mean"], fd["floor_kid_mean"]
            ok = k <= t["kid_floor_factor"] * max(f, 1e-6)
            verdicts.append(("pass" if ok else "warn", f"KID {k:.4f} vs real floor {f:.4f} "
                             f"({'close to' if ok else 'distinguishable from'} real data)"))
        if not cc and not (fd and fd.get("kid_mean") is not None):
            verdicts.append(("warn", "realism not measured (the assess figures hold neither class consistency nor "
                                     "KID): diversity alone cannot tell varied tissue from varied artefacts; look at "
                                     "the contact sheets"))
    if evaluate is not None:
        out["evaluate"] = {k: v for k, v in evaluate.items()
                           if k in ("fid", "kid_mean", "kid_std", "is_mean", "is_std", "step", "feature_extractor",
                                    "split", "model", "device") or k.startswith(("fid", "kid", "is_"))}
        out["evaluate"] = _base_names(out["evaluate"])
    threshold = (f"pixel diversity ≥ {t['diversity_ok']} varied, < {t['diversity_copies']} copies; distance to "
                 f"source < {t['source_distance_copy']} copies; balanced accuracy on variants within "
                 f"{t['class_consistency_drop']} of held-out real; KID ≤ {t['kid_floor_factor']:g}× the real floor")
    if not verdicts:
        v = _verdict("not measured", "no `dagan assess` figures given (pass --assess assess.json)"
                     if assess is None else "the assess figures hold no measure to judge", threshold)
    else:
        worst = "fail" if any(s == "fail" for s, _ in verdicts) else "warn" if any(s == "warn" for s, _ in verdicts) \
            else "pass"
        v = _verdict(worst, "; ".join(text for _, text in verdicts) + ".", threshold)
    out["verdict"] = v
    return out


def _usefulness(downstream: dict[str, Any] | None) -> dict[str, Any]:
    threshold = "real+dagan beats real when its mean is higher and the 95 % CIs do not overlap"
    if downstream is None:
        return {"table": None, "verdict": _verdict("not measured", "no `dagan evaluate-augmentation` figures given "
                                                   "(pass --downstream downstream.json)", threshold)}
    summary = downstream.get("summary", {})
    table = {regime: {m: {"mean": _finite(v[0]), "ci95": _finite(v[1])} for m, v in metrics.items()}
             for regime, metrics in summary.items()}
    base, dagan = table.get("real"), table.get("real+dagan")
    verdict = _verdict("not measured", "the table has no real and real+dagan regimes to compare", threshold)
    if base and dagan:
        metric = "auc" if base.get("auc", {}).get("mean") is not None and dagan.get("auc", {}).get("mean") is not None \
            else "accuracy"
        b, d = base[metric], dagan[metric]
        if b["mean"] is not None and d["mean"] is not None:
            diff = d["mean"] - b["mean"]
            ci_b, ci_d = b["ci95"] or 0.0, d["ci95"] or 0.0
            separated = abs(diff) > ci_b + ci_d
            if separated and diff > 0:
                verdict = _verdict("pass", f"DAGAN variants help: test {metric} {d['mean']:.3f} ± {ci_d:.3f} vs "
                                           f"{b['mean']:.3f} ± {ci_b:.3f} on real data alone", threshold)
            elif separated:
                verdict = _verdict("fail", f"DAGAN variants hurt: test {metric} {d['mean']:.3f} ± {ci_d:.3f} vs "
                                           f"{b['mean']:.3f} ± {ci_b:.3f} on real data alone", threshold)
            else:
                verdict = _verdict("warn", f"no measurable effect: test {metric} {d['mean']:.3f} ± {ci_d:.3f} with "
                                           f"DAGAN variants vs {b['mean']:.3f} ± {ci_b:.3f} without (the CIs "
                                           "overlap)", threshold)
    seeds = downstream.get("config", {}).get("seeds")
    return {"table": table, "n_train": downstream.get("n_train"), "n_test": downstream.get("n_test"),
            "seeds": len(seeds) if isinstance(seeds, list) else seeds, "verdict": verdict}


def _what_verdict(what: dict[str, Any], notes: list[str]) -> dict[str, str]:
    n = what["synthetic"]["patches"]
    what_text = (f"{n} synthetic patches ({what['synthetic']['variants_per_source']} variants per source) from the "
                 f"{what['real']['counts'] and sum(c.get('train', 0) for c in what['real']['counts'].values())} "
                 "training patches of the real file")
    rejected = what["synthetic"]["rejected_share"]
    if rejected is not None:
        what_text += f"; {100 * rejected:.1f} % of the generated variants were rejected as off-class"
    return _verdict("info" if not notes else "warn", what_text + "." + (
        " " + "; ".join(notes) + "." if notes else ""), "the checkpoint given must be the one that made the set")


def _card_data(what: dict[str, Any], notes: list[str], looks: dict[str, Any], quality: dict[str, Any],
               usefulness: dict[str, Any], privacy: dict[str, Any], privacy_notes: list[str], seed: int
               ) -> dict[str, Any]:
    """The card as a JSON-ready dict: the five sections, each with its verdict, and every note."""
    sections = {
        "what": {"verdict": _what_verdict(what, notes)},
        "looks": {"verdict": _verdict("look", "judge by eye: each row is a real source then its variants; a row of "
                                              "identical tiles means the noise is ignored",
                                      "none: for people to look at")},
        "quality": quality,
        "usefulness": usefulness,
        "privacy": privacy,
    }
    return _json_ready({"title": "Synthetic data release card", "what": what, "looks": looks, "sections": sections,
                        "notes": notes + privacy_notes + list(quality.get("assess", {}) and
                                                              quality["assess"].get("notes", []) or []),
                        "thresholds": THRESHOLDS, "seed": seed})


# ------------------------------------------------------------------------------------------------ the job
def release_card(
    real_path: str | os.PathLike,
    synthetic_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    checkpoint: str | os.PathLike | None = None,
    assess_json: str | os.PathLike | None = None,
    evaluate_json: str | os.PathLike | None = None,
    downstream_json: str | os.PathLike | None = None,
    heldout_split: str = "test",
    reference_split: str = "val",
    max_members: int = 2000,
    max_synthetic: int = 5000,
    n_bootstrap: int = 1000,
    device: str = "cpu",
    seed: int = 0,
) -> ReleaseCard:
    """Write ``card.html`` (one self-contained page) and ``card.json`` (the same figures) into ``out_dir``.

    Args:
        real_path: the real patch file the generator was trained on (its ``train`` split: the members).
        synthetic_path: the synthetic file from ``dagan augment``.
        checkpoint: the run folder or checkpoint file, to state and check its hash and step.
        assess_json, evaluate_json, downstream_json: ``dagan assess``, ``dagan evaluate`` and
            ``dagan evaluate-augmentation`` outputs; their sections say "not measured" without them.
        heldout_split: real patches of other patients: the non-members of the membership tests.
        reference_split: real patches for DOMIAS's reference density (half of ``heldout_split`` when too few).
        max_members, max_synthetic: seeded subsets that bound the membership tests' memory and time.
        n_bootstrap: bootstrap resamples of each AUC's 95 % interval.
        device: where distances and features are computed.
        seed: seed of every random choice (tiles, subsets, bootstrap, feature network).
    """
    from dagan_gn.fileio import atomic_write_text, check_writable
    from dagan_gn.jobs.report_html import render_card
    from dagan_gn.jobs.report_privacy import privacy_section
    from dagan_gn.runtime import resolve_device
    from dagan_gn.store.patch_file import PatchFile, synthetic_pairing_problem

    real_path, synthetic_path, out_dir = Path(real_path), Path(synthetic_path), Path(out_dir)
    check_writable(out_dir / "card.html", "--out")
    assess = _read_json(Path(assess_json) if assess_json else None, "--assess")
    evaluate = _read_json(Path(evaluate_json) if evaluate_json else None, "--evaluate")
    downstream = _read_json(Path(downstream_json) if downstream_json else None, "--downstream")
    dev = resolve_device(device)
    rng = np.random.default_rng(seed)
    with PatchFile(real_path) as real, PatchFile(synthetic_path) as syn:
        problem = synthetic_pairing_problem(real, syn, real_path, synthetic_path, same_classes=True)
        if problem:
            raise ReportError(problem)
        if "train" not in real.split_names or len(real.split_indices("train")) == 0:
            raise ReportError(f"{real_path}: no train split: the card needs the generator's training patches")
        what, notes = _what(real, syn, real_path, synthetic_path, Path(checkpoint) if checkpoint else None, dev,
                            seed)
        looks, figures = _looks(real, syn, rng)
        privacy, privacy_figures, privacy_notes = privacy_section(
            real_path, synthetic_path, real, syn, heldout_split=heldout_split, reference_split=reference_split,
            max_members=max_members, max_synthetic=max_synthetic, n_bootstrap=n_bootstrap, device=dev, seed=seed)
    figures.update(privacy_figures)
    quality, usefulness = _quality(assess, evaluate), _usefulness(downstream)
    data = _card_data(what, notes, looks, quality, usefulness, privacy, privacy_notes, seed)
    html = render_card(data, figures)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"html": out_dir / "card.html", "json": out_dir / "card.json"}
    atomic_write_text(files["html"], html)
    atomic_write_text(files["json"], json.dumps(data, indent=1, allow_nan=False))
    return ReleaseCard(data=data, html=html, files=files)
