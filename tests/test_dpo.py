"""DPO (issue 23): the losses equal their formulas and TRL's DPOTrainer on the same batch; the reference model of a
LoRA run is the base model; preference pairs are read, checked and tokenized as the SFT data is.

The recipe end to end (training, resume, several processes, bad records, saved folders): tests/test_dpo_recipe.py.
"""

import json
import math

import pytest
import torch

from phi3v.conversation import completion_ids, tokenize_conversation, tokenize_prompt
from phi3v.dpo import PreferenceCollator, adapters_disabled, pair_log_probs, preference_metrics
from phi3v.dpo_loss import pair_losses, preference_loss, reward_metrics
from phi3v.records import BadSampleError

# pair i: policy chosen, policy rejected, reference chosen, reference rejected (summed log-probabilities)
POLICY = torch.tensor([[-3.0, -5.0], [-2.5, -2.0], [-7.0, -7.5]], dtype=torch.float64)
REFERENCE = torch.tensor([[-3.5, -4.0], [-2.0, -2.2], [-6.0, -8.0]], dtype=torch.float64)
LENGTHS = torch.tensor([[3, 5], [2, 4], [6, 1]], dtype=torch.float64)


def hand_losses(loss_type, beta, smoothing=0.0):
    """Each formula written out per pair with math, from TRL's docstrings and papers."""
    out = []
    for (c, r), (rc, rr), (lc, lr) in zip(POLICY.tolist(), REFERENCE.tolist(), LENGTHS.tolist()):
        delta = (c - rc) - (r - rr)

        def logsigmoid(x):
            return -math.log1p(math.exp(-x))

        if loss_type == "sigmoid":
            out.append(-logsigmoid(beta * delta))
        elif loss_type == "hinge":
            out.append(max(0.0, 1 - beta * delta))
        elif loss_type == "ipo":
            out.append(((c - rc) / lc - (r - rr) / lr - 1 / (2 * beta)) ** 2)
        elif loss_type == "robust":
            out.append((-(1 - smoothing) * logsigmoid(beta * delta) + smoothing * logsigmoid(-beta * delta))
                       / (1 - 2 * smoothing))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("loss_type, beta, smoothing", [("sigmoid", 0.1, 0.0), ("sigmoid", 2.0, 0.0),
                                                        ("hinge", 0.5, 0.0), ("ipo", 0.3, 0.0),
                                                        ("robust", 0.2, 0.1)])
def test_losses_of_a_hand_built_batch_equal_the_formulas(loss_type, beta, smoothing):
    got = pair_losses(loss_type, beta, POLICY[:, 0], POLICY[:, 1], REFERENCE[:, 0], REFERENCE[:, 1],
                      chosen_lengths=LENGTHS[:, 0], rejected_lengths=LENGTHS[:, 1], label_smoothing=smoothing)
    assert torch.allclose(got, hand_losses(loss_type, beta, smoothing), atol=1e-6, rtol=0)
    # e.g. pair 0, sigmoid, beta 0.1: delta = 0.5 - (-1.0) = 1.5, -log sigmoid(0.15) = log(1 + e^-0.15) = 0.620957
    if (loss_type, beta) == ("sigmoid", 0.1):
        assert got[0].item() == pytest.approx(0.6209570, abs=1e-6)


def test_rpo_adds_the_mean_chosen_token_nll_and_the_logged_rewards():
    kwargs = dict(chosen_lengths=LENGTHS[:, 0], rejected_lengths=LENGTHS[:, 1])
    args = (0.1, POLICY[:, 0], POLICY[:, 1], REFERENCE[:, 0], REFERENCE[:, 1])
    rpo = preference_loss(("sigmoid", "sft"), (1.0, 0.5), *args, **kwargs)
    nll = -(POLICY[:, 0].sum() / LENGTHS[:, 0].sum())  # 12.5 / 11
    assert rpo.item() == pytest.approx(hand_losses("sigmoid", 0.1).mean().item() + 0.5 * nll.item(), abs=1e-6)
    metrics = reward_metrics(*args)
    assert metrics["rewards/chosen"].tolist() == pytest.approx([0.05, -0.05, -0.1])
    assert metrics["rewards/margins"].tolist() == pytest.approx([0.15, -0.07, -0.15])
    assert metrics["rewards/accuracies"].tolist() == [1.0, 0.0, 0.0]
    assert preference_metrics(POLICY, REFERENCE, 0.1)["preference_accuracy"] == pytest.approx(1 / 3)
    assert preference_metrics(POLICY, POLICY, 0.1)["preference_accuracy"] == 0.5  # ties: chance, before training


# ------------------------------------------------------------------------------------------------ against TRL
@pytest.fixture(scope="module")
def models(tiny_checkpoint):
    from phi3v import Phi3VForCausalLM

    policy, reference = Phi3VForCausalLM.from_pretrained(tiny_checkpoint), Phi3VForCausalLM.from_pretrained(
        tiny_checkpoint)
    torch.manual_seed(0)
    with torch.no_grad():  # a policy that differs from its reference, so every term of the loss matters
        for parameter in policy.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return policy, reference


