"""fastkd.weights: other tools' files as teacher / student weights (timm, Lightning, torchdistill,
EMA, safetensors), `--student-weights NET=PATH`, and pretrained weights from the local caches only.

Every file here is made by the test (tiny timm test_* networks, random weights); nothing is
downloaded: the cache tests point TORCH_HOME / HF_HOME at tmp folders."""

from __future__ import annotations

import argparse

import pytest
import timm
import torch
import torchvision
from safetensors.torch import save_file

from fastkd.checkpoint import build_last
from fastkd.errors import FastKDError
from fastkd.models import build_model, load_student_weights, load_teacher, network_names
from fastkd.weights import align_keys, unwrap_state_dict

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def manifest_for(indices):
    return {"classes": [{"label": i, "wnid": f"n{i:08d}", "name": f"c{i}", "imagenet_index": idx}
                        for i, idx in enumerate(indices)]}  # fmt: skip


def timm_net(num_classes=4, name="test_resnet", seed=0):
    torch.manual_seed(seed)
    return timm.create_model(name, pretrained=False, num_classes=num_classes).eval()


def assert_same_weights(model, reference):
    ours, theirs = model.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key


# ---------------------------------------------------------------------------------- other tools' files


def test_timm_train_checkpoint_with_argparse_args_loads_as_teacher(tmp_path):
    """timm's train.py saves {"state_dict", "args": Namespace, "epoch", ...}: read with weights_only=True."""
    net = timm_net()
    args = argparse.Namespace(model="test_resnet", lr=0.1, sched="cosine", img_size=None, mean=(0.5, 0.5, 0.5))
    torch.save({"epoch": 3, "arch": "test_resnet", "state_dict": net.state_dict(), "optimizer": {}, "args": args,
                "version": 2, "metric": 71.5}, tmp_path / "model_best.pth.tar")  # fmt: skip
    teacher = load_teacher(str(tmp_path / "model_best.pth.tar"), "timm:test_resnet", manifest_for([None] * 4))
    assert_same_weights(teacher, net)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())


def test_ema_weights_are_preferred_like_timm(tmp_path):
    """{"state_dict": raw, "state_dict_ema": ema}: the EMA weights, as timm's own loader picks."""
    raw, ema = timm_net(seed=0), timm_net(seed=1)
    ema_state = {f"module.{k}": v for k, v in ema.state_dict().items()}  # ModelEmaV2 keeps the net under .module
    torch.save({"state_dict": raw.state_dict(), "state_dict_ema": ema_state, "epoch": 9}, tmp_path / "ckpt.pth")
    teacher = load_teacher(str(tmp_path / "ckpt.pth"), "timm:test_resnet", manifest_for([None] * 4))
    assert_same_weights(teacher, ema)
    assert unwrap_state_dict(torch.load(tmp_path / "ckpt.pth", weights_only=True), "x")[1] == "state_dict_ema"


def test_lightning_checkpoint_with_model_prefix_loads_as_teacher(tmp_path):
    net = timm_net()
    state = {f"model.{k}": v for k, v in net.state_dict().items()}
    state["criterion.weight"] = torch.ones(4)  # another submodule of the LightningModule
    torch.save({"epoch": 4, "global_step": 100, "pytorch-lightning_version": "2.4.0", "state_dict": state,
                "hyper_parameters": {"lr": 0.1}, "loops": {}}, tmp_path / "epoch=4.ckpt")  # fmt: skip
    teacher = load_teacher(str(tmp_path / "epoch=4.ckpt"), "timm:test_resnet", manifest_for([None] * 4))
    assert_same_weights(teacher, net)


