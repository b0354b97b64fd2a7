"""transformers' vision attention on the real classes (random init, small configs, CPU): q_proj / k_proj / v_proj
with num_attention_heads and `scaling`, an o_proj / out_proj or none (*SelfAttention: the caller projects), called
as attention(hidden_states, attention_mask, position_embeddings=(cos, sin)) and returning (output, weights).
Swapped exactly (topk=1 parity, QAT into proj_l only, deploy = student): Dinov2, ViT, DINOv3 (rope), Siglip (its
pooling head's nn.MultiheadAttention left dense), YOLOS (*SelfAttention), ViTMAE, Data2Vec (query / key / value);
refused at swap time with one line: BEiT's relative position biases (per layer and shared, fed in as
attention_mask), Data2Vec's, Swin and Swin v2."""
import copy

import pytest
import torch

import lite3r
from thirdparty_checks import check_family, import_or_skip, perturb, swapped_classes

MODELS = ("Dinov2", "ViT", "DINOv3ViT", "SiglipVision", "Yolos", "ViTMAE", "Data2VecVision", "Beit", "Swin", "Swinv2")
transformers = import_or_skip("transformers", *(f"{m}{kind}" for m in MODELS for kind in ("Config", "Model")))


@pytest.fixture(autouse=True)
def _reference_backend(monkeypatch):
    monkeypatch.setenv("LITE3R_BACKEND", "torch")


SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, image_size=56,
             qkv_bias=True)
FAMILIES = {  # name: (model, config, input size, forward kwargs)
    "dinov2": ("Dinov2", dict(patch_size=14, attention_probs_dropout_prob=0.1), 56, {}),  # dropout: off in eval
    "vit": ("ViT", dict(patch_size=8), 56, {}),
    "dinov3-rope": ("DINOv3ViT", dict(patch_size=8, num_register_tokens=2), 56, {}),
    "siglip": ("SiglipVision", dict(patch_size=8), 56, {}),
    "yolos-selfattention": ("Yolos", dict(patch_size=8, image_size=[56, 56], num_detection_tokens=3), 56, {}),
    "vitmae": ("ViTMAE", dict(patch_size=8, mask_ratio=0.5), 56, {"noise": torch.rand(2, 49)}),
    "data2vec-query-key-value": ("Data2VecVision", dict(patch_size=8), 56, {}),  # called with resolution=(H, W)
}


def _build(name, **kwargs):
    torch.manual_seed(0)
    config = getattr(transformers, f"{name}Config")(**{**SMALL, **kwargs})
    return perturb(getattr(transformers, f"{name}Model")(config)), config


@pytest.mark.parametrize("family", list(FAMILIES))
def test_swapped_exactly(family):
    name, kwargs, size, extra = FAMILIES[family]
    model, config = _build(name, **kwargs)
    x = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    run = lambda m: m(pixel_values=x, **extra).last_hidden_state  # noqa: E731
    report = check_family(model, run, swapped=config.num_hidden_layers)
    swapped = {cls: n for cls, n in swapped_classes(report).items() if n}
    (cls, n), = swapped.items()
    assert n == config.num_hidden_layers and cls.startswith("transformers.models.")
    if family == "siglip":  # its attention-pooling head stays dense, and the report says why
        assert report.by_class()["torch.nn.modules.activation.MultiheadAttention"] == {"dense": 1}


@pytest.mark.parametrize("name,kwargs,why", [
    ("Beit", dict(patch_size=8, use_relative_position_bias=True), "relative position bias outside it "
     "(layers.0.relative_position_bias) reaches its attention scores through attention_mask"),
    ("Beit", dict(patch_size=8, use_shared_relative_position_bias=True), "relative position bias outside it "
     "(shared_position_bias) reaches its attention scores through attention_mask"),
    ("Data2VecVision", dict(patch_size=8, use_relative_position_bias=True), "relative position bias"),
    ("Swin", dict(patch_size=4, embed_dim=16, depths=[1], num_heads=[2], window_size=7), "relative position bias"),
    ("Swinv2", dict(patch_size=4, embed_dim=16, depths=[1], num_heads=[2], window_size=7), "relative position bias"),
], ids=["beit-relpos", "beit-shared-relpos", "data2vec-relpos", "swin", "swinv2"])
def test_refused_at_swap_time(name, kwargs, why):
    if name.startswith("Swin"):
        torch.manual_seed(0)
        model = getattr(transformers, f"{name}Model")(getattr(transformers, f"{name}Config")(image_size=56, **kwargs))
    else:
        model, _ = _build(name, **kwargs)
    with pytest.raises(lite3r.Lite3rError) as e:
        lite3r.swap_attention(model)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("SLA refuses ") and why in msg and "(transformers.models." in msg, msg
    assert not any(isinstance(m, lite3r.SLAAttention) for m in model.modules())


def test_mask_refused_at_call():
    model, _ = _build("ViT", patch_size=8)
    student = copy.deepcopy(model).eval()
    lite3r.swap_attention(student, fp8=False)
    attn = student.layers[0].attention
    assert isinstance(attn, lite3r.SLAAttention)
    h = torch.randn(1, 50, 64)
    out, weights = attn(h, None)  # the transformers convention: (output, attention weights)
    assert out.shape == h.shape and weights is None
    with pytest.raises(lite3r.Lite3rError, match="attention_mask"):
        attn(h, torch.zeros(1, 1, 50, 50))
