from __future__ import annotations

import pytest
import torch


@pytest.fixture
def one_thread():
    # tiny tensors: thread hand-off costs more than it saves on a busy 2-core machine
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
