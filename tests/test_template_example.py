"""The template keeps its promise: every recipe is its task section plus one recipe, the same text in each, so a copy
changes only its task section; and the README's worked example of a new task (examples/finetune_hf_trainer_shapes.py,
such a copy) trains."""

import ast
import builtins
import difflib
import importlib.util
import json
import os
import subprocess
import sys

from phi3v.synthetic import memes_rows, shapes_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEMPLATE = "finetune_hf_trainer_hateful_memes.py"
RECIPES = [TEMPLATE, "finetune_hf_trainer_docvqa.py", "finetune_hf_trainer_nlvr2.py", "finetune_hf_trainer_ucf101.py",
           "examples/finetune_hf_trainer_shapes.py"]
TASK_MARKER, RECIPE_MARKER = "# " + "-" * 96 + " the task\n", "# " + "-" * 96 + " the recipe\n"
# What a task section defines and main() reads (the memes docstring tells a copier to change these)
TASK_NAMES = {"SCRIPT_DEFAULTS", "TaskArguments", "CLASSIFY", "load_data", "to_record", "score"}


def sections(path) -> tuple[str, str, str]:
    """(docstring and imports, the task section, the recipe) of a script, split at its two marker lines."""
    with open(os.path.join(ROOT, path)) as f:
        text = f.read()
    assert text.count(TASK_MARKER) == text.count(RECIPE_MARKER) == 1, path
    task, recipe = text.index(TASK_MARKER), text.index(RECIPE_MARKER)
    assert task < recipe, path
    return text[:task], text[task:recipe], text[recipe:]


def load(path):
    spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], os.path.join(ROOT, path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def bound_names(statements) -> set[str]:
    """The module-level names that `statements` bind (assignments, functions, classes, imports)."""
    names = set()
    for node in statements:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names |= {n.id for target in node.targets for n in ast.walk(target) if isinstance(n, ast.Name)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(alias.asname or alias.name).split(".")[0] for alias in node.names}
    return names


def test_every_recipe_is_the_template_below_its_task_section():
    template = sections(TEMPLATE)[2]
    for path in RECIPES:
        recipe = sections(path)[2]
        assert recipe == template, f"{path} differs from {TEMPLATE} below its task section:\n" + "".join(
            difflib.unified_diff(template.splitlines(True), recipe.splitlines(True), TEMPLATE, path))


def test_every_task_choice_is_in_the_task_section():
    """main() reads the recipe's imports and the task section's names, nothing else; each script binds every one of
    those task names in its task section, and above it has only its docstring and imports."""
    main = ast.parse(sections(TEMPLATE)[2]).body[0]
    assert isinstance(main, ast.FunctionDef) and main.name == "main"
    names = [n for n in ast.walk(main) if isinstance(n, ast.Name)]
    free = {n.id for n in names if isinstance(n.ctx, ast.Load)} - {n.id for n in names if isinstance(n.ctx, ast.Store)}
    free -= set(dir(builtins))
    assert TASK_NAMES <= free
    recipe_imports = free - TASK_NAMES
    template = load(TEMPLATE)
    for path in RECIPES:
        head, task, _ = sections(path)
        head_nodes = ast.parse(head).body
        assert all(isinstance(node, (ast.Import, ast.ImportFrom, ast.Expr)) for node in head_nodes), path
        assert bound_names(ast.parse(task).body) >= TASK_NAMES, (path, TASK_NAMES - bound_names(ast.parse(task).body))
        assert not bound_names(head_nodes) & TASK_NAMES, path
        module = load(path)
        for name in recipe_imports:  # the same objects: the recipe runs the same code in every script
            assert getattr(module, name) is getattr(template, name), (path, name)


def test_the_template_builds_its_record_as_a_literal_dict():
    """The record a copier writes, in the template's to_record: a dict literal with the record's keys, which makes
    the records the shared the_cauldron reader makes."""
    from phi3v.splits import cauldron_record

    template = load(TEMPLATE)
    to_record = next(node for node in ast.parse(sections(TEMPLATE)[1]).body
                     if isinstance(node, ast.FunctionDef) and node.name == "to_record")
    literals = [{k.value for k in node.keys} for node in ast.walk(to_record) if isinstance(node, ast.Dict)]
    assert {"id", "source", "images", "video", "messages"} in literals
    for index, row in enumerate(memes_rows(4, seed=3)):
        assert template.to_record(row, index) == cauldron_record(row, index, template.DATASET, template.CONFIG)


def test_fifth_task_made_from_a_copy_trains_and_learns(tiny_checkpoint, tmp_path):
    data = shapes_dataset(str(tmp_path / "shapes"), train=128, test=16)
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", "finetune_hf_trainer_shapes.py"),
         "--model_name_or_path", tiny_checkpoint, "--dataset_path", data, "--output_dir", str(out),
         "--num_crops", "1", "--batch_size", "8", "--batch_size_per_gpu", "8", "--num_train_epochs", "5",
         "--learning_rate", "2e-3", "--warmup_steps", "4", "--logging_steps", "4", "--eval_batch_size", "16",
         "--max_new_tokens", "3", "--save_strategy", "no", "--report_to", "none", "--dataloader_num_workers", "0",
         "--no-tqdm", "--deepspeed", "none", "--seed", "0"],
        capture_output=True, text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    before = json.loads((out / "eval_before.json").read_text())["accuracy"]
    after = json.loads((out / "eval_after.json").read_text())["accuracy"]
    print(f"shapes example: accuracy {before:.3f} -> {after:.3f}")
    assert after > before and after >= 0.75
    for name in ("training_curves.png", "eval_comparison.png", "confusion_matrix.png", "run_config.json"):
        assert (out / name).is_file(), name
