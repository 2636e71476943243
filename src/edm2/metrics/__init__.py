"""Sample-quality metrics: FID and FD_DINOv2 as in the EDM2 paper (feature networks in `inception` and `dinov2`,
their weight files in `detectors`, statistics and reference files in `stats`, the measuring loops in `measure`),
precision/recall, the Frechet distance, and the digits judge used by the demo and the EMA sweep."""

from edm2.metrics.digits import DigitsJudge, DigitsQuality, JudgeReport
from edm2.metrics.frechet import frechet_distance, frechet_distance_from_stats
from edm2.metrics.precision_recall import precision_recall

__all__ = ["frechet_distance", "frechet_distance_from_stats", "precision_recall", "DigitsJudge", "DigitsQuality",
           "JudgeReport"]
