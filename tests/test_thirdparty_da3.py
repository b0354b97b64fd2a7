"""The Depth Anything 3 package's own DINOv2 (depth_anything_3.model.dinov2: frame / cross-view blocks, q/k norm and
2D RoPE from `rope_start`, attention(x, pos=..., attn_mask=None)) on its real classes, random init and a small
config: swapped exactly (topk=1 parity, QAT into proj_l only, deploy = student). The package is on PyPI as
depth-anything-3; its requirements are heavy (xformers, open3d, ...), and this model needs only
`pip install --no-deps depth-anything-3 addict omegaconf`: the test skips when it does not import."""
import pytest
import torch

from thirdparty_checks import check_family, import_or_skip, perturb, swapped_classes

vit = import_or_skip("depth_anything_3.model.dinov2.vision_transformer")


@pytest.fixture(autouse=True)
def _reference_backend(monkeypatch):
    monkeypatch.setenv("LITE3R_BACKEND", "torch")


def test_da3_backbone():
    torch.manual_seed(0)
    model = perturb(vit.DinoVisionTransformer(img_size=56, patch_size=14, embed_dim=64, depth=4, num_heads=4,
                                              alt_start=2, qknorm_start=2, rope_start=2, cat_token=True))
    x = torch.rand(1, 2, 3, 56, 56, generator=torch.Generator().manual_seed(0))  # 2 views of 16 patches

    def run(m):
        layers, _ = m.get_intermediate_layers(x, n=[1, 3])
        return torch.cat([t.flatten() for layer in layers for t in layer])

    report = check_family(model, run, swapped=4)
    assert swapped_classes(report) == {"depth_anything_3.model.dinov2.layers.attention.Attention": 4}
    assert sum(m.rope is not None for m in model.modules() if type(m).__name__ == "Attention") == 2
