"""Dataset loading: every layout, splits, and the failures a user can meet. All on tiny generated files."""
import json
from pathlib import Path

import pytest
from PIL import Image

from captioning.data.datasets import load_dataset
from captioning.utils import CaptioningError
from tests.helpers import coco_name, jpeg, make_flickr, make_mini_coco, write_json

FLICKR8K = Path(__file__).resolve().parents[3] / "shared" / "datasets" / "flickr8k"


def by_name(dataset):
    return {r.image.name: r for r in dataset.records}


# ---- layouts -------------------------------------------------------------------------------------------

def test_mini_coco_list(tmp_path):
    make_mini_coco(tmp_path)
    d = load_dataset(tmp_path)
    assert d.layout == "mini-coco" and d.root == tmp_path and d.missing == 0
    assert len(d.records) == 5
    r = by_name(d)[coco_name(9)]
    assert r.image.is_absolute() and r.image.exists()
    assert r.captions == ["A picture number 9 variant 0", "A picture number 9 variant 1"]  # stripped, in order
    assert [str(r.image) for r in d.records] == sorted(str(r.image) for r in d.records)
    assert {r.split for r in d.records} <= {"train", "val", "test"}


def test_mini_coco_as_coco_dict(tmp_path):
    write_json(tmp_path / "captions.json", {
        "images": [{"id": 9, "file_name": coco_name(9)}, {"id": 25, "file_name": coco_name(25)}],
        "annotations": [{"image_id": 9, "caption": "a cat"}, {"image_id": 25, "caption": "a dog"},
                        {"image_id": 9, "caption": "a small cat."}]})
    jpeg(tmp_path / "Images" / coco_name(9))
    jpeg(tmp_path / "Images" / coco_name(25))
    d = load_dataset(tmp_path)
    assert d.layout == "mini-coco"
    assert by_name(d)[coco_name(9)].captions == ["a cat", "a small cat."]


def test_flickr8k_csv_with_quoted_commas(tmp_path):
    make_flickr(tmp_path, ["1000_a.jpg", "1001_b.jpg", "1002_c.jpg"])
    # An unquoted caption with a comma keeps all its text; a BOM at the start is ignored.
    text = (tmp_path / "captions.txt").read_text()
    (tmp_path / "captions.txt").write_text("\ufeff" + text + "1002_c.jpg,two dogs , one ball\n", encoding="utf-8")
    d = load_dataset(tmp_path)
    assert d.layout == "flickr8k" and len(d.records) == 3
    assert by_name(d)["1000_a.jpg"].captions == ["A dog , a ball and a beach .", "A dog runs on the beach ."]
    assert by_name(d)["1002_c.jpg"].captions[-1] == "two dogs , one ball"


def test_karpathy_with_restval_and_filepath(tmp_path):
    images = [
        {"filepath": "train2014", "filename": "a.jpg", "split": "train", "sentences": [{"raw": "A cat. "}]},
        {"filepath": "val2014", "filename": "b.jpg", "split": "restval", "sentences": [{"raw": "A dog."}]},
        {"filepath": "val2014", "filename": "c.jpg", "split": "val", "sentences": [{"tokens": ["a", "bird"]}]},
        {"filename": "d.jpg", "split": "test", "sentences": [{"raw": "A fish."}, {"raw": "  "}]},
    ]
    write_json(tmp_path / "dataset_coco.json", {"images": images, "dataset": "coco"})
    jpeg(tmp_path / "train2014" / "a.jpg")
    jpeg(tmp_path / "val2014" / "b.jpg")
    jpeg(tmp_path / "Images" / "val2014" / "c.jpg")  # filepath joined under root/Images too
    jpeg(tmp_path / "Images" / "d.jpg")
    d = load_dataset(tmp_path)
    assert d.layout == "karpathy" and d.missing == 0
    assert {n: r.split for n, r in by_name(d).items()} == {"a.jpg": "train", "b.jpg": "train", "c.jpg": "val",
                                                         "d.jpg": "test"}
    assert by_name(d)["c.jpg"].captions == ["a bird"]
    assert by_name(d)["d.jpg"].captions == ["A fish."]


@pytest.mark.parametrize("image_dir", ["train2014", "Images", "."])
def test_official_coco_captions(tmp_path, image_dir):
    write_json(tmp_path / "annotations" / "captions_train2014.json", {
        "info": {}, "licenses": [],
        "images": [{"id": 9, "file_name": coco_name(9), "width": 8, "height": 8},
                   {"id": 25, "file_name": coco_name(25)}],
        "annotations": [{"id": 1, "image_id": 9, "caption": "A cat."}, {"id": 2, "image_id": 25, "caption": "A dog"}]})
    jpeg(tmp_path / image_dir / coco_name(9))
    jpeg(tmp_path / image_dir / coco_name(25))
    d = load_dataset(tmp_path)
    assert d.layout == "coco" and len(d.records) == 2 and d.missing == 0
    # The annotation file itself is accepted too.
    assert len(load_dataset(tmp_path / "annotations" / "captions_train2014.json").records) == 2


