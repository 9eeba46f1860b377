"""Phi3VForCausalLM: transformers' Phi-3 language model with the Phi-3-V image embedding in front.

Parameter names are the official ones (docs/DESIGN.md §1.2): `model.embed_tokens`, `model.layers.*`, `model.norm`,
`model.vision_embed_tokens.*`, `lm_head`, so `from_pretrained` / `save_pretrained` read and write the official
layout (592 tensors at full size) with no key mapping of our own.
"""

from dataclasses import dataclass

import torch
from torch import nn
from transformers import GenerationMixin
from transformers.modeling_outputs import CausalLMOutputWithPast

from phi3v.compat import (
    Phi3Model,
    Phi3PreTrainedModel,
    create_causal_mask,
    is_flash_attention_requested,
    keep_used_weight_conversions,
)
from phi3v.configuration import Phi3VConfig
from phi3v.image_embedding import Phi3VImageEmbedding


@dataclass
class Phi3VCausalLMOutput(CausalLMOutputWithPast):
    """CausalLMOutputWithPast plus `token_log_probs` [N]: log p(logp_targets[i]) from the hidden state at
    logp_positions[i], when the forward was asked for them (docs/DESIGN.md §12)."""

    token_log_probs: torch.FloatTensor | None = None


class Phi3VPreTrainedModel(Phi3PreTrainedModel):
    config_class = Phi3VConfig
    config: Phi3VConfig
    _no_split_modules = ["Phi3DecoderLayer", "CLIPEncoderLayer"]
    # Harmless extras some copies of the checkpoint carry: CLIP's position_ids buffer and the alias of
    # embed_tokens that the reference image embedding kept as `wte` (docs/DESIGN.md §1.3).
    _keys_to_ignore_on_load_unexpected = [r"\.position_ids$", r"vision_embed_tokens\.wte\.weight$"]

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, Phi3VImageEmbedding):
            std = self.config.initializer_range
            nn.init.normal_(module.glb_GN, std=std)
            nn.init.normal_(module.sub_GN, std=std)


class Phi3VModel(Phi3Model):
    """Phi3Model plus `vision_embed_tokens`; `embed()` merges image features into the token embeddings."""

    config_class = Phi3VConfig
    _keys_to_ignore_on_load_unexpected = Phi3VPreTrainedModel._keys_to_ignore_on_load_unexpected

    def __init__(self, config: Phi3VConfig):
        super().__init__(config)
        self.vision_embed_tokens = Phi3VImageEmbedding(config)
        self.embed_dropout = nn.Dropout(config.embd_pdrop)  # Phi3Model ignores embd_pdrop; the reference applies it

    def embed(
        self, input_ids, pixel_values=None, image_sizes=None, image_grids=None, image_positions=None
    ) -> torch.Tensor:
        """Token embeddings with the image features written, in order, over the negative (image) ids.

        image_grids (crops per image as [rows, cols], Python ints) and image_positions (the flat indices of the
        image slots in input_ids, in order) are what the training collator adds: with them nothing here waits for
        the GPU (no `.tolist()` of image_sizes, no count of the slots, no boolean-mask scatter whose backward needs
        `nonzero`). Without them the same result is computed from input_ids and image_sizes.
        """
        if pixel_values is not None and image_sizes is None:
            raise ValueError("pixel_values were given without image_sizes: pass both (the processor returns both)")
        embeds = self.embed_tokens(input_ids.clamp(min=0))  # never mutate the caller's ids (docs/DESIGN.md §9.9)
        if pixel_values is None:
            if image_positions is not None:
                has_slots = image_positions.numel() > 0
            else:
                has_slots = bool((input_ids < 0).any())
            if has_slots:
                raise ValueError("input_ids contain image slots (negative ids) but no pixel_values were given")
            return self.embed_dropout(embeds)
        features = self.vision_embed_tokens(pixel_values, image_sizes, grids=image_grids)
        if image_positions is not None:
            num_slots = image_positions.numel()
        else:
            image_slots = input_ids < 0
            num_slots = int(image_slots.sum())
        if num_slots != features.shape[0]:
            raise ValueError(
                f"input_ids have {num_slots} image slots but the images give {features.shape[0]} image tokens: "
                "were input_ids made by the processor with the same images and num_crops?"
            )
        features = features.to(embeds.dtype)
        if image_positions is not None:
            embeds = embeds.flatten(0, 1).index_copy(0, image_positions, features).view_as(embeds)
        else:
            embeds = embeds.masked_scatter(image_slots.unsqueeze(-1), features)
        return self.embed_dropout(embeds)

    def packed_attention_mask(self, inputs_embeds, position_ids, branch_ids=None):
        """The attention mask of padding-free rows (sdpa / eager / flex; flash attention takes no mask).

        Samples lie one after another, position ids restarting at 0 for each: a token attends to earlier tokens of
        its own sample. A shared-prefix row (docs/DESIGN.md §12) also has `branch_ids`: 0 on a group's prompt, i on
        its completion i (whose positions continue the prompt's); a token then attends only to the prompt and its
        own branch, so each completion sees its prompt and itself, never the other completions. Without branch_ids
        every token is on branch 0 and the mask is plain packing's. Built from these ids alone, without
        transformers' own packed-sequence detection, which checks the ids on the host (a GPU sync)."""
        if self.config._attn_implementation not in ("sdpa", "eager", "flex_attention"):
            return None  # flash attention takes the sample boundaries as cu_seq_lens instead of a mask
        batch = inputs_embeds.shape[0]
        # 1, 1, 1, 2, 2, 3, ...: which sample each token belongs to (a completion continues its prompt's positions)
        sample_index = (position_ids.expand(batch, -1) == 0).cumsum(-1)
        branch = torch.zeros_like(sample_index) if branch_ids is None else branch_ids.expand(batch, -1)

        def same_sample_and_visible_branch(batch_idx, head_idx, q_idx, kv_idx):
            kv_branch = branch[batch_idx, kv_idx]
            same_sample = sample_index[batch_idx, q_idx] == sample_index[batch_idx, kv_idx]
            return same_sample & ((kv_branch == 0) | (kv_branch == branch[batch_idx, q_idx]))

        # Causal over the row AND the above: samples and branches are contiguous, so this is causal within each.
        return create_causal_mask(
            self.config, inputs_embeds, attention_mask=None, cache=None,
            and_mask_function=same_sample_and_visible_branch,
        )