TEXT_PAIRS = [("Is the sky blue?", "Yes, it is.", "No."), ("Name a colour.", "Red", "A colour is a word for it."),
              ("2 + 2?", "4", "5")]


def text_examples(processor):
    examples = []
    for index, (question, chosen, rejected) in enumerate(TEXT_PAIRS):
        prompt = tokenize_prompt(processor, [{"role": "user", "content": question}], [])
        examples.append({**prompt, "completions": [completion_ids(processor, chosen),
                                                   completion_ids(processor, rejected)], "index": index})
    return examples


def trl_batch(examples, pad_token_id):
    """TRL's layout of the same pairs: rows chosen_0..n then rejected_0..n, right-padded, completion_mask."""
    rows = [(e["prompt_ids"], e["completions"][k]) for k in (0, 1) for e in examples]
    width = max(len(p) + len(c) for p, c in rows)
    ids = torch.full((len(rows), width), pad_token_id)
    attention, completion = torch.zeros_like(ids), torch.zeros_like(ids)
    for row, (prompt, answer) in enumerate(rows):
        ids[row, : len(prompt) + len(answer)] = torch.tensor(prompt + answer)
        attention[row, : len(prompt) + len(answer)] = 1
        completion[row, len(prompt): len(prompt) + len(answer)] = 1
    return {"input_ids": ids, "attention_mask": attention, "completion_mask": completion}


@pytest.fixture(scope="module")
def trl_trainer(models, processor, tmp_path_factory):
    from datasets import Dataset
    from trl import DPOConfig
    from trl import DPOTrainer as TRLDPOTrainer

    policy, reference = models
    # bf16=False: TRL's configs default to bf16 mixed precision, which would autocast both models' forwards
    config = DPOConfig(output_dir=str(tmp_path_factory.mktemp("trl")), report_to="none", use_cpu=True, bf16=False,
                       per_device_train_batch_size=2)
    data = Dataset.from_dict({"prompt": ["a"], "chosen": ["b"], "rejected": ["c"]})
    return TRLDPOTrainer(model=policy, ref_model=reference, args=config, train_dataset=data,
                         processing_class=processor.tokenizer)


@pytest.mark.parametrize("loss_types, weights, beta, smoothing", [
    (["sigmoid"], [1.0], 0.1, 0.0), (["hinge"], [1.0], 0.5, 0.0), (["ipo"], [1.0], 0.3, 0.0),
    (["robust"], [1.0], 0.2, 0.1), (["sigmoid", "sft"], [1.0, 0.7], 0.1, 0.0),
])
def test_loss_equals_trl_dpo_trainer_on_the_same_batch(models, processor, trl_trainer, loss_types, weights, beta,
                                                        smoothing):
    """TRL runs prompt + chosen and prompt + rejected as padded rows; ours runs one shared-prefix row. Same model,
    same pairs: the same loss (and gradients flow to the same value)."""
    policy, reference = models
    examples = text_examples(processor)
    trl_trainer.loss_types, trl_trainer.loss_weights = loss_types, weights
    trl_trainer.beta, trl_trainer.label_smoothing = beta, smoothing
    expected = trl_trainer.compute_loss(trl_trainer.model, trl_batch(examples, processor.pad_token_id))

    batch = PreferenceCollator(processor.pad_token_id)(examples)
    ours_policy = pair_log_probs(policy, batch)
    with torch.no_grad():
        ours_reference = pair_log_probs(reference, batch)
    lengths = batch["completion_lengths"].view(-1, 2)
    loss = preference_loss(loss_types, weights, beta, ours_policy[:, 0], ours_policy[:, 1], ours_reference[:, 0],
                           ours_reference[:, 1], chosen_lengths=lengths[:, 0], rejected_lengths=lengths[:, 1],
                           label_smoothing=smoothing)
    print(f"\n{loss_types}: TRL {expected.item():.8f}, ours {loss.item():.8f}")
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5, rel=1e-5)
    assert abs(loss.item() - 0.0) > 1e-3  # a real loss, not a degenerate zero


def test_lora_reference_is_the_base_model(tiny_checkpoint, processor):
    """With LoRA the reference is the policy with its adapters disabled: the base model's log-probabilities, while
    the adapted policy's differ."""
    from phi3v import Phi3VForCausalLM
    from phi3v.model_setup import apply_lora, lora_target_modules

    base = Phi3VForCausalLM.from_pretrained(tiny_checkpoint)
    lora = apply_lora(Phi3VForCausalLM.from_pretrained(tiny_checkpoint), 4, 8, 0.0,
                      lora_target_modules(base, vision=True, lm_head=True), seed=0)
    with torch.no_grad():
        for name, parameter in lora.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)
    batch = PreferenceCollator(processor.pad_token_id)(text_examples(processor))
    with torch.no_grad():
        expected = pair_log_probs(base, batch)
        with adapters_disabled(lora):
            disabled = pair_log_probs(lora, batch)
        adapted = pair_log_probs(lora, batch)
    assert torch.equal(disabled, expected)
    assert (adapted - expected).abs().max() > 1e-3


