"""Models: torchvision and timm by name, teacher head slicing, teachers and students from files."""

from __future__ import annotations

import pytest
import timm
import torch
import torchvision

from fastkd.errors import FastKDError
from fastkd.checkpoint import build_last
from fastkd.models import arch_label, build_model, count_params, load_teacher, network_names, resolve_arch, slice_head

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def manifest_for(indices):
    return {"classes": [{"label": i, "wnid": f"n{i:08d}", "name": f"c{i}", "imagenet_index": idx}
                        for i, idx in enumerate(indices)]}


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2", "squeezenet1_0"])
def test_sliced_logits_are_full_logits_rows(arch):
    torch.manual_seed(0)
    full = torchvision.models.get_model(arch, weights=None, num_classes=1000).eval()
    x = torch.randn(2, 3, 64, 64)
    indices = [15, 3, 999, 0, 417]
    with torch.no_grad():
        expected = full(x)[:, indices]
        sliced = slice_head(full, indices)
        got = sliced(x)
    assert got.shape == (2, 5)
    torch.testing.assert_close(got, expected)


def test_teacher_from_imagenet_state_dict_is_sliced(tmp_path):
    """A 1000-way torchvision state_dict file (what `imagenet` downloads) keeps the manifest rows."""
    torch.manual_seed(0)
    full = torchvision.models.get_model("resnet18", weights=None, num_classes=1000).eval()
    torch.save(full.state_dict(), tmp_path / "resnet18-imagenet.pth")
    indices = [7, 1, 500]
    teacher = load_teacher(str(tmp_path / "resnet18-imagenet.pth"), "resnet18", manifest_for(indices))
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(teacher(x.contiguous(memory_format=torch.channels_last)), full(x)[:, indices])


def test_imagenet_teacher_needs_imagenet_classes():
    manifest = {"classes": [{"label": 0, "wnid": "digit0", "name": "0", "imagenet_index": None}]}
    with pytest.raises(FastKDError, match="digit0"):
        load_teacher("imagenet", "resnet18", manifest)


