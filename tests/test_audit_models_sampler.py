"""The sampler's per-call prediction type (audit of the models): a value it does not know is
refused, not read as epsilon."""

from __future__ import annotations

import pytest
import torch

from diffedit.errors import ParameterError
from diffedit.models.config import PRESETS
from diffedit.sampler import DDIM

SAMPLER = DDIM(PRESETS["sd1"].scheduler)
X, OUT = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.randn(1, 4, 8, 8)
CALLS = {
    "step": lambda p: SAMPLER.step(OUT, 981, 961, X, prediction_type=p),
    "inverse_step": lambda p: SAMPLER.inverse_step(OUT, 961, 981, X, prediction_type=p),
    "predict_x0_and_eps": lambda p: SAMPLER.predict_x0_and_eps(OUT, X, 981, prediction_type=p),
}


@pytest.mark.parametrize("call", CALLS)
@pytest.mark.parametrize("typo", ["v-prediction", "v", "sample", "eps"])
def test_unknown_prediction_type_is_refused(call, typo):
    with pytest.raises(ParameterError, match=f"prediction_type '{typo}' is not supported; use epsilon or v_prediction"):
        CALLS[call](typo)


@pytest.mark.parametrize("call", CALLS)
def test_known_prediction_types_still_differ(call):
    def first(p):
        result = CALLS[call](p)
        return result[0] if isinstance(result, tuple) else result
    assert torch.equal(first(None), first("epsilon"))  # the config's (SD 1: epsilon)
    assert not torch.allclose(first("v_prediction"), first("epsilon"))
