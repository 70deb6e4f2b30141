"""Every registered visionlin model against timm's conventions (what timm's own test_models.py asserts)."""
import fnmatch

import pytest
import timm
import torch

import visionlin  # noqa: F401  (registers the models)
from zoo import ALL, MODELS, SMALL, get_model, layout, tiny, tiny_args


@pytest.mark.parametrize("name", ALL)
def test_parameter_count_matches_official(name):
    n = sum(p.numel() for p in get_model(name).parameters())
    assert round(n / 1e6, 2) == MODELS[name][0]


@pytest.mark.parametrize("family", ["vig", "ravlt", "vim", "vmamba"])
def test_models_are_registered_with_timm_under_the_family_module(family):
    names = [n for n in ALL if n.startswith(family)]
    assert set(names) <= set(timm.list_models(f"{family}*"))
    assert set(names) <= set(timm.list_models(module=family))


@pytest.mark.parametrize("name", ALL)
def test_forward_is_finite_and_grad_checkpointing_keeps_output(name):
    model = get_model(name)
    x = torch.randn(2, 3, SMALL, SMALL)
    with torch.no_grad():
        out = model(x)
        assert out.shape == (2, 1000) and torch.isfinite(out).all()
        model.set_grad_checkpointing(True)
        try:
            torch.testing.assert_close(model(x), out, rtol=1e-4, atol=1e-5)
        finally:
            model.set_grad_checkpointing(False)


@pytest.mark.parametrize("name", ALL)
def test_backward_reaches_every_parameter_with_new_class_count(name):
    model = tiny(name, num_classes=42)
    out = model(torch.randn(2, 3, SMALL, SMALL))
    assert out.shape == (2, 42)
    out.mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing


@pytest.mark.parametrize("name", ALL)
def test_grad_checkpointing_keeps_gradients(name):
    model = tiny(name, drop_path_rate=0.0).train()
    x = torch.randn(2, 3, SMALL, SMALL)
    model(x).square().mean().backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(x).square().mean().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("name", ALL)
def test_default_cfg_and_unpooled_outputs(name):
    model = get_model(name)
    cfg = model.pretrained_cfg
    assert cfg["num_classes"] == 1000 and model.num_features > 0 and model.head_hidden_size > 0
    assert cfg["mean"] and cfg["std"] and cfg["interpolation"] == "bicubic" and cfg["license"]
    state = model.state_dict()
    assert cfg["classifier"] + ".weight" in state and cfg["first_conv"] + ".weight" in state
    x = torch.randn(1, 3, *cfg["input_size"][1:])
    with torch.no_grad():
        feats = model.forward_features(x)
        if layout(name) == "NLC":
            assert feats.shape == (1, 196 + model.num_prefix_tokens, model.num_features)
        elif layout(name) == "NHWC":
            assert feats.shape[1:3] == cfg["pool_size"] and feats.shape[-1] == model.num_features
        else:
            assert feats.shape[2:] == cfg["pool_size"] and feats.shape[1] == model.num_features
        assert model.forward_head(feats, pre_logits=True).shape == (1, model.head_hidden_size)


@pytest.mark.parametrize("name", ALL)
def test_reset_classifier_and_num_classes_zero(name):
    x = torch.randn(1, 3, SMALL, SMALL)
    model = tiny(name).eval()
    with torch.no_grad():
        feats = model.forward_features(x)
        model.reset_classifier(0)
        assert model(x).shape == (1, model.head_hidden_size)
        model.reset_classifier(0, "")
        unpooled = model(x)
        assert unpooled.ndim == feats.ndim and unpooled.shape[-2 if layout(name) == "NHWC" else -1] == (
            feats.shape[-2 if layout(name) == "NHWC" else -1])
        model.reset_classifier(7, "avg")
        assert model(x).shape == (1, 7)
        assert isinstance(model.get_classifier(), torch.nn.Linear) and model.get_classifier().out_features == 7
        created = tiny(name, num_classes=0, global_pool="")
        assert created.eval()(x).ndim == feats.ndim
    with pytest.raises(ValueError, match="global_pool"):
        model.reset_classifier(0, "max")


@pytest.mark.parametrize("name", ALL)
def test_in_chans_and_num_classes_when_creating(name):
    model = tiny(name, in_chans=1, num_classes=5).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 1, SMALL, SMALL)).shape == (1, 5)
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        model(torch.randn(1, 3, SMALL, SMALL))


@pytest.mark.parametrize("name", ALL)
def test_features_only_channels_and_strides_match_feature_info(name):
    model = timm.create_model(name, features_only=True).eval()
    assert len(model.feature_info.channels()) >= 3
    with torch.no_grad():
        outs = model(torch.randn(1, 3, SMALL * 2, SMALL * 2))
    assert len(outs) == 4
    for out, ch, red in zip(outs, model.feature_info.channels(), model.feature_info.reduction()):
        assert out.shape[1] == ch
        assert out.shape[2] == SMALL * 2 // red and out.shape[3] == SMALL * 2 // red


@pytest.mark.parametrize("name", ALL)
def test_forward_intermediates_final_equals_forward_features(name):
    model = tiny(name).eval()
    x = torch.randn(1, 3, SMALL, SMALL)
    n_levels = len(model.feature_info)
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)
        torch.testing.assert_close(final, model.forward_features(x))
        assert len(inter) == n_levels
        only = model.forward_intermediates(x, indices=2, intermediates_only=True)
        assert len(only) == 2
        torch.testing.assert_close(only[-1], inter[-1])
        pruned = model.prune_intermediate_layers(indices=1)
        assert pruned == [n_levels - 1]
        assert model(x).shape == model.forward_features(x).shape  # head pruned: unpooled


@pytest.mark.parametrize("name", ALL)
def test_no_weight_decay_and_group_matcher_name_real_parameters(name):
    from timm.models import group_parameters
    model = tiny(name)
    names = dict(model.named_parameters())
    # timm matches these with fnmatch against full names: every entry must really match a parameter
    unmatched = [p for p in model.no_weight_decay() if not any(fnmatch.fnmatch(n, p) for n in names)]
    assert not unmatched, unmatched
    groups = group_parameters(model, model.group_matcher())
    assert sum(len(v) for v in groups.values()) == len(names)


@pytest.mark.parametrize("name", ALL)
def test_fx_traced_model_matches_eager(name):
    from timm.models import create_feature_extractor
    model = tiny(name).eval()
    x = torch.randn(1, 3, SMALL, SMALL)
    extractor = create_feature_extractor(model, return_nodes={model.pretrained_cfg["classifier"]: "out"})
    with torch.no_grad():
        torch.testing.assert_close(extractor(x)["out"], model(x))


@pytest.mark.parametrize("name", ["vig_t", "vig_h_t", "ravlt_t"])
def test_save_for_hf_round_trips_through_local_dir(tmp_path, name):
    from timm.models import save_for_hf
    model = tiny(name, num_classes=10).eval()
    save_for_hf(model, str(tmp_path), model_config=tiny_args(name))
    again = timm.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()
    x = torch.randn(1, 3, SMALL, SMALL)
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x))
