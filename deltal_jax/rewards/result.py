"""The value every reward function returns."""

from typing import NamedTuple


class RewardResult(NamedTuple):
    """A score in [0, 1] and a short reason the trainer can count and log.

    Reasons start with a fixed keyword (`correct`, `no_answer`, `wrong_value`, …), then
    optionally `: detail`, so `reason.split(":")[0]` gives a small set of counters.
    """

    score: float
    reason: str
