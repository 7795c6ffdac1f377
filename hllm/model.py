"""The user LLM of HSFT (after HLLM): a causal LM that reads a user's sequence of cached item embeddings through
`inputs_embeds` and predicts, at every position, the embedding of the next item.

Item vectors enter through a trainable linear projection (identity at start when the item and user LLMs have the
same width, so the un-tuned model reads the cached vectors as HLLM's user LLM does). The same projection maps the
candidate items into the user space for scoring: score(u, i) = cos(user vector, projected item vector).

Losses (HLLM): InfoNCE over in-batch and sampled negatives with a learnable temperature (start 0.07, logit scale
clamped to [0, log 100]), or BCE with sampled negatives. Fine-tuning: LoRA (peft), QLoRA (4-bit bitsandbytes base +
LoRA; CUDA only), or full.
"""
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from hllm.llm import load_base_model
from utils import UserError

MODES = ("none", "lora", "qlora", "full")
LORA_TARGETS = "all-linear"


# ----------------------------------------------------------------------------- losses

def nce_loss(user, pos, pos_ids, negs, neg_ids, logit_scale):
    """InfoNCE: each user vector against its positive and all negatives (cosine x logit_scale).
    user, pos: [M, d]; negs: [K, d] shared by all rows; a negative with the positive's id is no negative."""
    user, pos, negs = F.normalize(user, dim=-1), F.normalize(pos, dim=-1), F.normalize(negs, dim=-1)
    pos_logits = (user * pos).sum(-1, keepdim=True) * logit_scale
    neg_logits = (user @ negs.T) * logit_scale  # masked after scaling: -inf * scale would give NaN gradients
    neg_logits = neg_logits.masked_fill(neg_ids[None, :] == pos_ids[:, None], float("-inf"))
    logits = torch.cat([pos_logits, neg_logits], dim=1)
    return F.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long, device=logits.device))


def bce_loss(user, pos, pos_ids, negs, neg_ids, logit_scale):
    """BCE: -log sigmoid(s+) - mean over negatives of log(1 - sigmoid(s-)), averaged over rows."""
    user, pos, negs = F.normalize(user, dim=-1), F.normalize(pos, dim=-1), F.normalize(negs, dim=-1)
    pos_logits = (user * pos).sum(-1) * logit_scale
    neg_logits = (user @ negs.T) * logit_scale
    valid = (neg_ids[None, :] != pos_ids[:, None]).float()
    neg_term = (F.softplus(neg_logits) * valid).sum(1) / valid.sum(1).clamp(min=1)
    return (F.softplus(-pos_logits) + neg_term).mean()


LOSSES = {"nce": nce_loss, "bce": bce_loss}


# ----------------------------------------------------------------------------- model

class UserLLM(nn.Module):
    def __init__(self, backbone, item_table, temperature=0.07):
        """backbone: a base transformer (maybe peft-wrapped); item_table: [num_items + 1, d_item], row 0 = padding."""
        super().__init__()
        self.backbone = backbone
        self.register_buffer("item_table", item_table.float(), persistent=False)
        d_item, d_user = item_table.shape[1], backbone.config.hidden_size
        self.item_proj = nn.Linear(d_item, d_user)
        if d_item == d_user:
            nn.init.eye_(self.item_proj.weight)
            nn.init.zeros_(self.item_proj.bias)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / temperature)))

    def scale(self):
        with torch.no_grad():  # as HLLM: temperature stays in [0.01, 1]
            self.logit_scale.clamp_(0, math.log(100))
        return self.logit_scale.exp()

    def item_vectors(self, ids):
        return self.item_proj(self.item_table[ids])

    def hidden(self, item_ids, attention_mask):
        """[B, L, d_user] hidden states; item_ids [B, L] right-padded with 0."""
        embeds = self.item_vectors(item_ids)
        dtype = self.backbone.get_input_embeddings().weight.dtype
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):  # 4-bit weights compute in bf16
            dtype = torch.bfloat16
        out = self.backbone(inputs_embeds=embeds.to(dtype), attention_mask=attention_mask)
        return out.last_hidden_state.float()

    def user_vectors(self, item_ids, attention_mask):
        """The hidden state at each sequence's last real position: [B, d_user]."""
        hidden = self.hidden(item_ids, attention_mask)
        last = attention_mask.sum(1) - 1
        return hidden[torch.arange(len(hidden), device=hidden.device), last]

    def all_item_vectors(self):
        """Every item projected into the user space, [num_items + 1, d_user] (row 0 = padding)."""
        return self.item_proj(self.item_table)

    def loss(self, item_ids, kind="nce", num_negatives=256, generator=None):
        """Next-item loss at every position of right-padded training sequences [B, L]."""
        inputs, targets = item_ids[:, :-1], item_ids[:, 1:]
        mask = inputs != 0
        valid = mask & (targets != 0)
        hidden = self.hidden(inputs, mask.long())
        pos_ids = targets[valid]
        sampled = torch.randint(1, len(self.item_table), (num_negatives,), generator=generator).to(pos_ids.device)
        neg_ids = torch.unique(torch.cat([pos_ids, sampled]))  # in-batch + sampled negatives
        return LOSSES[kind](hidden[valid], self.item_vectors(pos_ids), pos_ids, self.item_vectors(neg_ids), neg_ids,
                            self.scale())


