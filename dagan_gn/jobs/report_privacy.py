"""The release card's privacy section (``dagan report``, :mod:`dagan_gn.jobs.report`): the memorization check of the
synthetic set against the generator's training patches, and two black-box membership-inference attacks (the distance
attack and DOMIAS), each part with its verdict, then one verdict for the section."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from dagan_gn.jobs.report_verdicts import THRESHOLDS, as_unit as _as_unit, verdict as _verdict

__all__ = ["privacy_section"]


def privacy_section(real_path: Path, syn_path: Path, real: Any, syn: Any, *, heldout_split: str, reference_split: str,
             max_members: int, max_synthetic: int, n_bootstrap: int, device: torch.device, seed: int
             ) -> tuple[dict[str, Any], dict[str, bytes], list[str]]:
    """The privacy section: the memorization check, then the membership-inference attacks, and one verdict."""
    from dagan_gn.jobs.memorization import check_memorization_files

    held_names = [s for s in (heldout_split, reference_split) if s in real.split_names]
    mem = check_memorization_files(real_path, syn_path, None, heldout_splits=held_names, device=str(device),
                                   seed=seed, max_synthetic=max_synthetic)
    memorization, figures = _memorization(mem, real, syn, seed=seed, max_synthetic=max_synthetic)
    membership, membership_figures, notes = _membership(
        real, syn, heldout_split=heldout_split, reference_split=reference_split, max_members=max_members,
        max_synthetic=max_synthetic, n_bootstrap=n_bootstrap, device=device, seed=seed)
    figures.update(membership_figures)
    v_mem, v_mia = memorization["verdict"], membership["verdict"]
    status = ("fail" if "fail" in (v_mem["status"], v_mia["status"]) else
              "warn" if "warn" in (v_mem["status"], v_mia["status"]) else
              "pass" if v_mem["status"] == "pass" and v_mia["status"] == "pass" else "warn")
    privacy = {
        "memorization": memorization,
        "membership": membership,
        "verdict": _verdict(status, f"memorization check {'passed' if mem.passed() else 'failed'} ("
                            + ("; ".join(f.split(" (synthetic ")[0] for f in memorization["failures"])
                               or v_mem["text"])
                            + f"). Membership: {v_mia['text']}.",
                            f"{v_mem['threshold']}; {v_mia['threshold']}"),
    }
    return privacy, figures, notes


def _memorization(mem: Any, real: Any, syn: Any, *, seed: int, max_synthetic: int
                  ) -> tuple[dict[str, Any], dict[str, bytes]]:
    """The memorization part of the privacy section, from ``check_memorization_files``'s report ``mem``."""
    from dagan_gn.metrics.memorization import count_then_indices

    spaces = {}
    for name, s in mem.spaces.items():
        spaces[name] = {"near_copy_fraction": s.near_copy_fraction, "near_copies": len(s.near_copy_indices),
                        "source_copy_fraction": s.source_copy_fraction, "patient_copies": len(s.patient_copy_indices),
                        "threshold": s.threshold, "heldout_median": s.heldout_nn.get("median"),
                        "synthetic_median": s.synthetic_nn.get("median"), "median_ratio": s.median_ratio,
                        "near_copy_indices": s.near_copy_indices[:50],
                        "patient_copy_indices": s.patient_copy_indices[:50]}
    pairs, figures, syn_rows, offending = _closest_pairs(mem, real, syn, seed=seed, max_synthetic=max_synthetic)
    failures = [line[2:] for line in mem.failure_lines()]
    threshold_m = (f"near-copy: closer to a training patch than the {mem.spaces['pixel'].percentile:g}st percentile "
                   "of held-out real patches; release needs at most "
                   f"{100 * mem.max_near_copy_fraction:.2f} % near-copies and no patient copy")
    if mem.passed():
        v_mem = _verdict("pass", "no near-copies beyond the allowed share, no patient copies", threshold_m)
    else:
        v_mem = _verdict("fail", "; ".join(failures) or "the memorization check failed", threshold_m)
    memorization = {"passed": mem.passed(), "n_synthetic": mem.n_synthetic, "n_train": mem.n_train,
                    "n_heldout": mem.n_heldout, "spaces": spaces, "failures": failures,
                    "max_near_copy_fraction": mem.max_near_copy_fraction, "closest_pairs": pairs,
                    "verdict": v_mem,
                    "offending": count_then_indices(syn_rows[offending].tolist(), "patient copies")
                    if offending else None}
    return memorization, figures