def test_nested_one_level_down(tmp_path):
    make_mini_coco(tmp_path / "mini-coco2014")
    d = load_dataset(tmp_path)
    assert d.root == tmp_path / "mini-coco2014" and len(d.records) == 5


def test_two_nested_datasets_is_an_error(tmp_path):
    make_mini_coco(tmp_path / "one")
    make_mini_coco(tmp_path / "two")
    with pytest.raises(CaptioningError, match="several"):
        load_dataset(tmp_path)


# ---- splits --------------------------------------------------------------------------------------------

def test_official_split_files(tmp_path):
    names = [f"{i}_x.jpg" for i in range(6)]
    make_flickr(tmp_path, names, splits={"train": names[:3], "dev": names[3:4], "test": names[4:5]})
    d = load_dataset(tmp_path)
    splits = {n: r.split for n, r in by_name(d).items()}
    assert splits == {names[0]: "train", names[1]: "train", names[2]: "train", names[3]: "val", names[4]: "test"}
    assert d.unsplit == 1  # names[5] is in no split file
    assert [r.image.name for r in d.split("dev")] == [names[3]]


def test_hash_split_by_image_is_deterministic_and_stable(tmp_path):
    names = [f"{1000 + i}_img.jpg" for i in range(200)]
    make_flickr(tmp_path, names)
    first, again = load_dataset(tmp_path), load_dataset(tmp_path)
    assert [(r.image, r.split) for r in first.records] == [(r.image, r.split) for r in again.records]
    images = [r.image for r in first.records]
    assert len(images) == len(set(images)) == 200  # one record, hence one split, per image
    sizes = {s: len(first.split(s)) for s in ("train", "val", "test")}
    assert sizes["val"] > 0 and sizes["test"] > 0 and sizes["train"] > 150
    # Adding images does not move the old ones: the split depends on the file name only.
    make_flickr(tmp_path, names + [f"{5000 + i}_new.jpg" for i in range(50)])
    grown = by_name(load_dataset(tmp_path))
    assert all(grown[r.image.name].split == r.split for r in first.records)


def test_tiny_dataset_still_has_val_and_test(tmp_path):
    make_mini_coco(tmp_path, ids=(1, 2, 3))
    d = load_dataset(tmp_path)
    assert sorted(r.split for r in d.records) == ["test", "train", "val"]


def test_unknown_split_name(tmp_path):
    d = load_dataset(make_mini_coco(tmp_path))
    with pytest.raises(CaptioningError, match="train, val, test"):
        d.split("holdout")


# ---- skipping and errors -------------------------------------------------------------------------------

def test_missing_images_are_skipped_and_counted(tmp_path):
    make_mini_coco(tmp_path)
    (tmp_path / "Images" / coco_name(25)).unlink()
    (tmp_path / "Images" / coco_name(30)).unlink()
    d = load_dataset(tmp_path)
    assert d.missing == 2 and len(d.records) == 3
    assert coco_name(25) not in by_name(d)


def test_empty_captions_dropped(tmp_path):
    write_json(tmp_path / "captions.json", [
        {"image_id": 1, "caption": "a cat "}, {"image_id": 1, "caption": "   "}, {"image_id": 1, "caption": ""},
        {"image_id": 2, "caption": " \t "}, {"image_id": 3, "caption": "a dog"}, {"image_id": 4, "caption": "a cow"}])
    for i in (1, 2, 3, 4):
        jpeg(tmp_path / "Images" / coco_name(i))
    d = load_dataset(tmp_path)
    assert by_name(d)[coco_name(1)].captions == ["a cat"]
    assert coco_name(2) not in by_name(d)  # no caption left: the image goes too
    assert len(d.records) == 3