def test_k_way_state_dict_and_errors(tmp_path):
    net = build_model("mobilenet_v2", 10)
    torch.save(net.state_dict(), tmp_path / "m.pt")
    teacher = load_teacher(str(tmp_path / "m.pt"), "mobilenet_v2", manifest_for([None] * 10))
    for a, b in zip(teacher.state_dict().values(), net.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(FastKDError, match="m.pt"):
        load_teacher(str(tmp_path / "m.pt"), "resnet18", manifest_for([None] * 10))
    with pytest.raises(FastKDError, match="missing.pt"):
        load_teacher(str(tmp_path / "missing.pt"), "resnet18", manifest_for([None] * 10))


def test_build_model_by_name():
    net = build_model("resnet18", 7)
    assert net.fc.out_features == 7
    assert net.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(FastKDError, match="resnet1800"):
        build_model("resnet1800", 7)


def test_network_names():
    assert network_names(["resnet18", "resnet18", "mobilenet_v2"]) == ["resnet18", "resnet18-2", "mobilenet_v2"]
    assert network_names(["timm:resnet18", "resnet18", "tv:mobilenet_v2"]) == ["resnet18", "resnet18-2", "mobilenet_v2"]


def test_naming_rule_torchvision_first_then_timm():
    assert resolve_arch("resnet18").zoo == "torchvision" and resolve_arch("tv:resnet18").zoo == "torchvision"
    assert resolve_arch("torchvision:resnet18").label == "torchvision:resnet18"
    assert resolve_arch("timm:resnet18").label == "timm:resnet18"  # the prefix forces timm
    assert arch_label("resnet10t") == "timm:resnet10t"  # not in torchvision: timm's
    assert arch_label("timm:resnet50.a1_in1k") == "timm:resnet50.a1_in1k"  # a pretrained tag is kept
    with pytest.raises(FastKDError, match="not a torchvision classifier"):
        resolve_arch("tv:resnet10t")


def test_timm_model_builds_and_trains_channels_last():
    """A timm resnet as a student: [B, K] logits, backward, channels_last and bf16 autocast work."""
    torch.manual_seed(0)
    net = build_model("resnet10t", 4)
    assert isinstance(net, timm.models.ResNet) and net.get_classifier().out_features == 4
    assert net.conv1[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert count_params(net) == sum(p.numel() for p in timm.create_model("resnet10t", num_classes=4).parameters())
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    logits = net(x)
    assert logits.shape == (2, 4)
    logits.square().mean().backward()
    assert net.fc.weight.grad is not None and net.conv1[0].weight.grad.abs().sum() > 0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert net(x).dtype == torch.bfloat16
    assert isinstance(build_model("timm:resnet18", 3, channels_last=False), timm.models.ResNet)


def test_unknown_name_suggests_close_names_of_both_zoos():
    with pytest.raises(FastKDError) as info:
        build_model("resnet1800", 4)
    message = str(info.value)
    assert "resnet1800" in message and "resnet18," in message and "resnet10t" in message  # torchvision's, timm's
    with pytest.raises(FastKDError, match=r"'timm:convnxt_tiny': not a timm model; closest: timm:convnext_tiny"):
        build_model("timm:convnxt_tiny", 4)
    with pytest.raises(FastKDError, match=r"no pretrained tag 'nope' for resnet50 \(its tags: .*a1_in1k"):
        build_model("timm:resnet50.nope", 4)


def test_distilled_timm_heads_are_both_sliced():
    """deit distilled: two heads (head, head_dist) averaged in eval; both keep the rows."""
    torch.manual_seed(0)
    full = timm.create_model("deit_tiny_distilled_patch16_224", img_size=32, num_classes=1000).eval()
    x = torch.randn(2, 3, 32, 32)
    indices = [9, 400, 1]
    with torch.no_grad():
        expected = full(x)[:, indices]
        torch.testing.assert_close(slice_head(full, indices)(x), expected)
    assert full.head.out_features == 3 and full.head_dist.out_features == 3


def test_teacher_checkpoint_classes_must_match(tmp_path):
    from fastkd.checkpoint import build_last

    net = build_model("resnet18", 3)
    classes = manifest_for([None] * 3)["classes"]
    ckpt = build_last(archs={"resnet18": "resnet18"}, models={"resnet18": net.state_dict()}, classes=classes)
    torch.save(ckpt, tmp_path / "last.pt")
    teacher = load_teacher(str(tmp_path / "last.pt"), "resnet18", {"classes": classes})
    assert teacher.fc.out_features == 3
    other = [dict(c, wnid=f"x{c['label']}") for c in classes]
    with pytest.raises(FastKDError, match="other classes"):
        load_teacher(str(tmp_path / "last.pt"), "resnet18", {"classes": other})


def test_wrong_architecture_says_what_the_file_looks_like(tmp_path):
    """A resnet18 state_dict given as a resnet50 teacher: a short message naming resnet18, not a key dump."""
    torch.save(build_model("resnet18", 4).state_dict(), tmp_path / "r18.pt")
    with pytest.raises(FastKDError) as info:
        load_teacher(str(tmp_path / "r18.pt"), "resnet50", manifest_for([None] * 4))
    message = str(info.value)
    assert "r18.pt" in message and "resnet18, not resnet50" in message
    assert "198 of resnet50's 320 keys missing" in message and "193 more" in message
    assert len(message) < 800 and "\n" not in message


def test_other_class_count_is_named(tmp_path):
    torch.save(build_model("resnet18", 7).state_dict(), tmp_path / "seven.pt")
    with pytest.raises(FastKDError, match=r"seven\.pt: its resnet18 head has 7 outputs, the data 4 classes"):
        load_teacher(str(tmp_path / "seven.pt"), "resnet18", manifest_for([None] * 4))


def test_1000_way_file_on_non_imagenet_classes_names_the_file(tmp_path):
    torch.save(build_model("resnet18", 1000, channels_last=False).state_dict(), tmp_path / "in1k.pt")
    manifest = {"classes": [{"label": 0, "wnid": "digit0", "name": "0", "imagenet_index": None},
                            {"label": 1, "wnid": "digit1", "name": "1", "imagenet_index": None}]}
    with pytest.raises(FastKDError) as info:
        load_teacher(str(tmp_path / "in1k.pt"), "resnet18", manifest)
    message = str(info.value)
    assert message.startswith(str(tmp_path / "in1k.pt")) and "1000-way" in message and "digit0" in message
    assert "`imagenet`" not in message  # the user gave a path, not the word imagenet


def _run_folder(tmp_path, classes):
    """RUN/checkpoints with best-resnet18.pt (weights A) and last.pt (weights B), both 3-way."""
    torch.manual_seed(0)
    best, last = build_model("resnet18", 3), build_model("resnet18", 3)
    ckpts = tmp_path / "run" / "checkpoints"
    ckpts.mkdir(parents=True)
    torch.save(best.state_dict(), ckpts / "best-resnet18.pt")
    torch.save(build_last(archs={"resnet18": "resnet18"}, models={"resnet18": last.state_dict()}, classes=classes),
               ckpts / "last.pt")
    return tmp_path / "run", best, last


def test_run_folder_as_teacher_weights(tmp_path):
    classes = manifest_for([None] * 3)["classes"]
    run, best, last = _run_folder(tmp_path, classes)
    teacher = load_teacher(str(run), "resnet18", {"classes": classes})
    assert torch.equal(teacher.fc.weight, best.fc.weight)  # best-<arch>.pt first
    (run / "checkpoints" / "best-resnet18.pt").unlink()
    teacher = load_teacher(str(run), "resnet18", {"classes": classes})
    assert torch.equal(teacher.fc.weight, last.fc.weight)  # else last.pt


def test_best_file_beside_last_is_checked_for_classes(tmp_path):
    classes = manifest_for([None] * 3)["classes"]
    run, _, _ = _run_folder(tmp_path, classes)
    other = [dict(c, wnid=f"x{c['label']}") for c in classes]
    with pytest.raises(FastKDError, match=r"best-resnet18\.pt \(classes from .*last\.pt\).*label 0: checkpoint "
                                          r"n00000000, data x0"):
        load_teacher(str(run / "checkpoints" / "best-resnet18.pt"), "resnet18", {"classes": other})


def test_state_dict_without_bn_step_counters_still_loads(tmp_path):
    """Old torchvision files lack BatchNorm's num_batches_tracked; torch accepts them, so must we."""
    net = build_model("resnet18", 4, channels_last=False)
    state = {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(state, tmp_path / "old.pt")
    teacher = load_teacher(str(tmp_path / "old.pt"), "resnet18", manifest_for([None] * 4))
    assert torch.equal(teacher.fc.weight, net.fc.weight)
