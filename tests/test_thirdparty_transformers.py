"""transformers' ViT-family attention on the real classes (Dinov2Model, ViTModel; random init, small configs, CPU):
q_proj / k_proj / v_proj / o_proj with num_attention_heads and `scaling`, called as attention(hidden_states,
attention_mask) and returning (output, attention weights). Swapped exactly (topk=1 parity, QAT into proj_l only,
deploy = student), or refused with one line when a mask arrives."""
import copy

import pytest
import torch

import lite3r
from thirdparty_checks import check_family, import_or_skip, perturb, swapped_classes

transformers = import_or_skip("transformers", "Dinov2Config", "Dinov2Model", "ViTConfig", "ViTModel")


@pytest.fixture(autouse=True)
def _reference_backend(monkeypatch):
    monkeypatch.setenv("LITE3R_BACKEND", "torch")


SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, image_size=56,
             qkv_bias=True)


def _build(config_cls, model_cls, **kwargs):
    torch.manual_seed(0)
    config = config_cls(**{**SMALL, **kwargs})
    return perturb(model_cls(config)), config


@pytest.mark.parametrize("family", ["dinov2", "vit"])
def test_swapped_exactly(family):
    if family == "dinov2":
        model, config = _build(transformers.Dinov2Config, transformers.Dinov2Model, patch_size=14,
                               attention_probs_dropout_prob=0.1)  # dropout: off in eval, so never refused there
        x = torch.rand(2, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    else:
        model, config = _build(transformers.ViTConfig, transformers.ViTModel, patch_size=8, add_pooling_layer=False)
        x = torch.rand(2, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    run = lambda m: m(pixel_values=x).last_hidden_state  # noqa: E731
    report = check_family(model, run, swapped=config.num_hidden_layers)
    (cls, n), = swapped_classes(report).items()
    assert n == config.num_hidden_layers and cls.startswith("transformers.models.")


def test_mask_refused_at_call():
    model, _ = _build(transformers.ViTConfig, transformers.ViTModel, patch_size=8, add_pooling_layer=False)
    student = copy.deepcopy(model).eval()
    lite3r.swap_attention(student, fp8=False)
    attn = student.layers[0].attention
    assert isinstance(attn, lite3r.SLAAttention)
    h = torch.randn(1, 50, 64)
    out, weights = attn(h, None)  # the transformers convention: (output, attention weights)
    assert out.shape == h.shape and weights is None
    with pytest.raises(lite3r.Lite3rError, match="attention_mask"):
        attn(h, torch.zeros(1, 1, 50, 50))
