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
    # 2 directions: state update + read-out (d_state 16), dt_proj (dt_rank 12, inside the scan), conv k4,
    # x_proj (to dt_rank + 2 d_state, inside the conv op)
    assert vim["mixer"] == pytest.approx(24 * 2 * L * 384 * (2 * 16 + 12 + 4 + 12 + 32) / 1e9)
    # every linear layer once: in_proj, out_proj (counted as ops; x_proj and dt_proj in the mixer count),
    # patch embedding, head
    linear = 24 * L * (192 * 768 + 384 * 192) + 196 * 16 * 16 * 3 * 192 + 192 * 1000
    assert vim["layers"] == pytest.approx(linear / 1e9)
    vmamba = count_flops.build("vmamba_t", 224)
    small, large = (count_flops.count_macs(vmamba, r)["mixer"] for r in (224, 448))
    # side, d_inner (ssm_ratio 1), dt_rank, depth; 4 routes, d_state 1: state update + read-out, dt_proj
    # (inside the scan) and x_proj (a batched einsum) to dt_rank + 2 d_state
    stages = [(56, 96, 6, 2), (28, 192, 12, 2), (14, 384, 24, 8), (7, 768, 48, 2)]
    assert small == pytest.approx(sum(depth * 4 * s * s * d * (2 + r + r + 2) for s, d, r, depth in stages) / 1e9)
    assert large == pytest.approx(4 * small)
