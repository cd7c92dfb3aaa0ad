"""fastkd pack --labels FILE.csv: images in any layout, labelled by the user's `path,label[,split]` rows.

Each image is a flat colour that encodes its class name (COLOUR), so a batch read back through
fastkd.data.build_loader (torch backend, CPU) shows whether every label travelled with its image.
Only the DALI shards are written (the torch backend reads them); a few 16x12 images per test.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fastkd import cli
from fastkd.data import build_loader
from fastkd.errors import FastKDError
from fastkd.packformat import load_manifest
from fastkd.preprocess.labels import scan_labels
from fastkd.preprocess.pack import pack
from fastkd.resources import imagenet100_wnids

COLOUR = {"dog": 0, "cat": 1, "bird": 2}  # class name -> its images' bright channel (R, G, B)
NAMES = sorted(COLOUR)  # label order: bird 0, cat 1, dog 2


def png(channel: int, shade: int = 0) -> bytes:
    arr = np.full((12, 16, 3), 20 + shade, dtype=np.uint8)
    arr[..., channel] = 230
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def write_images(src: Path, rows: list[tuple[str, str]]) -> None:
    for i, (rel, name) in enumerate(rows):
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(png(COLOUR.get(name, 0), shade=i))


def shard_labels(out: Path, split: str) -> list[int]:
    labels = {}
    for tar in sorted((out / "dali" / split).glob("*.tar")):
        with tarfile.open(tar) as tf:
            for m in tf:
                key, ext = m.name.split(".")
                if ext == "cls":
                    labels[key] = int(tf.extractfile(m).read())
    return [labels[k] for k in sorted(labels)]


# one flat folder plus a subfolder; rows deliberately not in path or class order
TRAIN = [("img/d2.png", "dog"), ("img/c1.png", "cat"), ("img/b1.png", "bird"), ("img/d1.png", "dog"),
         ("more/c2.png", "cat"), ("img/b2.png", "bird"), ("img/c3.png", "cat")]
VAL = [("img/v_dog.png", "dog"), ("img/v_bird.png", "bird"), ("more/v_cat.png", "cat")]


@pytest.fixture()
def flat(tmp_path):
    src = tmp_path / "photos"
    write_images(src, TRAIN + VAL)
    csv = tmp_path / "labels.csv"
    lines = ["path,label,split"] + [f"{p},{n},train" for p, n in TRAIN[:4]] + [f"{p},{n}," for p, n in TRAIN[4:]]
    lines += [f"{p},{n},val" for p, n in VAL]
    csv.write_text("\n".join(lines) + "\n")
    return src, csv


def test_flat_folder_packs_with_labels_and_loads(flat, tmp_path, capsys):
    src, csv = flat
    out = tmp_path / "packed"
    code = cli.main(["pack", str(src), str(out), "--labels", str(csv), "--formats", "dali",
                     "--workers", "1", "--quiet"])
    assert code == 0, capsys.readouterr().err
    m = load_manifest(out)
    assert [(c["label"], c["wnid"], c["name"], c["imagenet_index"]) for c in m["classes"]] == \
        [(i, n, n, None) for i, n in enumerate(NAMES)]
    assert m["splits"]["train"]["count"] == len(TRAIN) and m["splits"]["val"]["count"] == len(VAL)
    assert m["params"]["layout"] == "labels" and m["params"]["labels"] == str(csv)
    assert m["params"]["labels_sha256"] == hashlib.sha256(csv.read_bytes()).hexdigest()
    assert m["skipped"] == [] and m["dropped"] == []
    # pack order: label order, then path within a class (rows without split went to train)
    assert shard_labels(out, "train") == sorted(NAMES.index(n) for _, n in TRAIN)
    assert shard_labels(out, "val") == [0, 1, 2]

    for split, rows in (("train", TRAIN), ("val", VAL)):
        loader = build_loader(out, split, "torch", batch_size=len(rows), resolution=16, device="cpu",
                              dtype="float32", num_workers=1, drop_last=False, expected_classes=NAMES)
        images, labels = next(iter(loader))
        assert images.shape == (len(rows), 3, 16, 16)
        assert sorted(labels.tolist()) == sorted(NAMES.index(n) for _, n in rows)
        bright = images.mean(dim=(2, 3)).argmax(dim=1)  # normalised, yet the bright channel stays highest
        assert bright.tolist() == [COLOUR[NAMES[y]] for y in labels.tolist()], split
    with pytest.raises(FastKDError, match=r"--labels CSV.*--backend torch"):  # folder reads ImageNet layouts only
        build_loader(out, "train", "folder", batch_size=2, resolution=16, device="cpu", dtype="float32")


def test_missing_files_are_one_error_with_count(flat, tmp_path, capsys):
    src, csv = flat
    for rel in ("img/d1.png", "more/c2.png", "img/v_dog.png"):
        (src / rel).unlink()
    (src / "img" / "b2.png").unlink()
    (src / "img" / "b2.png").mkdir()  # a folder where the CSV names a file
    with pytest.raises(FastKDError, match=rf"--labels {csv}: 4 of 10 row\(s\) name no file under {src}: "
                                          r"line 5: img/d1.png \(missing\); line 6: more/c2.png \(missing\); "
                                          r"line 7: img/b2.png \(a folder, not a file\); line 9: img/v_dog.png "
                                          r"\(missing\)\. Missing files are always an error"):
        pack(src, tmp_path / "o", labels=csv, formats=("dali",), workers=1)
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.packing-*"))
    code = cli.main(["pack", str(src), str(tmp_path / "o"), "--labels", str(csv), "--quiet"])
    assert code == 2 and "4 of 10 row(s) name no file" in capsys.readouterr().err


@pytest.mark.parametrize("rows, message", [
    (["/abs/x.png,cat"], r"line 1: absolute path '/abs/x.png' \(paths are relative to SRC\)"),
    (["ok.png,cat", "../up.png,dog"], r"line 2: path '../up.png' leaves SRC"),
    (["ok.png,cat", "a/../../up.png,dog"], r"line 2: path 'a/../../up.png' leaves SRC"),
    (["ok.png,cat", "x.png,"], r"line 2: empty label"),
    (["ok.png,cat", "./ok.png,dog"], r"line 2: ok.png is also on line 1"),
    (["ok.png,cat,test"], r"line 1: split 'test' \(expected train, val or empty"),
    (["ok.png,cat,val,extra"], r"line 1: 4 cell\(s\), expected path,label\[,split\] \(a comma in a path"),
    (["path,label", "ok.png"], r"line 2: empty label"),
    (["ok.png"], r"line 1: 1 cell\(s\), expected path,label"),
])
def test_bad_rows_named_by_line(tmp_path, rows, message):
    src = tmp_path / "src"
    write_images(src, [("ok.png", "cat"), ("x.png", "dog")])
    csv = tmp_path / "bad.csv"
    csv.write_text("\n".join(rows) + "\n")
    with pytest.raises(FastKDError, match=rf"--labels {csv}: 1 bad row\(s\): {message}"):
        pack(src, tmp_path / "o", labels=csv, formats=("dali",), workers=1)


def test_all_bad_rows_in_one_message(tmp_path):
    src = tmp_path / "src"
    write_images(src, [("ok.png", "cat")])
    csv = tmp_path / "bad.csv"
    csv.write_text("ok.png,cat\n\n/a.png,cat\nb.png,\n\"c\nd.png\",,nope\nok.png,dog\n")  # "c\nd.png": lines 5-6
    with pytest.raises(FastKDError, match=r"4 bad row\(s\): line 3: absolute .*; line 4: empty label; "
                                          r"line 5: empty label, split 'nope' .*; line 7: ok.png is also on line 1"):
        pack(src, tmp_path / "o", labels=csv, formats=("dali",), workers=1)


def test_csv_encoding_bom_and_non_utf8(tmp_path):
    src = tmp_path / "src"
    rows = [("a.png", "cat"), ("b.png", "dog"), ("c.png", "cat")]
    write_images(src, rows)
    csv = tmp_path / "excel.csv"
    text = "Path,Label,Split\r\n" + "".join(f"{p},{n},{'VAL' if p == 'c.png' else ''}\r\n" for p, n in rows)
    csv.write_bytes(b"\xef\xbb\xbf" + text.encode())  # Excel's "CSV UTF-8": BOM, CRLF, header in capitals
    scan = scan_labels(src, csv)
    assert [c.wnid for c in scan.classes] == ["cat", "dog"]
    assert [i.rel for i in scan.splits["train"].items] == ["a.png", "b.png"]
    assert [i.rel for i in scan.splits["val"].items] == ["c.png"]
    data = text.encode().replace(b"dog", b"d\xe9g")
    csv.write_bytes(data)
    offset = data.index(b"\xe9")
    with pytest.raises(FastKDError, match=rf"--labels {csv}: not UTF-8 text: byte 0xe9 at byte offset "
                                          rf"{offset} \(line 3\)"):
        scan_labels(src, csv)


def test_split_column_and_val_fraction(tmp_path):
    src = tmp_path / "src"
    rows = [(f"{n}/{i}.png", n) for n in ("cat", "dog") for i in range(6)] + [("solo/0.png", "bird")]
    write_images(src, rows)
    csv = tmp_path / "l.csv"
    csv.write_text("".join(f"{p},{n}\n" for p, n in rows))  # no header, no split column
    with pytest.raises(FastKDError, match=r"no val images among the 13 packed row\(s\); give rows a third "
                                          r"column split \(train/val\), or pass --val-fraction"):
        pack(src, tmp_path / "o", labels=csv, formats=("dali",), workers=1)
    scan = scan_labels(src, csv, val_fraction=0.34, seed=0)
    val = [i.rel for i in scan.splits["val"].items]
    assert [i.label for i in scan.splits["val"].items] == [1, 1, 2, 2]  # round(.34 x 6) per class; bird: 1 row
    assert scan.notes == ["val: 1 class(es) have no val images: bird"]
    assert [i.rel for i in scan_labels(src, csv, val_fraction=0.34, seed=0).splits["val"].items] == val
    assert [i.rel for i in scan_labels(src, csv, val_fraction=0.34, seed=1).splits["val"].items] != val
    # a given split is kept: these two rows are val whatever the draw, and not counted in it
    csv.write_text("".join(f"{p},{n},{'val' if p in ('cat/0.png', 'cat/1.png') else ''}\n" for p, n in rows))
    scan = scan_labels(src, csv, val_fraction=0.25, seed=3)
    cat_val = [i.rel for i in scan.splits["val"].items if i.label == 1]
    assert {"cat/0.png", "cat/1.png"} <= set(cat_val) and len(cat_val) == 3  # 2 given + round(.25 x 4)
    with pytest.raises(FastKDError, match=r"--val-fraction 1.5: must be between 0 and 1"):
        scan_labels(src, csv, val_fraction=1.5)
    with pytest.raises(FastKDError, match=r"--val-fraction 0.1 needs --labels"):
        pack(src, tmp_path / "o", val_fraction=0.1)


def test_classes_numeric_file_order_and_wnids(tmp_path):
    src = tmp_path / "src"
    wnid = list(imagenet100_wnids())[0]
    rows = [("a.png", "10"), ("b.png", "2"), ("c.png", "0"), ("d.png", "2")]
    write_images(src, rows)
    csv = tmp_path / "l.csv"
    csv.write_text("".join(f"{p},{n},{'val' if p == 'd.png' else 'train'}\n" for p, n in rows))
    assert [c.wnid for c in scan_labels(src, csv).classes] == ["0", "2", "10"]  # numeric, not "10" < "2"
    classes = tmp_path / "classes.txt"
    classes.write_text("# my order\n2\n10\n")
    scan = scan_labels(src, csv, classes=str(classes))
    assert [(c.label, c.wnid) for c in scan.classes] == [(0, "2"), (1, "10")]
    assert [(i.rel, i.label) for i in scan.splits["train"].items] == [("b.png", 0), ("a.png", 1)]
    assert scan.dropped == [{"split": "train", "path": "c.png", "wnid": "0",
                             "reason": "class 0 (l.csv line 3) is not among the chosen classes"}]
    classes.write_text("2\n7\n")
    with pytest.raises(FastKDError, match=rf"--classes {classes}: 1 class\(es\) have no row in --labels {csv}: 7"):
        scan_labels(src, csv, classes=str(classes))
    csv.write_text(f"a.png,{wnid}\nb.png,golden retriever\nd.png,golden retriever,val\n")
    scan = scan_labels(src, csv)
    assert [(c.wnid, c.imagenet_index is None) for c in scan.classes] == [("golden retriever", True), (wnid, False)]


def test_one_number_spelled_two_ways_is_refused(tmp_path):
    src = tmp_path / "src"
    rows = [("a.png", "1"), ("b.png", "01"), ("c.png", "2"), ("d.png", "002"), ("e.png", "1"), ("f.png", "3")]
    write_images(src, rows)
    csv = tmp_path / "l.csv"
    csv.write_text("".join(f"{p},{n},{'val' if p == 'f.png' else 'train'}\n" for p, n in rows))
    with pytest.raises(FastKDError, match=rf"--labels {csv}: 2 number\(s\) spelled more than one way, which "
                                          r"would make separate classes: '1' \(line 1\) and '01' \(line 2\); "
                                          r"'2' \(line 3\) and '002' \(line 4\); write each"):  # fmt: skip
        scan_labels(src, csv)
    classes = tmp_path / "classes.txt"
    classes.write_text("1\n2\n")  # a class file does not make the CSV's other spelling go away silently
    with pytest.raises(FastKDError, match=r"spelled more than one way"):
        scan_labels(src, csv, classes=str(classes))


def test_labels_refuses_val_labels_and_needs_no_layout(flat, tmp_path):
    src, csv = flat
    with pytest.raises(FastKDError, match=r"--val-labels .* with --labels .*split=val"):
        pack(src, tmp_path / "o", labels=csv, val_labels=csv, formats=("dali",), workers=1)
    assert not (src / "train").exists()  # the ImageNet layout is not needed with --labels
    with pytest.raises(FastKDError, match="has no train/ or val/ folder"):
        pack(src, tmp_path / "o", classes="all", formats=("dali",), workers=1)
