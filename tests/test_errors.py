"""One error convention for every entry point (phi3v.errors): a user error prints the one line
`<script>: error: <message>` on stderr, argparse's form, no traceback, and exits with status 2."""

import os
import subprocess
import sys

import pytest

from phi3v.errors import InputError, UserErrorExit, exit_on_input_error, exit_with_error, one_line

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOPE = "/nonexistent/phi3v-test"

# (script, arguments with a bad input, what the message must say); each fails before any model is loaded
BAD_INPUTS = [
    ("finetune_hf_trainer_hateful_memes.py", ["--dataset_path", NOPE], f"--dataset_path {NOPE} does not exist"),
    ("finetune_hf_trainer_nlvr2.py", ["--lora_alpa", "16"], "unknown flag --lora_alpa: did you mean --lora_alpha"),
    ("finetune_hf_trainer_docvqa.py", ["--dataset_path", NOPE], f"--dataset_path {NOPE} does not exist"),
    ("finetune_hf_trainer_ucf101.py", ["--data_dir", NOPE], f"no ucf101_train.jsonl in --data_dir {NOPE}"),
    ("finetune_hf_trainer_custom.py", ["--data_path", f"{NOPE}.json"], f"{NOPE}.json: data file not found"),
    ("predict.py", ["--model", NOPE, "--prompt", "Hi"], f"{NOPE}: no such model folder"),
    ("serve.py", ["--model", NOPE], f"--model {NOPE}: {NOPE}: no such model folder"),
    ("scripts/merge_lora.py", ["--adapter_dir", NOPE, "--output_dir", "{out}"], f"{NOPE}: no adapter_config.json"),
    ("convert_ucf101.py", ["--video_dir", NOPE, "--out_dir", "{out}"], f"--video_dir '{NOPE}' is not a folder"),
]


@pytest.mark.parametrize("script, args, message", BAD_INPUTS, ids=[case[0] for case in BAD_INPUTS])
def test_every_entry_point_reports_a_user_error_in_one_line_with_status_2(tmp_path, script, args, message):
    args = [arg.replace("{out}", str(tmp_path / "out")) for arg in args]
    if script.startswith("finetune_"):
        args += ["--output_dir", str(tmp_path / "out")]
    result = subprocess.run([sys.executable, script, *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    name = os.path.basename(script)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr[-3000:]
    assert lines and lines[-1].startswith(f"{name}: error: ") and message in lines[-1], result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    # only the error line, apart from the log lines some libraries write while importing (DeepSpeed's accelerator)
    assert [line for line in lines if ": error: " in line] == [lines[-1]]
    assert not (tmp_path / "out").exists() or not os.listdir(tmp_path / "out")  # nothing written


def test_exit_with_error_is_argparse_form(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["/some/where/tool.py", "--flag"])
    with pytest.raises(UserErrorExit) as error:
        exit_with_error(InputError("a.jsonl:3: bad\nrecord"))
    assert isinstance(error.value, SystemExit) and error.value.code == 2
    assert str(error.value) == "tool.py: error: a.jsonl:3: bad record"
    assert capsys.readouterr().err == "tool.py: error: a.jsonl:3: bad record\n"


def test_exit_on_input_error_leaves_other_errors_alone(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["tool.py"])

    def main(error):
        raise error

    with pytest.raises(SystemExit) as error:
        exit_on_input_error(main)(InputError("--x: bad"))
    assert error.value.code == 2 and str(error.value) == "tool.py: error: --x: bad"
    with pytest.raises(KeyError):  # a bug keeps its traceback
        exit_on_input_error(main)(KeyError("bug"))


# A DataLoader worker's error, as torch re-raises it in the main process: the worker's traceback is its message.
WORKER_ERROR = ValueError("""Caught ValueError in DataLoader worker process 0.
Original Traceback (most recent call last):
  File "/x/torch/utils/data/_utils/worker.py", line 349, in _worker_loop
    data = fetcher.fetch(index)
ValueError: a.jsonl:3: image b.png:  not found""")


@pytest.mark.parametrize("error, line", [
    (InputError("a.jsonl:3: bad\nrecord"), "a.jsonl:3: bad record"),
    (RuntimeError(" spaces,\ttabs  and\r\n\nnewlines \n"), "spaces, tabs and newlines"),
    (WORKER_ERROR, "a.jsonl:3: image b.png: not found"),
    (KeyError("pixel_values"), "'pixel_values'"),
    (KeyError(), "KeyError"),  # no message: at least what it was
    (AssertionError(" \n "), "AssertionError"),
    ("a message\non two lines", "a message on two lines"),  # exit_with_error's messages are strings too
    ("", ""),
], ids=["lines", "whitespace", "worker", "key", "empty", "blank", "string", "empty string"])
def test_one_line(error, line):
    assert one_line(error) == line
