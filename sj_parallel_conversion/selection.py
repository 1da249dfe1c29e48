"""Choosing a calibration by measurement (``method="auto"``) and reporting what was chosen.

The candidates are fitted on part of the calibration images; each is then scored on images that
no fit read, and that the fits' early stopping did not read either, by how often its top-1
prediction agrees with the ANN's, the quantity the user cares about. No labels are used. Each
selection image also comes with blends of it with other selection images
(``CalibrationSettings.selection_blends``), scored against the ANN's outputs for the blends: on
the training images themselves the ANN is confident, and at large ``T`` no calibration misses
almost none of them while a calibration agrees with the ANN on several per cent more new images.
The blends are not independent of their images (an image enters up to ``2k + 1`` of the judged
items), so the test below is less conservative than its nominal two standard errors.

A hundred-odd selection images measure agreement coarsely: two candidates a point apart on test
images often swap places on them (the project's CNN at ``T = 16``: ``mse`` agreed with the ANN
on 4 more of 128 selection images than no calibration, yet was 0.45 points worse on 2,000 test
images). So no calibration is the baseline, and a calibration can replace it only if it is
*clearly* better on the same images: the images on which only it agrees with the ANN must
outnumber those on which only the uncalibrated network does by more than two standard errors of
that difference (a sign test: ``wins - losses > 2 * sqrt(wins + losses)``). Of the candidates
that pass, the one that agrees most is kept; on equal agreement the simpler one (no calibration
before Algorithm 1 before ``mse`` before the fits), then the lower mean KL divergence from the
ANN's outputs. Among calibrations the plain count decides: on training images, where the ANN is
confident, even a fit four points better on test images may win only a handful of selection
images over ``mse`` (the pretrained ResNet-32 at ``T = 4``), too few for the test, while picking
the wrong one of two calibrations costs far less than calibrating where none was needed. The
kept network therefore agrees with the ANN on the judged items (selection images and blends) at
least as often as the uncalibrated one, and differs from it only where they say so clearly. Without
per-image results (:func:`choose` called with scores alone) the highest agreement wins, with the
same tie-breaks.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, Mapping, Optional, Tuple

import torch

from .observers import Reducer

__all__ = ["CalibrationReport", "choose", "clearly_better", "irreplaceable", "paired_counts", "passed_over", "share",
           "PREFERENCE", "SIGN_TEST_Z"]

# On equal scores the simpler calibration wins.
PREFERENCE = ("none", "paper", "ema", "moment", "mse", "learned", "distill")
#: Standard errors by which a calibration's net wins over no calibration must exceed zero for it to be kept.
SIGN_TEST_Z = 2.0


def clearly_better(challenger: torch.Tensor, kept: torch.Tensor, reducer: Reducer = None,
                   z: float = SIGN_TEST_Z) -> bool:
    """Whether ``challenger`` agrees with the ANN clearly more often than ``kept`` on the same images.

    Both are boolean per-image agreements (this process's images, in the same order). With
    ``wins`` the images only the challenger gets right and ``losses`` those only the kept
    candidate gets right (summed over processes when ``reducer`` is given), the challenger is
    clearly better when ``wins - losses > z * sqrt(wins + losses)``.
    """
    wins, losses = paired_counts(challenger, kept, reducer)
    return wins - losses > z * math.sqrt(wins + losses)


def irreplaceable(baseline: torch.Tensor, reducer: Reducer = None, z: float = SIGN_TEST_Z) -> Tuple[bool, int]:
    """``(no_candidate_can_pass, misses)``: whether no challenger can be :func:`clearly_better`
    than the baseline, whatever it does, and on how many images the baseline disagrees with the ANN.

    A challenger can gain only the ``misses`` images the baseline gets wrong, so its best case is
    ``wins = misses`` and ``losses = 0``, which passes the sign test only if ``misses > z * sqrt(misses)``,
    i.e. ``misses > z**2``. Below that, measuring any candidate cannot change the choice.
    """
    misses = torch.tensor([float((~baseline.bool()).sum())], dtype=torch.float64)
    if reducer is not None:
        misses = reducer(misses, "sum")
    m = int(misses[0])
    return not m > z * math.sqrt(m), m


def share(hits: torch.Tensor, reducer: Reducer = None) -> float:
    """The fraction of ``True`` in boolean per-image agreements (over all processes with ``reducer``)."""
    counts = torch.tensor([float(hits.bool().sum()), float(hits.numel())], dtype=torch.float64)
    if reducer is not None:
        counts = reducer(counts, "sum")
    return float(counts[0] / counts[1]) if counts[1] > 0 else 0.0


def paired_counts(challenger: torch.Tensor, kept: torch.Tensor, reducer: Reducer = None) -> Tuple[int, int]:
    """``(wins, losses)``: images only ``challenger`` agrees with the ANN on, and images only
    ``kept`` does (boolean per-image agreements, summed over processes with ``reducer``)."""
    if challenger.shape != kept.shape:
        raise ValueError(f"per-image agreements of different lengths: {tuple(challenger.shape)} and "
                         f"{tuple(kept.shape)}")
    challenger, kept = challenger.bool(), kept.bool()  # ~ on integers would be a bitwise not
    counts = torch.tensor([int((challenger & ~kept).sum()), int((kept & ~challenger).sum())], dtype=torch.float64)
    if reducer is not None:
        counts = reducer(counts, "sum")
    return int(counts[0]), int(counts[1])


def choose(scores: Dict[str, Dict[str, float]], hits: Optional[Mapping[str, torch.Tensor]] = None,
           reducer: Reducer = None) -> str:
    """The candidate to keep (see the module's text).

    ``scores``: per candidate, ``{"agreement", "kl", ...}``. ``hits``: per candidate, its per-image
    agreement with the ANN on the selection images (:func:`~sj_parallel_conversion.learned.held_out_score`);
    with it, only candidates :func:`clearly_better` than ``"none"`` (when ``"none"`` is a
    candidate) may replace it. The highest agreement wins among the rest, ties going to the
    simpler candidate, then to the lower KL.
    """
    if not scores:
        raise ValueError("no calibration candidate to choose from")
    rank = {name: i for i, name in enumerate(PREFERENCE)}
    eligible = list(scores)
    baseline = PREFERENCE[0]
    if hits is not None and baseline in scores:
        missing = sorted(set(scores) - set(hits))
        if missing:
            raise ValueError(f"no per-image agreement for candidate(s) {missing}")
        eligible = [baseline] + [n for n in scores if n != baseline and clearly_better(hits[n], hits[baseline], reducer)]
    return max(eligible, key=lambda n: (scores[n]["agreement"], -rank.get(n, len(rank)), -scores[n]["kl"]))


def passed_over(scores: Dict[str, Dict[str, float]], hits: Mapping[str, torch.Tensor], kept: str,
                reducer: Reducer = None) -> Dict[str, str]:
    """Why each candidate that agreed with the ANN more often than ``kept`` was not kept: it was
    not clearly better than no calibration (with the paired counts). Empty without the baseline."""
    baseline = PREFERENCE[0]
    if baseline not in hits:
        return {}
    reasons: Dict[str, str] = {}
    for name in scores:
        if scores[name]["agreement"] > scores[kept]["agreement"]:
            wins, losses = paired_counts(hits[name], hits[baseline], reducer)
            reasons[name] = (f"not clearly better than {baseline} on the judged items ({wins} gained, "
                             f"{losses} lost; a sign test asks for more than {SIGN_TEST_Z:g} sqrt({wins + losses}) net)")
    return reasons


@dataclass
class CalibrationReport:
    """What calibration did, kept on the converted model as ``snn.calibration_report``.

    Attributes:
        requested: the ``method`` asked for (one of the recipe's methods).
        method: the calibration in the model (``"none"``, ``"paper"``, ``"ema"``, ``"moment"``,
            ``"mse"``, ``"learned"`` or ``"distill"``).
        scores: per candidate, ``{"agreement", "kl", "images"}``: on the selection images and
            their blends for ``"auto"`` (``images`` counts both, over all processes), on the fit's
            held-out images for ``"learned"``/``"distill"`` (empty for the methods that hold
            nothing out).
        seconds: fitting time per candidate (``auto`` builds ``ema`` and ``mse`` in one pass of
            Algorithm 1 and charges each half of it, ``mse`` its threshold search too).
        skipped: candidates ``"auto"`` did not build or fit, with the reason.
        fit_images: images the fits learned from; held_out_images: images their early stopping
            read; selection_images: images ``"auto"``'s choice read, and selection_blends: the
            blends of them it also scored (both per process).
        learned: the fit's history (held-out KL and agreement per evaluation, the step kept,
            steps run, whether it fell back to its start).
        passed_over: ``"auto"``: candidates that agreed with the ANN on more judged items than
            the one kept but not clearly more than no calibration, with their paired counts.
    """

    requested: str
    method: str
    scores: Dict[str, Dict[str, float]] = field(default_factory=dict)
    seconds: Dict[str, float] = field(default_factory=dict)
    fit_images: int = 0
    held_out_images: int = 0
    learned: Optional[Dict] = None
    skipped: Dict[str, str] = field(default_factory=dict)
    selection_images: int = 0
    passed_over: Dict[str, str] = field(default_factory=dict)
    selection_blends: int = 0

    @property
    def label(self) -> str:
        """The calibration in the model, with the method that chose it: ``"distill"``,
        ``"ema (auto)"``, ``"none (auto)"``, ``"learned fell back to its start"``."""
        fell_back = bool(self.learned and self.learned.get("fell_back")) and self.method in ("learned", "distill")
        text = self.method + (" (auto)" if self.requested == "auto" else "")
        return text + (" fell back to its start" if fell_back else "")

    def summary(self) -> str:
        """One line: the choice and the measured agreement of every candidate."""
        if not self.scores:
            return f"calibration: {self.method} ({sum(self.seconds.values()):.1f} s)"
        parts = ", ".join(f"{n} {100 * s['agreement']:.1f}%" for n, s in self.scores.items())
        where = (f"{self.selection_images} selection images" if self.selection_images
                 else f"{self.held_out_images} held-out images")
        if self.selection_images and self.selection_blends:
            where += f" and {self.selection_blends} blends of them"
        grouped: Dict[str, list] = {}  # one reason often covers several candidates
        for n, why in self.skipped.items():
            grouped.setdefault(why, []).append(n)
        skipped = "".join(f"; skipped {', '.join(names)}: {why}" for why, names in grouped.items())
        skipped += "".join(f"; passed over {n}: {why}" for n, why in self.passed_over.items())
        return (f"calibration ({self.requested}): kept {self.label}; agreement with the ANN on {where}: {parts}"
                f"{skipped}; fitting took {sum(self.seconds.values()):.1f} s")

    def __str__(self) -> str:
        return self.summary()
