"""The official VGGT code's Aggregator (frame / global attention with q/k norm and 2D RoPE; a conv patch embed, or
its DINOv2 ViT-S/14 one with MemEffAttention, attn(x, attn_bias=None, pos=None))
on its real classes, random init, a small config: swapped exactly (topk=1 parity, QAT into proj_l only, deploy =
student). The official code is not on PyPI; with a checkout of facebookresearch/vggt on PYTHONPATH (or installed
with `pip install --no-deps -e <checkout>`) this runs, otherwise it skips."""
import pytest
import torch

from thirdparty_checks import check_family, import_or_skip, perturb, swapped_classes

aggregator = import_or_skip("vggt.models.aggregator")


@pytest.fixture(autouse=True)
def _reference_backend(monkeypatch):
    monkeypatch.setenv("LITE3R_BACKEND", "torch")


@pytest.mark.parametrize("patch_embed,dim,classes", [
    ("conv", 64, {"vggt.layers.attention.Attention": 4}),
    ("dinov2_vits14_reg", 384, {"vggt.layers.attention.Attention": 4,  # the official DINOv2 ViT-S/14 patch embed
                                "vggt.layers.attention.MemEffAttention": 12}),
], ids=["conv", "dinov2"])
def test_vggt_aggregator(patch_embed, dim, classes):
    torch.manual_seed(0)
    model = perturb(aggregator.Aggregator(img_size=56, patch_size=14, embed_dim=dim, depth=2, num_heads=4,
                                          num_register_tokens=2, patch_embed=patch_embed))
    images = torch.rand(1, 2, 3, 56, 56, generator=torch.Generator().manual_seed(0))  # 2 views of 16 patches

    def run(m):
        layers, _ = m(images)
        return torch.cat([t.flatten() for t in layers])

    report = check_family(model, run, swapped=sum(classes.values()))  # 2 frame + 2 global blocks (+ the ViT's)
    assert swapped_classes(report) == classes
