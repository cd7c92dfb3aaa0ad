"""fastkd pack: round trips on tiny generated folders, both formats read back by FFCV and DALI.

Every folder is generated here (a few dozen small images), so the file runs in seconds apart from
the one-off FFCV import.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fastkd import cli, packformat
from fastkd.errors import FastKDError
from fastkd.preprocess import writers
from fastkd.preprocess.encode import target_size
from fastkd.packformat import check_outputs, load_manifest, split_files
from fastkd.preprocess.pack import pack
from fastkd.resources import imagenet100_wnids, imagenet1k_synsets

WNIDS = list(imagenet100_wnids())[:3]
# FFCV's Loader leaves a numba dispatcher finaliser that raises KeyError at garbage collection
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def photo(w: int, h: int, seed: int, mode: str = "RGB") -> Image.Image:
    """Smooth colour field + mild noise: compresses like a photo, decodes deterministically."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(4, 5, 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((w, h), Image.BICUBIC)
    arr = np.asarray(img, dtype=np.int16) + rng.normal(0, 6, size=(h, w, 3)).astype(np.int16)
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    return img.convert(mode) if mode != "RGB" else img


def jpeg_bytes(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=92, **kw)
    return buf.getvalue()


SIZES = [(300, 200), (120, 160), (64, 64), (90, 250), (257, 101)]


def make_folder(root: Path, wnids=WNIDS, sizes=SIZES, val_sizes=((100, 80), (70, 90))) -> Path:
    for split, split_sizes in (("train", sizes), ("val", val_sizes)):
        for c, wnid in enumerate(wnids):
            folder = root / split / wnid
            folder.mkdir(parents=True)
            for i, (w, h) in enumerate(split_sizes):
                # names sort differently from creation order: pack order must be by name
                name = f"{wnid}_{(len(split_sizes) - i) * 7 % 10}_{i}.JPEG"
                (folder / name).write_bytes(jpeg_bytes(photo(w, h, seed=(split == "val") * 1000 + c * 100 + i)))
    return root


def read_beton(path: Path):
    """(jpeg bytes, width, height, label) per sample, through FFCV's own Reader."""
    from ffcv.reader import Reader

    reader = Reader(str(path))
    data = path.read_bytes()
    sizes = {int(row["sample_id"]): (int(row["ptr"]), int(row["size"])) for row in reader.alloc_table}
    image_field, label_field = reader.metadata.dtype.names
    out = []
    for i in range(int(reader.num_samples)):
        meta = reader.metadata[i]
        ptr, size = sizes[i]
        assert int(meta[image_field]["data_ptr"]) == ptr and int(meta[image_field]["mode"]) == 0
        out.append((data[ptr:ptr + size], int(meta[image_field]["width"]), int(meta[image_field]["height"]),
                    int(meta[label_field])))
    assert list(reader.handlers) == ["image", "label"]
    assert [type(h).__name__ for h in reader.handlers.values()] == ["RGBImageField", "IntField"]
    return out


def read_shards(tars: list[Path]):
    """(key, jpeg bytes, label) per sample, plain tarfile (no DALI needed)."""
    members: dict[str, dict[str, bytes]] = {}
    order = []
    for tar in tars:
        with tarfile.open(tar) as tf:
            for m in tf:
                key, ext = m.name.split(".", 1)
                if key not in members:
                    members[key] = {}
                    order.append(key)
                members[key][ext] = tf.extractfile(m).read()
    return [(k, members[k]["jpg"], int(members[k]["cls"].decode("ascii"))) for k in order]


def read_dali(tars: list[Path], batch_size: int):
    import nvidia.dali.fn as fn
    from nvidia.dali import pipeline_def

    idx = [str(t.with_suffix(".idx")) for t in tars]

    @pipeline_def(batch_size=batch_size, num_threads=1, device_id=None, prefetch_queue_depth=1)
    def pipe():
        jpg, cls = fn.readers.webdataset(paths=[str(t) for t in tars], index_paths=idx, ext=["jpg", "cls"],
                                         random_shuffle=False, name="reader")
        return jpg, cls

    p = pipe()
    p.build()
    assert p.epoch_size("reader") == batch_size
    jpgs, cls = p.run()
    return [(bytes(np.array(jpgs.at(i))), int(bytes(np.array(cls.at(i))).decode())) for i in range(batch_size)]


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    root = tmp_path_factory.mktemp("rt")
    src = make_folder(root / "src")
    (src / "train" / "n99999999").mkdir()  # not a chosen class: ignored and counted
    (src / "train" / "n99999999" / "x.JPEG").write_bytes(jpeg_bytes(photo(10, 10, 0)))
    classes = root / "classes.txt"
    classes.write_text("\n".join(reversed(WNIDS)) + "\n")
    result = pack(src, root / "out", classes=str(classes), max_side=128, quality=90, workers=2, shard_size=4)
    return src, root / "out", result


