"""Replay buffers: sizes and nesting at every step; the table of strategies."""
import pytest

from data import Part, keep_sample
from strategies import STRATEGIES, equal_buffer, exp_buffer, get_strategy, step_parts


@pytest.mark.parametrize("replay", [exp_buffer, equal_buffer])
def test_buffer_sizes_and_nesting(replay):
    for t in range(1, 12):
        now, before = replay(t), replay(t - 1)
        assert now[t] == 1.0                                          # all new data
        assert sum(f for s, f in now.items() if s < t) <= 2.0 + 1e-9  # at most 2D of old data
        assert all(0 < f <= 1.0 for f in now.values())
        for s in range(t):                                            # a buffer only ever shrinks
            assert now[s] <= before[s]


def test_exp_and_equal_fractions():
    assert exp_buffer(4) == {3: 1.0, 2: 0.5, 1: 0.25, 0: 0.125, 4: 1.0}
    assert equal_buffer(1) == {0: 1.0, 1: 1.0}
    assert equal_buffer(4) == {0: 0.5, 1: 0.5, 2: 0.5, 3: 0.5, 4: 1.0}


def test_kept_samples_stay_nested_through_time():
    keys = [f"2019_{i:07d}" for i in range(3000)]
    kept_before = set(keys)
    for t in range(1, 8):
        fraction = exp_buffer(t)[0]
        kept = {k for k in keys if keep_sample(k, fraction, seed=0)}
        assert kept <= kept_before                                     # dropped once, never back
        assert abs(len(kept) / len(keys) - fraction) < 0.04
        kept_before = kept


def test_step_parts_and_budgets():
    steps = [[Part(str(2018 + s), [(f"{s}.tar", 100)])] for s in range(4)]
    parts = step_parts(STRATEGIES["cumulative-exp"], 3, steps)
    assert [(p.name, p.keep_fraction) for p in parts] == [("2018", 0.25), ("2019", 0.5), ("2020", 1.0), ("2021", 1.0)]
    assert [p.name for p in step_parts(STRATEGIES["sequential"], 2, steps)] == ["2020"]
    assert [STRATEGIES["oracle"].budget_steps(t) for t in range(4)] == [1, 2, 3, 4]
    assert all(STRATEGIES[n].budget_steps(3) == 1 for n in STRATEGIES if n != "oracle")
    assert not STRATEGIES["restart"].warm_start and STRATEGIES["sequential"].warm_start
    with pytest.raises(SystemExit, match="unknown strategy 'nope'.*sequential"):
        get_strategy("nope")


def test_distillation_is_zero_for_identical_models_and_positive_otherwise():
    import torch
    import torch.nn.functional as F
    from strategies import distillation_loss
    g = torch.Generator().manual_seed(0)
    img, txt = F.normalize(torch.randn(16, 8, generator=g), dim=-1), F.normalize(torch.randn(16, 8, generator=g), dim=-1)
    scale = torch.tensor(14.3)
    assert distillation_loss(img, txt, scale, img, txt, scale).abs() < 1e-6
    other = F.normalize(img + 0.5 * torch.randn(16, 8, generator=g), dim=-1)
    assert distillation_loss(other, txt, scale, img, txt, scale) > 1e-3


def test_interpolate_endpoints_and_midpoint():
    import torch
    from model import CLIP, make_config
    torch.manual_seed(0)
    prev = CLIP(make_config("tiny", vocab_size=64)).state_dict()
    torch.manual_seed(1)
    ft = CLIP(make_config("tiny", vocab_size=64)).state_dict()
    from strategies import interpolate
    at0, at1, half = interpolate(prev, ft, 0.0), interpolate(prev, ft, 1.0), interpolate(prev, ft, 0.5)
    assert all(torch.equal(at0[k], prev[k]) for k in prev)
    assert all(torch.equal(at1[k], ft[k]) for k in ft)
    assert all(torch.allclose(half[k], (prev[k] + ft[k]) / 2) for k in ft)
