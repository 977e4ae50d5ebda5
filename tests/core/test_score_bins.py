"""A version's score histogram (what divergence is judged on) does not depend on how rows arrive."""

from __future__ import annotations

import numpy as np

from server.core.rollout import SCORE_BINS, Arm


def test_rows_one_at_a_time_and_in_one_batch_fill_the_same_bins() -> None:
    edges = [0.0, 1.0, 1 / SCORE_BINS, 0.5, 0.999999, -0.3, 1.7, np.nan, np.inf, -np.inf]
    scores = np.concatenate([np.array(edges), np.random.default_rng(7).random(500)])
    one_by_one, batched = Arm(), Arm()
    for score in scores:
        one_by_one.scored(np.array([score]))
    batched.scored(scores)
    assert one_by_one.scores.tolist() == batched.scores.tolist()
    assert int(batched.scores.sum()) == len(scores)  # every row counted, NaN and inf too
    assert batched.scores[0] >= 3  # below 0, and NaN
    assert batched.scores[-1] >= 4  # 1.0 and above