def test_manifest_and_counts(packed):
    src, out, result = packed
    m = load_manifest(out)
    assert m["splits"]["train"] == {"count": 15, "skipped": 0, "shards": 4}
    assert m["splits"]["val"] == {"count": 6, "skipped": 0, "shards": 2}
    synsets = imagenet1k_synsets()
    assert [c["wnid"] for c in m["classes"]] == sorted(WNIDS)
    assert [c["label"] for c in m["classes"]] == [0, 1, 2]
    assert [c["imagenet_index"] for c in m["classes"]] == [synsets[w].imagenet_index for w in sorted(WNIDS)]
    assert m["params"]["max_side"] == 128 and m["params"]["formats"] == ["ffcv", "dali"]
    assert m["source"] == str(src.absolute()) and m["skipped"] == []
    assert result.splits["train"].ignored_folders == 1
    assert check_outputs(out, m, full_hash=True) == []
    assert not list(out.parent.glob(".out.packing-*"))  # temporary folder renamed away


@pytest.mark.parametrize("split", ["train", "val"])
def test_same_bytes_order_labels_both_formats(packed, split):
    src, out, _ = packed
    m = load_manifest(out)
    beton = read_beton(split_files(out, m, split, "ffcv")[0])
    tars = split_files(out, m, split, "dali")
    shards = read_shards(tars)
    assert len(beton) == len(shards) == m["splits"][split]["count"]
    assert [k for k, _, _ in shards] == [f"{i:08d}" for i in range(len(shards))]
    for (jpeg_f, _, _, label_f), (_, jpeg_d, label_d) in zip(beton, shards):
        assert jpeg_f == jpeg_d and label_f == label_d
    # pack order: classes in label order, files sorted by name within a class
    expected = [(c, p) for c, w in enumerate(sorted(WNIDS)) for p in sorted((src / split / w).iterdir())]
    assert [label for *_, label in beton] == [c for c, _ in expected]

    for (jpeg, width, height, _), (_, source) in zip(beton, expected):
        stored = Image.open(io.BytesIO(jpeg))
        assert stored.format == "JPEG" and stored.mode == "RGB" and not stored.info.get("progressive")
        assert stored.size == (width, height)
        original = Image.open(source).convert("RGB")
        assert (width, height) == target_size(*original.size, 128)  # aspect kept, longer side <= 128
        assert max(width, height) <= 128
        assert abs(width / height - original.size[0] / original.size[1]) < 2.0 / min(width, height)
        reference = np.asarray(original.resize((width, height), Image.BOX), dtype=np.float32)
        diff = np.abs(np.asarray(stored.convert("RGB"), dtype=np.float32) - reference)
        assert diff.mean() < 4.0, (source, diff.mean())  # JPEG q90 + resampling tolerance


def test_dali_reader_and_index(packed):
    _, out, _ = packed
    m = load_manifest(out)
    tars = split_files(out, m, "train", "dali")
    assert [t.name for t in tars] == [f"shard-{i:06d}.tar" for i in range(4)]
    got = read_dali(tars, batch_size=m["splits"]["train"]["count"])
    assert got == [(jpeg, label) for _, jpeg, label in read_shards(tars)]
    # our index equals what DALI's own wds2idx tool writes for the same tar
    wds2idx = pytest.importorskip("wds2idx")
    for tar in tars:
        theirs = tar.with_name(tar.stem + ".theirs.idx")
        with wds2idx.IndexCreator(str(tar), str(theirs), verbose=False) as creator:
            creator.create_index()
        assert theirs.read_text() == tar.with_suffix(".idx").read_text()
        theirs.unlink()


def test_record_types_match_ffcv():
    from ffcv.fields import IntField, RGBImageField
    from ffcv.types import (ALLOC_TABLE_TYPE, CURRENT_VERSION, TYPE_ID_HANDLER, FieldDescType, HeaderType,
                            get_metadata_type)

    f = packformat
    assert f.HEADER_TYPE == HeaderType and f.FIELD_DESC_TYPE == FieldDescType
    assert f.ALLOC_TABLE_TYPE == ALLOC_TABLE_TYPE and f.FFCV_VERSION == CURRENT_VERSION
    assert f.SAMPLE_METADATA == get_metadata_type([RGBImageField(), IntField()])
    assert TYPE_ID_HANDLER[f.FFCV_TYPE_RGB_IMAGE] is RGBImageField
    assert TYPE_ID_HANDLER[f.FFCV_TYPE_INT] is IntField
    assert not RGBImageField().to_binary().tobytes().strip(b"\0")  # all-zero arguments, as we write


