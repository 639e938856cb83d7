"""timm models: handled with cut == removal and an exact ledger, or documented with the reason.

The timm counterpart of tests/test_torchvision_matrix.py, at random initialisation (no
pretrained weights offline), on small inputs. A model is *handled* when `adapter: auto`
finds its units, the up-front per-layer check (`cswap.verify`) leaves out, each with its
reason, the layers whose cut is not their removal, as a run would, and removing two random
units of every remaining layer through the plan equals cutting them (float64 and float32)
with the parameter count the ledger predicted (`removal_check.check_cut_equals_removal`).
Every other model is listed in docs/architectures.md ("timm models", table "Not handled")
with what happens, which this test reads and checks: a one-line ModelError naming the module,
or no layer left (every one with its reason). Models whose discovery runs longer than five
minutes or exhausts memory are documented and not run. A representative subset runs by
default; the full set (104 models of 84 families) is `pytest -m slow tests/test_timm_matrix.py`.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from cswap.build import resolve_adapter
from cswap.errors import ModelError
from cswap.verify import verify_units

from removal_check import check_cut_equals_removal, prepare

timm = pytest.importorskip("timm")

DOC = Path(__file__).resolve().parents[1] / "docs" / "architectures.md"
VIT64 = {"img_size": 64}
# name: (family, input size, timm kwargs); CNNs first, then hybrids, then transformers and MLPs
MODELS: dict[str, tuple[str, int, dict]] = {
    "resnet18": ("ResNet", 64, {}), "resnet10t": ("ResNet", 64, {}), "resnet26d": ("ResNet", 64, {}),
    "seresnext26d_32x4d": ("ResNeXt", 64, {}), "ecaresnet26t": ("ECA-ResNet", 64, {}),
    "skresnet18": ("SK-ResNet", 64, {}), "resnest14d": ("ResNeSt", 64, {}), "res2net50_14w_8s": ("Res2Net", 64, {}),
    "res2next50": ("Res2Net", 64, {}), "resnetv2_50": ("ResNetV2", 64, {}),
    "efficientnet_b0": ("EfficientNet", 64, {}), "efficientnet_lite0": ("EfficientNet", 64, {}),
    "efficientnet_es": ("EfficientNet", 64, {}), "tf_efficientnetv2_b0": ("EfficientNetV2", 64, {}),
    "efficientnetv2_rw_t": ("EfficientNetV2", 64, {}), "mobilenetv2_050": ("MobileNetV2", 64, {}),
    "mobilenetv3_small_050": ("MobileNetV3", 64, {}), "mobilenetv4_conv_small": ("MobileNetV4", 64, {}),
    "mnasnet_small": ("MnasNet", 64, {}), "semnasnet_050": ("MnasNet", 64, {}), "fbnetc_100": ("FBNet", 64, {}),
    "spnasnet_100": ("SPNASNet", 64, {}), "lcnet_050": ("LCNet", 64, {}), "tinynet_e": ("TinyNet", 64, {}),
    "hardcorenas_a": ("HardCoRe-NAS", 64, {}), "mixnet_s": ("MixNet", 64, {}), "ghostnet_100": ("GhostNet", 64, {}),
    "ghostnetv2_100": ("GhostNet", 64, {}), "ghostnetv3_100": ("GhostNet", 64, {}),
    "repghostnet_050": ("RepGhostNet", 64, {}), "rexnet_100": ("RexNet", 64, {}),
    "regnetx_002": ("RegNet", 64, {}), "regnety_002": ("RegNet", 64, {}), "regnetz_b16": ("RegNet", 64, {}),
    "convnext_atto": ("ConvNeXt", 64, {}), "convnextv2_atto": ("ConvNeXt", 64, {}),
    "densenet121": ("DenseNet", 64, {}), "dla46_c": ("DLA", 64, {}), "dpn48b": ("DPN", 64, {}),
    "hrnet_w18_small": ("HRNet", 64, {}), "cspresnet50": ("CSPNet", 64, {}), "cspdarknet53": ("CSPNet", 64, {}),
    "cs3darknet_s": ("CSPNet", 64, {}), "darknet17": ("DarkNet", 64, {}), "selecsls42b": ("SelecSLS", 64, {}),
    "gernet_s": ("GENet", 64, {}), "repvgg_a0": ("RepVGG", 64, {}), "mobileone_s0": ("MobileOne", 64, {}),
    "ese_vovnet19b_slim_dw": ("VoVNet", 64, {}), "hgnetv2_b0": ("HGNet", 64, {}), "hgnet_tiny": ("HGNet", 64, {}),
    "nf_resnet26": ("NFNet", 64, {}), "inception_v3": ("Inception", 96, {}), "xception41": ("Xception", 64, {}),
    "vgg11": ("VGG", 64, {}), "starnet_s1": ("StarNet", 64, {}), "repvit_m0_9": ("RepViT", 64, {}),
    "inception_next_tiny": ("InceptionNeXt", 64, {}), "rdnet_tiny": ("RDNet", 64, {}),
    "mambaout_femto": ("MambaOut", 64, {}), "lambda_resnet26t": ("LambdaNet", 64, {}),
    # hybrids
    "edgenext_xx_small": ("EdgeNeXt", 64, {}), "poolformerv2_s12": ("PoolFormer", 64, {}),
    "convmixer_768_32": ("ConvMixer", 64, {}), "fastvit_t8": ("FastViT", 64, {}),
    "mobilevit_xxs": ("MobileViT", 64, {}), "mobilevitv2_050": ("MobileViT", 64, {}),
    "levit_128s": ("LeViT", 64, VIT64), "efficientformer_l1": ("EfficientFormer", 224, {}),
    "efficientformerv2_s0": ("EfficientFormer", 224, {}), "efficientvit_b0": ("EfficientViT", 64, {}),
    "efficientvit_m0": ("EfficientViT", 224, {}), "nextvit_small": ("Next-ViT", 64, {}),
    "shvit_s1": ("SHViT", 224, {}), "coat_lite_tiny": ("CoaT", 224, {}), "coatnet_nano_rw_224": ("CoAtNet", 224, {}),
    "maxvit_nano_rw_256": ("MaxViT", 256, {}), "convit_tiny": ("ConViT", 64, VIT64),
    "crossvit_tiny_240": ("CrossViT", 240, {}), "pit_ti_224": ("PiT", 64, VIT64),
    "tnt_s_patch16_224": ("TNT", 64, VIT64), "twins_pcpvt_small": ("Twins", 64, {}), "pvt_v2_b0": ("PVTv2", 64, {}),
    "mvitv2_tiny": ("MViTv2", 64, VIT64), "xcit_nano_12_p16_224": ("XCiT", 64, VIT64),
    "visformer_tiny": ("Visformer", 224, {}), "tiny_vit_5m_224": ("TinyViT", 224, {}),
    # transformers and MLPs
    "cait_xxs24_224": ("CaiT", 64, VIT64), "deit_tiny_patch16_224": ("DeiT", 64, VIT64),
    "deit_tiny_distilled_patch16_224": ("DeiT", 64, VIT64), "vit_tiny_patch16_224": ("ViT", 64, VIT64),
    "eva02_tiny_patch14_224": ("EVA-02", 56, {"img_size": 56}), "beit_base_patch16_224": ("BEiT", 64, VIT64),
    "swin_tiny_patch4_window7_224": ("Swin", 224, {}), "swinv2_cr_tiny_ns_224": ("Swin", 224, {}),
    "gcvit_xxtiny": ("GCViT", 224, {}), "sequencer2d_s": ("Sequencer", 224, {}), "mixer_s32_224": ("MLP-Mixer", 64, VIT64),
    "resmlp_12_224": ("ResMLP", 64, VIT64), "gmlp_ti16_224": ("gMLP", 64, VIT64),
    "focalnet_tiny_srf": ("FocalNet", 64, {}), "davit_tiny": ("DaViT", 64, {}), "hiera_tiny_224": ("Hiera", 64, VIT64),
    "vitamin_small_224": ("ViTamin", 64, VIT64),
}
# ~30 s on one CPU thread: plain and depthwise CNNs, grouped convolutions left out, LayerNorm
# groups left out (ConvNeXt; ConvNeXt-V2 has none left), a hybrid and LeViT with layers the
# check leaves out, MixNet's broken splits, and a ViT through the vit adapter's own removal
DEFAULT = {"resnet10t", "regnetx_002", "mobilenetv3_small_050", "efficientnet_lite0", "convnext_atto",
           "convnextv2_atto", "mobilevit_xxs", "levit_128s", "mixnet_s", "deit_tiny_patch16_224"}
NOT_RUN = ("not run:",)  # documented outcomes whose check would take minutes or exhaust memory


def not_handled() -> dict[str, str]:
    """The `| model | outcome | reason |` rows of the timm "Not handled" table."""
    text = DOC.read_text().split("## timm models", 1)[1].split("### Not handled", 1)[1].split("\n#", 1)[0]
    rows = re.findall(r"^\|\s*`([a-z0-9_]+)`\s*\|\s*(.+?)\s*\|\s*(.+?)\s*\|\s*$", text, flags=re.MULTILINE)
    return {name: f"{outcome}: {reason}" for name, outcome, reason in rows}


def build(name: str) -> tuple[torch.nn.Module, torch.Tensor]:
    _, size, kwargs = MODELS[name]
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10, **kwargs).eval()
    prepare(model, torch.randn(4, 3, size, size))
    return model, torch.randn(2, 3, size, size)


def check_documented_outcome(name: str, outcome: str) -> None:
    """What the docs say happens is what happens, and it is never a raw error."""
    model, x = build(name)
    _, adapter = resolve_adapter("auto", model)
    if outcome.startswith("ModelError"):
        with pytest.raises(ModelError, match=r"module '[^']+'") as info:
            adapter.units(model, x)
        assert "\n" not in str(info.value)
    else:
        assert outcome.startswith("no layer left"), outcome
        graph = adapter.units(model, x)
        graph = verify_units(model, graph, adapter, x)
        assert not graph.layers and graph.skipped and all(len(why) > 15 for why in graph.skipped.values())


@pytest.mark.parametrize("name", [pytest.param(n, marks=[] if n in DEFAULT else [pytest.mark.slow]) for n in MODELS])
def test_timm_model_is_handled_or_fails_as_documented(name, one_thread):
    documented = not_handled()
    if name not in documented:
        result = check_cut_equals_removal(*build(name), per_layer=2, verify=True)
        assert result["layers"] >= 1
        return
    if documented[name].startswith(NOT_RUN):
        pytest.skip(f"documented: {documented[name]}")
    check_documented_outcome(name, documented[name])


# timm's ResNet class (timm.models.resnet.ResNet) builds these; ResNet-V2 is another class
TIMM_RESNETS = ["resnet18", "resnet10t", "resnet26d", "seresnext26d_32x4d", "ecaresnet26t", "skresnet18",
                "resnest14d", "res2net50_14w_8s", "res2next50"]


@pytest.mark.parametrize("name", TIMM_RESNETS)
@torch.no_grad()
def test_timm_resnets_get_the_resnet_adapter_and_its_stage_chain(name, one_thread):
    """The staged engine applies: `adapter: auto` picks the resnet adapter, whose stages run
    in order compute the model's forward exactly (not only on torchvision's ResNets)."""
    from removal_check import stages_forward

    from cswap.engine import stage_chain

    model, x = build(name)
    adapter_name, adapter = resolve_adapter("auto", model)
    assert adapter_name == "resnet"
    stages = adapter.stages(model)
    assert len(stages) == 2 + sum(len(getattr(model, f"layer{i}")) for i in range(1, 5))
    torch.testing.assert_close(stages_forward(stages, x), model(x), atol=0, rtol=0)
    assert stage_chain("auto", stages, model, x) is not None  # what engine auto then runs
    assert not any(isinstance(m, type(model)) for s in stages for m in s.modules())  # no stage holds the whole model


def test_documented_models_are_tested_and_most_are_handled():
    documented = not_handled()
    assert set(documented) <= set(MODELS), f"docs list untested models: {set(documented) - set(MODELS)}"
    assert all(len(reason) > 30 for reason in documented.values()), "every model that is not handled needs a reason"
    handled = len(MODELS) - len(documented)
    assert handled >= 0.8 * len(MODELS), f"only {handled}/{len(MODELS)} timm models handled"
    assert len({family for family, _, _ in MODELS.values()}) >= 30
    section = DOC.read_text().split("## timm models", 1)[1].split("### Not handled", 1)[0]
    counts = re.search(r"Handled: (\d+) of (\d+)", section)
    assert counts and (int(counts[1]), int(counts[2])) == (handled, len(MODELS)), "the docs' count is stale"
    listed = set(re.findall(r"^\|\s*`([a-z0-9_]+)`\s*\|", section, flags=re.MULTILINE))
    assert listed == set(MODELS) - set(documented), "the handled table must list exactly the handled models"


def test_dry_run_lists_the_layers_the_check_leaves_out(tmp_path, capsys, one_thread):
    """`cswap prune --dry-run` on a timm model: the layers whose removal breaks LeViT's
    attention downsampling are "not pruned" with the module and the error, before any run."""
    import yaml

    from cswap.cli import main

    cfg = {"name": "levit", "model": {"source": "timm", "name": "levit_128s", "kwargs": {"img_size": 64, "num_classes": 10}},
           "task": {"name": "classification",
                    "options": {"dataset": "cifar10", "root": str(tmp_path / "absent"), "input_shape": [3, 64, 64]}},
           "adapter": {"name": "auto"}, "output": {"dir": str(tmp_path / "runs")}}
    path = tmp_path / "levit.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["prune", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "in 15 layers" in out
    assert ("not pruned: stages.0.blocks.1.mlp.ln2.linear: removing channels [0, 64, 127] breaks the model's forward "
            "in module 'stages.1.downsample.attn_downsample.q.ln.linear'") in out
