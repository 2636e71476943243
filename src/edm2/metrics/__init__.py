"""Sample-quality metrics: the Frechet distance, and the digits judge used by the demo and the EMA sweep."""

from edm2.metrics.digits import DigitsJudge, DigitsQuality, JudgeReport
from edm2.metrics.frechet import frechet_distance

__all__ = ["frechet_distance", "DigitsJudge", "DigitsQuality", "JudgeReport"]
