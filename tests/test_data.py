import json
import logging

import pytest
from PIL import Image

from phi3v import media, records
from phi3v.media import load_record_images, open_image
from phi3v.records import (
    BadSampleError,
    check_record_tags,
    load_records,
    load_records_with_report,
)


def make_image(path, size=(8, 6), color=(10, 20, 30), mode="RGB", fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path, format=fmt)
    return path


def write_jsonl(path, objs):
    path.write_text("".join(json.dumps(o) + "\n" for o in objs))
    return path


@pytest.fixture
def project(tmp_path):
    """A project-format data folder: data.jsonl beside images/ with four frames."""
    for i in range(4):
        make_image(tmp_path / "images" / "train" / "Cls" / f"v.{i}.jpg")
    return tmp_path


def frame(i):
    return f"train/Cls/v.{i}.jpg"


# --------------------------------------------------------------------------------------------------
# project jsonl


def test_project_one_image(project):
    path = write_jsonl(project / "train.jsonl", [
        {"id": "train-0000000001", "source": "ucf101",
         "conversations": [{"images": [frame(0)], "user": "Classify the action.", "assistant": "Cls"}]},
    ])
    [record] = load_records(path)
    assert record == {
        "id": "train-0000000001",
        "source": f"{path}:1",
        "images": [str(project / "images" / frame(0))],
        "video": None,
        "messages": [
            {"role": "user", "content": "<|image_1|>\nClassify the action."},
            {"role": "assistant", "content": "Cls"},
        ],
    }


def test_project_many_images_several_turns_and_system(project):
    path = write_jsonl(project / "train.jsonl", [
        {"system": "Be brief.", "conversations": [
            {"images": [frame(0), frame(1)], "user": "What happens?", "assistant": "Cls"},
            {"user": "Are you sure?", "assistant": "Yes"},
            {"images": [frame(2), frame(3)], "user": "And here?", "assistant": "Cls again"},
        ]},
    ])
    [record] = load_records(path)
    assert record["id"] == "train-0"  # no id in the data: file stem + record index
    assert record["images"] == [str(project / "images" / frame(i)) for i in range(4)]
    assert [m["content"] for m in record["messages"]] == [
        "Be brief.",
        "<|image_1|>\n<|image_2|>\nWhat happens?",
        "Cls",
        "Are you sure?",
        "Yes",
        "<|image_3|>\n<|image_4|>\nAnd here?",
        "Cls again",
    ]
    assert [m["role"] for m in record["messages"]] == ["system"] + ["user", "assistant"] * 3


def test_project_explicit_tags_and_image_folder_override(tmp_path):
    root = tmp_path / "elsewhere"
    make_image(root / "a.png")
    make_image(root / "b.png")
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"conversations": [
            {"images": ["a.png"], "user": "Look: <|image_1|> ok?", "assistant": "ok"},
            {"images": ["b.png"], "user": "Now <|image_2|>.", "assistant": "fine"},
        ]},
    ])
    [record] = load_records(path, image_folder=root)
    assert record["messages"][0]["content"] == "Look: <|image_1|> ok?"
    assert record["messages"][2]["content"] == "Now <|image_2|>."
    assert record["images"] == [str(root / "a.png"), str(root / "b.png")]


def test_project_explicit_tags_wrong_numbers(project):
    path = write_jsonl(project / "d.jsonl", [
        {"conversations": [
            {"images": [frame(0)], "user": "x", "assistant": "a"},
            {"images": [frame(1)], "user": "<|image_1|> again", "assistant": "b"},
        ]},
    ])
    with pytest.raises(BadSampleError) as e:
        load_records(path)
    assert str(e.value) == (
        f"{path}:1: turn 2: user text has image tags <|image_1|> but this turn's images need <|image_2|>"
    )


# --------------------------------------------------------------------------------------------------
# LLaVA


@pytest.fixture
def llava(tmp_path):
    folder = tmp_path / "imgs"
    make_image(folder / "a.jpg")
    make_image(folder / "b.png")
    make_image(folder / "c.png")
    return folder


def write_json(path, records):
    path.write_text(json.dumps(records, indent=2))
    return path