def test_ffcv_loader_decodes_stored_bytes(packed):
    from ffcv.fields.decoders import CenterCropRGBImageDecoder, IntDecoder
    from ffcv.loader import Loader, OrderOption

    _, out, _ = packed
    m = load_manifest(out)
    beton_path = split_files(out, m, "train", "ffcv")[0]
    beton = read_beton(beton_path)
    loader = Loader(str(beton_path), batch_size=1, num_workers=1, order=OrderOption.SEQUENTIAL,
                    pipelines={"image": [CenterCropRGBImageDecoder((48, 48), ratio=1.0)], "label": [IntDecoder()]},
                    os_cache=True)
    labels = []
    for (images, label), (jpeg, w, h, lab) in zip(loader, beton):
        assert images.shape == (1, 48, 48, 3)
        labels.append(int(label.ravel()[0]))
    assert labels == [lab for *_, lab in beton]


def test_demo_data_deterministic_and_packs(tmp_path):
    assert cli.main(["demo-data", str(tmp_path / "d1")]) == 0
    from fastkd.preprocess.demo import write_demo

    write_demo(tmp_path / "d2")
    files1 = sorted(p.relative_to(tmp_path / "d1") for p in (tmp_path / "d1").rglob("*.JPEG"))
    files2 = sorted(p.relative_to(tmp_path / "d2") for p in (tmp_path / "d2").rglob("*.JPEG"))
    assert files1 == files2 and len(files1) == 1797
    assert all((tmp_path / "d1" / f).read_bytes() == (tmp_path / "d2" / f).read_bytes() for f in files1[::37])
    for split, n in (("train", 1437), ("val", 360)):
        assert sorted(p.name for p in (tmp_path / "d1" / split).iterdir()) == [f"digit{k}" for k in range(10)]
        assert len(list((tmp_path / "d1" / split).rglob("*.JPEG"))) == n
    img = Image.open(files1 and tmp_path / "d1" / files1[0])
    assert img.size == (48, 48) and img.mode == "RGB"
    arr = np.asarray(img, dtype=np.int16)
    assert np.abs(arr[..., 0] - arr[..., 2]).max() > 5  # tinted: real RGB

    out = tmp_path / "packed"
    assert cli.main(["pack", str(tmp_path / "d1"), str(out), "--classes", "all", "--quiet",
                     "--workers", "2"]) == 0
    m = load_manifest(out)
    assert [c["wnid"] for c in m["classes"]] == [f"digit{k}" for k in range(10)]
    assert all(c["imagenet_index"] is None for c in m["classes"])
    assert m["splits"]["val"]["count"] == 360 and m["splits"]["train"]["count"] == 1437

    # FFCV's Loader with the constant-size decoder gives PIL's decode of the stored bytes
    from ffcv.fields.decoders import IntDecoder, SimpleRGBImageDecoder
    from ffcv.loader import Loader, OrderOption

    beton_path = split_files(out, m, "val", "ffcv")[0]
    beton = read_beton(beton_path)
    loader = Loader(str(beton_path), batch_size=60, num_workers=1, order=OrderOption.SEQUENTIAL,
                    pipelines={"image": [SimpleRGBImageDecoder()], "label": [IntDecoder()]}, os_cache=True)
    images = np.concatenate([np.array(x) for x, _ in loader])
    assert images.shape == (360, 48, 48, 3)
    pil = np.stack([np.asarray(Image.open(io.BytesIO(j)).convert("RGB")) for j, *_ in beton])
    diff = np.abs(images.astype(np.int16) - pil.astype(np.int16))
    # libjpeg-turbo in both; FFCV's fast-DCT/upsampling settings differ from PIL's by a few levels
    assert diff.max() <= 8 and diff.mean() < 2.0, (diff.max(), diff.mean())
    assert np.abs(images[1:].astype(np.int16) - pil[:-1]).mean() > 5 * diff.mean()  # order is meaningful