def test_kd_wrapper_with_two_networks_is_refused_until_a_prefix_is_chosen(tmp_path):
    """A Lightning KD module saves its trained teacher and its (random) student side by side."""
    trained, random_student = timm_net(seed=0), timm_net(seed=1)
    state = {**{f"teacher.{k}": v for k, v in trained.state_dict().items()},
             **{f"student.{k}": v for k, v in random_student.state_dict().items()}}  # fmt: skip
    path = tmp_path / "kd.ckpt"
    torch.save({"pytorch-lightning_version": "2.4.0", "state_dict": state}, path)
    manifest = manifest_for([None] * 4)
    with pytest.raises(FastKDError, match=r"2 prefixes \(student, teacher\).*e\.g\. .*kd\.ckpt:student"):
        load_teacher(str(path), "timm:test_resnet", manifest)
    assert_same_weights(load_teacher(f"{path}:teacher", "timm:test_resnet", manifest), trained)
    assert_same_weights(load_teacher(f"{path}:student.", "timm:test_resnet", manifest), random_student)
    with pytest.raises(FastKDError, match=r"kd\.ckpt has no keys under 'ema'; its leading prefixes: student, teacher"):
        load_teacher(f"{path}:ema", "timm:test_resnet", manifest)


def test_torchdistill_checkpoint_model_key(tmp_path):
    net = build_model("mobilenet_v3_small", 4, channels_last=False).eval()
    torch.save({"model": net.state_dict(), "optimizer": {"state": {}}, "lr_scheduler": {"last_epoch": 3},
                "best_value": 0.7, "args": argparse.Namespace(config="kd.yaml")}, tmp_path / "student.pt")  # fmt: skip
    teacher = load_teacher(str(tmp_path / "student.pt"), "mobilenet_v3_small", manifest_for([None] * 4))
    assert_same_weights(teacher, net)


@pytest.mark.parametrize("name", ["weights.safetensors", "weights.bin"])  # .bin: found by its header
def test_safetensors_file_as_teacher(tmp_path, name):
    net = timm_net()
    save_file({f"_orig_mod.{k}": v.contiguous() for k, v in net.state_dict().items()}, str(tmp_path / name))
    teacher = load_teacher(str(tmp_path / name), "timm:test_resnet", manifest_for([None] * 4))
    assert_same_weights(teacher, net)


def test_wrapper_without_weights_names_file_and_keys(tmp_path):
    torch.save({"epoch": 3, "state_dict": {}, "notes": "x"}, tmp_path / "empty.pth")
    with pytest.raises(FastKDError, match=r"empty\.pth is neither .*keys: epoch, state_dict, notes"):
        load_teacher(str(tmp_path / "empty.pth"), "timm:test_resnet", manifest_for([None] * 4))


def test_align_keys_drops_a_wrapper_prefix_only_when_it_helps():
    ours = ["conv.weight", "fc.weight", "fc.bias"]
    t = torch.zeros(1)
    plain = {"conv.weight": t, "fc.weight": t, "fc.bias": t}
    assert align_keys(plain, ours) is plain
    partial = {"teacher.conv.weight": t, "student.conv.weight": t, "student.fc.weight": t, "student.fc.bias": t}
    assert align_keys(partial, ours) == {"conv.weight": t, "fc.weight": t, "fc.bias": t}  # only student. is whole
    wrapped = {**partial, "teacher.fc.weight": t, "teacher.fc.bias": t}  # two whole networks: no guess
    with pytest.raises(FastKDError, match=r"kd\.ckpt holds a whole network under each of 2 prefixes "
                                          r"\(student, teacher\); choose one as PATH:PREFIX"):  # fmt: skip
        align_keys(wrapped, ours, "kd.ckpt")
    assert list(align_keys({"model.conv.weight": t, "fc.weight": t, "fc.bias": t}, ours)) == [
        "model.conv.weight", "fc.weight", "fc.bias"]  # fmt: skip  # bare keys match more: unchanged


# ---------------------------------------------------------------------------------- heads, classes


