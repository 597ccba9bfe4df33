"""Converters: each public layout rebuilt in miniature (synthetic pixels, published label formats) -> manifest."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import cv2
import numpy as np
import pytest

from dermpipe.data.convert import main
from dermpipe.data.formats import (
    FORMATS,
    ConversionError,
    apply_class_map,
    convert_dataset,
    get_reader,
    parse_class_map,
)
from dermpipe.data.manifest import Manifest

REPO = Path(__file__).resolve().parents[1]


def write_image(path: Path, size: int = 8, mask: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(abs(hash(path.name)) % 2**32)
    if mask:
        pixels = np.zeros((size, size), np.uint8)
        pixels[2:6, 2:6] = 255
    else:
        pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    assert cv2.imwrite(str(path), pixels)
    return path


def write_csv(path: Path, rows: list[list[object]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    return path


def by_id(result) -> dict[str, dict[str, str]]:
    return {r["image_id"]: r for r in result.rows}


# ---------------------------------------------------------------------------------------------------------------------
# One fixture per published layout


def test_isic2016_reads_headerless_ground_truth_masks_and_official_split(tmp_path: Path) -> None:
    for i in range(4):
        write_image(tmp_path / "ISBI2016_ISIC_Part3_Training_Data" / f"ISIC_000000{i}.jpg")
        if i != 2:  # ISIC_0000002 has no mask
            write_image(
                tmp_path / "ISBI2016_ISIC_Part1_Training_GroundTruth" / f"ISIC_000000{i}_Segmentation.png", mask=True
            )
    write_image(tmp_path / "ISBI2016_ISIC_Part3_Test_Data" / "ISIC_0000010.jpg")
    write_image(tmp_path / "ISBI2016_ISIC_Part1_Test_GroundTruth" / "ISIC_0000010_Segmentation.png", mask=True)
    # Published without a header; ISIC_0000003 has no row, ISIC_0000099 has no image.
    write_csv(
        tmp_path / "ISBI2016_ISIC_Part3_Training_GroundTruth.csv",
        [
            ["ISIC_0000000", "benign"],
            ["ISIC_0000001", "malignant"],
            ["ISIC_0000002", "benign"],
            ["ISIC_0000099", "benign"],
        ],
    )
    write_csv(tmp_path / "ISBI2016_ISIC_Part3_Test_GroundTruth.csv", [["ISIC_0000010", "1.0"]])

    result = FORMATS["isic2016"](tmp_path)
    rows = by_id(result)
    assert result.classes == ("benign", "malignant")
    assert {i: r["label"] for i, r in rows.items()} == {
        "ISIC_0000000": "benign",  # the first row is data, not a header
        "ISIC_0000001": "malignant",
        "ISIC_0000002": "benign",
        "ISIC_0000003": "",
        "ISIC_0000010": "malignant",
    }
    assert {i: r["split"] for i, r in rows.items()} == {
        **{f"ISIC_000000{i}": "train" for i in range(4)},
        "ISIC_0000010": "test",
    }
    assert rows["ISIC_0000001"]["mask_path"].endswith("ISIC_0000001_Segmentation.png")
    assert Path(rows["ISIC_0000001"]["image_path"]).is_absolute()
    report = result.report
    assert (report.images_found, report.labelled, report.masks_found) == (5, 4, 4)
    assert report.unlabelled == ["ISIC_0000003"]
    assert report.labels_without_images == ["ISIC_0000099"]
    assert report.missing_masks == ["ISIC_0000002"]


def test_isic2017_one_hot_floats_nevus_when_both_zero_and_superpixels_ignored(tmp_path: Path) -> None:
    for split, ids in (("Training", ["ISIC_0000000", "ISIC_0000001", "ISIC_0000002", "ISIC_0000003"]),
                       ("Validation", ["ISIC_0000010"])):  # fmt: skip
        for image_id in ids:
            write_image(tmp_path / f"ISIC-2017_{split}_Data" / f"{image_id}.jpg")
            write_image(tmp_path / f"ISIC-2017_{split}_Part1_GroundTruth" / f"{image_id}_segmentation.png", mask=True)
    write_image(tmp_path / "ISIC-2017_Training_Data" / "ISIC_0000000_superpixels.png")
    write_csv(
        tmp_path / "ISIC-2017_Training_Data" / "ISIC-2017_Training_Data_metadata.csv",
        [["image_id", "age_approximate", "sex"], ["ISIC_0000000", "55", "female"], ["ISIC_0000001", "unknown", "male"]],
    )
    write_csv(
        tmp_path / "ISIC-2017_Training_Part3_GroundTruth.csv",
        [
            ["image_id", "melanoma", "seborrheic_keratosis"],
            ["ISIC_0000000", "0.0", "0.0"],
            ["ISIC_0000001", "1.0", "0.0"],
            ["ISIC_0000002", "0.0", "1.0"],
            ["ISIC_0000003", "1.0", "1.0"],  # two classes at once: reported, kept unlabelled
        ],
    )
    write_csv(
        tmp_path / "ISIC-2017_Validation_Part3_GroundTruth.csv",
        [["image_id", "melanoma", "seborrheic_keratosis"], ["ISIC_0000010", "0.0", "1.0"]],
    )

    result = FORMATS["isic2017"](tmp_path)
    rows = by_id(result)
    assert result.classes == ("melanoma", "nevus", "seborrheic_keratosis")
    assert len(rows) == 5  # the superpixel file is not an image
    assert rows["ISIC_0000000"]["label"] == "nevus"
    assert rows["ISIC_0000001"]["label"] == "melanoma"
    assert rows["ISIC_0000002"]["label"] == "seborrheic_keratosis"
    assert rows["ISIC_0000003"]["label"] == ""
    assert [b.split()[0] for b in result.report.bad_labels] == ["ISIC_0000003"]
    assert rows["ISIC_0000010"]["split"] == "val" and rows["ISIC_0000000"]["split"] == "train"
    assert (rows["ISIC_0000000"]["age"], rows["ISIC_0000000"]["sex"]) == ("55", "female")
    assert "age" not in rows["ISIC_0000001"] and rows["ISIC_0000001"]["sex"] == "male"
    assert result.report.missing_masks == []


def _isic2018_task3(root: Path, with_task1: bool) -> None:
    classes = ["MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"]
    gt = [["image", *classes]]
    meta = [["lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization"]]
    for i, label in enumerate(["NV", "NV", "MEL", "BKL"]):
        image_id = f"ISIC_002430{i}"
        write_image(root / "ISIC2018_Task3_Training_Input" / f"{image_id}.jpg")
        gt.append([image_id, *["1.0" if c == label else "0.0" for c in classes]])
        meta.append([f"HAM_000000{i // 2}", image_id, label.lower(), "histo", "40.0", "male", "back"])
    gt.append(["ISIC_0024399", *["1.0", "1.0", "0.0", "0.0", "0.0", "0.0", "0.0"]])  # two 1s and no image
    write_csv(root / "ISIC2018_Task3_Training_GroundTruth" / "ISIC2018_Task3_Training_GroundTruth.csv", gt)
    write_csv(root / "HAM10000_metadata.csv", meta)
    if with_task1:
        for image_id in ("ISIC_0000000", "ISIC_0000001"):
            write_image(root / "ISIC2018_Task1-2_Training_Input" / f"{image_id}.jpg")
            write_image(root / "ISIC2018_Task1_Training_GroundTruth" / f"{image_id}_segmentation.png", mask=True)


def test_isic2018_task1_masks_task3_labels_and_ham_groups(tmp_path: Path) -> None:
    _isic2018_task3(tmp_path, with_task1=True)
    result = FORMATS["isic2018"](tmp_path)
    rows = by_id(result)
    assert result.classes == ("MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC")
    assert [rows[f"ISIC_002430{i}"]["label"] for i in range(4)] == ["NV", "NV", "MEL", "BKL"]
    assert rows["ISIC_0024300"]["group"] == rows["ISIC_0024301"]["group"] == "HAM_0000000"
    assert rows["ISIC_0024302"]["site"] == "back" and rows["ISIC_0024302"]["age"] == "40.0"
    assert rows["ISIC_0000000"]["label"] == "" and rows["ISIC_0000000"]["mask_path"]
    assert result.report.unlabelled == ["ISIC_0000000", "ISIC_0000001"]
    assert result.report.missing_masks == [f"ISIC_002430{i}" for i in range(4)]
    assert result.report.labels_without_images == ["ISIC_0024399"]
    assert all(r["split"] == "train" for r in result.rows)


def test_isic2018_task3_alone_reports_that_masks_are_absent(tmp_path: Path) -> None:
    _isic2018_task3(tmp_path, with_task1=False)
    result = FORMATS["isic2018"](tmp_path)
    assert result.report.masks_found == 0 and result.report.missing_masks == []
    assert "no lesion masks found" in result.report.notes
    assert result.report.labelled == 4


def _ham10000(root: Path, lesions: int = 3, per_lesion: int = 2) -> list[list[str]]:
    """HAM10000 as published: two image parts, the metadata CSV, the tschandl mask release."""
    meta = [["lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization", "dataset"]]
    classes = ["nv", "mel", "bkl", "bcc"]
    n = 0
    for lesion in range(lesions):
        for _ in range(per_lesion):
            image_id = f"ISIC_{24306 + n:07d}"
            part = 1 if n % 2 == 0 else 2
            write_image(root / f"HAM10000_images_part_{part}" / f"{image_id}.jpg")
            write_image(root / "HAM10000_segmentations_lesion_tschandl" / f"{image_id}_segmentation.png", mask=True)
            dx = classes[lesion % len(classes)]
            meta.append([f"HAM_{lesion:07d}", image_id, dx, "histo", "45.0", "female", "face", "vidir_modern"])
            n += 1
    write_csv(root / "HAM10000_metadata.csv", meta)
    return meta


def test_ham10000_lesion_groups_metadata_masks_and_problems(tmp_path: Path) -> None:
    meta = _ham10000(tmp_path)
    meta.append(["HAM_0000099", "ISIC_0099999", "nv", "histo", "30.0", "male", "back", "rosendahl"])  # no image
    meta.append(["HAM_0000098", "ISIC_0024312", "xyz", "histo", "30.0", "male", "back", "rosendahl"])  # unknown dx
    write_csv(tmp_path / "HAM10000_metadata.csv", meta)
    write_image(tmp_path / "HAM10000_images_part_1" / "ISIC_0024312.jpg")
    (tmp_path / "HAM10000_segmentations_lesion_tschandl" / "ISIC_0024307_segmentation.png").unlink()

    result = FORMATS["ham10000"](tmp_path)
    rows = by_id(result)
    assert result.classes == ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
    assert rows["ISIC_0024306"]["group"] == rows["ISIC_0024307"]["group"] == "HAM_0000000"
    assert rows["ISIC_0024308"]["label"] == "mel" and rows["ISIC_0024308"]["group"] == "HAM_0000001"
    assert {k: rows["ISIC_0024306"][k] for k in ("age", "sex", "site", "dx_type")} == {
        "age": "45.0",
        "sex": "female",
        "site": "face",
        "dx_type": "histo",
    }
    assert "localization" not in rows["ISIC_0024306"]
    assert rows["ISIC_0024312"]["label"] == ""
    assert [b.split()[0] for b in result.report.bad_labels] == ["ISIC_0024312"]
    assert result.report.labels_without_images == ["ISIC_0099999"]
    assert result.report.missing_masks == ["ISIC_0024307", "ISIC_0024312"]
    assert result.report.labelled == 6


def _isic2019(root: Path, unk_used: bool = False) -> None:
    classes = ["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK"]
    labels = {"ISIC_0000000_downsampled": "NV", "ISIC_0000001": "AK", "ISIC_0000002": "SCC", "ISIC_0000003": "MEL"}
    if unk_used:
        labels["ISIC_0000004"] = "UNK"
    for name in labels:
        write_image(root / "ISIC_2019_Training_Input" / f"{name}.jpg")
    gt = [["image", *classes]] + [[n, *["1.0" if c == lab else "0.0" for c in classes]] for n, lab in labels.items()]
    write_csv(root / "ISIC_2019_Training_GroundTruth.csv", gt)
    write_csv(
        root / "ISIC_2019_Training_Metadata.csv",
        [
            ["image", "age_approx", "anatom_site_general", "lesion_id", "sex"],
            ["ISIC_0000000_downsampled", "55.0", "anterior torso", "BCN_0000001", "male"],
            ["ISIC_0000001", "60.0", "", "BCN_0000001", "female"],
            ["ISIC_0000002", "", "head/neck", "", ""],
        ],
    )


def test_isic2019_downsampled_ids_lesion_groups_and_unused_unk_left_out(tmp_path: Path) -> None:
    _isic2019(tmp_path)
    result = FORMATS["isic2019"](tmp_path)
    rows = by_id(result)
    assert result.classes == ("MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC")
    assert sorted(rows) == ["ISIC_0000000", "ISIC_0000001", "ISIC_0000002", "ISIC_0000003"]
    assert rows["ISIC_0000000"]["label"] == "NV"
    assert rows["ISIC_0000000"]["image_path"].endswith("ISIC_0000000_downsampled.jpg")
    assert rows["ISIC_0000000"]["group"] == rows["ISIC_0000001"]["group"] == "BCN_0000001"
    assert rows["ISIC_0000002"]["group"] == "" and rows["ISIC_0000002"]["site"] == "head/neck"
    assert rows["ISIC_0000000"]["site"] == "anterior torso" and rows["ISIC_0000000"]["age"] == "55.0"
    assert result.report.unlabelled == [] and result.report.labels_without_images == []


def test_isic2019_keeps_unk_when_a_row_uses_it(tmp_path: Path) -> None:
    _isic2019(tmp_path, unk_used=True)
    result = FORMATS["isic2019"](tmp_path)
    assert result.classes[-1] == "UNK"
    assert by_id(result)["ISIC_0000004"]["label"] == "UNK"


def test_isic2020_patient_groups_diagnosis_and_unlabelled_test_images(tmp_path: Path) -> None:
    header = ["image_name", "patient_id", "sex", "age_approx", "anatom_site_general_challenge", "diagnosis"]
    train = [[*header, "benign_malignant", "target"]]
    for i, (patient, target) in enumerate([("IP_1", 0), ("IP_1", 1), ("IP_2", 0)]):
        write_image(tmp_path / "jpeg" / "train" / f"ISIC_000000{i}.jpg")
        diagnosis = "melanoma" if target else "nevus"
        train.append(
            [
                f"ISIC_000000{i}",
                patient,
                "male",
                "45.0",
                "torso",
                diagnosis,
                "malignant" if target else "benign",
                target,
            ]
        )
    write_csv(tmp_path / "train.csv", train)
    write_image(tmp_path / "jpeg" / "test" / "ISIC_0000009.jpg")
    write_csv(tmp_path / "test.csv", [header[:5], ["ISIC_0000009", "IP_7", "female", "30.0", "head/neck"]])

    result = FORMATS["isic2020"](tmp_path)
    rows = by_id(result)
    assert result.classes == ("benign", "malignant")
    assert [rows[f"ISIC_000000{i}"]["label"] for i in range(3)] == ["benign", "malignant", "benign"]
    assert rows["ISIC_0000000"]["group"] == rows["ISIC_0000001"]["group"] == "IP_1"
    assert rows["ISIC_0000001"]["diagnosis"] == "melanoma" and rows["ISIC_0000001"]["site"] == "torso"
    assert rows["ISIC_0000009"]["label"] == "" and rows["ISIC_0000009"]["split"] == "test"
    assert rows["ISIC_0000009"]["group"] == "IP_7"
    assert rows["ISIC_0000000"]["split"] == "train"
    assert result.report.unlabelled == ["ISIC_0000009"]


PH2_HEADER = (
    "||   Name   ||   Histological Diagnosis   ||   Clinical Diagnosis   ||   Asymmetry   |   Pigment Network   |"
    "   Dots/Globules   |   Streaks   |   Regression Areas   |   Blue-Whitish Veil   ||   Colors   ||"
)


def test_ph2_txt_table_classes_masks_and_criteria(tmp_path: Path) -> None:
    images = tmp_path / "PH2Dataset" / "PH2 Dataset images"
    lines = [PH2_HEADER]
    for n, code in ((2, 0), (3, 1), (4, 2)):
        name = f"IMD{n:03d}"
        write_image(images / name / f"{name}_Dermoscopic_Image" / f"{name}.bmp")
        if n != 3:
            write_image(images / name / f"{name}_lesion" / f"{name}_lesion.bmp", mask=True)
        write_image(images / name / f"{name}_roi" / f"{name}_R1_Label4.bmp", mask=True)  # colour ROI, not a mask
        histology = "Melanoma" if code == 2 else ""
        criteria = f"{n % 3}   |   AT   |   A   |   P   |   A   |   A"
        lines.append(f"|| {name} ||   {histology:<22} ||   {code}   ||   {criteria}   ||   3  4   ||")
    lines.append(
        "||  IMD200  ||      ||   0   ||   0   |   T   |   A   |   A   |   A   |   A   ||   4   ||"
    )  # no image
    lines += ["", "Legend:", "Clinical Diagnosis:", "\t0 - Common Nevus;", "\t1 - Atypical Nevus;", "\t2 - Melanoma."]
    (tmp_path / "PH2Dataset" / "PH2_dataset.txt").write_text("\n".join(lines) + "\n")

    result = FORMATS["ph2"](tmp_path)
    rows = by_id(result)
    assert result.classes == ("common_nevus", "atypical_nevus", "melanoma")
    assert sorted(rows) == ["IMD002", "IMD003", "IMD004"]
    assert [rows[i]["label"] for i in ("IMD002", "IMD003", "IMD004")] == ["common_nevus", "atypical_nevus", "melanoma"]
    assert rows["IMD004"]["histology"] == "Melanoma"
    assert rows["IMD004"]["pigment_network"] == "AT" and rows["IMD004"]["colors"] == "3 4"
    assert rows["IMD002"]["mask_path"].endswith("IMD002_lesion.bmp")
    assert result.report.missing_masks == ["IMD003"]
    assert result.report.labels_without_images == ["IMD200"]


# The PH2 sheet as published (PH2_dataset.xlsx): title rows, then one header row; an X marks the clinical diagnosis
# and each colour. Rows: image, histology, diagnosis (0/1/2), asymmetry, pigment network, colours (legend codes).
PH2_SHEET_HEADER = [
    "Image Name", "Histological Diagnosis", "Common Nevus", "Atypical Nevus", "Melanoma", "Asymmetry\n(0/1/2)",
    "Pigment Network\n(AT/T)", "Dots/Globules\n(A/AT/T)", "Streaks\n(A/P)", "Regression Areas\n(A/P)",
    "Blue-Whitish Veil\n(A/P)", "White", "Red", "Light-Brown", "Dark-Brown", "Blue-Gray", "Black",
]  # fmt: skip
PH2_ROWS = [
    ("IMD002", "", 0, 0, "AT", (3, 4)),
    ("IMD003", "", 1, 2, "T", (4,)),
    ("IMD004", "Melanoma", 2, 1, "AT", (1, 6)),
]


def _ph2_images(root: Path) -> None:
    for name, *_ in PH2_ROWS:
        write_image(root / "PH2 Dataset images" / name / f"{name}_Dermoscopic_Image" / f"{name}.bmp")
        write_image(root / "PH2 Dataset images" / name / f"{name}_lesion" / f"{name}_lesion.bmp", mask=True)


def _ph2_sheet_rows(numbers: bool = False) -> list[list[object]]:
    """The sheet: title rows, a blank row, the header, a row per image; ``numbers``: numbers as openpyxl stores them."""
    rows: list[list[object]] = [
        ["PH2 Database"],
        ["Dermatology Service of Hospital Pedro Hispano"],
        [],
        PH2_SHEET_HEADER,
    ]
    for name, histology, code, asymmetry, network, colours in PH2_ROWS:
        marks = ["X" if code == k else None for k in range(3)] + [asymmetry if numbers else str(asymmetry), network]
        marks += ["A", "A", "A", "P" if code == 2 else "A"] + ["X" if k in colours else None for k in range(1, 7)]
        rows.append([name, histology or None, *marks])
    return rows


def _write_xlsx(path: Path, rows: list[list[object]], title: str = "PH2") -> Path:
    openpyxl = pytest.importorskip("openpyxl")
    book = openpyxl.Workbook()
    sheet = book.active
    sheet.title = title
    for row in rows:
        sheet.append(row)
    path.parent.mkdir(parents=True, exist_ok=True)
    book.save(path)
    return path


def _assert_ph2_table_read(root: Path) -> None:
    result = FORMATS["ph2"](root)
    rows = by_id(result)
    assert [rows[f"IMD00{n}"]["label"] for n in (2, 3, 4)] == ["common_nevus", "atypical_nevus", "melanoma"]
    assert [rows[f"IMD00{n}"]["colors"] for n in (2, 3, 4)] == ["3 4", "4", "1 6"]
    assert [rows[f"IMD00{n}"]["asymmetry"] for n in (2, 3, 4)] == ["0", "2", "1"]
    assert rows["IMD004"]["histology"] == "Melanoma" and rows["IMD003"]["pigment_network"] == "T"
    assert rows["IMD004"]["blue_whitish_veil"] == "P" and rows["IMD002"]["dots_globules"] == "A"
    assert result.report.labelled == 3 and result.report.bad_labels == []


def test_ph2_xlsx_sheet_as_published(tmp_path: Path) -> None:
    _ph2_images(tmp_path / "PH2Dataset")
    _write_xlsx(tmp_path / "PH2Dataset" / "PH2_dataset.xlsx", _ph2_sheet_rows(numbers=True))
    _assert_ph2_table_read(tmp_path)


def test_ph2_xlsx_with_a_merged_clinical_diagnosis_header_above(tmp_path: Path) -> None:
    _ph2_images(tmp_path)
    rows = _ph2_sheet_rows(numbers=True)
    header = rows[3]
    above = ["Image Name", "Histological Diagnosis", "Clinical Diagnosis", None, None, "Dermoscopic Criteria"]
    rows[3] = [None, None, *header[2:]]  # the two header rows of a sheet with merged cells
    rows.insert(3, above)
    _write_xlsx(tmp_path / "PH2_dataset.xlsx", rows)
    _assert_ph2_table_read(tmp_path)


@pytest.mark.parametrize("export", ["csv", "semicolon", "tsv", "utf16_txt"])
def test_ph2_sheet_exports_csv_tab_and_excel_unicode_text(tmp_path: Path, export: str) -> None:
    _ph2_images(tmp_path)
    rows = [["" if c is None else str(c) for c in row] for row in _ph2_sheet_rows()]
    if export == "csv":
        write_csv(tmp_path / "PH2_dataset.csv", rows)
    elif export == "semicolon":  # Excel's CSV where the decimal mark is a comma
        with open(tmp_path / "PH2_dataset.csv", "w", newline="", encoding="utf-8-sig") as f:
            csv.writer(f, delimiter=";").writerows(rows)
    else:
        text = "\r\n".join("\t".join(c.replace("\n", " ") for c in row) for row in rows) + "\r\n"
        if export == "tsv":
            (tmp_path / "PH2_dataset.tsv").write_text(text)
        else:  # Excel's "Unicode text": UTF-16 with a byte-order mark, tab-separated, named .txt
            (tmp_path / "PH2_dataset.txt").write_bytes(text.encode("utf-16"))
    _assert_ph2_table_read(tmp_path)


def test_ph2_csv_export_of_the_text_table(tmp_path: Path) -> None:
    _ph2_images(tmp_path)
    header = ["Name", "Histological Diagnosis", "Clinical Diagnosis", "Asymmetry", "Pigment Network", "Dots/Globules"]
    header += ["Streaks", "Regression Areas", "Blue-Whitish Veil", "Colors"]
    rows = [header]
    for name, histology, code, asymmetry, network, colours in PH2_ROWS:
        veil = "P" if code == 2 else "A"
        rows.append([name, histology, code, asymmetry, network, "A", "A", "A", veil, " ".join(map(str, colours))])
    write_csv(tmp_path / "ph2_dataset.csv", rows)
    _assert_ph2_table_read(tmp_path)


@pytest.mark.parametrize(
    ("name", "content", "what"),
    [
        ("PH2_dataset.txt", b"the PH2 labels are on the web site\n", "no PH2 header row"),
        ("PH2_dataset.csv", b"Name,Diagnosis\nIMD002,0\n", "no PH2 header row"),
        ("PH2_dataset.xlsx", b"PK\x03\x04 not really a workbook", "not a readable .xlsx workbook"),
        ("PH2_dataset.xls", b"\xd0\xcf\x11\xe0 an old workbook", "old Excel .xls file"),
        ("PH2_dataset.tsv", b"Name\tClinical Diagnosis\nIMD002\tmaybe\nIMD003\t7\n", "none of its 2 label rows"),
    ],
)
def test_ph2_table_that_cannot_be_read_is_one_error_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture, name: str, content: bytes, what: str
) -> None:
    _ph2_images(tmp_path)
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ConversionError, match=what) as caught:
        FORMATS["ph2"](tmp_path)
    assert str(tmp_path / name) in str(caught.value)
    assert main(["--format", "ph2", "--root", str(tmp_path), "--out", str(tmp_path / "m.csv")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.splitlines()) == 1 and name in err
    assert not (tmp_path / "m.csv").exists()  # no manifest of unlabelled rows


def test_derm7pt_meta_dermoscopic_images_cases_and_official_index_split(tmp_path: Path) -> None:
    release = tmp_path / "release_v0"
    header = ["case_num", "diagnosis", "seven_point_score", "pigment_network", "location", "sex", "clinic", "derm"]
    meta = [header]
    diagnoses = ["basal cell carcinoma", "clark nevus", "melanoma (in situ)", "clark nevus", "blue nevus"]
    for i, diagnosis in enumerate(diagnoses):
        folder = "NEL" if "nevus" in diagnosis else "Fbl"
        write_image(release / "images" / folder / f"Cl{i:03d}.jpg")
        derm = f"{folder}/Dm{i:03d}.jpg"
        if i != 4:  # the last case's dermoscopic image is missing
            write_image(release / "images" / derm)
        meta.append([i + 1, diagnosis, 2, "typical", "back", "female", f"{folder}/Cl{i:03d}.jpg", derm])
    write_csv(release / "meta" / "meta.csv", meta)
    for name, indexes in (("train", [0, 1]), ("valid", [2]), ("test", [3, 4])):
        write_csv(release / "meta" / f"{name}_indexes.csv", [["indexes"], *[[i] for i in indexes]])

    result = FORMATS["derm7pt"](tmp_path)
    rows = by_id(result)
    assert result.classes == ("basal cell carcinoma", "blue nevus", "clark nevus", "melanoma (in situ)")
    assert sorted(rows) == ["Dm000", "Dm001", "Dm002", "Dm003"]  # clinical images are not rows
    assert {i: r["split"] for i, r in rows.items()} == {
        "Dm000": "train",
        "Dm001": "train",
        "Dm002": "val",
        "Dm003": "test",
    }
    assert rows["Dm002"]["label"] == "melanoma (in situ)" and rows["Dm002"]["group"] == "case_3"
    assert rows["Dm001"]["site"] == "back" and rows["Dm001"]["pigment_network"] == "typical"
    assert rows["Dm001"]["clinic_path"].endswith("NEL/Cl001.jpg")
    assert len(result.report.labels_without_images) == 1 and "Dm004" in result.report.labels_without_images[0]


def test_folder_class_subfolders_masks_and_loose_images(tmp_path: Path) -> None:
    for cls, names in (("nevus", ["a", "b"]), ("melanoma", ["c"])):
        for name in names:
            write_image(tmp_path / cls / f"{name}.png")
    write_image(tmp_path / "loose.jpg")
    write_image(tmp_path / "masks" / "a_segmentation.png", mask=True)
    write_image(tmp_path / "masks" / "c.png", mask=True)
    write_image(tmp_path / "masks" / "zzz.png", mask=True)

    result = FORMATS["folder"](tmp_path)
    rows = by_id(result)
    assert result.classes == ("melanoma", "nevus")
    assert {i: r["label"] for i, r in rows.items()} == {"a": "nevus", "b": "nevus", "c": "melanoma", "loose": ""}
    assert rows["a"]["mask_path"].endswith("a_segmentation.png") and rows["c"]["mask_path"].endswith("c.png")
    assert result.report.missing_masks == ["b", "loose"]
    assert result.report.masks_without_images == ["zzz"]
    assert result.report.unlabelled == ["loose"]


def test_folder_flat_is_unlabelled_and_split_folders_are_kept(tmp_path: Path) -> None:
    flat = tmp_path / "flat"
    for name in ("x", "y"):
        write_image(flat / f"{name}.jpg")
    result = FORMATS["folder"](flat)
    assert result.classes == () and [r["label"] for r in result.rows] == ["", ""]

    split = tmp_path / "split"
    write_image(split / "train" / "mel" / "img1.jpg")
    write_image(split / "train" / "nv" / "img2.jpg")
    write_image(split / "test" / "mel" / "img1.jpg")  # same file name in another split: ids become paths
    result = FORMATS["folder"](split)
    rows = by_id(result)
    assert result.classes == ("mel", "nv")
    assert {i: (r["label"], r["split"]) for i, r in rows.items()} == {
        "train/mel/img1": ("mel", "train"),
        "train/nv/img2": ("nv", "train"),
        "test/mel/img1": ("mel", "test"),
    }


def test_semicolon_separated_ground_truth_is_read(tmp_path: Path) -> None:
    _isic2019(tmp_path)
    gt = tmp_path / "ISIC_2019_Training_GroundTruth.csv"
    rows = list(csv.reader(gt.open()))
    with open(gt, "w", newline="", encoding="utf-8-sig") as f:  # Excel where the decimal mark is a comma
        csv.writer(f, delimiter=";").writerows([[c.replace(".", ",") for c in row] for row in rows])
    result = FORMATS["isic2019"](tmp_path)
    assert by_id(result)["ISIC_0000002"]["label"] == "SCC" and result.report.labelled == 4


@pytest.mark.parametrize(
    ("fmt", "make", "table", "content", "what"),
    [
        ("ham10000", _ham10000, "HAM10000_metadata.csv", b"PK\x03\x04\x14\x00binary\x00xlsx", "named like the label"),
        ("ham10000", _ham10000, "HAM10000_metadata.csv", b"lesion;image;diagnosis\nHAM_1;ISIC_0024306;nv\n", "dx"),
        ("isic2019", _isic2019, "ISIC_2019_Training_GroundTruth.csv", b"image MEL NV\n", "named like the label"),
        ("isic2019", _isic2019, "ISIC_2019_Training_GroundTruth.csv",
         b"image,MEL,NV,SCC\nISIC_0000001,yes,no,no\nISIC_0000002,no,no,yes\n", "none of its 2 label rows"),
        ("isic2016", lambda root: _isic2016_many(root), "ISBI2016_ISIC_Part3_Training_GroundTruth.csv",
         b"\xff\xfe\x00garbage", "named"),
    ],
)  # fmt: skip
def test_label_table_that_cannot_be_parsed_fails_naming_it(
    tmp_path: Path, fmt: str, make, table: str, content: bytes, what: str
) -> None:
    make(tmp_path)
    for stale in tmp_path.glob("*.csv"):  # the fixture's own tables: only the unreadable one stays
        stale.unlink()
    (tmp_path / table).write_bytes(content)
    with pytest.raises(ConversionError, match=what) as caught:
        FORMATS[fmt](tmp_path)
    assert str(caught.value).startswith(str(tmp_path / table)) and "\n" not in str(caught.value)


def test_images_without_any_label_table_still_convert_unlabelled(tmp_path: Path) -> None:
    _ham10000(tmp_path)
    (tmp_path / "HAM10000_metadata.csv").unlink()
    result = FORMATS["ham10000"](tmp_path)
    assert result.report.labelled == 0 and any("no HAM10000_metadata" in n for n in result.report.notes)


@pytest.mark.skipif(sys.platform == "win32", reason="FIFOs are POSIX")
def test_a_fifo_named_like_a_table_is_never_opened(tmp_path: Path) -> None:
    import os
    import threading

    _ham10000(tmp_path)
    os.mkfifo(tmp_path / "extra_metadata.csv")  # opening it would block until a writer comes
    done: list[object] = []
    thread = threading.Thread(target=lambda: done.append(FORMATS["ham10000"](tmp_path)), daemon=True)
    thread.start()
    thread.join(30)
    assert done and done[0].report.labelled == 6


def test_file_names_that_cannot_be_ids_are_skipped_with_a_note(tmp_path: Path) -> None:
    write_image(tmp_path / "nv" / "fine.jpg")
    write_image(tmp_path / "nv" / "two\nlines.jpg")
    result = FORMATS["folder"](tmp_path)
    assert sorted(by_id(result)) == ["fine"]
    assert any("control character" in note and "\\n" in note and "\n" not in note for note in result.report.notes)


def test_every_converter_writes_a_manifest_that_reads_back(tmp_path: Path) -> None:
    fixtures = {"ham10000": _ham10000, "isic2019": _isic2019, "isic2016": _isic2016_many}
    fixtures["isic2018"] = lambda root: _isic2018_task3(root, with_task1=True)
    for fmt, make in fixtures.items():
        make(tmp_path / fmt)
        written = FORMATS[fmt](tmp_path / fmt).manifest().write(tmp_path / f"{fmt}.csv")
        back = Manifest.read(written)
        assert len(back) == len({r["image_id"] for r in back.rows}) > 0, fmt
    _ph2_images(tmp_path / "ph2")
    _write_xlsx(tmp_path / "ph2" / "PH2_dataset.xlsx", _ph2_sheet_rows(numbers=True))
    assert len(Manifest.read(FORMATS["ph2"](tmp_path / "ph2").manifest().write(tmp_path / "ph2.csv"))) == 3


def test_empty_root_and_missing_root_raise_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConversionError, match="no ISIC_"):
        FORMATS["ham10000"](tmp_path)
    with pytest.raises(ConversionError, match="does not exist"):
        FORMATS["isic2019"](tmp_path / "nowhere")


# ---------------------------------------------------------------------------------------------------------------------
# Class maps


def test_builtin_map_refuses_unmapped_class_then_maps_with_explicit_pair(tmp_path: Path) -> None:
    _isic2019(tmp_path)
    result = FORMATS["isic2019"](tmp_path)
    with pytest.raises(ConversionError, match=r"SCC \(1 images\) unmapped.*--drop SCC"):
        apply_class_map(result, parse_class_map(["isic2019-ham10000"]))

    mapped = apply_class_map(FORMATS["isic2019"](tmp_path), parse_class_map(["isic2019-ham10000", "SCC=akiec"]))
    rows = by_id(mapped)
    assert mapped.classes == ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
    assert (rows["ISIC_0000001"]["label"], rows["ISIC_0000001"]["source_label"]) == ("akiec", "AK")
    assert (rows["ISIC_0000002"]["label"], rows["ISIC_0000002"]["source_label"]) == ("akiec", "SCC")
    assert rows["ISIC_0000000"]["label"] == "nv"


def test_drop_removes_and_counts_a_class(tmp_path: Path) -> None:
    _isic2019(tmp_path)
    mapped = apply_class_map(FORMATS["isic2019"](tmp_path), parse_class_map(["isic2019-ham10000"]), drop=["SCC"])
    assert "ISIC_0000002" not in by_id(mapped)
    assert mapped.report.dropped == {"SCC": 1}
    assert mapped.report.labelled == 3
    with pytest.raises(ConversionError, match="not a class"):
        apply_class_map(FORMATS["isic2019"](tmp_path), None, drop=["scc"])


def test_inline_and_file_maps_check_their_keys(tmp_path: Path) -> None:
    _isic2019(tmp_path / "data")
    result = FORMATS["isic2019"](tmp_path / "data")
    with pytest.raises(ConversionError, match="Ak.*not classes"):
        apply_class_map(result, parse_class_map(["MEL=m,NV=n,Ak=k,SCC=k"]))
    map_file = tmp_path / "map.yaml"
    map_file.write_text(
        "map:\n  MEL: malignant\n  SCC: malignant\n  AK: benign\n  NV: benign\nclasses: [benign, malignant]\n"
    )
    mapped = apply_class_map(FORMATS["isic2019"](tmp_path / "data"), parse_class_map([str(map_file)]))
    assert mapped.classes == ("benign", "malignant")
    assert [r["label"] for r in mapped.rows] == ["benign", "benign", "malignant", "malignant"]
    json_file = tmp_path / "map.json"
    json_file.write_text(json.dumps({"MEL": "mel", "NV": None}))
    with pytest.raises(ConversionError, match="--drop"):
        parse_class_map([str(json_file)])
    with pytest.raises(ConversionError, match="did you mean 'isic2019-ham10000'"):
        parse_class_map(["isic2019-ham1000"])


# ---------------------------------------------------------------------------------------------------------------------
# CLI, splits and folds


def test_unknown_format_lists_valid_names_with_did_you_mean(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["--format", "ham1000", "--root", str(tmp_path), "--out", str(tmp_path / "m.csv")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown format 'ham1000' (did you mean 'ham10000'?)")
    assert all(name in err for name in FORMATS) and "Traceback" not in err
    with pytest.raises(ConversionError):
        get_reader("nope")


def test_cli_writes_manifest_sidecar_and_report(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _ham10000(tmp_path / "ham", lesions=16, per_lesion=2)
    out = tmp_path / "runs" / "ham.csv"
    assert main(["--format", "ham10000", "--root", str(tmp_path / "ham"), "--out", str(out), "--seed", "3"]) == 0
    printed = capsys.readouterr().out
    assert printed.splitlines()[0].startswith("ham10000: 32 images, 32 labelled, 7 classes, 32 masks")
    manifest = Manifest.read(out)
    assert manifest.classes == ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
    assert len(manifest) == 32 and {r["split"] for r in manifest.rows} == {"train", "val", "test"}
    assert all(Path(r["image_path"]).is_file() and Path(r["mask_path"]).is_file() for r in manifest.rows)
    assert manifest.info["format"] == "ham10000" and manifest.info["report"]["counts"]["images"] == 32
    side = json.loads(out.with_suffix(".json").read_text())
    assert side["classes"][0] == "akiec" and side["seed"] == 3


def test_too_small_to_split_is_one_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _ham10000(tmp_path / "ham", lesions=3, per_lesion=1)
    assert main(["--format", "ham10000", "--root", str(tmp_path / "ham"), "--out", str(tmp_path / "m.csv")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot split ham10000") and "--fractions" in err and len(err.splitlines()) == 1


def test_grouped_split_and_folds_never_put_a_lesion_on_two_sides(tmp_path: Path) -> None:
    _ham10000(tmp_path, lesions=30, per_lesion=3)
    manifest, _ = convert_dataset("ham10000", tmp_path, seed=1, folds=3)
    sides: dict[str, set[str]] = defaultdict(set)
    folds: dict[str, set[str]] = defaultdict(set)
    for row in manifest.rows:
        sides[row["group"]].add(row["split"])
        if row["split"] == "train":
            folds[row["group"]].add(row["fold"])
    assert len(sides) == 30 and all(len(s) == 1 for s in sides.values())
    assert {r["split"] for r in manifest.rows} == {"train", "val", "test"}
    assert all(len(f) == 1 for f in folds.values())
    assert {r["fold"] for r in manifest.rows if r["split"] == "train"} == {"0", "1", "2"}
    assert all(r["fold"] == "" for r in manifest.rows if r["split"] != "train")
    again, _ = convert_dataset("ham10000", tmp_path, seed=1, folds=3)
    assert [r["split"] for r in again.rows] == [r["split"] for r in manifest.rows]  # fixed seed, same split


def _isic2016_many(root: Path, n_train: int = 24, n_test: int = 4) -> None:
    train, test = [], []
    for i in range(n_train + n_test):
        image_id = f"ISIC_{i:07d}"
        folder = "Training" if i < n_train else "Test"
        write_image(root / f"ISBI2016_ISIC_Part3_{folder}_Data" / f"{image_id}.jpg")
        (train if i < n_train else test).append([image_id, "malignant" if i % 4 == 0 else "benign"])
    write_csv(root / "ISBI2016_ISIC_Part3_Training_GroundTruth.csv", train)
    write_csv(root / "ISBI2016_ISIC_Part3_Test_GroundTruth.csv", test)


def test_official_split_kept_and_missing_val_carved_from_train(tmp_path: Path) -> None:
    _isic2016_many(tmp_path)
    manifest, report = convert_dataset("isic2016", tmp_path)
    splits = {r["image_id"]: r["split"] for r in manifest.rows}
    official_test = {f"ISIC_{i:07d}" for i in range(24, 28)}
    assert {i for i, s in splits.items() if s == "test"} == official_test
    assert 0 < sum(s == "val" for s in splits.values()) < 24
    assert any("carved" in note for note in report.notes)

    resplit, _ = convert_dataset("isic2016", tmp_path, keep_official=False)
    assert {r["image_id"] for r in resplit.rows if r["split"] == "test"} != official_test


def test_map_refusal_through_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _isic2019(tmp_path)
    args = [
        "--format",
        "isic2019",
        "--root",
        str(tmp_path),
        "--out",
        str(tmp_path / "m.csv"),
        "--fractions",
        "1",
        "0",
        "0",
    ]
    assert main([*args, "--map", "isic2019-ham10000"]) == 2
    assert "SCC" in capsys.readouterr().err
    assert not (tmp_path / "m.csv").exists()
    assert main([*args, "--map", "isic2019-ham10000", "--map", "SCC=akiec"]) == 0
    assert Manifest.read(tmp_path / "m.csv").classes[0] == "akiec"


def test_script_runs_from_the_repository_root(tmp_path: Path) -> None:
    """`python data/convert.py` puts data/ first on sys.path; no module there may shadow a top-level package."""
    for name in ("x", "y"):
        write_image(tmp_path / "imgs" / "nv" / f"{name}.jpg")
    done = subprocess.run(
        [sys.executable, "data/convert.py", "--format", "folder", "--root", str(tmp_path / "imgs")]
        + ["--out", str(tmp_path / "m.csv"), "--fractions", "1", "0", "0"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("folder: 2 images, 2 labelled, 1 classes")
