"""Hugging Face configuration of a latent-thought Llama (shipped inside every latent export).

Self-contained: imports `transformers` only, so an exported directory loads with
`AutoConfig.from_pretrained(DIR, trust_remote_code=True)` where neither megatron_lcot nor
megatron-core is installed. The fields beyond LlamaConfig's are those of docs/method.md.
"""

from transformers import LlamaConfig


class LcotLlamaConfig(LlamaConfig):
    """LlamaConfig + latent thoughts.

    latent_steps: K latent thoughts per token (>= 1; a vanilla model exports as LlamaConfig).
    latent_layout: "stepwise" (K+1 exact passes) or "interleaved" (PonderLM-2, Jacobi passes).
    halting: "none" (every token runs K steps) or "adaptive" (per-step linear router).
    halting_threshold: tau; step k of a token runs only while its reach r(t,k) >= tau.
    embedding_scale: token embeddings are multiplied by this before the first layer.
    jacobi_eval_iters: interleaved layout, Jacobi iterations of a forward over a whole sequence
        (what training evaluated with); generation runs enough iterations to be exact.
    """

    model_type = "lcot_llama"

    def __init__(
        self,
        latent_steps=1,
        latent_layout="stepwise",
        halting="none",
        halting_threshold=0.05,
        embedding_scale=1.0,
        jacobi_eval_iters=3,
        **kwargs,
    ):
        self.latent_steps = latent_steps
        self.latent_layout = latent_layout
        self.halting = halting
        self.halting_threshold = halting_threshold
        self.embedding_scale = embedding_scale
        self.jacobi_eval_iters = jacobi_eval_iters
        super().__init__(**kwargs)