def _closest_pairs(mem: Any, real: Any, syn: Any, *, seed: int, max_synthetic: int
                   ) -> tuple[list[dict[str, Any]], dict[str, bytes], np.ndarray, list[int]]:
    """The closest pairs, offending ones first: each synthetic patch beside its nearest training patch, in the space
    that failed (pixel when none did). Returns the pairs, their figure, the synthetic rows the check read and the
    positions (in those rows) of the patient copies."""
    from dagan_gn.jobs.report_html import tile_grid

    figures: dict[str, bytes] = {}
    train_rows = real.split_indices("train")
    failed = [n for n, sp in mem.spaces.items() if sp.patient_copy_indices
              or sp.near_copy_fraction > mem.max_near_copy_fraction]
    space = failed[0] if failed else "pixel"
    d = np.asarray(mem.per_sample[f"{space}_nn_distance"])
    nn = np.asarray(mem.per_sample[f"{space}_nn_index"])
    syn_rows = np.arange(len(syn))
    if len(d) != len(syn):  # check_memorization_files subsampled: its first draw from default_rng(seed)
        syn_rows = np.sort(np.random.default_rng(seed).choice(len(syn), max_synthetic, replace=False))
    offending = sorted({i for sp in mem.spaces.values() for i in sp.patient_copy_indices})
    closest = [int(i) for i in np.argsort(d, kind="stable") if int(i) not in offending]
    shown = (offending + closest)[:6]
    pairs = []
    if shown:
        left = _as_unit(syn.read_patches(syn_rows[np.asarray(shown)], signed=True))
        right = _as_unit(real.read_patches(train_rows[nn[shown]], signed=True))
        tiles = [t for a, b in zip(left, right) for t in (a, b)]
        figures["closest_pairs"] = tile_grid([tiles[k : k + 6] for k in range(0, len(tiles), 6)], gap_after=(1, 3))
        pairs = [{"synthetic_row": int(syn_rows[i]), "train_row": int(train_rows[nn[i]]), "space": space,
                  "distance": float(d[i]), "patient_copy": int(i) in offending} for i in shown]
    return pairs, figures, syn_rows, offending


def _membership_rows(real: Any, n_synthetic: int, rng: np.random.Generator, notes: list[str], *, heldout_split: str,
                     reference_split: str, max_members: int, max_synthetic: int
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Members (training patches), non-members (held-out patches of other patients), DOMIAS's reference set (another
    held-out split, or half of the one held-out split; never the non-member queries) and the synthetic rows, each a
    seeded subset of at most ``max_members`` / ``max_synthetic``."""
    members_rows = real.split_indices("train")
    if len(members_rows) > max_members:
        members_rows = np.sort(rng.choice(members_rows, max_members, replace=False))
    non_rows = real.split_indices(heldout_split) if heldout_split in real.split_names else np.zeros(0, int)
    ref_rows = real.split_indices(reference_split) if reference_split in real.split_names else np.zeros(0, int)
    if len(non_rows) == 0:
        non_rows, ref_rows = ref_rows, np.zeros(0, int)
        notes.append(f"split {heldout_split!r} is empty: the non-members are the {reference_split!r} patches")
    if len(ref_rows) < 8 and len(non_rows) >= 16:
        perm = rng.permutation(non_rows)
        ref_rows, non_rows = np.sort(perm[: len(perm) // 2]), np.sort(perm[len(perm) // 2:])
        notes.append("DOMIAS's reference set is a random half of the held-out patches (the other half are the "
                     "non-member queries)")
    if len(non_rows) > max_members:
        non_rows = np.sort(rng.choice(non_rows, max_members, replace=False))
    syn_pick = np.arange(n_synthetic) if n_synthetic <= max_synthetic else np.sort(
        rng.choice(n_synthetic, max_synthetic, replace=False))
    return members_rows, non_rows, ref_rows, syn_pick


def _membership_attacks(real: Any, syn: Any, rows: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
                        notes: list[str], *, n_bootstrap: int, device: torch.device, seed: int
                        ) -> tuple[list[dict[str, Any]], dict[str, bytes]]:
    """The distance attack (pixels, random-conv features) and DOMIAS (with 8 or more reference patches), as dicts,
    and the histogram of the pixel attack's distances."""
    from dagan_gn.jobs.report_html import histogram_png
    from dagan_gn.metrics.membership import distance_attack, domias_attack
    from dagan_gn.metrics.memorization import RandomConvFeatures

    members_rows, non_rows, ref_rows, syn_pick = rows
    if len(non_rows) == 0:
        notes.append("no held-out real patches: the membership tests need non-members")
        return [], {}
    members = torch.from_numpy(real.read_patches(members_rows, signed=True))
    nonmembers = torch.from_numpy(real.read_patches(non_rows, signed=True))
    synthetic = torch.from_numpy(syn.read_patches(syn_pick, signed=True))
    features = RandomConvFeatures(in_channels=int(real.channels), seed=seed)
    kw = dict(n_bootstrap=n_bootstrap, seed=seed, device=device)
    pixel = distance_attack(members, nonmembers, synthetic, space="pixel", **kw)
    feat = distance_attack(members, nonmembers, synthetic, extractor=features, space="random-conv features", **kw)
    attacks = [pixel, feat]
    if len(ref_rows) >= 8:
        reference = torch.from_numpy(real.read_patches(ref_rows, signed=True))
        attacks.append(domias_attack(members, nonmembers, synthetic, reference, extractor=features,
                                     space="random-conv features", **kw))
    else:
        notes.append(f"DOMIAS not run: {len(ref_rows)} reference patches (needs at least 8)")
    figures = {"membership_hist": histogram_png(
        -np.asarray(pixel.member_scores), -np.asarray(pixel.nonmember_scores),
        xlabel="pixel L2 distance to the nearest synthetic patch",
        labels=(f"training patches (members, n={pixel.n_members})",
                f"held-out patches (non-members, n={pixel.n_nonmembers})"))}
    return [a.to_dict() for a in attacks], figures