def test_refuses_existing_out_unless_overwrite(packed, tmp_path):
    src, _, _ = packed
    classes = str(src.parent / "classes.txt")
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(FastKDError, match="already exists.*--overwrite"):
        pack(src, out, classes=classes, workers=1, formats=("dali",))
    assert (out / "keep.txt").exists()
    assert cli.main(["pack", str(src), str(out), "--classes", classes, "--quiet", "--workers", "1",
                     "--formats", "dali"]) == 2
    # --overwrite replaces only an earlier pack or an empty folder: keep.txt is the user's
    with pytest.raises(FastKDError, match=f"{out} is not a fastkd pack.*nothing was deleted"):
        pack(src, out, classes=classes, workers=1, formats=("dali",), overwrite=True)
    assert (out / "keep.txt").read_text() == "x"
    (out / "keep.txt").unlink()
    pack(src, out, classes=classes, workers=1, formats=("dali",), overwrite=True)  # empty: replaced
    assert load_manifest(out)["params"]["formats"] == ["dali"] and not (out / "ffcv").exists()
    pack(src, out, classes=classes, workers=1, formats=("ffcv",), overwrite=True)  # a pack: replaced
    assert load_manifest(out)["params"]["formats"] == ["ffcv"] and not (out / "dali").exists()
    with pytest.raises(FastKDError, match="without the dali format"):
        split_files(out, load_manifest(out), "train", "dali")


def test_verify_catches_flipped_byte(packed, tmp_path, capsys):
    import shutil

    _, out0, _ = packed
    out = tmp_path / "copy"
    shutil.copytree(out0, out)
    assert cli.main(["verify", str(out)]) == 0
    shard = out / "dali" / "train" / "shard-000001.tar"
    data = bytearray(shard.read_bytes())
    data[len(data) // 3] ^= 0x01
    shard.write_bytes(bytes(data))
    m = load_manifest(out)
    assert check_outputs(out, m) == []  # size unchanged: only the hash can tell
    assert cli.main(["verify", str(out)]) == 1
    assert "dali/train/shard-000001.tar" in capsys.readouterr().out
    assert cli.main(["verify", str(out), "--formats", "ffcv"]) == 0
    (out / "ffcv" / "val.beton").unlink()
    assert check_outputs(out, m, formats=["ffcv"]) == ["ffcv/val.beton: missing"]
    (out / "manifest.json").write_text(json.dumps({**m, "format_version": 99}))
    assert cli.main(["verify", str(out)]) == 2


def test_beton_pages_never_split_a_sample(tmp_path):
    """Small pages force many page breaks; FFCV's page-reading cache must still see every sample."""
    from ffcv.fields.decoders import IntDecoder, SimpleRGBImageDecoder
    from ffcv.loader import Loader, OrderOption

    page = 1 << 13  # 8 KiB: three or four ~2 KiB samples per page
    jpegs = [jpeg_bytes(photo(64, 48, seed=i)) for i in range(40)]
    assert all(page // 8 < len(j) < page for j in jpegs)
    w = writers.BetonWriter(tmp_path / "t.beton", capacity=45, page_size=page)
    for i, j in enumerate(jpegs):
        w.add(j, 64, 48, i % 7)
    with pytest.raises(writers.SampleTooLarge):
        w.add(b"\xff" * (page + 1), 64, 48, 0)
    w.close()
    got = read_beton(tmp_path / "t.beton")
    assert [(j, lab) for j, _, _, lab in got] == [(j, i % 7) for i, j in enumerate(jpegs)]
    from ffcv.reader import Reader

    table = Reader(str(tmp_path / "t.beton")).alloc_table
    assert all(int(p) // page == (int(p) + int(s) - 1) // page for p, s in zip(table["ptr"], table["size"]))
    assert len({int(p) // page for p in table["ptr"]}) > 5
    loader = Loader(str(tmp_path / "t.beton"), batch_size=8, num_workers=1, order=OrderOption.SEQUENTIAL,
                    pipelines={"image": [SimpleRGBImageDecoder()], "label": [IntDecoder()]}, os_cache=False)
    images, labels = zip(*[(np.array(x), np.array(y).ravel()) for x, y in loader])
    assert np.concatenate(labels).tolist() == [i % 7 for i in range(40)]
    pil = np.stack([np.asarray(Image.open(io.BytesIO(j))) for j in jpegs]).astype(np.int16)
    assert np.abs(np.concatenate(images).astype(np.int16) - pil).mean() < 2.0


def test_loaders_read_the_format_without_the_packer(packed):
    """fastkd.data opens a pack through fastkd.packformat alone: the packer (fastkd.preprocess)
    is not imported, so the two sides share only the format module."""
    import subprocess
    import sys

    _, out, _ = packed
    code = ("import sys; from fastkd.data.packed import open_packed, shard_paths; "
            f"m = open_packed({str(out)!r}, 'train', 'dali'); shard_paths({str(out)!r}, m, 'train'); "
            "print(sorted(n for n in sys.modules if n.startswith('fastkd.preprocess')))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"