def test_llava_single_image_several_turns(tmp_path, llava):
    path = write_json(tmp_path / "llava.json", [
        {"id": 7, "image": "a.jpg", "conversations": [
            {"from": "system", "value": "You are helpful."},
            {"from": "human", "value": "<image>\nWhat is this?"},
            {"from": "gpt", "value": "A cat."},
            {"from": "user", "value": "What colour?"},
            {"from": "assistant", "value": "Black."},
        ]},
    ])
    [record] = load_records(path, image_folder=llava)
    assert record == {
        "id": "7",
        "source": f"{path}[0]",
        "images": [str(llava / "a.jpg")],
        "video": None,
        "messages": [
            {"role": "system", "content": "You are helpful."},
            {"role": "user", "content": "<|image_1|>\nWhat is this?"},
            {"role": "assistant", "content": "A cat."},
            {"role": "user", "content": "What colour?"},
            {"role": "assistant", "content": "Black."},
        ],
    }


def test_llava_multi_image_across_turns(tmp_path, llava):
    path = write_json(tmp_path / "llava.json", [
        {"image": ["a.jpg", "b.png", str(llava / "c.png")], "conversations": [
            {"from": "human", "value": "Compare <image> and <image>."},
            {"from": "gpt", "value": "Same."},
            {"from": "human", "value": "<image>\nAnd this?"},
            {"from": "gpt", "value": "Different."},
        ]},
    ])
    [record] = load_records(path, image_folder=llava)
    assert record["id"] == "llava-0"
    assert record["images"] == [str(llava / n) for n in ("a.jpg", "b.png", "c.png")]
    assert record["messages"][0]["content"] == "Compare <|image_1|> and <|image_2|>."
    assert record["messages"][2]["content"] == "<|image_3|>\nAnd this?"


def test_llava_without_image_tag_prepends_to_first_user_turn(tmp_path, llava):
    path = write_jsonl(tmp_path / "llava.jsonl", [
        {"image": ["a.jpg", "b.png"], "video": None, "conversations": [
            {"from": "human", "value": "Describe."}, {"from": "gpt", "value": "Two pictures."},
        ]},
    ])
    [record] = load_records(path, image_folder=llava)
    assert record["source"] == f"{path}:1"
    assert record["messages"][0]["content"] == "<|image_1|>\n<|image_2|>\nDescribe."