# ------------------------------------------------------------------------------------------------ the data
def write_pairs(folder, records, name="pairs.json"):
    from PIL import Image

    (folder / "media").mkdir(exist_ok=True)
    Image.new("RGB", (64, 48), (220, 30, 30)).save(folder / "media" / "red.jpg")
    Image.new("RGB", (40, 80), (30, 30, 220)).save(folder / "media" / "blue.png")
    path = folder / name
    path.write_text(json.dumps(records))
    return path


def test_a_pair_is_the_sft_example_of_its_chosen_answer(tmp_path, processor):
    """prompt + chosen tokenizes exactly as the SFT example of the same conversation ending with the chosen answer
    (history, several images); rejected continues the same prompt."""
    from phi3v.media import load_record_images
    from phi3v.preference import PreferenceDataset, parse_preference
    from phi3v.records import load_records

    path = write_pairs(tmp_path, [{
        "id": "p1", "image": ["red.jpg", "blue.png"],
        "conversations": [{"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "Red."}],
        "prompt": "<image>\nAnd this one?", "chosen": "Blue.", "rejected": "Green."}])
    [record] = load_records(path, tmp_path / "media", parse=parse_preference)
    assert record["rejected"] == "Green." and record["messages"][-1]["content"] == "Blue."
    item = PreferenceDataset([record], processor, num_crops=1)[0]
    images, messages = load_record_images(record)
    sft = tokenize_conversation(processor, messages, images, num_crops=1)
    chosen, rejected = item["completions"]
    assert item["prompt_ids"] + chosen == sft["input_ids"]
    assert rejected == completion_ids(processor, "Green.")
    assert torch.equal(item["pixel_values"], sft["pixel_values"])


@pytest.mark.parametrize("change, message", [
    ({"chosen": ""}, "[0]: empty 'chosen'"),
    ({"rejected": None}, "[0]: 'rejected' must be a str, got NoneType"),
    ({"rejected": "A cat. "}, "[0]: 'chosen' and 'rejected' are the same answer: nothing to prefer"),
    ({"prompt": "<image>\n<image>\nWhat?"}, "[0]: 2 <image> tags but 1 images"),
    ({"image": "missing.jpg"}, "[0]: image file not found: "),
    ({"conversations": [{"from": "human", "value": "Hi"}]},
     "[0]: 'conversations' holds the turns before 'prompt' and must end with an answer (the prompt is the next "
     "question)"),
])
def test_each_bad_pair_is_one_line_naming_the_record(tmp_path, change, message):
    from phi3v.preference import parse_preference
    from phi3v.records import load_records

    record = {"id": "a", "image": "red.jpg", "prompt": "<image>\nWhat is it?", "chosen": "A cat.",
              "rejected": "A dog."}
    path = write_pairs(tmp_path, [{**record, **change}, record])
    with pytest.raises(BadSampleError) as error:
        load_records(path, tmp_path / "media", parse=parse_preference)
    text = str(error.value)
    assert text.startswith(f"{path}{message}") and "\n" not in text, text
    del record["id"]
    missing = write_pairs(tmp_path, [{k: v for k, v in record.items() if k != "chosen"}], "missing.json")
    with pytest.raises(BadSampleError, match=r"missing\.json\[0\]: missing key 'chosen'"):
        load_records(missing, tmp_path / "media", parse=parse_preference)
    kept = load_records(path, tmp_path / "media", skip_bad_samples=True, parse=parse_preference)
    assert [r["source"] for r in kept] == [f"{path}[1]"]


def test_too_long_pairs_are_found_before_any_image_is_decoded(tmp_path, processor, monkeypatch):
    import phi3v.media
    from phi3v.preference import PreferenceDataset, check_pair_lengths, parse_preference
    from phi3v.records import load_records

    path = write_pairs(tmp_path, [
        {"image": "red.jpg", "prompt": "<image>\nWhat is it?", "chosen": "A red picture.", "rejected": "Blue."},
        {"prompt": "Say something long.", "chosen": "word " * 400, "rejected": "No."},
    ])
    records = load_records(path, tmp_path / "media", parse=parse_preference)
    dataset = PreferenceDataset(records, processor, num_crops=1)
    lengths = [len(dataset[i]["prompt_ids"]) + max(map(len, dataset[i]["completions"])) for i in range(2)]
    limit = lengths[0]  # the first pair fits exactly, the second does not
    assert lengths[1] > limit
    monkeypatch.setattr(phi3v.media, "open_image", lambda *a: pytest.fail("an image was decoded"))
    with pytest.raises(BadSampleError) as error:
        check_pair_lengths(records, processor, 1, limit)
    assert str(error.value) == (f"{path}[1]: the pair is {lengths[1]} tokens long (prompt and longer answer), more "
                                f"than max_seq_length {limit}")
    assert check_pair_lengths(records, processor, 1, limit, skip_bad_samples=True) == records[:1]
