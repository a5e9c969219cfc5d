"""The benchmark stream: chunking, skips, resume, order, limit, sources, lineage."""

from __future__ import annotations

import dataclasses

import datasets
import pytest
from PIL import Image

import icd.data.images as images
from icd.config import DataConfig
from icd.data import shapes
from icd.data.registry import DatasetSpec, UnknownDataset, get_dataset
from icd.data.stream import DatasetUnavailable, _vqa_answers, open_stream

N, CORRUPT = 150, 40  # corrupt samples at rows 39, 79, 119
FIXTURE = f"fixture:shapes?n={N}&corrupt_every={CORRUPT}"


@pytest.fixture(autouse=True)
def _hf_cache(tmp_path_factory, monkeypatch):
    # Keep datasets' arrow cache for user-supplied local data out of the home folder.
    monkeypatch.setattr(
        datasets.config, "HF_DATASETS_CACHE", str(tmp_path_factory.getbasetemp() / "hf-cache")
    )


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("fixtures")


def shapes_stream(root, **kw):
    return open_stream(DataConfig(dataset="shapes", source=FIXTURE, **kw), root=root)


@pytest.fixture
def decode_count(monkeypatch):
    """Count calls to load_image (the only place images are decoded)."""
    calls = []
    real = images.load_image

    def counting(data, *args, **kwargs):
        calls.append(len(data))
        return real(data, *args, **kwargs)

    monkeypatch.setattr(images, "load_image", counting)
    return calls


def flat(chunks):
    return [s for c in chunks for s in c.samples]


def test_full_pass_covers_every_sample_once_and_skips_corrupt_images(root):
    stream = shapes_stream(root)
    assert stream.length == N and stream.num_chunks(32) == 5
    assert len(stream.class_names) >= 20 and stream.synonyms["red square"] == ["red box"]
    chunks = list(stream.chunks(32))
    assert [c.index for c in chunks] == [0, 1, 2, 3, 4]
    assert [len(c.samples) for c in chunks] == [32, 32, 32, 32, 22]
    samples = flat(chunks)
    assert [s.stream_pos for s in samples] == list(range(N))
    assert len({s.sample_id for s in samples}) == N
    skipped = [s for s in samples if s.skip_reason]
    assert [s.sample_id for s in skipped] == ["shapes0-000039", "shapes0-000079", "shapes0-000119"]
    for s in skipped:
        assert s.image is None and s.skip_reason.startswith("bad_image: ") and s.image_bytes
        assert "0x" not in s.skip_reason  # no object addresses: the same reason on every run
    for s in samples:
        assert s.answers[0] in stream.class_names and len(s.answers) == 1
        assert s.question == shapes.QUESTION
        if not s.skip_reason:
            assert isinstance(s.image, Image.Image) and s.image.mode == "RGB"
    assert sum(len(c.valid) for c in chunks) == N - 3


def test_resume_yields_the_same_chunks_without_decoding_earlier_ones(root, decode_count):
    stream = shapes_stream(root)
    full = list(stream.chunks(16))
    decode_count.clear()
    resumed = list(stream.chunks(16, start_chunk=6))
    assert [c.index for c in resumed] == [c.index for c in full[6:]]
    assert [c.key for c in resumed] == [c.key for c in full[6:]]
    for a, b in zip(flat(resumed), flat(full[6:]), strict=True):
        assert (a.sample_id, a.stream_pos, a.answers, a.skip_reason) == (
            b.sample_id,
            b.stream_pos,
            b.answers,
            b.skip_reason,
        )
        assert a.image_bytes == b.image_bytes
    # Only the resumed samples were decoded (the corrupt one at row 119 is attempted too).
    assert len(decode_count) == len(flat(full[6:]))
    assert stream.chunk(6, 16).key == full[6].key
    with pytest.raises(IndexError):
        stream.chunk(10, 16)


def test_order_seed_permutes_the_same_ids(root):
    plain = flat(shapes_stream(root).chunks(50))
    a = flat(shapes_stream(root, order_seed=1).chunks(50))
    b = flat(shapes_stream(root, order_seed=1).chunks(64))
    c = flat(shapes_stream(root, order_seed=2).chunks(50))
    ids = [s.sample_id for s in plain]
    assert sorted(s.sample_id for s in a) == sorted(ids) == sorted(s.sample_id for s in c)
    assert [s.sample_id for s in a] != ids and [s.sample_id for s in a] != [s.sample_id for s in c]
    assert [s.sample_id for s in a] == [s.sample_id for s in b]  # order does not depend on chunking
    assert [s.stream_pos for s in a] == list(range(N))
    # Ids name the sample, not its position: the same id carries the same label and bytes.
    by_id = {s.sample_id: s for s in plain}
    assert all(
        by_id[s.sample_id].answers == s.answers and by_id[s.sample_id].image_bytes == s.image_bytes
        for s in a
    )