class Phi3VForCausalLM(Phi3VPreTrainedModel, GenerationMixin):
    def __init__(self, config: Phi3VConfig):
        super().__init__(config)
        self.model = Phi3VModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        output_loading_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs)
        if info["missing_keys"]:
            # transformers would only print a report and initialise them randomly: silently wrong outputs.
            missing = sorted(info["missing_keys"])
            raise ValueError(
                f"{pretrained_model_name_or_path}: {len(missing)} weight tensor(s) of the model in config.json are not "
                f"in the checkpoint (e.g. {', '.join(missing[:3])}): does config.json belong to these weights?"
            )
        model.model.vision_embed_tokens.freeze_unused_layers()  # loading makes fresh (trainable) parameters
        keep_used_weight_conversions(model)  # else saving after ZeRO-3 loading writes CLIP's keys wrongly
        return (model, info) if output_loading_info else model

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        num_items_in_batch: int | torch.Tensor | None = None,
        image_grids: list | None = None,
        image_positions: torch.LongTensor | None = None,
        loss_positions: torch.LongTensor | None = None,
        branch_ids: torch.LongTensor | None = None,
        max_sequence_length: int | None = None,
        logp_positions: torch.LongTensor | None = None,
        logp_targets: torch.LongTensor | None = None,
        logp_temperature: float = 1.0,
        **kwargs,
    ) -> Phi3VCausalLMOutput:
        """Loss and logits, or the log-probabilities of given tokens. With `labels`, only the supervised positions go
        through `lm_head` and `logits` is None: the [tokens x 32064] logits of a whole multimodal sequence are never
        built for training. With `logp_positions` and `logp_targets` (the flat indices b * length + t of the hidden
        states that predict each target, and the target ids), `token_log_probs` holds log softmax(logits /
        logp_temperature) at each target, from those positions only; `logits` is None then too.

        The training collator (phi3v.collator.Phi3VDataCollator) also passes what it knows on the host, so that the
        step never waits for the GPU: `image_grids` and `image_positions` (see `Phi3VModel.embed`) and
        `loss_positions`, the flat indices b * length + t of the positions whose next label is supervised. Packed
        (padding-free) rows come with `position_ids` restarting at 0 for each sample, no attention_mask, and
        transformers' varlen arguments `cu_seq_lens_q/k` (sample boundaries) and `max_length_q/k` (the longest
        sample, an int): flash attention uses them directly, SDPA / eager / flex get a block-diagonal causal mask.

        Shared-prefix rows (phi3v.shared_prefix, docs/DESIGN.md §12: each group's prompt once, then its completions)
        come with `position_ids` (each completion continues its prompt's), `branch_ids` (0 on prompts, i on
        completion i), no attention_mask, and `max_sequence_length`, the longest prompt + completion (an int) for
        the length limit. Their mask keeps completions apart, which only SDPA / eager / flex attention can take.
        """
        packed = kwargs.get("cu_seq_lens_q") is not None
        shared = branch_ids is not None
        if packed:
            max_length = kwargs.get("max_length_q")
            if attention_mask is not None or position_ids is None or not isinstance(max_length, int):
                raise ValueError(
                    "packed rows (cu_seq_lens_q) take position_ids restarting at 0 for each sample, no attention_mask, "
                    "and max_length_q as an int"
                )
            if not is_flash_attention_requested(self.config):  # the varlen arguments are for flash attention only
                for key in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k"):
                    kwargs.pop(key, None)
        if shared:
            if is_flash_attention_requested(self.config):
                raise ValueError(
                    "shared-prefix rows (branch_ids) need an attention mask that flash attention cannot take: "
                    "load the model with attn_implementation='sdpa'"
                )
            if packed or attention_mask is not None or position_ids is None or not isinstance(max_sequence_length, int):
                raise ValueError(
                    "shared-prefix rows (branch_ids) take position_ids, no attention_mask or cu_seq_lens_q, and "
                    "max_sequence_length as an int"
                )
            max_length = max_sequence_length
        if (logp_positions is None) != (logp_targets is None):
            raise ValueError("pass logp_positions and logp_targets together")
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("pass input_ids (or inputs_embeds)")
            inputs_embeds = self.model.embed(input_ids, pixel_values, image_sizes, image_grids, image_positions)
        past_length = cache.get_seq_length() if cache is not None else 0
        total_length = past_length + inputs_embeds.shape[1]
        if packed or shared:
            if past_length:
                raise ValueError("packed or shared-prefix rows cannot continue a cache")
            total_length = max_length  # the limit is per sequence, not per row
            if not is_flash_attention_requested(self.config):
                attention_mask = self.model.packed_attention_mask(inputs_embeds, position_ids, branch_ids)
        if total_length > self.config.max_position_embeddings:
            raise ValueError(
                f"the sequence is {total_length} tokens long, more than the model's limit of "
                f"{self.config.max_position_embeddings} (max_position_embeddings)"
            )
        outputs = self.model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            **kwargs,
        )
        hidden = outputs.last_hidden_state
        loss = logits = token_log_probs = None
        if labels is not None:
            loss = self.supervised_loss(hidden, labels, num_items_in_batch, loss_positions)
        if logp_positions is not None:
            rows = hidden.flatten(0, 1).index_select(0, logp_positions)
            token_log_probs = self.target_log_probs(rows, logp_targets, logp_temperature)
        if labels is None and logp_positions is None:
            if isinstance(logits_to_keep, int):
                hidden = hidden[:, -logits_to_keep:] if logits_to_keep else hidden
            else:
                hidden = hidden[:, logits_to_keep]
            logits = self.lm_head(hidden)
        return Phi3VCausalLMOutput(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            token_log_probs=token_log_probs,
        )

    def target_log_probs(self, hidden_rows, targets, temperature: float = 1.0) -> torch.Tensor:
        """[N] log p(targets[i]) under softmax(lm_head(hidden_rows[i]) / temperature), in fp32.

        The one place training reads the language model's output: lm_head runs on the N given rows of hidden
        states only, never on the whole sequence."""
        logits = self.lm_head(hidden_rows).float()
        if temperature != 1.0:
            logits = logits / temperature
        return logits.log_softmax(-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)

    def supervised_loss(self, hidden, labels, num_items_in_batch=None, positions=None) -> torch.Tensor:
        """Shifted cross-entropy over labels != -100: -sum(log p(label)) / count, from the supervised positions only.

        `positions` (flat indices into [batch x length] of the positions whose next label is supervised, in order)
        gives the same rows without a boolean mask, whose data-dependent size the host would have to wait for."""
        if positions is not None:
            rows = hidden.flatten(0, 1).index_select(0, positions)
            targets = labels.flatten().index_select(0, positions + 1)
            count = torch.full((), max(positions.numel(), 1), device=labels.device)  # a fill, not a host copy
        else:
            shift_labels = labels[:, 1:]
            keep = shift_labels != -100
            rows = hidden[:, :-1][keep]
            targets = shift_labels[keep]
            count = keep.sum().clamp(min=1)
        loss = -self.target_log_probs(rows, targets).sum()
        if num_items_in_batch is None:  # plain mean over supervised tokens
            return loss / count
        # Gradient accumulation: the Trainer counts the tokens of all micro-batches of the step.
        return loss / torch.as_tensor(num_items_in_batch, device=loss.device)

    def prepare_inputs_for_generation(
        self,
        input_ids,
        cache=None,
        attention_mask=None,
        inputs_embeds=None,
        pixel_values=None,
        image_sizes=None,
        next_sequence_length=None,
        **kwargs,
    ):
        # LongRoPE: keys cached under the short factors are wrong once the sequence passes
        # original_max_position_embeddings; drop the cache once there and re-run the whole prefix (docs/DESIGN.md §6).
        limit = self.config.original_max_position_embeddings
        cached = cache.get_seq_length() if cache is not None else 0
        if input_ids.shape[1] > limit and 0 < cached <= limit:
            cache = None
            next_sequence_length = None
        model_inputs = super().prepare_inputs_for_generation(
            input_ids,
            next_sequence_length=next_sequence_length,
            cache=cache,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            **kwargs,
        )
        # Image features are needed when this step runs the whole sequence, image slots included: the prefill, a
        # step without a cache, and a re-prefill after the reset above. Every other step runs only the trailing
        # next_sequence_length (new) tokens. generate keeps the prompt's negative ids in input_ids.
        whole_sequence = next_sequence_length is None or next_sequence_length >= input_ids.shape[1]
        model_inputs["pixel_values"] = pixel_values if whole_sequence else None
        model_inputs["image_sizes"] = image_sizes if whole_sequence else None
        return model_inputs
