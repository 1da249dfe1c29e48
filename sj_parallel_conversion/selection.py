"""Choosing a calibration by measurement (``method="auto"``) and reporting what was chosen.

The candidates are fitted on part of the calibration images; each is then scored on images that
no fit read, and that the fits' early stopping did not read either, by how often its top-1
prediction agrees with the ANN's, the quantity the user cares about. On equal agreement the simpler candidate wins (no calibration before
Algorithm 1 before learned): a few hundred held-out images cannot tell such candidates apart, and
at large ``T``, where they tie, a lower KL divergence did not mean a better network (measured on
the shipped ResNet-20 at ``T = 32``). The mean KL divergence from the ANN's outputs breaks the
remaining ties. No labels are used. Because "no calibration" is always among the candidates, the chosen network
agrees with the ANN on the held-out images at least as often as the uncalibrated one.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional

__all__ = ["CalibrationReport", "choose", "PREFERENCE"]

# On equal scores the simpler calibration wins.
PREFERENCE = ("none", "paper", "ema", "moment", "mse", "learned", "distill")


def choose(scores: Dict[str, Dict[str, float]]) -> str:
    """The candidate with the highest held-out agreement; ties go to the simpler one, then the lower KL."""
    if not scores:
        raise ValueError("no calibration candidate to choose from")
    rank = {name: i for i, name in enumerate(PREFERENCE)}
    return max(scores, key=lambda n: (scores[n]["agreement"], -rank.get(n, len(rank)), -scores[n]["kl"]))


@dataclass
class CalibrationReport:
    """What calibration did, kept on the converted model as ``snn.calibration_report``.

    Attributes:
        requested: the ``method`` asked for (one of the recipe's methods).
        method: the calibration in the model (``"none"``, ``"paper"``, ``"ema"``, ``"moment"``,
            ``"mse"``, ``"learned"`` or ``"distill"``).
        scores: per candidate, ``{"agreement", "kl", "images"}``: on the selection images for
            ``"auto"``, on the fit's held-out images for ``"learned"``/``"distill"`` (empty for the
            methods that hold nothing out).
        seconds: fitting time per candidate.
        skipped: candidates ``"auto"`` did not fit, with the reason.
        fit_images: images the fits learned from; held_out_images: images their early stopping
            read; selection_images: images ``"auto"``'s choice read (per process).
        learned: the fit's history (held-out KL and agreement per evaluation, the step kept,
            steps run, whether it fell back to its start).
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

    @property
    def label(self) -> str:
        """The calibration in the model, with the method that chose it: ``"distill"``,
        ``"ema (auto)"``, ``"none (auto)"``, ``"learned (fell back to its start)"``."""
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
        skipped = "".join(f"; skipped {n}: {why}" for n, why in self.skipped.items())
        return (f"calibration ({self.requested}): kept {self.label}; agreement with the ANN on {where}: {parts}"
                f"{skipped}; fitting took {sum(self.seconds.values()):.1f} s")

    def __str__(self) -> str:
        return self.summary()
