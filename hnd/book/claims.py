"""The papers' claims, checked against what a grid measured.

Each experiment chapter closes with the claims it tests: what the papers say, what this grid
measured, and whether it holds here. A claim that does not hold is reported as such, next to
how the grid differs from the papers' setting (:func:`differences`), never hidden.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from hnd.book.results import (RunRecord, beta_setting, entropic_comparison, entropic_settings, hnd_partner,
                              matched_input, most_accurate, teacher_reference)
from hnd.image_folders import check_layout
from hnd.synth import SUMMARY_FILE

ACCESS_2020 = "Matsubara et al., IEEE Access 2020"
HOTEDGE_2019 = "Matsubara et al., HotEdgeVideo 2019"
ENTROPIC_2022 = "Matsubara et al., WACV 2022 (Entropic Student)"
AE_BASELINE = "the original code's autoencoder baseline"
PAPER_EPOCHS = 20  # every method of the official ImageNet configs
PAPER_STUDENT = "densenet169_head_mimic-ver2b-3ch"  # the papers' first student, for comparisons
SIMILAR_TOP1 = 2.0  # points of top-1 within which two students count as equally accurate
METHOD_NAMES = {"hnd": "HND", "kd": "KD", "naive": "naive", "ae": "AE", "head_kd": "HND head, KD loss"}  # in tables


@dataclass
class Claim:
    claim: str  # what the papers say, in one sentence
    source: str  # who says it
    measured: str  # what this grid measured, in numbers
    holds: bool | None  # None: the grid lacks the runs to tell, or the difference is within noise
    within_noise: bool = False  # measured, but the difference does not exceed the spread over seeds

    @property
    def verdict(self) -> str:
        if self.within_noise:
            return "within noise"
        return {True: "holds", False: "does not hold", None: "not measured"}[self.holds]


def _lead(runs: list[RunRecord]) -> str | None:
    """The backbone the chapters summarise: the first with a reference top-1."""
    reference = teacher_reference(runs)
    return sorted(reference)[0] if reference else None


def _seeds(runs: list[RunRecord], method: str, channels: int) -> list[float]:
    """Test top-1 of every seed of (method, channels)."""
    return [r.test_top1 for r in runs if r.method == method and r.channels == channels]


def _spread(values: list[float]) -> float:
    """How far seeds of one setting lie apart: max - min (0 with one seed)."""
    return max(values) - min(values) if values else 0.0


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def compare(a: list[float], b: list[float], margin: float = 0.0) -> str | None:
    """Is ``a`` at least ``b`` minus ``margin`` (each a list of per-seed top-1)? ``"holds"``
    when the difference of the means exceeds the larger spread over seeds, ``"fails"`` when
    it falls short by more than that, ``"noise"`` between; None without both."""
    if not a or not b:
        return None
    gap, noise = _mean(a) - _mean(b) + margin, max(_spread(a), _spread(b))
    return "holds" if gap > noise else "fails" if gap < -noise else "noise"


def _claim(claim: str, source: str, measured: str, outcomes: list[str | None]) -> Claim:
    """A claim over several comparisons: it does not hold if one fails, holds if all hold,
    and is within noise otherwise."""
    outcomes = [o for o in outcomes if o is not None]
    if not outcomes:
        return Claim(claim, source, "", None)
    if "fails" in outcomes:
        return Claim(claim, source, measured, False)
    if all(o == "holds" for o in outcomes):
        return Claim(claim, source, measured, True)
    return Claim(claim, source, measured, None, within_noise=True)


def _describe(values: list[float]) -> str:
    """``90.1%`` (one seed) or ``90.1% (89.5-90.7, 2 seeds)``."""
    if len(values) == 1:
        return f"{values[0]:.1f}%"
    return f"{_mean(values):.1f}% ({min(values):.1f}–{max(values):.1f}, {len(values)} seeds)"


def _per_width(runs: list[RunRecord], methods: tuple[str, ...], widths: list[int]) -> str:
    return "; ".join(f"{w} ch: " + ", ".join(f"{METHOD_NAMES[m]} {_describe(_seeds(runs, m, w))}" for m in methods
                                              if _seeds(runs, m, w)) for w in widths)


def training_claims(runs: list[RunRecord]) -> list[Claim]:
    """The results chapter's claims, for the lead backbone of ``runs``: HND against KD and
    naive training and KD against naive at every bottleneck width, what an epoch of each
    costs, HND against the autoencoder baseline, and an entropic student's bytes falling as β
    rises. Accuracy claims compare means over seeds against the spread between seeds."""
    lead = _lead(runs)
    runs = [r for r in runs if r.teacher == lead]
    widths = sorted({r.channels for r in runs if r.method != "teacher" and r.channels is not None})
    top1 = {(m, w): _seeds(runs, m, w) for m in ("hnd", "kd", "naive", "ae") for w in widths}
    claims = [
        _claim("At the same bottleneck, the student head trained by HND is at least as accurate as the same student "
               "trained end to end, naively or with knowledge distillation.", ACCESS_2020,
               _per_width(runs, ("hnd", "kd", "naive"), widths),
               [compare(top1["hnd", w], top1[other, w]) for w in widths for other in ("kd", "naive")]),
        _claim("At the same bottleneck, knowledge distillation trains a more accurate student than naive training.",
               HOTEDGE_2019, _per_width(runs, ("kd", "naive"), widths),
               [compare(top1["kd", w], top1["naive", w]) for w in widths]),
    ]

    cost = {m: [r.seconds_per_epoch for r in runs if r.method == m] for m in ("hnd", "kd", "naive")}
    mean = {m: _mean(v) for m, v in cost.items() if v}
    claims.append(Claim(
        "HND costs less per epoch than naive training or KD: it back-propagates through the student head only, "
        "and needs no more of the teacher than its head's output.", ACCESS_2020,
        ", ".join(f"{m if m == 'naive' else m.upper()} {s:.1f} s" for m, s in mean.items()) + " per epoch"
        if mean else "", mean["hnd"] < min(mean["kd"], mean["naive"]) if len(mean) == 3 else None))

    claims.append(_claim(
        "A distilled student head with a bottleneck is as accurate as an autoencoder inserted into the unchanged "
        "teacher, while the device runs only the small head instead of the teacher's head plus an encoder.",
        AE_BASELINE, _per_width(runs, ("hnd", "ae"), widths),
        [compare(top1["hnd", w], top1["ae", w], margin=SIMILAR_TOP1) for w in widths]))

    sweeps = {w: sorted((r.beta, r.bytes_per_image, r.test_top1) for r in runs
                        if r.method == "entropic" and r.channels == w and r.bytes_per_image is not None)
              for w in widths}
    sweeps = {w: _by_beta(s) for w, s in sweeps.items()}
    sweeps = {w: s for w, s in sweeps.items() if len(s) > 1}
    claims.append(Claim(
        "A larger rate weight β makes an entropic student send fewer bytes, at some cost in accuracy.",
        ENTROPIC_2022,
        "; ".join(f"{w} ch: " + ", ".join(f"{beta_setting(b)} {n:,.0f} B ({t:.1f}%)" for b, n, t in s)
                  for w, s in sweeps.items()),
        all(all(n2 < n1 for (_, n1, _), (_, n2, _) in zip(s, s[1:])) for s in sweeps.values()) if sweeps else None))
    return claims


def _by_beta(points: list[tuple[float, float, float]]) -> list[tuple[float, float, float]]:
    """(β, bytes, top-1) averaged over the seeds of each β, in β order."""
    betas = sorted({b for b, _, _ in points})
    return [(b, _mean([n for bb, n, _ in points if bb == b]), _mean([t for bb, _, t in points if bb == b]))
            for b in betas]


def _jpeg_claim(packed: list[dict], rows: list[dict]) -> tuple[str, bool | None, bool]:
    """(measured, holds, within noise) of the bottleneck-against-JPEG claim: the HND width with the
    best mean top-1 sent as int8+zlib, its bytes (mean over seeds) against the fewest JPEG bytes
    that reach its lowest and its highest seed's top-1. It holds when JPEG needs more bytes even
    for the lowest, fails when JPEG reaches even the highest with fewer, and is within noise
    between (one seed: a plain comparison)."""
    widths = {r["channels"] for r in packed}
    seeds = max(([r for r in packed if r["channels"] == w] for w in widths),
                key=lambda group: (_mean([r["top1"] for r in group]), -_mean([r["bytes"] for r in group])))
    top1 = [r["top1"] for r in seeds]
    sent = _mean([r["bytes"] for r in seeds])
    low, high = matched_input(rows, "jpeg", min(top1)), matched_input(rows, "jpeg", max(top1))

    def jpeg(point: dict | None) -> str:
        return f"{point['bytes']:,.0f} B ({point['setting']}) at {point['top1']:.1f}%" if point else "no quality"

    measured = f"{seeds[0]['label']}: {sent:,.0f} B at {_describe(top1)}; JPEG at that top-1: {jpeg(low)}" + (
        f" (lowest seed), {jpeg(high)} (highest)" if len(top1) > 1 else "")
    if low is None or low["bytes"] > sent:
        return measured, True, False
    if high is not None and high["bytes"] < sent:
        return measured, False, False
    return measured, None, True


def rate_claims(rows: list[dict]) -> list[Claim]:
    """The rate chapter's claims, from its measured points (:func:`hnd.book.results.model_points`):
    the most accurate HND width sent as 8-bit+zlib against JPEG at the same top-1 (over its
    seeds), and each entropic student against the HND student of its width sent as 8-bit+zlib
    (over both's seeds)."""
    packed = [r for r in rows if r.get("kind") == "bottleneck" and r.get("method") == "hnd"
              and r.get("setting") == "int8+zlib"]
    measured, holds, noise = _jpeg_claim(packed, rows) if packed else ("", None, False)
    claims = [Claim(
        "The student's bottleneck takes fewer bytes than the input image compressed as JPEG at the same accuracy.",
        HOTEDGE_2019, measured, holds, within_noise=noise)]
    return claims + [_entropy_claim(rows)]


def _entropy_claim(rows: list[dict]) -> Claim:
    """The entropic student against the HND student of its width sent as int8+zlib: at each
    width its most accurate β (mean over seeds) must send fewer bytes, and reach a top-1 no more
    than SIMILAR_TOP1 points lower, both beyond the spread between seeds."""
    claim = ("A learned entropy model on the bottleneck sends fewer bytes than the 8-bit bottleneck of a student "
             f"of the same width, at a top-1 within {SIMILAR_TOP1:g} points.")
    comparison = [c for c in entropic_comparison(rows) if c["hnd_zlib_bytes"] is not None]
    settings = entropic_settings(rows)
    measured, outcomes = [], []
    for channels in sorted({c["channels"] for c in comparison}):
        top = most_accurate([c for c in comparison if c["channels"] == channels])
        seeds = settings[(top["label"], channels, top["beta"])]
        hnd = hnd_partner(rows, channels, "int8+zlib")
        sent, hnd_sent = [r["bytes"] for r in seeds], [r["bytes"] for r in hnd]
        top1, hnd_top1 = [r["top1"] for r in seeds], [r["top1"] for r in hnd]
        outcomes += [compare(hnd_sent, sent), compare(top1, hnd_top1, margin=SIMILAR_TOP1)]
        measured.append(f"{channels} ch: entropic ({beta_setting(top['beta'])}) {_mean(sent):,.0f} B at "
                        f"{_describe(top1)}, HND int8+zlib {_mean(hnd_sent):,.0f} B at {_describe(hnd_top1)}")
    return _claim(claim, ENTROPIC_2022, "; ".join(measured), outcomes)


def differences(runs: list[RunRecord], data: str | os.PathLike) -> str:
    """Markdown sentences: how the grid of ``runs``, trained on the dataset ``data``, differs
    from the papers' ImageNet setting, and how light its student's encoder is."""
    layout = check_layout(data, splits=("train",))
    images = "generated images" if (Path(data) / SUMMARY_FILE).is_file() else "images"
    lead = _lead(runs)
    own = [r for r in runs if r.teacher == lead]
    ran = sorted({r.epochs_run or r.epochs for r in own if r.method != "teacher"})
    students = f"{ran[0]}" if len(ran) == 1 else f"{ran[0]} to {ran[-1]}" if ran else "no"
    teacher = teacher_reference(own).get(lead)
    sizes = sorted({r.input_size for r in own if r.input_size})
    size = f" at {sizes[0]} px" if len(sizes) == 1 else ""
    trained = any(r.method == "teacher" for r in own)
    widths = sorted(r.channels for r in own if r.method == "hnd")
    text = (f"This grid's students train for {students} epochs (the papers: "
            f"{PAPER_EPOCHS}) on {len(layout.samples['train']):,} {images} of {len(layout.classes)} classes (the "
            f"papers: 1.28 million ImageNet photographs of 1,000 classes), against a `{lead}` teacher{size}"
            + (f" trained from scratch on these images to {teacher:.1f}% top-1" if trained and teacher is not None
               else "")
            + " (the papers: torchvision's pretrained DenseNet-169/201 and ResNet-152 at 224 px and Inception-v3 at "
              "299 px).")
    return text + (" " + head_difference(lead, widths[0], sizes[0] if len(sizes) == 1 else None) if widths else "")


def head_difference(teacher: str, channels: int, input_size: int | None) -> str:
    """One sentence: how much lighter the encoder of ``teacher``'s student is than the teacher
    head it replaces, next to the papers' DenseNet-169 (94%: the device runs a small part)."""
    from hnd.analysis import analyze, compare_heads
    from hnd.registry import resolve, student_spec

    spec = student_spec(teacher, channels).at_input_size(input_size)
    mine = compare_heads(analyze(spec.as_teacher()), analyze(spec))["macs_reduction_pct"]
    paper = resolve(PAPER_STUDENT)
    papers = compare_heads(analyze(paper.as_teacher()), analyze(paper))["macs_reduction_pct"]
    return (f"The student's encoder does {mine:.0f}% fewer multiply-adds than the teacher head it replaces (the "
            f"papers' DenseNet-169: {papers:.0f}%).")


def claims_table(claims: list[Claim]) -> str:
    """The claims as a Markdown table (text wraps, nothing is cut short)."""
    lines = ["| claim | source | measured here | here |", "| --- | --- | --- | --- |"]
    lines += [f"| {c.claim} | {c.source} | {c.measured or '-'} | **{c.verdict}** |" for c in claims]
    return "\n".join(lines)


def verdict(claims: list[Claim], difference: str) -> str:
    """The Markdown paragraph under a chapter's claims table: which claims hold at this scale,
    and for those that do not, how the grid differs from the papers."""
    held = [c for c in claims if c.holds]
    failed = [c for c in claims if c.holds is False]
    noise = [c for c in claims if c.within_noise]
    unknown = [c for c in claims if c.holds is None and not c.within_noise]
    text = f"{len(held)} of {len(claims)} claims hold on this grid."
    if noise:
        text += (f" For {len(noise)} the difference is within the spread between seeds: this grid cannot tell "
                 "either way.")
    if failed:
        text += (f" {len(failed)} do{'es' if len(failed) == 1 else ''} not, and this grid cannot tell whether "
                 f"{'it' if len(failed) == 1 else 'they'} would in the papers' setting. " + difference
                 + " The `paper` profile runs the same chapters in the papers' setting.")
    if unknown:
        text += f" {len(unknown)} could not be checked: the grid lacks the runs."
    return text


def ablation_rows(settings: dict[str, list[RunRecord]]) -> list[dict]:
    """One row per setting (e.g. the same students stopped after 2 epochs, after 5, and after
    the whole schedule): each method's mean test top-1 at every width and the verdicts of the two
    accuracy claims (HND against KD and naive, KD against naive) under that setting."""
    rows = []
    for label, runs in settings.items():
        claims = training_claims(runs)
        lead = _lead(runs)
        own = [r for r in runs if r.teacher == lead]
        widths = sorted({r.channels for r in own if r.method != "teacher" and r.channels is not None})
        row = {"setting": label}
        for w in widths:
            for m, name in (("hnd", "HND"), ("kd", "KD"), ("naive", "naive")):
                values = _seeds(own, m, w)
                row[f"{name} {w}ch"] = round(_mean(values), 1) if values else None
        row["HND ≥ KD, naive"], row["KD ≥ naive"] = claims[0].verdict, claims[1].verdict
        rows.append(row)
    return rows


LOSS_ABLATION = ("hnd", "head_kd", "kd", "naive")  # the methods the loss ablation puts side by side; the
# first two differ in their loss only


def _loss_effects(runs: list[RunRecord]) -> list[dict]:
    """For every width of the lead backbone with HND and head_kd runs: the per-seed test top-1 of
    each ablation method, the outcome of head_kd against HND (:func:`compare`), and the per-seed
    head errors of HND and head_kd."""
    lead = _lead(runs)
    own = [r for r in runs if r.teacher == lead]
    out = []
    for w in sorted({r.channels for r in own if r.method == "head_kd"}):
        top1 = {m: _seeds(own, m, w) for m in LOSS_ABLATION}
        if top1["hnd"]:
            errors = {m: [r.head_error for r in own if r.method == m and r.channels == w and r.head_error is not None]
                      for m in LOSS_ABLATION[:2]}
            out.append({"channels": w, "top1": top1, "outcome": compare(top1["head_kd"], top1["hnd"]),
                        "errors": errors})
    return out


def loss_ablation_rows(runs: list[RunRecord]) -> list[dict]:
    """One row per bottleneck width that has both HND and ``head_kd`` runs: the test top-1 of
    HND, of the same head and frozen tail trained on KD's loss (``head_kd``), of KD and of naive
    training (mean and range over seeds), whether changing only HND's loss moved the top-1
    beyond the spread between seeds, and each of the two heads' error against the teacher head
    (:func:`hnd.evaluation.head_error`, mean over seeds)."""
    rows = []
    for effect in _loss_effects(runs):
        top1 = effect["top1"]
        row = {"channels": effect["channels"],
               **{METHOD_NAMES[m]: _describe(v) if v else "-" for m, v in top1.items()}}
        gap = _mean(top1["head_kd"]) - _mean(top1["hnd"])
        row["KD loss − HND loss"] = f"{gap:+.1f} points, " + (
            "within noise" if effect["outcome"] == "noise" else "beyond the spread between seeds")
        for m, errors in effect["errors"].items():
            row[f"{METHOD_NAMES[m]}: head error"] = round(_mean(errors), 2) if errors else None
        rows.append(row)
    return rows


def loss_ablation_reading(runs: list[RunRecord]) -> str:
    """One Markdown sentence per width: what changing only HND's loss did to the top-1."""
    sentences = []
    for effect in _loss_effects(runs):
        top1, outcome = effect["top1"], effect["outcome"]
        kd, hnd = _mean(top1["head_kd"]), _mean(top1["hnd"])
        said = (f"At {effect['channels']} channels the head trained on KD's loss reaches {kd:.1f}% against "
                f"HND's {hnd:.1f}%")
        if outcome == "holds":
            said += (": the head and its bottleneck can carry what the frozen tail needs, and HND's squared error "
                     "to the teacher head's output does not single it out.")
            errors = {m: _mean(e) for m, e in effect["errors"].items() if e}
            if len(errors) == 2 and errors["head_kd"] > errors["hnd"]:
                said += (f" The more accurate head's output lies further from the teacher head's (head error "
                         f"{errors['head_kd']:.2f} against HND's {errors['hnd']:.2f}): the tail needs less than a "
                         "copy of that output.")
        elif outcome == "fails":
            said += ": HND's squared error trains the better head."
        else:
            said += (": within the spread between seeds, so at this width this grid cannot tell whether the loss "
                     "limits HND.")
        sentences.append(said)
    return " ".join(sentences) or "No width of this grid has both HND and `head_kd` runs."