def write_video(path, num_frames=12, size=(32, 24)):
    av = pytest.importorskip("av")
    import numpy as np

    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=12)
        stream.width, stream.height = size
        stream.pix_fmt = "yuv420p"
        for i in range(num_frames):
            array = np.full((size[1], size[0], 3), i * 20, dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def test_llava_video_record_and_frame_sampling(tmp_path):
    pytest.importorskip("phi3v.video")
    folder = tmp_path / "videos"
    folder.mkdir()
    write_video(folder / "clip.mp4")
    path = write_json(tmp_path / "v.json", [
        {"id": "v1", "video": "clip.mp4", "conversations": [
            {"from": "human", "value": "<video>\nWhat happens?"}, {"from": "gpt", "value": "Nothing."},
        ]},
    ])
    [record] = load_records(path, image_folder=folder)
    assert record["video"] == str(folder / "clip.mp4")
    assert record["images"] == []
    assert record["messages"][0]["content"] == "<video>\nWhat happens?"

    images, messages = load_record_images(record, max_num_frames=4)
    assert len(images) == 4
    assert all(im.mode == "RGB" and im.size == (32, 24) for im in images)
    assert messages[0]["content"] == "<|image_1|>\n<|image_2|>\n<|image_3|>\n<|image_4|>\nWhat happens?"
    assert record["messages"][0]["content"] == "<video>\nWhat happens?"  # record not mutated

    # fewer frames than asked for: each frame once
    images, messages = load_record_images(record, max_num_frames=20)
    assert len(images) == 12
    assert messages[0]["content"].startswith("<|image_1|>\n") and "<|image_12|>\nWhat" in messages[0]["content"]


def test_unreadable_video_is_bad_sample(tmp_path):
    pytest.importorskip("phi3v.video")
    (tmp_path / "clip.mp4").write_bytes(b"not a video at all")
    path = write_json(tmp_path / "v.json", [
        {"video": "clip.mp4", "conversations": [
            {"from": "human", "value": "What?"}, {"from": "gpt", "value": "This."},
        ]},
    ])
    [record] = load_records(path, image_folder=tmp_path)
    assert record["messages"][0]["content"] == "<video>\nWhat?"  # placeholder added when missing
    with pytest.raises(BadSampleError) as e:
        load_record_images(record)
    assert str(e.value).startswith(f"{path}[0]: cannot read video: {tmp_path / 'clip.mp4'}")


def test_load_record_images_opens_images(tmp_path, llava):
    path = write_json(tmp_path / "l.json", [
        {"image": ["a.jpg", "b.png"], "conversations": [
            {"from": "human", "value": "<image><image>"}, {"from": "gpt", "value": "x"},
        ]},
    ])
    [record] = load_records(path, image_folder=llava)
    images, messages = load_record_images(record)
    assert [im.size for im in images] == [(8, 6), (8, 6)]
    assert images[1].getpixel((0, 0)) == (10, 20, 30)
    assert messages == record["messages"] and messages is not record["messages"]


# --------------------------------------------------------------------------------------------------
# each check of a record runs once, whichever way the record comes (phi3v.records' docstring)


@pytest.fixture
def checks(monkeypatch):
    """{check's name: the arguments of each of its calls}, wherever it is called from."""
    calls = {"check_messages": [], "_check_turns": [], "check_record_tags": []}

    def counted(check):
        def call(*args):
            calls[check.__name__].append(args)
            return check(*args)

        return call

    for module, name in [(media, "check_messages"), (records, "_check_turns"), (records, "check_record_tags"),
                         (media, "check_record_tags")]:
        monkeypatch.setattr(module, name, counted(getattr(module, name)))
    return calls


def counts(calls):
    return {name: len(args) for name, args in calls.items()}


def through_dataset(row, to_record):
    """The record SFTDataset hands to load_record_images for `row`, with a recipe's `to_record`."""
    from phi3v.dataset import SFTDataset

    return SFTDataset([row], processor=None, to_record=to_record).record(0)


def new_dict(row, index):  # a recipe's to_record makes a new dict (from a hub row)
    return dict(row)


@pytest.mark.parametrize("fmt", ["project", "llava"])
def test_each_check_runs_once(tmp_path, project, fmt, checks):
    if fmt == "project":
        path = write_jsonl(tmp_path / "d.jsonl", [{"conversations": [
            {"images": [frame(0)], "user": "q", "assistant": "a"},
            {"images": [frame(1)], "user": "r", "assistant": "b"},
        ]}])
    else:
        path = write_json(tmp_path / "d.json", [{"image": [frame(0), frame(1)], "conversations": chat(
            "<image>\nq", "a", "<image>\nr", "b")}])
    [record] = load_records(path, image_folder=project / "images")  # a file's record: checked when parsed
    assert counts(checks) == {"check_messages": 0, "_check_turns": 1, "check_record_tags": 1}
    load_record_images(record)  # not again
    assert counts(checks) == {"check_messages": 0, "_check_turns": 1, "check_record_tags": 1}
    load_record_images(through_dataset(record, lambda row, index: row))  # ucf101's to_record: rows are records
    assert counts(checks) == {"check_messages": 0, "_check_turns": 1, "check_record_tags": 1}

    for calls in checks.values():
        calls.clear()
    _, messages = load_record_images(through_dataset(record, new_dict))  # a recipe's record: checked when read
    assert counts(checks) == {"check_messages": 1, "_check_turns": 0, "check_record_tags": 1}
    assert checks["check_record_tags"][0] == (messages, 2, record["source"])


def test_each_check_of_a_video_record_runs_once(tmp_path, checks):
    pytest.importorskip("phi3v.video")
    write_video(tmp_path / "clip.mp4", num_frames=3)
    path = write_json(tmp_path / "v.json", [{"video": "clip.mp4", "conversations": chat("What happens?", "x")}])
    [record] = load_records(path, image_folder=tmp_path)  # its tags checked when parsed: none before the frames
    assert counts(checks) == {"check_messages": 0, "_check_turns": 1, "check_record_tags": 1}
    load_record_images(record)  # not again
    assert counts(checks) == {"check_messages": 0, "_check_turns": 1, "check_record_tags": 1}

    for calls in checks.values():
        calls.clear()
    _, messages = load_record_images(through_dataset(record, new_dict))
    assert counts(checks) == {"check_messages": 1, "_check_turns": 0, "check_record_tags": 1}
    assert checks["check_record_tags"][0] == (messages, 3, record["source"])  # on the final messages: the frames' tags
    assert messages[0]["content"] == "<|image_1|>\n<|image_2|>\n<|image_3|>\nWhat happens?"


# --------------------------------------------------------------------------------------------------
# bad records: every message starts with file:line (or file[index]) and says what is wrong


def llava_error(tmp_path, folder, record):
    path = write_json(tmp_path / "bad.json", [record])
    with pytest.raises(BadSampleError) as e:
        load_records(path, image_folder=folder)
    return str(e.value), path


def chat(*values):
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": v} for i, v in enumerate(values)]


def test_missing_image_file(tmp_path, llava):
    msg, path = llava_error(tmp_path, llava, {"image": "nope.jpg", "conversations": chat("<image>", "x")})
    assert msg == f"{path}[0]: image file not found: {llava / 'nope.jpg'}"


def test_missing_image_file_project_format(project):
    path = write_jsonl(project / "d.jsonl", [
        {"conversations": [{"images": ["gone.jpg"], "user": "q", "assistant": "a"}]},
    ])
    with pytest.raises(BadSampleError) as e:
        load_records(path)
    assert str(e.value) == f"{path}:1: turn 1: image file not found: {project / 'images' / 'gone.jpg'}"


def test_tag_count_mismatch(tmp_path, llava):
    msg, path = llava_error(tmp_path, llava, {
        "image": ["a.jpg", "b.png", "c.png"], "conversations": chat("<image> <image>", "x"),
    })
    assert msg == f"{path}[0]: 2 <image> tags but 3 images"


def test_image_tag_without_image(tmp_path, llava):
    msg, path = llava_error(tmp_path, llava, {"conversations": chat("<image>\nWhat?", "x")})
    assert msg == f"{path}[0]: 1 <image> tags but 0 images"


def test_both_image_and_video(tmp_path, llava):
    msg, path = llava_error(tmp_path, llava, {
        "image": "a.jpg", "video": "a.mp4", "conversations": chat("<image>", "x"),
    })
    assert msg == f"{path}[0]: record has both 'image' and 'video'"


def test_path_escaping_image_folder(tmp_path, llava):
    make_image(tmp_path / "outside.jpg")
    msg, path = llava_error(tmp_path, llava, {"image": "../outside.jpg", "conversations": chat("<image>", "x")})
    assert msg == f"{path}[0]: image path '../outside.jpg' resolves outside the image folder {llava}"


def test_relative_path_needs_image_folder(tmp_path, llava):
    msg, path = llava_error(tmp_path, None, {"image": "a.jpg", "conversations": chat("<image>", "x")})
    assert msg == f"{path}[0]: relative image path 'a.jpg' needs an image_folder"


def test_empty_answer(tmp_path, llava):
    msg, path = llava_error(tmp_path, llava, {"image": "a.jpg", "conversations": chat("<image>", "  ")})
    assert msg == f"{path}[0]: empty assistant answer"


def test_conversation_must_end_with_answer(tmp_path, llava):
    msg, path = llava_error(tmp_path, llava, {"conversations": chat("hi", "hello", "bye")})
    assert msg == f"{path}[0]: conversation ends with a user turn; the last turn must be the assistant's answer"


def test_turns_must_alternate(tmp_path, llava):
    turns = [{"from": "gpt", "value": "hello"}, {"from": "human", "value": "hi"}]
    msg, path = llava_error(tmp_path, llava, {"conversations": turns})
    assert msg == (f"{path}[0]: turn 1 is from 'assistant', expected 'user' "
                   "(turns must alternate user/assistant, starting with user)")


def test_missing_keys(tmp_path, project):
    path = write_jsonl(project / "d.jsonl", [
        {"id": "a", "conversations": [{"user": "q", "assistant": "a"}]},
        {"id": "b", "convos": []},
        {"id": "c", "conversations": [{"user": "q"}]},
        {"id": "d", "conversations": [{"from": "human"}, {"from": "gpt", "value": "x"}]},
        {"id": "e", "conversations": [{"question": "q"}]},
    ])
    records, reasons = load_records_with_report(path, skip_bad_samples=True)
    assert [r["id"] for r in records] == ["a"]
    assert reasons == [
        f"{path}:2: missing key 'conversations'",
        f"{path}:3: turn 1: missing key 'assistant'",
        f"{path}:4: turn 1: missing key 'value'",
        f"{path}:5: cannot tell the format: conversation turns need 'from'/'value' (LLaVA) "
        "or 'user'/'assistant' keys",
    ]


def test_line_that_is_not_json(project):
    path = project / "d.jsonl"
    good = json.dumps({"conversations": [{"user": "q", "assistant": "a"}]})
    path.write_text(good + "\n\n{not json\n")
    with pytest.raises(BadSampleError) as e:
        load_records(path)
    assert str(e.value).startswith(f"{path}:3: line is not valid JSON: ")


def test_broken_json_list(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[\n  {"id": 1},\n  oops\n]')
    with pytest.raises(BadSampleError) as e:
        load_records(path)
    assert str(e.value).startswith(f"{path}:3: not valid JSON: ")


def test_tags_out_of_order(tmp_path, llava):
    path = write_json(tmp_path / "d.json", [
        {"image": ["a.jpg", "b.png"], "conversations": chat("<|image_2|> then <|image_1|>", "x")},
    ])
    with pytest.raises(BadSampleError) as e:
        load_records(path, image_folder=llava)
    assert str(e.value) == (
        f"{path}[0]: image tags must be <|image_1|>, <|image_2|>, ... in order, each once; "
        "found <|image_2|>, <|image_1|>"
    )


def test_check_record_tags():
    user = lambda text: [{"role": "user", "content": text}, {"role": "assistant", "content": "a"}]  # noqa: E731
    check_record_tags(user("<|image_1|>\n<|image_2|>\nq"), 2, "s")
    check_record_tags(user("no images"), 0, "s")
    with pytest.raises(BadSampleError, match=r"^s: the prompt has 1 image tag\(s\) but 2 image\(s\) were given$"):
        check_record_tags(user("<|image_1|>"), 2, "s")
    with pytest.raises(BadSampleError, match=r"^s: image tags must be .* found <\|image_1\|>, <\|image_1\|>$"):
        check_record_tags(user("<|image_1|><|image_1|>"), 2, "s")
    with pytest.raises(BadSampleError, match=r"^s: image tag <\|image_1\|> in a assistant message"):
        check_record_tags([{"role": "user", "content": "q"}, {"role": "assistant", "content": "<|image_1|>"}], 1, "s")


def test_missing_data_file(tmp_path):
    path = tmp_path / "nowhere.jsonl"
    with pytest.raises(BadSampleError) as e:
        load_records(path)
    assert str(e.value) == f"{path}: data file not found"


def test_empty_file(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n  \n")
    with pytest.raises(BadSampleError) as e:
        load_records(path)
    assert str(e.value) == f"{path}: no usable records (the file has no records)"


def test_skip_bad_samples_reports(tmp_path, llava, caplog):
    path = write_json(tmp_path / "d.json", [
        {"image": "a.jpg", "conversations": chat("<image>", "good")},
        {"image": "gone.jpg", "conversations": chat("<image>", "bad")},
        {"image": "b.png", "conversations": chat("<image>", "")},
        {"image": "c.png", "conversations": chat("<image>", "good too")},
    ])
    with pytest.raises(BadSampleError, match=r"\[1\]: image file not found"):
        load_records(path, image_folder=llava)
    with caplog.at_level(logging.WARNING, logger="phi3v.records"):
        records, reasons = load_records_with_report(path, image_folder=llava, skip_bad_samples=True)
    assert [r["source"] for r in records] == [f"{path}[0]", f"{path}[3]"]
    assert reasons == [f"{path}[1]: image file not found: {llava / 'gone.jpg'}", f"{path}[2]: empty assistant answer"]
    assert f"{path}: skipped 2 bad record(s), kept 2" in caplog.text
    assert "empty assistant answer" in caplog.text
    assert len(load_records(path, image_folder=llava, skip_bad_samples=True)) == 2


def test_all_records_skipped(tmp_path, llava):
    path = write_json(tmp_path / "d.json", [{"image": "gone.jpg", "conversations": chat("<image>", "x")}])
    with pytest.raises(BadSampleError) as e:
        load_records(path, image_folder=llava, skip_bad_samples=True)
    assert str(e.value) == f"{path}: no usable records (1 skipped as bad)"


# --------------------------------------------------------------------------------------------------
# open_image


def test_open_image_missing(tmp_path):
    with pytest.raises(BadSampleError) as e:
        open_image(tmp_path / "x.jpg", "d.jsonl:4")
    assert str(e.value) == f"d.jsonl:4: image file not found: {tmp_path / 'x.jpg'}"


def test_open_image_truncated_jpeg(tmp_path):
    good = make_image(tmp_path / "good.jpg", size=(64, 64))
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(good.read_bytes()[:300])
    with pytest.raises(BadSampleError) as e:
        open_image(bad, "d.jsonl:4")
    assert str(e.value).startswith(f"d.jsonl:4: corrupt or truncated image: {bad} (")


def test_open_image_not_an_image(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("hello, not pixels")
    with pytest.raises(BadSampleError) as e:
        open_image(path, "s")
    assert str(e.value) == f"s: not an image file (or unsupported format): {path}"


def test_open_image_too_small(tmp_path):
    path = make_image(tmp_path / "dot.png", size=(1, 1))
    with pytest.raises(BadSampleError) as e:
        open_image(path, "s")
    assert str(e.value) == f"s: image is 1x1 pixels (need at least 2x2): {path}"


@pytest.mark.parametrize("pixels", [25, 40])  # warning zone (<= 2x limit) and error zone (> 2x)
def test_open_image_decompression_bomb(tmp_path, monkeypatch, pixels):
    path = make_image(tmp_path / "big.png", size=(10, 10))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", pixels)
    with pytest.raises(BadSampleError) as e:
        open_image(path, "s")
    assert str(e.value).startswith(f"s: image too large, refused as a possible decompression bomb: {path} (")


def test_open_image_modes_to_rgb(tmp_path):
    cmyk = make_image(tmp_path / "cmyk.jpg", mode="CMYK", color=(0, 0, 0, 0))
    assert open_image(cmyk, "s").getpixel((0, 0)) == (255, 255, 255)

    palette = Image.new("P", (4, 4))
    palette.putpalette([0, 0, 0, 200, 100, 50])
    palette.putpixel((0, 0), 1)
    palette.save(tmp_path / "p.png")
    im = open_image(tmp_path / "p.png", "s")
    assert im.mode == "RGB" and im.getpixel((0, 0)) == (200, 100, 50) and im.getpixel((1, 1)) == (0, 0, 0)

    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 255))
    rgba.putpixel((0, 0), (0, 0, 0, 0))  # fully transparent black -> white
    rgba.putpixel((1, 0), (0, 0, 0, 128))  # half transparent black -> grey
    rgba.save(tmp_path / "rgba.png")
    im = open_image(tmp_path / "rgba.png", "s")
    assert im.mode == "RGB"
    assert im.getpixel((0, 0)) == (255, 255, 255)
    assert im.getpixel((1, 0)) == (127, 127, 127)
    assert im.getpixel((2, 2)) == (255, 0, 0)

    la = Image.new("LA", (3, 3), (0, 0))
    la.putpixel((2, 2), (50, 255))
    la.save(tmp_path / "la.png")
    im = open_image(tmp_path / "la.png", "s")
    assert im.getpixel((0, 0)) == (255, 255, 255) and im.getpixel((2, 2)) == (50, 50, 50)

    grey = make_image(tmp_path / "l.png", mode="L", color=7)
    assert open_image(grey, "s").getpixel((0, 0)) == (7, 7, 7)

    deep = Image.new("I;16", (3, 3), 32768)
    deep.save(tmp_path / "i16.png")
    assert open_image(tmp_path / "i16.png", "s").getpixel((0, 0)) == (128, 128, 128)


def test_open_image_transparent_palette(tmp_path):
    palette = Image.new("P", (3, 3), 0)
    palette.putpalette([0, 0, 0, 9, 9, 9])
    palette.putpixel((1, 1), 1)
    palette.info["transparency"] = 0
    palette.save(tmp_path / "t.png", transparency=0)
    im = open_image(tmp_path / "t.png", "s")
    assert im.getpixel((0, 0)) == (255, 255, 255) and im.getpixel((1, 1)) == (9, 9, 9)


def test_open_image_applies_exif_orientation(tmp_path):
    im = Image.new("RGB", (6, 2), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    im.save(tmp_path / "rot.jpg", exif=exif)
    assert open_image(tmp_path / "rot.jpg", "s").size == (2, 6)


def test_open_image_accepts_pil(tmp_path):
    im = open_image(Image.new("RGBA", (2, 2), (0, 0, 0, 0)), "s")
    assert im.mode == "RGB" and im.getpixel((0, 0)) == (255, 255, 255)
    with pytest.raises(BadSampleError, match=r"^s: image is 1x3 pixels"):
        open_image(Image.new("RGB", (1, 3)), "s")
