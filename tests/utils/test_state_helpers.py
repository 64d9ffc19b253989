"""The state-unchanged helper of the bad-input tests compares exactly, lists and dicts included."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import _assert_same_state, _snapshot


class Holder:
    def __init__(self):
        self.t = torch.tensor([1.0, float("nan")])
        self.items = [1, torch.tensor([2.0])]
        self.table = {"a": 0.5}
        self.opaque = object()  # not comparable: ignored


@pytest.mark.parametrize(
    "change",
    [
        lambda h: h.t.__setitem__(0, torch.nextafter(torch.tensor(1.0), torch.tensor(2.0))),  # one ulp
        lambda h: h.items[1].add_(1.0),
        lambda h: h.items.append(3),
        lambda h: h.table.__setitem__("a", 0.25),
        lambda h: setattr(h, "t", h.t.double()),  # same values, another dtype
    ],
)
def test_any_change_is_caught(change):
    h = Holder()
    before = _snapshot(h)
    change(h)
    with pytest.raises(AssertionError):
        _assert_same_state(before, _snapshot(h))


def test_nan_in_place_and_opaque_values_pass():
    h = Holder()
    before = _snapshot(h)
    h.opaque = object()
    _assert_same_state(before, _snapshot(h))
