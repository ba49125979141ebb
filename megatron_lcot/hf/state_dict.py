"""State-dict adapter between LcotGPTModel (megatron-core names, one process) and Llama names.

    embedding.word_embeddings.weight [V_pad, h]      <-> model.embed_tokens.weight [V, h]
    decoder.layers.N.input_layernorm.weight           <-> model.layers.N.input_layernorm.weight
    decoder.layers.N.self_attention.linear_qkv.weight <-> q_proj, k_proj, v_proj (per query group
        megatron stores [q_1 .. q_{heads/groups}, k, v] rows of head_dim each)
    decoder.layers.N.self_attention.linear_proj       <-> self_attn.o_proj
    decoder.layers.N.pre_mlp_layernorm.weight         <-> post_attention_layernorm.weight
    decoder.layers.N.mlp.linear_fc1.weight [2f, h]    <-> mlp.gate_proj [f, h] ; mlp.up_proj [f, h]
    decoder.layers.N.mlp.linear_fc2.weight            <-> mlp.down_proj
    decoder.final_layernorm.weight                    <-> model.norm.weight
    output_layer.weight [V_pad, h]                    <-> lm_head.weight [V, h]
    halting_router.{weight [K, h], bias [K]}          <-> model.router.{weight, bias}

Padded vocabulary rows (Megatron rounds the vocabulary up for tensor parallelism) are dropped on
export and zero-filled on import. Both directions are pure reshapes and slices, so a round trip
ours -> HF -> ours is bit-exact on the real rows.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

# LcotGPTModel's RoPE base (its `rotary_base` default; no flag changes it).
ROTARY_BASE = 10000.0


@dataclass(frozen=True)
class Shapes:
    """What the layout of the fused tensors depends on."""

    num_layers: int
    num_heads: int
    num_query_groups: int
    head_dim: int
    vocab_size: int  # the tokenizer's real vocabulary
    padded_vocab_size: int


def _split_qkv(weight: torch.Tensor, s: Shapes) -> tuple:
    per_group = s.num_heads // s.num_query_groups
    grouped = weight.view(s.num_query_groups, per_group + 2, s.head_dim, -1)
    q = grouped[:, :per_group].reshape(s.num_heads * s.head_dim, -1)
    k = grouped[:, per_group].reshape(s.num_query_groups * s.head_dim, -1)
    v = grouped[:, per_group + 1].reshape(s.num_query_groups * s.head_dim, -1)
    return q, k, v


def _fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, s: Shapes) -> torch.Tensor:
    per_group = s.num_heads // s.num_query_groups
    hidden = q.shape[-1]
    grouped = torch.cat(
        [
            q.view(s.num_query_groups, per_group, s.head_dim, hidden),
            k.view(s.num_query_groups, 1, s.head_dim, hidden),
            v.view(s.num_query_groups, 1, s.head_dim, hidden),
        ],
        dim=1,
    )
    return grouped.reshape(-1, hidden)


_RENAMES = {  # per-layer tensors that only change name (megatron suffix -> Llama suffix)
    "input_layernorm.weight": "input_layernorm.weight",
    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
    "mlp.linear_fc2.weight": "mlp.down_proj.weight",
}


def megatron_to_hf(state: dict, s: Shapes) -> dict:
    """LcotGPTModel.state_dict() (whole model, one process) -> Llama-named tensors (contiguous)."""
    out = {
        "model.embed_tokens.weight": state["embedding.word_embeddings.weight"][: s.vocab_size],
        "model.norm.weight": state["decoder.final_layernorm.weight"],
        "lm_head.weight": state["output_layer.weight"][: s.vocab_size],
    }
    for n in range(s.num_layers):
        ours, theirs = f"decoder.layers.{n}.", f"model.layers.{n}."
        for suffix, name in _RENAMES.items():
            out[theirs + name] = state[ours + suffix]
        q, k, v = _split_qkv(state[ours + "self_attention.linear_qkv.weight"], s)
        out.update(
            {
                theirs + "self_attn.q_proj.weight": q,
                theirs + "self_attn.k_proj.weight": k,
                theirs + "self_attn.v_proj.weight": v,
            }
        )
        gate, up = state[ours + "mlp.linear_fc1.weight"].chunk(2, dim=0)
        out.update({theirs + "mlp.gate_proj.weight": gate, theirs + "mlp.up_proj.weight": up})
    if "halting_router.weight" in state:
        out["model.router.weight"] = state["halting_router.weight"]
        out["model.router.bias"] = state["halting_router.bias"]
    return {name: tensor.detach().clone().contiguous() for name, tensor in out.items()}


def _pad_rows(weight: torch.Tensor, rows: int) -> torch.Tensor:
    return torch.cat([weight, weight.new_zeros(rows - weight.shape[0], weight.shape[1])])


def hf_to_megatron(hf: dict, s: Shapes) -> dict:
    """Llama-named tensors -> LcotGPTModel.state_dict() entries (padded vocabulary rows zero)."""
    out = {
        "embedding.word_embeddings.weight": _pad_rows(hf["model.embed_tokens.weight"], s.padded_vocab_size),
        "decoder.final_layernorm.weight": hf["model.norm.weight"],
        "output_layer.weight": _pad_rows(hf["lm_head.weight"], s.padded_vocab_size),
    }
    for n in range(s.num_layers):
        ours, theirs = f"decoder.layers.{n}.", f"model.layers.{n}."
        for suffix, name in _RENAMES.items():
            out[ours + suffix] = hf[theirs + name]
        out[ours + "self_attention.linear_qkv.weight"] = _fuse_qkv(
            hf[theirs + "self_attn.q_proj.weight"],
            hf[theirs + "self_attn.k_proj.weight"],
            hf[theirs + "self_attn.v_proj.weight"],
            s,
        )
        out[ours + "mlp.linear_fc1.weight"] = torch.cat(
            [hf[theirs + "mlp.gate_proj.weight"], hf[theirs + "mlp.up_proj.weight"]]
        )
    if "model.router.weight" in hf:
        out["halting_router.weight"] = hf["model.router.weight"]
        out["halting_router.bias"] = hf["model.router.bias"]
    return {name: tensor.detach().clone().contiguous() for name, tensor in out.items()}


def unexpected_hf_tensors(names, num_layers: int) -> list:
    """Names in an HF checkpoint that the adapter would not read (biases, extra layers, ...)."""
    known = re.compile(
        r"model\.(embed_tokens|norm|router)\.(weight|bias)|lm_head\.weight|model\.layers\.(\d+)\."
        r"(input_layernorm|post_attention_layernorm|self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)"
        r"\.weight"
    )
    unexpected = []
    for name in names:
        match = known.fullmatch(name)
        if match is None or (match.group(3) is not None and int(match.group(3)) >= num_layers):
            unexpected.append(name)
    return unexpected