def test_limit(root):
    stream = shapes_stream(root, limit=45)
    assert stream.length == 45 and stream.num_chunks(20) == 3
    samples = flat(stream.chunks(20))
    assert [s.sample_id for s in samples] == [f"shapes0-{i:06d}" for i in range(45)]
    shuffled = shapes_stream(root, limit=45, order_seed=9)
    got = flat(shuffled.chunks(20))
    assert len(got) == 45 and [s.stream_pos for s in got] == list(range(45))
    assert shuffled.dataset_info()["num_rows"] == 45 and shuffled.dataset_info()["source_rows"] == N


def test_imagefolder_source_with_odd_image_modes(tmp_path):
    folder = tmp_path / "pics"
    (folder / "cat").mkdir(parents=True)
    (folder / "dog").mkdir()
    Image.new("RGBA", (20, 30), (255, 0, 0, 100)).save(folder / "cat" / "rgba.png")
    Image.new("L", (30, 20), 90).save(folder / "dog" / "grey.png")
    Image.new("RGB", (12, 12), (0, 0, 255)).save(folder / "dog" / "plain.jpg")
    (folder / "cat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    stream = open_stream(DataConfig(dataset="my-pets", source=f"imagefolder:{folder}"))
    assert stream.class_names == ["cat", "dog"] and stream.length == 4
    samples = flat(stream.chunks(3))
    assert len(samples) == 4 and len({s.sample_id for s in samples}) == 4
    ok = {s.sample_id: s for s in samples if s.skip_reason is None}
    assert len(ok) == 3
    assert sorted(s.image.size for s in ok.values()) == [(12, 12), (20, 30), (30, 20)]
    assert all(s.image.mode == "RGB" for s in ok.values())
    assert sorted(s.answers[0] for s in ok.values()) == ["cat", "dog", "dog"]
    (broken,) = [s for s in samples if s.skip_reason]
    assert broken.skip_reason.startswith("bad_image: ") and broken.answers == ["cat"]
    assert stream.dataset_info()["source"] == f"imagefolder:{folder}"


def test_missing_column_is_a_one_line_error_naming_it(root):
    spec = dataclasses.replace(get_dataset("shapes"), source=FIXTURE, image_column="picture")
    with pytest.raises(ValueError) as e:
        open_stream(DataConfig(), root=root, spec=spec)
    msg = str(e.value)
    assert "\n" not in msg and "'picture'" in msg and "image, question, label" in msg


def _write_parquet(path, rows, features):
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(path))
    return path


def test_empty_question_and_missing_label_are_skipped_not_dropped(tmp_path, root):
    png = shapes.render_shape(0)
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "question": datasets.Value("string"),
            "label": datasets.ClassLabel(names=["circle", "square"]),
        }
    )
    rows = {
        "image": [{"bytes": png, "path": None}] * 4,
        "question": ["What is it?", "", "What is it?", None],
        "label": [1, 0, -1, 0],
    }
    path = _write_parquet(tmp_path / "q.parquet", rows, features)
    spec = DatasetSpec(
        name="q",
        source=f"parquet:{path}",
        split="test",
        question_column="question",
        label_column="label",
        prompt="Look closely. {question}",
    )
    samples = flat(open_stream(DataConfig(), spec=spec).chunks(10))
    assert [s.skip_reason for s in samples] == [
        None,
        "empty_question",
        "missing_label",
        "empty_question",
    ]
    assert samples[0].answers == ["square"] and samples[0].image is not None
    assert samples[0].question == "Look closely. What is it?"
    assert all(s.image is None for s in samples[1:])
    assert [s.sample_id for s in samples] == [f"q:test:{i}" for i in range(4)]