# ----------------------------------------------------------------------------- building, saving, loading

def resolve_mode(use_lora, use_qlora, val_only, log=print):
    if val_only:
        return "none"
    if use_qlora:
        if torch.cuda.is_available():
            return "qlora"
        log("--use_qlora: QLoRA needs CUDA (bitsandbytes 4-bit kernels) and none is visible; "
            "falling back to LoRA on full-precision weights")
        return "lora"
    return "lora" if use_lora else "full"


def lora_config(r=8, alpha=16, dropout=0.05):
    from peft import LoraConfig
    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=LORA_TARGETS, bias="none")


def load_backbone(path, mode, device, log=print):
    quant = None
    if mode == "qlora":
        from transformers import BitsAndBytesConfig
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=torch.bfloat16)
    backbone, resolved = load_base_model(path, quantization_config=quant)
    if quant is None:
        backbone.to(device)
    return backbone, resolved


def build_user_llm(path, item_table, mode="lora", device=torch.device("cpu"), lora_r=8, lora_alpha=16,
                   lora_dropout=0.05, temperature=0.07, log=print):
    """A UserLLM ready to train in `mode` (none = frozen, for --val_only)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    backbone, resolved = load_backbone(path, mode, device, log)
    if mode in ("lora", "qlora"):
        from peft import get_peft_model, prepare_model_for_kbit_training
        if mode == "qlora":
            backbone = prepare_model_for_kbit_training(backbone, use_gradient_checkpointing=False)
        backbone = get_peft_model(backbone, lora_config(lora_r, lora_alpha, lora_dropout))
    else:
        backbone.requires_grad_(mode == "full")
    model = UserLLM(backbone, item_table, temperature).to(device)
    model.resolved_path = resolved
    return model


def trainable_parameters(model):
    return [p for p in model.parameters() if p.requires_grad]


def save_user_llm(model, out_dir, mode, config):
    """Adapter (LoRA/QLoRA) or full weights in out_dir/user_llm, projection + temperature in head.safetensors,
    and the model config as JSON. Every file written before the last one moves into place is complete."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if mode in ("lora", "qlora", "full"):
        model.backbone.save_pretrained(out_dir / "user_llm")  # safetensors; peft writes only the adapter
    head = {f"item_proj.{k}": v.detach().cpu().contiguous() for k, v in model.item_proj.state_dict().items()}
    head["logit_scale"] = model.logit_scale.detach().cpu().reshape(1)
    tmp = out_dir / "head.safetensors.tmp"
    save_file(head, str(tmp))
    tmp.replace(out_dir / "head.safetensors")
    from utils import atomic_write_json
    atomic_write_json(out_dir / "model_config.json", {**config, "mode": mode, "base_model": model.resolved_path})


def load_user_llm(out_dir, item_table, device=torch.device("cpu"), log=print):
    """Rebuild a saved UserLLM for evaluation (frozen)."""
    out_dir = Path(out_dir)
    config = json.loads((out_dir / "model_config.json").read_text())
    mode = config["mode"]
    if mode == "qlora" and not torch.cuda.is_available():
        log(f"{out_dir} holds a QLoRA adapter; without CUDA it is applied to full-precision weights")
        mode = "lora"
    if mode == "full":
        backbone, resolved = load_backbone(out_dir / "user_llm", "none", device, log)
    else:
        base = config["base_model"] if Path(config["base_model"]).exists() else config.get("user_pretrain_dir")
        backbone, resolved = load_backbone(base, mode, device, log)
        if mode in ("lora", "qlora"):
            from peft import PeftModel
            backbone = PeftModel.from_pretrained(backbone, out_dir / "user_llm")
    backbone.requires_grad_(False)
    model = UserLLM(backbone, item_table).to(device)
    head = load_file(str(out_dir / "head.safetensors"))
    if head["item_proj.weight"].shape != model.item_proj.weight.shape:
        print(f"{out_dir}/head.safetensors: projection {tuple(head['item_proj.weight'].shape)} does not fit "
              f"item vectors of size {item_table.shape[1]}", file=sys.stderr)
        raise UserError("item cache and checkpoint disagree on the item embedding size")
    model.item_proj.load_state_dict({"weight": head["item_proj.weight"], "bias": head["item_proj.bias"]})
    with torch.no_grad():
        model.logit_scale.copy_(head["logit_scale"][0])
    model.resolved_path = resolved
    return model.eval(), config