def _membership_verdict(attacks: list[dict[str, Any]]) -> dict[str, str]:
    lim = THRESHOLDS["membership_auc"]
    threshold_a = (f"leakage when the 95 % bootstrap interval of the AUC lies above {lim}; AUC 0.5 = an attacker "
                   "does no better than a coin")
    if not attacks:
        return _verdict("not measured", "no membership test (no held-out real patches)", threshold_a)
    leaks = [a for a in attacks if a["ci_low"] is not None and a["ci_low"] > lim]
    text = ", ".join(f"{a['attack']} ({a['space']}) AUC {a['auc']:.2f} [{a['ci_low']:.2f}, {a['ci_high']:.2f}]"
                     for a in attacks)
    if leaks:
        caveat = ""
        if all(a["attack"] == "distance" for a in leaks) and any(a["attack"] == "domias" for a in attacks):
            caveat = (". DOMIAS, which divides by the density of real data, finds no leakage: part of the "
                      "distance attack's signal may be the difference between the training and the held-out "
                      "patients rather than membership")
        return _verdict("fail", f"membership leaks: {text}. An outsider holding the synthetic set can tell "
                                f"which patches were in training{caveat}", threshold_a)
    if any(a["auc"] > lim for a in attacks):
        return _verdict("warn", f"inconclusive: {text} (the intervals include {lim}; more held-out patches "
                                "would narrow them)", threshold_a)
    return _verdict("pass", f"no measurable membership leakage: {text}", threshold_a)


def _membership(real: Any, syn: Any, *, heldout_split: str, reference_split: str, max_members: int,
                max_synthetic: int, n_bootstrap: int, device: torch.device, seed: int
                ) -> tuple[dict[str, Any], dict[str, bytes], list[str]]:
    """The membership-inference part of the privacy section (its own ``default_rng(seed)`` for the subsets)."""
    notes: list[str] = []
    rng = np.random.default_rng(seed)
    rows = _membership_rows(real, len(syn), rng, notes, heldout_split=heldout_split, reference_split=reference_split,
                            max_members=max_members, max_synthetic=max_synthetic)
    attacks, figures = _membership_attacks(real, syn, rows, notes, n_bootstrap=n_bootstrap, device=device, seed=seed)
    verdict = _membership_verdict(attacks)
    for a in attacks:  # scores are figure data, rounded to keep the JSON small
        a["member_scores"] = [round(float(x), 5) for x in a["member_scores"]]
        a["nonmember_scores"] = [round(float(x), 5) for x in a["nonmember_scores"]]
    members_rows, non_rows, ref_rows, syn_pick = rows
    membership = {"attacks": attacks, "n_members": int(len(members_rows)), "n_nonmembers": int(len(non_rows)),
                  "n_reference": int(len(ref_rows)), "n_synthetic": int(len(syn_pick)), "verdict": verdict}
    return membership, figures, notes
