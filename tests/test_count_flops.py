"""The MAC counter behind the model cards reproduces the documented counts."""
import importlib.util
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location("count_flops", Path(__file__).parents[1] / "tools" / "count_flops.py")
count_flops = importlib.util.module_from_spec(spec)
spec.loader.exec_module(count_flops)


@pytest.mark.parametrize("name,gmacs", [("vig_t", 1.17), ("vig_s", 4.48)])
def test_vig_counts_match_the_every_linear_layer_count(name, gmacs):
    macs = count_flops.count_macs(count_flops.build(name, 224), 224)
    assert round(macs["total"], 2) == gmacs


def test_attention_is_counted_quadratically_and_gla_linearly():
    deit = count_flops.count_macs(count_flops.build("deit_tiny_patch16_224", 224), 224)
    assert deit["mixer"] == pytest.approx(12 * 2 * 197 ** 2 * 192 / 1e9)
    vig = count_flops.build("vig_t", 224)
    small, large = (count_flops.count_macs(vig, r)["mixer"] for r in (224, 448))
    assert large == pytest.approx(4 * small)


def test_ravlt_counts_rala_linearly_and_its_softmax_stages_quadratically():
    macs = count_flops.count_macs(count_flops.build("ravlt_t", 224), 224)
    assert round(macs["total"], 2) == 2.61
    linear = count_flops.build("ravlt_s_linear", 224)
    small, large = (count_flops.count_macs(linear, r)["mixer"] for r in (224, 448))
    assert large == pytest.approx(4 * small)
    official = count_flops.build("ravlt_s", 224)
    small, large = (count_flops.count_macs(official, r)["mixer"] for r in (224, 448))
    assert large > 8 * small         # stages 3-4 (softmax) dominate and grow with N^2


def test_selective_scans_are_counted_per_route_state_and_token():
    vim = count_flops.count_macs(count_flops.build("vim_t", 224), 224)
    L = 14 * 14 + 1  # patches + the middle class token
    assert vim["mixer"] == pytest.approx(24 * 2 * L * 384 * (2 * 16 + 4) / 1e9)  # 2 directions, conv k4
    vmamba = count_flops.build("vmamba_t", 224)
    small, large = (count_flops.count_macs(vmamba, r)["mixer"] for r in (224, 448))
    stages = [(56, 96, 2), (28, 192, 2), (14, 384, 8), (7, 768, 2)]  # side, d_inner (ssm_ratio 1), depth
    assert small == pytest.approx(sum(depth * 4 * 2 * s * s * d * 1 for s, d, depth in stages) / 1e9)
    assert large == pytest.approx(4 * small)
