"""A misspelt keyword argument names our class and the closest keyword, not a PML base class."""

from __future__ import annotations

import pytest
from pytorch_metric_learning.losses import ContrastiveLoss
from pytorch_metric_learning.reducers import MeanReducer

from pml_rll.losses import NAMRLoss, RankedListLoss


@pytest.mark.parametrize(
    "build, message",
    [
        (
            lambda: RankedListLoss(marign=0.3),
            "RankedListLoss() got an unexpected keyword argument 'marign'; did you mean 'margin'?",
        ),
        (
            lambda: RankedListLoss(reducr=MeanReducer()),
            "RankedListLoss() got an unexpected keyword argument 'reducr'; did you mean 'reducer'?",
        ),
        (lambda: RankedListLoss(zzz=1), "RankedListLoss() got an unexpected keyword argument 'zzz'"),
        (
            lambda: NAMRLoss(ContrastiveLoss(), 4, structure_weigth=1.0),
            "NAMRLoss() got an unexpected keyword argument 'structure_weigth'; did you mean 'structure_weight'?",
        ),
    ],
)
def test_typo_names_our_class_and_the_closest_keyword(build, message):
    with pytest.raises(TypeError) as exc:
        build()
    assert str(exc.value) == message


def test_keywords_of_pml_base_classes_still_pass():
    loss = RankedListLoss(reducer=MeanReducer(), collect_stats=True)
    assert isinstance(loss.reducer, MeanReducer) and loss.collect_stats
