"""LoRA dropout with masks built from random bits (``lora.dropout_draw: bits``, :mod:`fltac.models.dropout`).

That the shared-pass bank draws the very masks a lone adapter's :class:`MaskDropout` draws is checked where the
two trainings are compared (``tests/test_speed.py``, both draws); here: the mask's keep rate, its scale, and
the module's behaviour.
"""

from __future__ import annotations

import math

import pytest
import torch

from fltac.models.dropout import MaskDropout, keep_cut, keep_mask, keep_scale


@pytest.mark.parametrize("p", [0.05, 0.1, 0.3])
def test_the_mask_keeps_each_entry_with_probability_one_minus_p(p):
    n = 2_000_000
    keep_prob = 1 - keep_cut(p) / 2 ** 15
    assert abs(keep_prob - (1 - p)) <= 2 ** -16  # the configured p, to the lanes' resolution
    kept = keep_mask((n,), p, torch.Generator().manual_seed(3)).float().mean().item()
    assert abs(kept - keep_prob) < 5 * math.sqrt(keep_prob * (1 - keep_prob) / n)
    assert keep_scale(p) == pytest.approx(1 / keep_prob, rel=1e-12)


def test_the_four_lanes_of_a_word_are_independent_and_uniform():
    """Each of the four 15-bit lanes read from one 64-bit draw is dropped at the same rate (a lane biased by the
    word's top bit, which torch's random_ leaves 0, would show here)."""
    n, p = 4 * 500_000, 0.5
    mask = keep_mask((n,), p, torch.Generator().manual_seed(5)).view(-1, 4).float()
    for lane in range(4):
        assert abs(mask[:, lane].mean().item() - 0.5) < 5 * math.sqrt(0.25 / (n // 4))
    # neighbouring lanes uncorrelated
    centred = mask - mask.mean(0)
    corr = (centred[:, 0] * centred[:, 1]).mean() / (centred[:, 0].std() * centred[:, 1].std())
    assert abs(corr.item()) < 5 / math.sqrt(n // 4)


def test_the_mask_depends_on_the_generator_and_shape_only():
    a = keep_mask((6, 7, 11), 0.2, torch.Generator().manual_seed(9))
    b = keep_mask((6, 7, 11), 0.2, torch.Generator().manual_seed(9))
    c = keep_mask((6, 7, 11), 0.2, torch.Generator().manual_seed(10))
    assert a.dtype == torch.bool and a.shape == (6, 7, 11)
    assert torch.equal(a, b) and not torch.equal(a, c)
    torch.manual_seed(9)  # the global generator, as a lone job seeds it
    assert torch.equal(keep_mask((6, 7, 11), 0.2), a)


def test_mask_dropout_scales_kept_entries_and_is_the_identity_in_eval_mode():
    drop = MaskDropout(0.25)
    x = torch.randn(8, 5, 16)
    torch.manual_seed(1)
    y = drop(x)
    torch.manual_seed(1)
    keep = keep_mask(tuple(x.shape), 0.25)
    assert torch.equal(y, x * keep * torch.tensor(keep_scale(0.25)))
    assert torch.equal(y == 0, ~keep | (x == 0))
    drop.eval()
    assert drop(x) is x
    assert MaskDropout(0.0)(x) is x


def test_mask_dropout_keeps_the_expected_output():
    drop = MaskDropout(0.1)
    torch.manual_seed(0)
    y = drop(torch.ones(1_000_000))
    assert y.mean().item() == pytest.approx(1.0, abs=5 * math.sqrt(0.1 / 0.9 / 1_000_000))