def test_unknown_layout_lists_known_layouts(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    jpeg(tmp_path / "photo.jpg")
    with pytest.raises(CaptioningError) as e:
        load_dataset(tmp_path)
    for layout in ("mini-coco", "flickr8k", "karpathy", "coco"):
        assert layout in str(e.value)


def test_folder_that_does_not_exist(tmp_path):
    with pytest.raises(CaptioningError, match="does not exist"):
        load_dataset(tmp_path / "nowhere")


def test_malformed_json_names_file_and_line(tmp_path):
    (tmp_path / "captions.json").write_text('[\n  {"image_id": 1, "caption": "a"},\n  {"image_id": 2,, }\n]')
    with pytest.raises(CaptioningError) as e:
        load_dataset(tmp_path)
    assert "captions.json" in str(e.value) and "line 3" in str(e.value)


def test_json_of_the_wrong_shape_names_the_entry(tmp_path):
    write_json(tmp_path / "captions.json", [{"image_id": 1, "caption": "a"}, {"id": 2, "text": "b"}])
    with pytest.raises(CaptioningError, match="captions.json: entry 1"):
        load_dataset(tmp_path)


@pytest.mark.parametrize("bad, line", [('b.jpg,"an unterminated quote\n', 3), ("c.jpg\n", 3)])
def test_malformed_csv_names_file_and_line(tmp_path, bad, line):
    (tmp_path / "Images").mkdir()
    (tmp_path / "captions.txt").write_text("image,caption\na.jpg,a cat\n" + bad)
    with pytest.raises(CaptioningError) as e:
        load_dataset(tmp_path)
    assert "captions.txt" in str(e.value) and f"line {line}" in str(e.value)


def test_csv_without_header(tmp_path):
    (tmp_path / "captions.txt").write_text("a.jpg,a cat\n")
    with pytest.raises(CaptioningError, match="line 1"):
        load_dataset(tmp_path)


def test_empty_dataset(tmp_path):
    write_json(tmp_path / "captions.json", [])
    (tmp_path / "Images").mkdir()
    with pytest.raises(CaptioningError, match="No captioned images"):
        load_dataset(tmp_path)


def test_all_images_missing_says_so(tmp_path):
    make_mini_coco(tmp_path)
    for p in (tmp_path / "Images").iterdir():
        p.unlink()
    with pytest.raises(CaptioningError, match="5 images listed but none found"):
        load_dataset(tmp_path)


# ---- the real thing, where present ---------------------------------------------------------------------

def test_real_flickr8k_official_splits():
    if not (FLICKR8K / "captions.txt").exists():
        pytest.skip(f"no Flickr8k at {FLICKR8K}")
    d = load_dataset(FLICKR8K)
    assert d.layout == "flickr8k" and d.missing == 0
    assert [len(d.split(s)) for s in ("train", "val", "test")] == [6000, 1000, 1000]
    assert all(len(r.captions) == 5 for r in d.records)


# ---- the layouts people's own data come in -------------------------------------------------------------

def test_imagefolder_csv_with_several_caption_columns(tmp_path):
    for n in ("a.jpg", "b.jpg", "c.jpg"):
        jpeg(tmp_path / "images" / n)
    (tmp_path / "metadata.csv").write_text('file_name,caption_0,caption_1\nimages/a.jpg,"a red, square",'
                                           'red square\nimages/b.jpg,blue thing,\nimages/c.jpg,green,leaf\n')
    d = load_dataset(tmp_path)
    assert d.layout == "imagefolder" and len(d.records) == 3
    assert by_name(d)["a.jpg"].captions == ["a red, square", "red square"]
    assert by_name(d)["b.jpg"].captions == ["blue thing"]   # an empty column is dropped, not trained on


def test_imagefolder_split_folders_are_the_splits(tmp_path):
    for split, names in (("train", ["a.jpg", "b.jpg"]), ("validation", ["a.jpg"]), ("test", ["d.jpg"])):
        lines = [json.dumps({"file_name": n, "text": f"{split} photo {n}", "other": 1}) for n in names]
        for n in names:
            jpeg(tmp_path / split / n)
        (tmp_path / split / "metadata.jsonl").write_text("\n".join(lines) + "\n\n")
    d = load_dataset(tmp_path)   # once refused as "several datasets"
    assert d.layout == "imagefolder" and d.missing == 0
    got = sorted((r.image.parent.name, r.image.name, r.split, r.captions[0]) for r in d.records)
    assert got == [("test", "d.jpg", "test", "test photo d.jpg"), ("train", "a.jpg", "train", "train photo a.jpg"),
                   ("train", "b.jpg", "train", "train photo b.jpg"),
                   ("validation", "a.jpg", "val", "validation photo a.jpg")]


@pytest.mark.parametrize("name, text, message", [
    ("metadata.csv", "file_name,text\na.jpg,one,two\n", "line 2: expected 2 fields"),
    ("metadata.csv", "image,text\na.jpg,one\n", "expected a 'file_name' column"),
    ("metadata.csv", "file_name,label\na.jpg,one\n", "caption column"),
    ("metadata.csv", 'file_name,text\na.jpg,"never closed\n', "malformed CSV"),
    ("metadata.jsonl", '{"file_name": "a.jpg", "text": "ok"}\n{"file_name": "a.jpg", \n', "line 2: not valid JSON"),
    ("metadata.jsonl", '{"file_name": "a.jpg", "text": "ok"}\n["a.jpg"]\n', "line 2: expected a JSON object"),
    ("metadata.jsonl", '{"file_name": "", "text": "ok"}\n', "line 1: 'file_name' is empty"),
])
def test_imagefolder_malformed_is_one_line(tmp_path, name, text, message):
    jpeg(tmp_path / "a.jpg")
    (tmp_path / name).write_text(text)
    with pytest.raises(CaptioningError, match=message) as e:
        load_dataset(tmp_path)
    assert name in str(e.value) and "\n" not in str(e.value)


def test_flickr30k_results_csv_skips_and_counts_broken_rows(tmp_path):
    root = tmp_path / "flickr30k_images"
    for n in ("1000.jpg", "2000.jpg"):
        jpeg(root / "flickr30k_images" / n)
    (root / "results.csv").write_text(
        "image_name| comment_number| comment\n"
        "1000.jpg| 0| Two young guys with shaggy hair look at their hands .\n"
        "1000.jpg| 1| A man | a sign .\n"
        "2000.jpg| 4 A dog runs across the grass .\n"     # the real file's broken row: a delimiter missing
        "2000.jpg| 0| A dog runs .\n"
        "garbage\n\n", encoding="utf-8")
    d = load_dataset(tmp_path)   # the Kaggle download nests one level
    assert d.layout == "flickr30k" and d.skipped == 2 and len(d.records) == 2
    assert by_name(d)["1000.jpg"].captions == ["Two young guys with shaggy hair look at their hands .",
                                               "A man | a sign ."]
    assert by_name(d)["2000.jpg"].captions == ["A dog runs ."]


def test_flickr30k_wrong_header(tmp_path):
    (tmp_path / "results.csv").write_text("image,caption\na.jpg,a dog\n")
    with pytest.raises(CaptioningError, match="results.csv line 1: expected the header"):
        load_dataset(tmp_path)


def test_flickr8k_token_file_with_original_folders_and_splits(tmp_path):
    text = tmp_path / "Flickr8k_text"
    text.mkdir()
    names = ["1.jpg", "2.jpg", "3.jpg"]
    for n in names:
        jpeg(tmp_path / "Flicker8k_Dataset" / n)
    (text / "Flickr8k.token.txt").write_text("".join(f"{n}#{k}\t{n} caption {k} .\n" for n in names for k in
                                                     range(2)) + "gone.jpg#0\ta missing photo\n")
    for split, listed in (("train", ["1.jpg"]), ("dev", ["2.jpg"]), ("test", ["3.jpg"])):
        (text / f"Flickr_8k.{split}Images.txt").write_text("\n".join(listed) + "\n")
    d = load_dataset(tmp_path)
    assert d.layout == "flickr8k-text" and d.missing == 1
    assert {r.image.name: r.split for r in d.records} == {"1.jpg": "train", "2.jpg": "val", "3.jpg": "test"}
    assert by_name(d)["2.jpg"].captions == ["2.jpg caption 0 .", "2.jpg caption 1 ."]


def test_flickr8k_token_file_malformed_line(tmp_path):
    jpeg(tmp_path / "a.jpg")
    (tmp_path / "Flickr8k.token.txt").write_text("a.jpg#0\ta dog .\na.jpg a cat without a tab\n")
    with pytest.raises(CaptioningError, match="Flickr8k.token.txt line 2: expected 'name.jpg#0<TAB>caption'"):
        load_dataset(tmp_path)


def test_sidecar_captions_in_subfolders(tmp_path):
    for rel, caption in (("a/IMG_0001.jpg", "a dog on grass\n"), ("b/IMG_0001.jpg", "two cats\nthe cats\n"),
                         ("c.png", "a red square")):
        jpeg(tmp_path / rel)
        (tmp_path / rel).with_suffix(".txt").write_text(caption)
    jpeg(tmp_path / "uncaptioned.jpg")
    (tmp_path / "notes.txt").write_text("not a caption: no photo has this name")
    d = load_dataset(tmp_path)
    assert d.layout == "sidecars" and d.skipped == 1 and d.root == tmp_path
    got = {str(r.image.relative_to(tmp_path)): r.captions for r in d.records}
    assert got == {"a/IMG_0001.jpg": ["a dog on grass"], "b/IMG_0001.jpg": ["two cats", "the cats"],
                   "c.png": ["a red square"]}
    assert {r.split for r in d.records} <= {"train", "val", "test"}


def test_annotation_file_wins_over_sidecars(tmp_path):
    make_flickr(tmp_path, ["x.jpg", "y.jpg"])
    (tmp_path / "Images" / "x.txt").write_text("a sidecar")
    assert load_dataset(tmp_path).layout == "flickr8k"