def test_1000_way_timm_head_sliced_by_wnid(tmp_path):
    """A timm file with an ImageNet-1k head: logits are the full model's at the manifest's rows."""
    full = timm_net(1000, "test_convnext")  # head at head.fc (pretrained_cfg['classifier'])
    torch.save({"state_dict": full.state_dict(), "args": argparse.Namespace(model="test_convnext")},
               tmp_path / "in1k.pth.tar")  # fmt: skip
    indices = [417, 3, 999, 0]
    teacher = load_teacher(str(tmp_path / "in1k.pth.tar"), "timm:test_convnext", manifest_for(indices))
    assert teacher.get_classifier().out_features == 4
    with torch.no_grad():
        torch.testing.assert_close(teacher(X.contiguous(memory_format=torch.channels_last)), full(X)[:, indices])


def test_mismatched_timm_file_names_file_expected_and_found(tmp_path):
    torch.save(timm_net(7).state_dict(), tmp_path / "seven.pth")
    with pytest.raises(FastKDError, match=r"seven\.pth: its timm:test_resnet head has 7 outputs, the data 4"):
        load_teacher(str(tmp_path / "seven.pth"), "timm:test_resnet", manifest_for([None] * 4))
    torch.save(timm_net(4, "test_convnext").state_dict(), tmp_path / "convnext.pth")
    with pytest.raises(FastKDError) as info:
        load_teacher(str(tmp_path / "convnext.pth"), "timm:test_resnet", manifest_for([None] * 4))
    message = str(info.value)
    assert "convnext.pth does not fit timm:test_resnet" in message and "keys missing" in message
    assert len(message) < 900 and "\n" not in message


# ---------------------------------------------------------------------------------- student weights


def _students(archs, num_classes=4):
    names = network_names(archs)
    return {n: build_model(a, num_classes) for n, a in zip(names, archs)}


def test_student_weights_from_run_folder_and_safetensors(tmp_path):
    archs = ["timm:test_resnet", "timm:test_resnet", "mobilenet_v3_small"]
    trained = _students(archs)
    assert list(trained) == ["test_resnet", "test_resnet-2", "mobilenet_v3_small"]
    classes = manifest_for([None] * 4)["classes"]
    ckpts = tmp_path / "run" / "checkpoints"
    ckpts.mkdir(parents=True)
    torch.save(build_last(archs=dict(zip(trained, archs)), models={n: m.state_dict() for n, m in trained.items()},
                          classes=classes), ckpts / "last.pt")  # fmt: skip
    save_file({k: v.contiguous() for k, v in trained["mobilenet_v3_small"].state_dict().items()},
              str(tmp_path / "mnv3.safetensors"))  # fmt: skip

    fresh = _students(archs)
    specs = [f"test_resnet-2={tmp_path / 'run'}", "mobilenet_v3_small=" + str(tmp_path / "mnv3.safetensors")]
    paths = load_student_weights(fresh, specs, {"classes": classes})
    assert paths == {"test_resnet-2": str(ckpts / "last.pt"), "mobilenet_v3_small": str(tmp_path / "mnv3.safetensors")}
    assert_same_weights(fresh["test_resnet-2"], trained["test_resnet-2"])  # its own network of last.pt
    assert_same_weights(fresh["mobilenet_v3_small"], trained["mobilenet_v3_small"])
    assert not torch.equal(fresh["test_resnet"].fc.weight, trained["test_resnet"].fc.weight)  # not asked for
    conv = fresh["test_resnet-2"].conv1[0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last)  # loaded in place: layout kept