def test_vqa_answers_in_every_layout(tmp_path):
    png = shapes.render_shape(1)
    features = datasets.Features(
        {
            "question_id": datasets.Value("int64"),
            "image": datasets.Image(),
            "question": datasets.Value("string"),
            "answers": datasets.List(
                {"answer": datasets.Value("string"), "answer_id": datasets.Value("int64")}
            ),
        }
    )
    rows = {
        "question_id": [11, 12],
        "image": [{"bytes": png, "path": None}] * 2,
        "question": ["What colour?", "How many?"],
        "answers": [
            [{"answer": "red", "answer_id": 1}, {"answer": "dark red", "answer_id": 2}],
            [],
        ],
    }
    path = _write_parquet(tmp_path / "vqa.parquet", rows, features)
    spec = dataclasses.replace(
        get_dataset("vqav2"), source=f"parquet:{tmp_path}", split="validation"
    )
    stream = open_stream(DataConfig(dataset="vqav2"), spec=spec)
    assert stream.class_names is None and stream.task == "vqa"
    first, second = flat(stream.chunks(8))
    assert (
        first.sample_id == "11"
        and first.answers == ["red", "dark red"]
        and first.skip_reason is None
    )
    assert first.question == "What colour?"
    assert second.skip_reason == "missing_label"
    assert path.exists()
    assert _vqa_answers(["yes", " ", "no"]) == ["yes", "no"]
    assert _vqa_answers({"answer": ["2", "two"], "answer_id": [1, 2]}) == ["2", "two"]
    assert _vqa_answers("blue") == ["blue"] and _vqa_answers(None) == []


@pytest.fixture
def fake_hub(monkeypatch, root):
    """Route `load_dataset(<hub id>, streaming=True)` to the shapes folder, which carries a
    hub-style dataset card: the hub code path, offline."""
    folder = shapes.build_shapes_dataset(root, n=N, corrupt_every=CORRUPT)
    real = datasets.load_dataset
    seen = []

    def load(path, name=None, split=None, streaming=False, revision=None, **kwargs):
        seen.append((path, split, streaming))
        return real(str(folder), split=split, streaming=streaming)

    monkeypatch.setattr(datasets, "load_dataset", load)
    return seen


HUB_SPEC = DatasetSpec(
    name="hubshapes",
    source="hf:someone/shapes",
    split="train",
    question_column="question",
    label_column="label",
)


def test_hub_stream_resumes_and_shuffles_with_stable_ids(fake_hub, decode_count):
    stream = open_stream(DataConfig(), spec=HUB_SPEC)
    assert fake_hub == [("someone/shapes", "train", True)]
    assert stream.length == N  # from the split info of the card
    full = list(stream.chunks(32))
    samples = flat(full)
    assert [s.stream_pos for s in samples] == list(range(N))
    assert len({s.sample_id for s in samples}) == N
    assert sum(1 for s in samples if s.skip_reason) == 3
    decode_count.clear()
    resumed = list(stream.chunks(32, start_chunk=3))
    assert [c.key for c in resumed] == [c.key for c in full[3:]]
    assert len(decode_count) == len(flat(full[3:]))

    shuffled = open_stream(DataConfig(order_seed=4, limit=100), spec=HUB_SPEC)
    assert shuffled.length == 100
    s_full = list(shuffled.chunks(25))
    s_ids = [s.sample_id for s in flat(s_full)]
    assert len(s_ids) == 100 and len(set(s_ids)) == 100
    assert set(s_ids) <= {s.sample_id for s in samples}  # ids do not depend on the order
    assert s_ids != [s.sample_id for s in samples[:100]]
    assert [c.key for c in shuffled.chunks(25, start_chunk=2)] == [c.key for c in s_full[2:]]
    assert shuffled.dataset_info()["digest"] == stream.dataset_info()["digest"]


def test_hub_ids_use_the_id_column_when_there_is_one(fake_hub):
    spec = dataclasses.replace(HUB_SPEC, id_column="id")
    stream = open_stream(DataConfig(order_seed=1), spec=spec)
    ids = [s.sample_id for s in stream.chunk(0, 10).samples]
    assert all(i.startswith("shapes0-") for i in ids)


def test_unreachable_hub_dataset_is_a_one_line_error(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'nobody/nothing' on the Hub\n(long traceback text)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DatasetUnavailable) as e:
        open_stream(DataConfig(dataset="cub200"))
    assert "\n" not in str(e.value) and "bentrevett/caltech-ucsd-birds-200-2011" in str(e.value)


def test_unknown_dataset_and_bad_sources(tmp_path):
    with pytest.raises(UnknownDataset, match="shapes"):
        open_stream(DataConfig(dataset="nope"))
    with pytest.raises(DatasetUnavailable, match="no parquet files"):
        open_stream(DataConfig(dataset="x", source=f"parquet:{tmp_path}/*.parquet"))
    with pytest.raises(DatasetUnavailable, match="not a folder"):
        open_stream(DataConfig(dataset="x", source=f"imagefolder:{tmp_path}/missing"))
    with pytest.raises(DatasetUnavailable, match="unknown parameter"):
        open_stream(DataConfig(source="fixture:shapes?colour=red"), root=tmp_path)


