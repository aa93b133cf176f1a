"""The gold judge: an independent scorer used to tell real alignment gains from reward hacking.

For the synthetic task it is the task's rule-based gold scorer (the proxy reward models never see it).
For other data there is no rule and no judge yet (`eval.judge`: auto | rules | none, validated by config): the
gold columns are absent rather than invented.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from edgerlhf.config import Params

GoldFn = Callable[[Sequence[str], Sequence[str]], list[float]]


def gold_judge(params: Params) -> GoldFn | None:
    """The gold scorer for this run's data source, or None where none is available."""
    if params.data.source == "synthetic" and params.eval.judge in ("auto", "rules"):
        from edgerlhf.synthetic import gold_score

        def judge(prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
            return [gold_score(p, r) for p, r in zip(prompts, responses)]

        return judge
    return None