def test_student_weights_errors_name_the_net(tmp_path):
    students = _students(["timm:test_resnet", "mobilenet_v3_small"])
    manifest = manifest_for([None] * 4)
    torch.save(students["test_resnet"].state_dict(), tmp_path / "r.pt")
    with pytest.raises(FastKDError, match=r"no student 'test_resnet2' \(did you mean test_resnet\?\); its "
                                          r"students: test_resnet, mobilenet_v3_small"):  # fmt: skip
        load_student_weights(students, [f"test_resnet2={tmp_path / 'r.pt'}"], manifest)
    with pytest.raises(FastKDError, match=r"expected NET=PATH with NET one of test_resnet, mobilenet_v3_small"):
        load_student_weights(students, [str(tmp_path / "r.pt")], manifest)
    with pytest.raises(FastKDError, match="names student test_resnet twice"):
        load_student_weights(students, [f"test_resnet={tmp_path / 'r.pt'}"] * 2, manifest)
    with pytest.raises(FastKDError, match=r"r\.pt does not fit mobilenet_v3_small"):
        load_student_weights(students, [f"mobilenet_v3_small={tmp_path / 'r.pt'}"], manifest)


# ---------------------------------------------------------------------------------- caches, no downloads


@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "XDG_CACHE_HOME", "TORCH_HUB"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    return tmp_path


def test_imagenet_weights_absent_from_caches_are_not_downloaded(empty_caches):
    manifest = manifest_for([1, 2])
    with pytest.raises(FastKDError) as info:
        load_teacher("imagenet", "squeezenet1_1", manifest)
    message = str(info.value)
    assert str(empty_caches / "torch" / "hub" / "checkpoints" / "squeezenet1_1-b8a52dc0.pth") in message
    assert "does not download" in message
    with pytest.raises(FastKDError) as info:
        load_teacher("imagenet", "timm:test_resnet", manifest)
    message = str(info.value)
    assert str(empty_caches / "hf" / "hub") in message and "timm/test_resnet.r160_in1k" in message
    assert "does not download" in message
    assert not (empty_caches / "torch").exists() and not (empty_caches / "hf").exists()  # nothing written


def _fake_hf_snapshot(root, repo, files):
    """The Hugging Face cache layout: models--ORG--NAME/{refs/main, snapshots/<hash>/<file>}."""
    folder = root / "hf" / "hub" / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text("0123abcd")
    (folder / "snapshots" / "0123abcd").mkdir(parents=True)
    for name, state in files.items():
        save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "snapshots" / "0123abcd" / name))


def test_cached_imagenet_weights_load_and_slice(empty_caches):
    """Weights already in the caches (made here, random) load without a network, head sliced."""
    indices = [5, 0, 999]
    manifest = manifest_for(indices)
    torch.manual_seed(0)
    tv = torchvision.models.get_model("squeezenet1_1", weights=None).eval()
    (empty_caches / "torch" / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(tv.state_dict(), empty_caches / "torch" / "hub" / "checkpoints" / "squeezenet1_1-b8a52dc0.pth")
    teacher = load_teacher("imagenet", "squeezenet1_1", manifest, channels_last=False)
    with torch.no_grad():
        torch.testing.assert_close(teacher(X), tv(X)[:, indices])

    full = timm_net(1000)
    _fake_hf_snapshot(empty_caches, "timm/test_resnet.r160_in1k", {"model.safetensors": full.state_dict()})
    teacher = load_teacher("imagenet", "timm:test_resnet", manifest)
    with torch.no_grad():
        torch.testing.assert_close(teacher(X), full(X)[:, indices])
    students = _students(["timm:test_resnet"], num_classes=3)
    assert load_student_weights(students, ["test_resnet=imagenet"], manifest)["test_resnet"].endswith("model.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(students["test_resnet"].eval()(X), full(X)[:, indices])


def test_pretrained_weights_must_match_the_teacher_and_imagenet(empty_caches):
    manifest = manifest_for([1, 2])
    with pytest.raises(FastKDError, match=r"timm.s resnet18, the network is torchvision:resnet18: .*--teacher timm:resnet18"):
        load_teacher("timm:resnet18.a1_in1k", "resnet18", manifest)  # torchvision's resnet18 vs timm's weights
    with pytest.raises(FastKDError, match=r"21843-way head, not ImageNet-1k"):
        load_teacher("imagenet", "timm:vit_tiny_patch16_224.augreg_in21k", manifest)
