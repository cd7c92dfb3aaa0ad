"""fastkd pack on awkward inputs: every bad-image case, class selection, the flat ILSVRC val layout
and the source-folder errors. All inputs are generated here; the FFCV format is skipped where
only scanning/decoding is under test (DALI shards are plain tar, read with tarfile)."""

from __future__ import annotations

import io
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fastkd import cli
from fastkd.errors import FastKDError
from fastkd.preprocess.encode import BadImage, encode_image
from fastkd.packformat import load_manifest
from fastkd.preprocess.pack import pack
from fastkd.resources import imagenet100_wnids

WNIDS = list(imagenet100_wnids())[:2]


def image(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(3, 4, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((w, h), Image.BILINEAR)


def encoded(img: Image.Image, fmt: str = "JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def simple_folder(root: Path, wnids=WNIDS, per_class: int = 2) -> Path:
    for split in ("train", "val"):
        for c, wnid in enumerate(wnids):
            (root / split / wnid).mkdir(parents=True)
            for i in range(per_class):
                (root / split / wnid / f"{i}.JPEG").write_bytes(encoded(image(40, 30, seed=c * 10 + i)))
    return root


def shard_samples(out: Path, split: str) -> list[tuple[bytes, int]]:
    samples = {}
    for tar in sorted((out / "dali" / split).glob("*.tar")):
        with tarfile.open(tar) as tf:
            for m in tf:
                key, ext = m.name.split(".")
                samples.setdefault(key, {})[ext] = tf.extractfile(m).read()
    return [(samples[k]["jpg"], int(samples[k]["cls"])) for k in sorted(samples)]


BAD = {"truncated.JPEG": "truncated", "zero.JPEG": "empty file", "text.JPEG": "not an image"}


@pytest.fixture(scope="module")
def awkward(tmp_path_factory):
    """One class with every kind of input ImageNet has, good and bad."""
    root = tmp_path_factory.mktemp("awk")
    src = simple_folder(root / "src")
    folder = src / "train" / WNIDS[0]
    rgb = image(60, 40, seed=3)
    full = encoded(rgb, quality=90)
    (folder / "cmyk.JPEG").write_bytes(encoded(rgb.convert("CMYK"), quality=95))
    (folder / "gray.JPEG").write_bytes(encoded(rgb.convert("L"), quality=95))
    (folder / "png_named.JPEG").write_bytes(encoded(rgb, "PNG"))
    (folder / "palette.JPEG").write_bytes(encoded(rgb.quantize(64, dither=Image.Dither.NONE), "PNG"))
    (folder / "rgba.png").write_bytes(encoded(rgb.convert("RGBA"), "PNG"))
    (folder / "exif_rotated.JPEG").write_bytes(encoded(rgb, exif=_exif_orientation(6)))
    (folder / "one_px.JPEG").write_bytes(encoded(image(1, 1)))
    (folder / "huge.JPEG").write_bytes(encoded(image(5000, 300, seed=5), quality=80))
    (folder / "truncated.JPEG").write_bytes(full[: len(full) // 2])
    (folder / "zero.JPEG").write_bytes(b"")
    (folder / "text.JPEG").write_text("this is not an image\n")
    (folder / "notes.txt").write_text("ignored: not an image extension")
    out = root / "out"
    result = pack(src, out, classes=_classes_file(root), max_side=64,
                  formats=("dali",), workers=2)
    return src, out, result


def _classes_file(root: Path) -> str:
    path = root / "classes.txt"
    path.write_text("# two classes\n" + "\n".join(WNIDS) + "\n")
    return str(path)


def _exif_orientation(value: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = value
    return exif.tobytes()


def test_bad_inputs_skipped_with_reasons(awkward):
    src, out, result = awkward
    m = load_manifest(out)
    reasons = {Path(row["path"]).name: row["reason"] for row in m["skipped"]}
    assert set(reasons) == set(BAD)
    for name, words in BAD.items():
        assert words in reasons[name], reasons[name]
    assert all(row["split"] == "train" and row["path"].startswith(f"train/{WNIDS[0]}/") for row in m["skipped"])
    assert m["splits"]["train"] == {"count": 4 + 8, "skipped": 3, "shards": 1}
    assert result.splits["train"].ignored_files == 1  # notes.txt


def test_awkward_images_converted_like_imagefolder(awkward):
    src, out, _ = awkward
    folder = src / "train" / WNIDS[0]
    good = sorted(p for p in folder.iterdir() if p.name not in BAD and p.suffix != ".txt")
    stored = shard_samples(out, "train")[: len(good)]  # class 0 comes first, files sorted by name
    assert [label for _, label in stored] == [0] * len(good)
    for path, (jpeg, _) in zip(good, stored):
        img = Image.open(io.BytesIO(jpeg))
        assert img.mode == "RGB" and img.format == "JPEG"
        source = Image.open(path)
        assert max(img.size) <= 64
        if path.name == "huge.JPEG":
            assert img.size == (64, 4)  # 5000x300 -> longer side 64, aspect kept
        elif path.name == "one_px.JPEG":
            assert img.size == (1, 1)
        else:
            assert img.size == source.size  # 60x40 <= 64: not resized; EXIF rotation not applied
            reference = np.asarray(source.convert("RGB"), dtype=np.float32)
            diff = np.abs(np.asarray(img, dtype=np.float32) - reference).mean()
            assert diff < 8.0, (path.name, diff)  # q90 4:2:0 on hard palette edges: ~5


def test_strict_makes_bad_input_fatal(awkward, tmp_path, capsys):
    src, _, _ = awkward
    classes = str(src.parent / "classes.txt")
    with pytest.raises(FastKDError, match=r"(truncated|text|zero)\.JPEG.*--strict"):
        pack(src, tmp_path / "o", classes=classes, formats=("dali",), workers=1, strict=True)
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.packing-*"))
    code = cli.main(["pack", str(src), str(tmp_path / "o"), "--classes", classes, "--strict", "--quiet"])
    assert code == 2 and "--strict" in capsys.readouterr().err


def test_encode_reasons():
    with pytest.raises(BadImage, match="empty file"):
        encode_image(b"", 64, 90)
    with pytest.raises(BadImage, match="not an image"):
        encode_image(b"GIF89 nope", 64, 90)
    good = encoded(image(50, 50))
    with pytest.raises(BadImage, match="truncated|corrupt"):
        encode_image(good[:200], 64, 90)
    e = encode_image(good, 0, 90)
    assert (e.width, e.height) == (50, 50) and e.source_format == "JPEG"


def test_class_selection_and_missing_classes(tmp_path):
    src = simple_folder(tmp_path / "src", wnids=WNIDS + ["n99999999"])
    few = tmp_path / "few.txt"
    few.write_text(WNIDS[1] + "\n")
    result = pack(src, tmp_path / "a", classes=str(few), formats=("dali",), workers=1)
    m = result.manifest
    assert [c["wnid"] for c in m["classes"]] == [WNIDS[1]] and m["splits"]["train"]["count"] == 2
    assert result.splits["train"].ignored_folders == 2 and result.splits["val"].ignored_folders == 2
    result = pack(src, tmp_path / "b", classes="all", formats=("dali",), workers=1)
    assert [c["wnid"] for c in result.manifest["classes"]] == sorted(WNIDS + ["n99999999"])
    assert result.manifest["classes"][-1]["imagenet_index"] is None
    missing = tmp_path / "missing.txt"
    missing.write_text(f"{WNIDS[0]}\nn01234567\nn07654321\n")
    with pytest.raises(FastKDError, match="2 requested class.*n01234567, n07654321"):
        pack(src, tmp_path / "c", classes=str(missing), formats=("dali",), workers=1)
    with pytest.raises(FastKDError, match=r"98 requested class\(es\) missing"):
        pack(src, tmp_path / "d", formats=("dali",), workers=1)  # default imagenet100


def _train_and_empty_val(tmp_path: Path) -> Path:
    """SRC with train/<wnid>/a.JPEG for WNIDS and an empty flat val/."""
    src = tmp_path / "src"
    for c, wnid in enumerate(WNIDS):
        (src / "train" / wnid).mkdir(parents=True)
        (src / "train" / wnid / "a.JPEG").write_bytes(encoded(image(20, 20, seed=c)))
    (src / "val").mkdir()
    return src


def test_flat_val_with_loc_val_solution(tmp_path):
    src = _train_and_empty_val(tmp_path)
    rows = ["ImageId,PredictionString"]
    labels = {}
    for i in range(1, 7):
        name = f"ILSVRC2012_val_{i:08d}"
        wnid = WNIDS[i % 2] if i != 6 else "n99999999"  # one image of a class not chosen
        (src / "val" / f"{name}.JPEG").write_bytes(encoded(image(24, 16, seed=100 + i)))
        rows.append(f"{name},{wnid} 1 2 20 14 {wnid} 3 3 10 10")
        labels[name] = wnid
    csv = tmp_path / "LOC_val_solution.csv"
    csv.write_text("\n".join(rows) + "\n")
    with pytest.raises(FastKDError, match="--val-labels"):
        pack(src, tmp_path / "x", classes="all", formats=("dali",), workers=1)
    result = pack(src, tmp_path / "o", classes="all", val_labels=csv, formats=("dali",), workers=1)
    assert result.manifest["splits"]["val"]["count"] == 5
    got = [label for _, label in shard_samples(tmp_path / "o", "val")]
    expected = sorted(sorted(WNIDS).index(w) for n, w in labels.items() if w in WNIDS)
    assert got == expected
    csv.write_text("ImageId,PredictionString\nILSVRC2012_val_00000001,n01\n")
    with pytest.raises(FastKDError, match="no label for 5 file"):
        pack(src, tmp_path / "y", classes="all", val_labels=csv, formats=("dali",), workers=1)


def test_source_errors(tmp_path, capsys):
    with pytest.raises(FastKDError, match="does not exist"):
        pack(tmp_path / "nope", tmp_path / "o", classes="all")
    src = simple_folder(tmp_path / "src")
    shutil.rmtree(src / "val")
    with pytest.raises(FastKDError, match=r"no val/ folder"):
        pack(src, tmp_path / "o", classes="all")
    src = simple_folder(tmp_path / "src2")
    for f in (src / "val" / WNIDS[1]).iterdir():
        f.unlink()
    with pytest.raises(FastKDError, match=f"{WNIDS[1]}: empty class folder"):
        pack(src, tmp_path / "o", classes="all")
    (src / "val" / WNIDS[1] / "x.JPEG").write_bytes(b"junk")  # every val image of a class unreadable
    (src / "val" / WNIDS[0] / "0.JPEG").write_bytes(b"")
    (src / "val" / WNIDS[0] / "1.JPEG").write_bytes(b"")
    with pytest.raises(FastKDError, match="no readable images"):
        pack(src, tmp_path / "o", classes="all", formats=("dali",), workers=1)
    assert cli.main(["pack", str(tmp_path / "nope"), str(tmp_path / "o"), "--quiet"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli.main(["pack", str(src), str(tmp_path / "o"), "--quality", "0", "--quiet"]) == 2
    assert cli.main(["pack", str(src), str(tmp_path / "o"), "--formats", "tfrecord", "--quiet"]) == 2
    assert not (tmp_path / "o").exists()


def _flat_val_source(tmp_path: Path, wnids: list[str]) -> tuple[Path, list[str]]:
    """train/<wnid>/a.JPEG for WNIDS, a flat val/ with one image per entry of `wnids`; CSV rows."""
    src = _train_and_empty_val(tmp_path)
    rows = ["ImageId,PredictionString"]
    for i, wnid in enumerate(wnids, start=1):
        name = f"ILSVRC2012_val_{i:08d}"
        (src / "val" / f"{name}.JPEG").write_bytes(encoded(image(24, 16, seed=100 + i)))
        rows.append(f"{name},{wnid} 1 2 20 14")
    return src, rows


def test_val_labels_utf8_bom_accepted(tmp_path):
    src, rows = _flat_val_source(tmp_path, [WNIDS[0], WNIDS[1], WNIDS[0]])
    csv = tmp_path / "LOC_val_solution.csv"
    csv.write_bytes(b"\xef\xbb\xbf" + ("\r\n".join(rows) + "\r\n").encode())  # Excel's "CSV UTF-8"
    result = pack(src, tmp_path / "o", classes="all", val_labels=csv, formats=("dali",), workers=1)
    assert result.manifest["splits"]["val"]["count"] == 3


def test_val_labels_not_utf8_names_file_and_offset(tmp_path):
    src, rows = _flat_val_source(tmp_path, [WNIDS[0], WNIDS[1]])
    csv = tmp_path / "labels.csv"
    text = "\n".join(rows) + "\n"
    data = text.encode().replace(b"PredictionString", b"Predicti\xe9nString")  # Latin-1 byte
    csv.write_bytes(data)
    offset = data.index(b"\xe9")
    with pytest.raises(FastKDError, match=rf"--val-labels {csv}: not UTF-8 text: byte 0xe9 at byte offset "
                                          rf"{offset} \(line 1\)"):
        pack(src, tmp_path / "o", classes="all", val_labels=csv, formats=("dali",), workers=1)


def test_val_labels_rows_of_unchosen_classes_listed_as_dropped(tmp_path, capsys):
    src, rows = _flat_val_source(tmp_path, [WNIDS[0], "n99999999", WNIDS[1], WNIDS[0]])
    csv = tmp_path / "LOC_val_solution.csv"
    csv.write_text("\n".join(rows) + "\n")
    result = pack(src, tmp_path / "o", classes="all", val_labels=csv, formats=("dali",), workers=1)
    m = load_manifest(tmp_path / "o")
    assert m["splits"]["val"]["count"] == 3 and result.splits["val"].ignored_files == 0
    assert m["dropped"] == [{"split": "val", "path": "val/ILSVRC2012_val_00000002.JPEG", "wnid": "n99999999",
                             "reason": "class n99999999 (LOC_val_solution.csv line 3) is not among the "
                                       "chosen classes"}]
    assert m["skipped"] == []  # dropped is not skipped: the folder loader's file count stays right
    err = capsys.readouterr().err
    assert "val: dropped 1 of 4 image(s) whose --val-labels class is not among the chosen classes" in err


def test_val_labels_with_class_folders_says_not_flat(tmp_path):
    src = simple_folder(tmp_path / "src")
    csv = tmp_path / "LOC_val_solution.csv"
    csv.write_text("ImageId,PredictionString\nILSVRC2012_val_00000001,n01 1 2 3 4\n")
    with pytest.raises(FastKDError, match=rf"--val-labels {csv}: {src / 'val'} is not flat: it has 2 "
                                          rf"subfolder\(s\) \({WNIDS[0]}, {WNIDS[1]}\)"):
        pack(src, tmp_path / "o", classes="all", val_labels=csv, formats=("dali",), workers=1)


def test_val_labels_rows_without_an_image_are_an_error_unless_allowed(tmp_path, capsys):
    src, rows = _flat_val_source(tmp_path, [WNIDS[0], WNIDS[1], WNIDS[0], WNIDS[1]])
    gone = [f"ILSVRC2012_val_{i:08d},{wnid} 1 2 20 14" for i, wnid in ((5, WNIDS[0]), (6, WNIDS[1]))]
    other = "ILSVRC2012_val_00000007,n99999999 1 2 20 14"  # an unchosen class's image may be absent
    csv = tmp_path / "LOC_val_solution.csv"
    csv.write_text("\n".join(rows + gone + [other]) + "\n")
    with pytest.raises(FastKDError, match=rf"--val-labels {csv}: 2 of 6 row\(s\) of the chosen classes name no "
                                          rf"image in {src / 'val'}: line 6: ILSVRC2012_val_00000005, line 7: "
                                          r"ILSVRC2012_val_00000006\. .*--allow-missing-val"):  # fmt: skip
        pack(src, tmp_path / "o", classes="all", val_labels=csv, formats=("dali",), workers=1)
    assert not (tmp_path / "o").exists()
    result = pack(src, tmp_path / "o", classes="all", val_labels=csv, allow_missing_val=True,
                  formats=("dali",), workers=1)  # fmt: skip
    m = load_manifest(tmp_path / "o")
    assert m["splits"]["val"]["count"] == 4 and m["params"]["val_labels_missing"] == 2
    assert result.manifest["params"]["val_labels_missing"] == 2
    assert "val: 2 --val-labels row(s) of the chosen classes name no image" in capsys.readouterr().err
    with pytest.raises(FastKDError, match=r"--allow-missing-val is for --val-labels"):
        pack(src, tmp_path / "p", classes="all", allow_missing_val=True)