def test_dataset_info_is_stable_lineage(root, tmp_path):
    a = shapes_stream(root).dataset_info()
    b = shapes_stream(root, order_seed=3).dataset_info()
    assert {"name", "source", "split", "num_rows", "digest"} <= set(a)
    assert a["name"] == "shapes" and a["num_rows"] == N and a["split"] == "train"
    assert a["digest"] == b["digest"]  # same source, different order
    other = open_stream(
        DataConfig(source=f"fixture:shapes?n={N}&seed=1&corrupt_every={CORRUPT}"), root=root
    )
    assert other.dataset_info()["digest"] != a["digest"]
    # A copy of the same data elsewhere has the same digest.
    copy = tmp_path / "copy"
    import shutil

    shutil.copytree(shapes.dataset_dir(root, n=N, corrupt_every=CORRUPT), copy)
    moved = open_stream(DataConfig(dataset="shapes-copy", source=f"parquet:{copy}/data"))
    assert moved.dataset_info()["digest"] == a["digest"]


def test_default_fixture_root_comes_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("ICD_FIXTURES", str(tmp_path))
    stream = open_stream(DataConfig(source="fixture:shapes?n=31&corrupt_every=0"))
    assert (tmp_path / "shapes-31-0-c0").is_dir() and stream.length == 31


def _plain_parquet(path, questions, column="question"):
    png = shapes.render_shape(2)
    features = datasets.Features(
        {
            "image": datasets.Image(),
            column: datasets.Value("string"),
            "label": datasets.Value("string"),
        }
    )
    rows = {
        "image": [{"bytes": png, "path": None}] * len(questions),
        column: questions,
        "label": ["circle"] * len(questions),
    }
    return _write_parquet(path, rows, features)


def test_plain_parquet_questions_are_honoured_and_empty_ones_skipped(tmp_path):
    path = _plain_parquet(tmp_path / "mine.parquet", ["What colour is it?", "", None, "  "])
    samples = flat(open_stream(DataConfig(dataset="mine", source=f"parquet:{path}")).chunks(8))
    assert samples[0].question == "What colour is it?" and samples[0].image is not None
    assert [s.skip_reason for s in samples] == [None, "empty_question", "empty_question"] + [
        "empty_question"
    ]
    # A source without a question column gets the fixed question.
    png = shapes.render_shape(3)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("string")})
    bare = _write_parquet(
        tmp_path / "bare.parquet",
        {"image": [{"bytes": png, "path": None}], "label": ["star"]},
        features,
    )
    (only,) = flat(open_stream(DataConfig(dataset="bare", source=f"parquet:{bare}")).chunks(8))
    assert only.question == "What is shown in the image?" and only.skip_reason is None


def test_question_column_from_the_config(tmp_path):
    path = _plain_parquet(tmp_path / "p.parquet", ["Which shape?", ""], column="prompt_text")
    cfg = DataConfig(dataset="mine", source=f"parquet:{path}", question_column="prompt_text")
    samples = flat(open_stream(cfg).chunks(8))
    assert [s.question for s in samples] == ["Which shape?", ""]
    assert [s.skip_reason for s in samples] == [None, "empty_question"]
    # Named explicitly, the column must exist: a one-line error naming it.
    with pytest.raises(ValueError) as e:
        open_stream(cfg.model_copy(update={"question_column": "nope"}))
    assert "\n" not in str(e.value) and "'nope'" in str(e.value)


def test_registered_dataset_from_another_source_needs_only_what_it_can_have(tmp_path):
    png = shapes.render_shape(4)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("string")})
    rows = {"image": [{"bytes": png, "path": None}] * 3, "label": ["red circle"] * 3}
    path = _write_parquet(tmp_path / "noid.parquet", rows, features)
    spec = get_dataset("shapes")
    samples = flat(open_stream(DataConfig(dataset="shapes", source=f"parquet:{path}")).chunks(8))
    assert [s.sample_id for s in samples] == [f"shapes:{spec.split}:{i}" for i in range(3)]
    assert all(s.skip_reason is None for s in samples)
    assert samples[0].question == spec.prompt.format(question=spec.question)
    # An image folder has no label column but its folder names (the entry names another).
    folder = tmp_path / "planes"
    for name in ("a320", "b737"):
        (folder / name).mkdir(parents=True)
        Image.new("RGB", (8, 8), (9, 9, 9)).save(folder / name / "x.png")
    assert get_dataset("aircraft").label_column != "label"
    stream = open_stream(
        DataConfig(dataset="aircraft", source=f"imagefolder:{folder}", split="train")
    )
    planes = flat(stream.chunks(4))
    assert sorted(p.answers[0] for p in planes) == ["a320", "b737"]
    assert all(p.skip_reason is None for p in planes)
