"""retry_unvalidated: the same draws again without validation where torch's validation refused a parameter."""

import pyro
import pytest
import torch

from ppl_vae.errors import ConfigError
from ppl_vae.inference.validation import retry_unvalidated


def draws_with_a_negative_scale(calls: list[int]):
    def run() -> torch.Tensor:
        calls.append(1)
        eps = torch.randn(3)
        torch.distributions.Normal(
            eps.new_zeros(()), -eps.new_ones(())
        )  # validated: a ValueError before any value
        return eps

    return run


def test_a_refused_parameter_is_met_again_unvalidated_with_the_same_draws():
    calls: list[int] = []
    with pyro.validation_enabled(True):
        torch.manual_seed(0)
        value, met = retry_unvalidated(draws_with_a_negative_scale(calls))
    torch.manual_seed(0)
    assert torch.equal(value, torch.randn(3)) and len(calls) == 2
    assert met.startswith("a distribution got an invalid parameter (") and "scale" in met


def test_without_validation_it_runs_once_and_errors_are_the_callers():
    calls: list[int] = []
    with pyro.validation_enabled(False):
        value, met = retry_unvalidated(draws_with_a_negative_scale(calls))
    assert met == "" and len(calls) == 1 and value.shape == (3,)

    def refused() -> None:
        calls.append(1)
        raise ConfigError("the package's own refusal")

    calls.clear()
    with pyro.validation_enabled(True), pytest.raises(ConfigError):
        retry_unvalidated(refused)
    assert len(calls) == 1  # not retried

    def not_validation() -> None:
        raise ValueError("shape mismatch inside plate")

    with pyro.validation_enabled(True), pytest.raises(ValueError, match="shape mismatch"):
        retry_unvalidated(not_validation)  # the retry meets it again: raised as it is
