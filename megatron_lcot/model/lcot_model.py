"""LcotGPTModel: megatron-core's GPTModel that thinks in latent space before every token.

With `latent_steps == 0` it *is* GPTModel (same modules, same forward). Otherwise the forward
reads top to bottom: embed, run the latent schedule (decoder passes that feed each step's
final-normed output back as the next step's input, gated by the halting router), mix the step
states by exit mass, project, and compute the per-token losses.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.spec_utils import build_module

from megatron_lcot.model.config import LcotConfig
from megatron_lcot.model.halting_schedule import HaltingSchedule, HaltingSettings
from megatron_lcot.model.loss import correctness_penalty, penalty_samples
from megatron_lcot.model.output import LcotOutput
from megatron_lcot.model.seeded_init import seed_model_init
from megatron_lcot.model.vocab_parallel import head_statistic, vocab_parallel_nll

if TYPE_CHECKING:
    from megatron_lcot.model.layer_specs import LcotSubmodules


class LcotGPTModel(GPTModel):
    """GPTModel + a spec'd latent schedule and halting router (untied, RoPE).

    Args beyond GPTModel's: `submodules` (LcotSubmodules: decoder layer spec, latent_schedule,
    halting_router). On a pipeline stage (not both pre_process and post_process) the latent
    passes run as virtual pipeline chunks (parallel/pipeline_passes.py), not through `forward`; the
    router lives on the last stage.
    """

    def __init__(
        self,
        config: LcotConfig,
        submodules: LcotSubmodules,
        vocab_size: int,
        max_sequence_length: int,
        pre_process: bool = True,
        post_process: bool = True,
        parallel_output: bool = True,
        rotary_base: int = 10000,
        **gpt_model_kwargs,
    ):
        seed_model_init(config)
        super().__init__(
            config=config,
            transformer_layer_spec=submodules.decoder,
            vocab_size=vocab_size,
            max_sequence_length=max_sequence_length,
            pre_process=pre_process,
            post_process=post_process,
            parallel_output=parallel_output,
            share_embeddings_and_output_weights=False,
            position_embedding_type="rope",
            rotary_base=rotary_base,
            **gpt_model_kwargs,
        )
        self.latent_schedule = None
        self.halting_router = None
        if config.latent_steps > 0:
            self.latent_schedule = build_module(submodules.latent_schedule, config=config)
            if post_process:  # the last pipeline stage decides and mixes (parallel/pipeline_passes.py)
                self.halting_router = build_module(submodules.halting_router, config=config)
                self.halting_router.bind_output_layer(self.output_layer)
                for param in self.halting_router.parameters():
                    # Replicated on tensor-parallel ranks: averaged there like megatron-core's
                    # replicated parameters, so the copies cannot drift apart.
                    param.average_gradients_across_tp_domain = True

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        jacobi_iters: int | None = None,
        return_thoughts: bool = False,
        halting: HaltingSettings | None = None,
        **gpt_forward_kwargs,
    ):
        """input_ids, position_ids, labels: [b, s]. Returns an LcotOutput (model/output.py):
        logits without labels, losses with them, latent steps in latent modes, the latent
        thoughts when `return_thoughts`; a non-last pipeline stage returns its hidden states.

        halting: the training iteration's HaltingSettings (`HaltingSchedule.at`), handed by the
        training loop; in eval mode, or when None, the final settings (`HaltingSchedule.final`).

        Latent modes build their own masks and slot positions (every slot of token t sits at
        position t); `attention_mask` must be None (causal) there.
        """
        if self.latent_schedule is None:
            result = super().forward(
                input_ids, position_ids, attention_mask, labels=labels, **gpt_forward_kwargs
            )
            if not self.post_process:
                return result  # [s, b, h]: megatron-core's schedule sends it to the next stage
            if labels is None:
                return LcotOutput(logits=result)
            return LcotOutput(loss=result, lm_loss=result)
        if attention_mask is not None or gpt_forward_kwargs:
            raise ValueError("latent modes take no attention_mask or extra GPTModel arguments")

        token_states = self.embed_tokens(input_ids, position_ids)
        schedule_kwargs = {} if jacobi_iters is None else {"jacobi_iters": jacobi_iters}
        halting = self.halting_settings(halting)
        thoughts = self.latent_schedule(
            self.decoder,
            token_states,
            self.rotary_pos_emb,
            self.halting_router,
            threshold=halting.threshold,
            **schedule_kwargs,
        )
        output = self.language_model_output(thoughts, labels, halting)
        return output._replace(thoughts=thoughts) if return_thoughts else output

    def halting_settings(self, halting: HaltingSettings | None) -> HaltingSettings:
        """The settings a forward uses: the training iteration's in training mode when handed,
        the final ones otherwise (evaluation and inference prune as decoding does)."""
        if halting is not None and self.training:
            return halting
        return HaltingSchedule(self.config).final()

    def embed_tokens(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """[b, s] token ids -> [s, b, h] scaled token embeddings, the input of latent step 0."""
        token_states = self.embedding(input_ids=input_ids, position_ids=position_ids)
        return token_states * self.config.embedding_scale

    def language_model_output(self, thoughts, labels: torch.Tensor | None, halting: HaltingSettings):
        """Exit-mass mixture -> head -> LcotOutput: logits [b, s, vocab/tp] (no labels) or losses;
        the adaptive loss adds the penalty weighted and sampled as `halting` says.

        Shared by the one-stage forward and the last pipeline stage's last pass
        (parallel/pipeline_passes.py), so both compute the same loss from the same step states.
        """
        logits, _ = self.output_layer(thoughts.output_states())  # [s, b, vocab/tp]
        if labels is None:
            return LcotOutput(
                logits=logits.transpose(0, 1).contiguous(),
                latent_steps=thoughts.latent_steps().transpose(0, 1),
                expected_latent_steps=thoughts.expected_latent_steps().transpose(0, 1),
            )

        lm_loss = self.compute_language_model_loss(labels, logits)  # [b, s]
        loss = lm_loss
        if self.config.adaptive:
            samples = penalty_samples(
                thoughts, halting.penalty_fraction, halting.penalty_generator(labels.device)
            )
            penalty = correctness_penalty(
                thoughts, samples, self.gold_probabilities(thoughts, labels, samples)
            )
            loss = lm_loss + halting.loss_weight * penalty
        return LcotOutput(
            loss=loss,
            lm_loss=lm_loss,
            latent_steps=thoughts.latent_steps().transpose(0, 1),
            expected_latent_steps=thoughts.expected_latent_steps().transpose(0, 1),
        )

    @torch.no_grad()
    def gold_probabilities(self, thoughts, labels: torch.Tensor, samples: list) -> list:
        """sg(p(t,k))^beta for each gated step k's sampled rows (loss.penalty_samples): the LM
        head and the gold token's NLL (vocab_parallel.py) on those tokens only, forward-only.
        Returns [m_k]."""
        flat_labels = labels.t().reshape(-1)  # [s * b], rows t * b + sequence
        gold_probs = []
        for step, (rows, _) in enumerate(samples):
            states = thoughts.step_states[step].flatten(0, 1)[rows]  # [m, h]
            token_loss = head_statistic(self.output_layer, states, vocab_parallel_nll, flat_labels[rows])
            gold_probs.append(torch.exp(-token_loss) ** self.config.halting_correctness_exponent)
        return gold_probs
