"""The recommender: T5 with per-task learned prompt vectors and whole-word embeddings (POD / RDRec / HDRec).

The encoder input of a sample is  [prompt_1 .. prompt_P of its task] + token embeddings + whole-word embeddings,
where every token of one word (e.g. the pieces of `item_1234`) shares a whole-word index, so the model can tell
where an id starts and ends. Decoding is transformers' `generate`; ranking over items can be constrained to valid,
not-yet-bought item ids with a prefix trie over their token sequences.
"""
import io
import re
import shutil
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_model, save_file
from transformers import AutoTokenizer, LogitsProcessor, T5Config, T5ForConditionalGeneration, T5Tokenizer
from transformers.cache_utils import DynamicCache, EncoderDecoderCache
from transformers.modeling_outputs import BaseModelOutput

from dataset import read_json
from utils import UserError, atomic_write_json

# from-scratch T5 shapes; `small` is t5-small's, `mini` the d256 4+4 model the original code was timed with
SIZES = {
    "tiny": dict(d_model=64, d_ff=256, num_layers=2, num_decoder_layers=2, num_heads=2, d_kv=32),
    "mini": dict(d_model=256, d_ff=1024, num_layers=4, num_decoder_layers=4, num_heads=4, d_kv=64),
    "small": dict(d_model=512, d_ff=2048, num_layers=6, num_decoder_layers=6, num_heads=8, d_kv=64),
}
# the seed's --model_version
MODEL_VERSIONS = ["t5-small", "t5-base", "t5-large", "t5-3b", "t5-11b"]
MAX_WHOLE_WORDS = 512


def user_word(user):
    return f"user_{user}"


def item_word(item):
    return f"item_{item}"


ITEM_RE = re.compile(r"^item_(\d+)$")


def parse_item(text):
    """Decoded text -> item id, or None when it is not exactly one item id."""
    m = ITEM_RE.match(text.strip())
    return int(m.group(1)) if m else None


# ---------------------------------------------------------------------------------------------------- tokenizer

def train_tokenizer(texts, vocab_size=8000, id_words=None):
    """A SentencePiece model trained on the dataset's own task text, wrapped as a transformers T5 tokenizer (pad 0,
    eos 1, unk 2, like T5). `vocab_size` is an upper bound: a corpus of ids and templates supports fewer.

    id_words=None: ids such as item_1234 stay in the text and are split into pieces (unigram), as in P5 / POD / HDRec.
    id_words=[...]: each of these words becomes one token of its own ("atomic" ids), added after a BPE model learnt
    on the text alone (`texts` must then hold no id words; BPE keeps template words whole where unigram, on a corpus
    of repeated templates, splits them into letters)."""
    import sentencepiece as spm
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=model, vocab_size=vocab_size, hard_vocab_limit=False,
        model_type="unigram" if id_words is None else "bpe", character_coverage=1.0, pad_id=0, eos_id=1, unk_id=2,
        bos_id=-1, num_threads=1, shuffle_input_sentence=False, minloglevel=2, max_sentence_length=1 << 14)
    tokenizer = tokenizer_from_spm(model.getvalue())
    if id_words is not None:
        add_id_tokens(tokenizer, id_words)
    return tokenizer, model.getvalue()


def add_id_tokens(tokenizer, words):
    """Make each id word one token. lstrip: the space before an id belongs to it, so "a item_7" is [a, item_7];
    single_word: item_1 never matches inside item_12. Returns how many tokens were new."""
    from tokenizers import AddedToken
    return tokenizer.add_tokens([AddedToken(w, lstrip=True, single_word=True, normalized=False) for w in words])


def set_dropout(t5, rate):
    """T5's dropout rate, in its config (saved with the checkpoint) and everywhere it was copied when the model was
    built: every dropout layer, and the attention layers' own rate (a float attribute, not a layer)."""
    t5.config.dropout_rate = rate
    for layer in t5.modules():
        if isinstance(layer, nn.Dropout):
            layer.p = rate
        elif isinstance(getattr(layer, "dropout", None), float):
            layer.dropout = rate


class InputOnlyDropout(nn.Dropout):
    """A T5 stack's `dropout` layer, which the stack calls twice a forward pass: on the input embeddings, then on
    the output after the final layer norm. This one drops on the first call only (`calls` is reset before every
    forward by a hook on the stack, see no_output_dropout)."""
    calls = 0

    def forward(self, x):
        self.calls += 1
        return super().forward(x) if self.calls == 1 else x


def no_output_dropout(t5):
    """No dropout between the decoder's final layer norm and the output layer (the input embeddings and every block
    keep theirs). T5 drops there; SASRec does not. At the heavy rates a small sequential model needs (0.5) that
    dropout zeroes half of each position's query vector at every step, and training without it ranks better at
    every epoch measured (docs/RESULTS.md). Recorded in the config (hdrec_output_dropout), so a loaded model is
    rebuilt the same way."""
    t5.config.hdrec_output_dropout = False
    decoder = t5.decoder
    if not isinstance(decoder.dropout, InputOnlyDropout):
        decoder.dropout = InputOnlyDropout(decoder.dropout.p)
        decoder.register_forward_pre_hook(lambda stack, args: setattr(stack.dropout, "calls", 0))


def init_item_embeddings(t5, tokenizer, vectors, std=None):
    """Start the embedding of each atomic item token item_N from vectors[N], scaled to element std `std` (None: the
    embedding matrix's own); all-zero rows keep their initialisation. Returns how many rows were set."""
    words = [item_word(i) for i in range(1, len(vectors))]
    token_ids = tokenizer.convert_tokens_to_ids(words)
    if tokenizer.unk_token_id in token_ids:
        raise UserError("--item_init cooc needs --id_tokens atomic: each item_N must be one token")
    emb = t5.get_input_embeddings().weight
    vectors = torch.as_tensor(vectors[1:], dtype=torch.float32)
    d = min(vectors.shape[1], emb.shape[1])
    vectors = vectors[:, :d]
    used = vectors.norm(dim=1) > 0
    with torch.no_grad():
        rows = torch.tensor(token_ids)[used]
        scaled = vectors[used] * ((emb.std() if std is None else std) / vectors[used].std())
        emb[rows, :d] = scaled.to(emb.dtype)
    return int(used.sum())


def tokenizer_from_spm(model_bytes):
    import sentencepiece as spm
    from tokenizers import normalizers
    sp = spm.SentencePieceProcessor(model_proto=model_bytes)
    vocab = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    tok = T5Tokenizer(vocab=vocab, extra_ids=0, unk_id=2)
    tok.backend_tokenizer.normalizer = normalizers.NFKC()  # SentencePiece's nmt_nfkc, minus its control-char rules
    return tok


# ---------------------------------------------------------------------------------------------------- model

class HDRec(nn.Module):
    def __init__(self, t5, task_num=4, prompt_num=3, seed=1):
        super().__init__()
        self.t5 = t5
        self.task_num, self.prompt_num = task_num, prompt_num
        d = t5.config.d_model
        # prompts start as copies of random token embeddings, so their scale matches the backbone's
        g = torch.Generator().manual_seed(seed)
        rows = torch.randint(3, t5.config.vocab_size, (task_num * prompt_num,), generator=g)
        self.prompts = nn.Parameter(t5.shared.weight.detach()[rows].clone().view(task_num, prompt_num, d))
        # zero-initialised: training starts from the plain backbone and learns the word marking
        self.whole_word = nn.Embedding(MAX_WHOLE_WORDS, d)
        nn.init.zeros_(self.whole_word.weight)
        self.item_tokens = None     # set_item_tokens: the softmax of item-sequence targets runs over these only
        self.label_smoothing = 0.0  # a training setting (pretrain.py --label_smoothing): evaluation losses stay plain
        if getattr(t5.config, "hdrec_output_dropout", True) is False:
            no_output_dropout(t5)
        if getattr(t5.config, "hdrec_input_scale", "none") != "none":
            set_input_scale(t5, t5.config.hdrec_input_scale)

    def set_item_tokens(self, token_ids):
        """Token ids of the atomic item ids. Batches with decoder_input_ids (--history decoder), whose every label is
        an item, then take their cross-entropy over the items alone: ~1/3 of the output layer's work on beauty (the
        user and text tokens are never the answer), and no probability mass spent learning that."""
        self.item_tokens = torch.as_tensor(token_ids, dtype=torch.long, device=self.device)
        self.item_index = torch.full((self.t5.config.vocab_size,), -1, dtype=torch.long, device=self.device)
        self.item_index[self.item_tokens] = torch.arange(len(self.item_tokens), device=self.device)

    @property
    def device(self):
        return self.prompts.device

    def encoder_inputs(self, input_ids, whole_word_ids, attention_mask, task):
        embeds = self.t5.shared(input_ids) + self.whole_word(whole_word_ids)
        prompts = self.prompts[task]                                    # (B, P, d)
        embeds = torch.cat([prompts.to(embeds.dtype), embeds], dim=1)
        mask = torch.cat([attention_mask.new_ones(attention_mask.shape[0], self.prompt_num), attention_mask], dim=1)
        return embeds, mask

    def encode(self, batch):
        embeds, mask = self.encoder_inputs(batch["input_ids"], batch["whole_word_ids"], batch["attention_mask"],
                                           batch["task"])
        hidden = self.t5.encoder(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        return BaseModelOutput(last_hidden_state=hidden), mask

    def forward(self, batch):
        """Mean token cross-entropy of the batch's labels (-100 = ignored; in training mode smoothed by
        `label_smoothing`). The decoder reads the batch's decoder_input_ids where it has them (--history decoder), else
        the labels shifted right."""
        embeds, mask = self.encoder_inputs(batch["input_ids"], batch["whole_word_ids"], batch["attention_mask"],
                                           batch["task"])
        smoothing = self.label_smoothing if self.training else 0.0
        if self.item_tokens is None or "decoder_input_ids" not in batch:
            labels, decoder_inputs = batch["labels"], batch.get("decoder_input_ids")
            if not smoothing:
                return self.t5(inputs_embeds=embeds, attention_mask=mask, labels=labels,
                               decoder_input_ids=decoder_inputs).loss
            if decoder_inputs is None:      # T5's own plain loss is not wanted: shift the labels here instead
                decoder_inputs = self.t5.prepare_decoder_input_ids_from_labels(labels=labels)
            logits = self.t5(inputs_embeds=embeds, attention_mask=mask, decoder_input_ids=decoder_inputs).logits
            return nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100,
                                               label_smoothing=smoothing)
        encoded = self.t5.encoder(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        hidden = self.t5.decoder(input_ids=batch["decoder_input_ids"], encoder_hidden_states=encoded,
                                 encoder_attention_mask=mask).last_hidden_state
        scored = batch["labels"] != -100
        hidden = hidden[scored]                                  # only the positions that carry a loss
        logits = hidden * output_scale(self.t5.config) @ self.t5.lm_head.weight[self.item_tokens].T
        target = self.item_index[batch["labels"][scored]]
        if (target < 0).any():
            raise ValueError("an item-sequence label is not an item token")
        return nn.functional.cross_entropy(logits.float(), target, label_smoothing=smoothing)

    @torch.no_grad()
    def generate(self, batch, num_beams=20, num_return_sequences=10, max_new_tokens=12, do_sample=False, **kwargs):
        encoder_outputs, mask = self.encode(batch)
        if num_beams > 1 and "past_key_values" not in kwargs:
            kwargs["past_key_values"] = BeamCache(DynamicCache(), DynamicCache())
        return self.t5.generate(encoder_outputs=encoder_outputs, attention_mask=mask, num_beams=num_beams,
                                num_return_sequences=num_return_sequences, max_new_tokens=max_new_tokens,
                                do_sample=do_sample, **kwargs)

    @torch.no_grad()
    def next_token_logprobs(self, batch, decoder_input_ids, decoder_attention_mask):
        """log p(next token | input, decoder prefix) at the end of each (left-padded) prefix: (B, vocab). With
        one-token item ids this ranks every item exactly, as beam search would, in one pass instead of one per beam."""
        encoder_outputs, mask = self.encode(batch)
        out = self.t5(encoder_outputs=encoder_outputs, attention_mask=mask, decoder_input_ids=decoder_input_ids,
                      decoder_attention_mask=decoder_attention_mask)
        return torch.log_softmax(out.logits[:, -1].float(), -1)

    @torch.no_grad()
    def score_candidates(self, batch, candidate_labels, decoder_prefix=None, prefix_mask=None):
        """Sequence log-likelihood log p(candidate | input[, decoder prefix]) for every candidate of every sample.
        candidate_labels: (B, C, L) token ids padded with -100; returns (B, C). decoder_prefix / prefix_mask: what the
        decoder reads before the candidate (--history decoder: [start] + the history, left-padded); default [start].
        The encoder and the prefix (which every candidate shares) run once per sample. The later steps run once per
        candidate, over the sample's cached keys and values expanded to its C candidates as stride-0 views: the
        cross-attention cache, the largest part, is never copied."""
        encoder_outputs, mask = self.encode(batch)
        hidden = encoder_outputs.last_hidden_state
        B, C, L = candidate_labels.shape
        if decoder_prefix is None:
            decoder_prefix = torch.full((B, 1), self.t5.config.decoder_start_token_id, dtype=torch.long,
                                        device=self.device)
            prefix_mask = torch.ones_like(decoder_prefix)
        first = self.t5(encoder_outputs=encoder_outputs, attention_mask=mask, decoder_input_ids=decoder_prefix,
                        decoder_attention_mask=prefix_mask, use_cache=True)
        first_logp = torch.log_softmax(first.logits[:, -1].float(), -1)                       # (B, V)
        labels = candidate_labels.clamp(min=0)
        scores = first_logp.gather(1, labels[:, :, 0])                                        # (B, C)
        if L > 1:
            cache = first.past_key_values
            layers = cache.self_attention_cache.layers + cache.cross_attention_cache.layers
            shared = [(layer.keys, layer.values) for layer in layers]
            for b in range(B):
                for layer, (k, v) in zip(layers, shared):   # a fresh self-attention cache each time: it grows
                    layer.keys, layer.values = k[b:b + 1].expand(C, -1, -1, -1), v[b:b + 1].expand(C, -1, -1, -1)
                steps_mask = torch.cat([prefix_mask[b:b + 1].expand(C, -1),
                                        prefix_mask.new_ones(C, L - 1)], dim=1)
                rest = self.t5(encoder_outputs=BaseModelOutput(last_hidden_state=hidden[b:b + 1].expand(C, -1, -1)),
                               attention_mask=mask[b:b + 1].expand(C, -1), decoder_input_ids=labels[b, :, :-1],
                               decoder_attention_mask=steps_mask, past_key_values=cache, use_cache=True)
                logp = torch.log_softmax(rest.logits.float(), -1).gather(-1, labels[b, :, 1:].unsqueeze(-1))
                scores[b] += (logp.squeeze(-1) * (candidate_labels[b, :, 1:] != -100)).sum(-1)
        return scores


class BeamCache(EncoderDecoderCache):
    """Beam search reorders the whole cache at every step, but a beam only ever moves within its own input's group of
    beams, and all beams of one input hold the same cross-attention keys and values (computed from the same encoder
    output). Reordering those is a large copy that changes nothing, so only the self-attention cache is reordered."""

    def reorder_cache(self, beam_idx):
        self.self_attention_cache.reorder_cache(beam_idx)


def micro_batches(batch, max_tokens):
    """Split a padded batch into micro-batches of at most `max_tokens` padded input tokens (at least one sample;
    0: the whole batch), each trimmed to its own longest input/target. A budget in tokens, not samples: 64 short
    sequential inputs stay one efficient micro-batch while long top-N inputs are cut to bound activation memory."""
    B, L = batch["input_ids"].shape
    rows = max(1, max_tokens // L) if max_tokens else B
    for i in range(0, B, rows):
        mb = {k: v[i:i + rows] for k, v in batch.items()}
        n = int(mb["attention_mask"].sum(1).max())
        scored = mb["labels"] != -100                 # up to the last scored position (a prefix may be unscored)
        t = int((scored * torch.arange(1, scored.shape[1] + 1, device=scored.device)).max())
        mb.update(input_ids=mb["input_ids"][:, :n], whole_word_ids=mb["whole_word_ids"][:, :n],
                  attention_mask=mb["attention_mask"][:, :n], labels=mb["labels"][:, :t])
        if "decoder_input_ids" in mb:
            mb["decoder_input_ids"] = mb["decoder_input_ids"][:, :t]
        yield {k: v.contiguous() for k, v in mb.items()}   # T5's loss views the labels: they must be contiguous


def backward_batch(model, batch, max_tokens, autocast, no_sync=None):
    """Gradients of the batch's mean token loss, accumulated over micro-batches of at most `max_tokens` input tokens
    so activation memory scales with the micro-batch (the gradient equals the full batch's). `no_sync`: DDP's context
    for all but the last micro-batch. Returns the batch's mean token loss."""
    import contextlib
    total = (batch["labels"] != -100).sum()
    parts = list(micro_batches(batch, max_tokens))
    loss_sum = 0.0
    for k, mb in enumerate(parts):
        sync = contextlib.nullcontext() if no_sync is None or k == len(parts) - 1 else no_sync()
        with sync:
            with autocast:
                loss = model(mb) * ((mb["labels"] != -100).sum() / total)
            loss.backward()
        loss_sum += loss.item()
    return loss_sum


def t5_config_for(size, tokenizer):
    if size not in SIZES:
        raise UserError(f"unknown model size {size!r}; sizes: {', '.join(SIZES)}")
    return T5Config(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id,
                    feed_forward_proj="relu", dropout_rate=0.1, tie_word_embeddings=True, **SIZES[size])


INPUT_SCALES = ("none", "sqrt_d", "norm")


def set_input_scale(t5, how):
    """How token embeddings enter the blocks (encoder and decoder): none (T5: as they are), sqrt_d (times
    d_model**0.5, as the Transformer and the original SASRec) or norm (each scaled to unit RMS, as RecBole's SASRec
    layer-normalises its input). Embeddings that start small (std .02) and stay small for rare items otherwise enter
    the residual stream ~50x below the blocks' outputs, and the last item, the strongest clue to the next one, is
    barely heard when it is rare (docs/RESULTS.md section 8). The tied output layer reads the raw embeddings either
    way. A hook on every embedding module (they share one weight); recorded in the config (hdrec_input_scale), so a
    loaded model is rebuilt the same way."""
    if how not in INPUT_SCALES:
        raise ValueError(f"input scale must be one of {INPUT_SCALES}, got {how!r}")
    t5.config.hdrec_input_scale = how
    factor = t5.config.d_model ** 0.5

    def scaled(module, args, out):
        if how == "sqrt_d":
            return out * factor
        return out * torch.rsqrt(out.float().pow(2).mean(-1, keepdim=True) + 1e-6).to(out.dtype)
    for module in {id(m): m for m in (t5.shared, t5.encoder.embed_tokens, t5.decoder.embed_tokens)}.values():
        if getattr(module, "hdrec_input_hook", None) is not None:       # set again (a resumed run): replace
            module.hdrec_input_hook.remove()
        module.hdrec_input_hook = module.register_forward_hook(scaled) if how != "none" else None


def no_output_scale(t5):
    """No d_model**-0.5 between the decoder's output and the tied output layer: the logits are the plain dot
    products of the decoder's output and the token embeddings, as SASRec scores items. T5 scales there; with
    small embeddings (std .02, as SASRec's) T5's scale leaves logits of std ~.02, too flat to learn which items go
    together (docs/RESULTS.md section 8). transformers' own switch (scale_decoder_outputs, saved in config.json),
    which T5's forward reads: generation and ranking follow it too."""
    t5.config.scale_decoder_outputs = False


def output_scale(config):
    """The factor T5 puts on the decoder's output before its tied output layer (1 after no_output_scale)."""
    scaled = config.scale_decoder_outputs
    return config.d_model ** -0.5 if scaled else 1.0


def from_scratch_t5(size, tokenizer, embedding_std=None):
    """A randomly initialised T5 of one of SIZES. T5 initialises its embeddings at std 1.0, a scale meant for
    Adafactor, whose steps are relative to each parameter's size; under AdamW (steps of ~lr whatever the scale) rows
    that large barely move in a short run, so the model learns item popularity long before it learns which items go
    together. The embeddings start at std d_model**-0.5 instead, the scale of the other weights, or at
    `embedding_std` (0 or None: d_model**-0.5)."""
    t5 = T5ForConditionalGeneration(t5_config_for(size, tokenizer))
    with torch.no_grad():
        t5.shared.weight.normal_(0.0, embedding_std or t5.config.d_model ** -0.5)
    return t5


def resolve_backbone(backbone, model_version=0):
    """--backbone wins; else the seed's --model_version picks a pretrained t5 from the hub."""
    if backbone:
        return backbone
    if not 0 <= model_version < len(MODEL_VERSIONS):
        raise UserError(f"--model_version must be 0..{len(MODEL_VERSIONS) - 1}")
    return MODEL_VERSIONS[model_version]


def load_pretrained(name_or_path):
    """A pretrained T5 and its tokenizer from a local folder or hub name, with a clear error when offline."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        t5 = T5ForConditionalGeneration.from_pretrained(name_or_path)
    except (OSError, ValueError) as e:
        raise UserError(
            f"could not load the pretrained T5 {name_or_path!r} ({type(e).__name__}: {str(e).splitlines()[0]}). "
            f"Give a local folder with config.json, weights and tokenizer files, a hub name on a machine that can reach "
            f"the hub, or a from-scratch size: --backbone {'|'.join(SIZES)}") from None
    return t5, tokenizer


# ---------------------------------------------------------------------------------------------------- checkpoints

def save_checkpoint(model, tokenizer, out_dir, meta, spm_model=None):
    """model.safetensors + config.json + tokenizer/; each file replaced atomically."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # one name per tied tensor, in state-dict order: save_model's header order varies between calls, this does not
    tensors, seen = {}, set()
    for name, tensor in model.state_dict().items():
        key = (tensor.data_ptr(), tuple(tensor.shape))
        if key not in seen:       # tied weights (shared embeddings, lm_head) are stored once
            seen.add(key)
            tensors[name] = tensor.contiguous()
    tmp = out_dir / "model.safetensors.tmp"
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    tmp.replace(out_dir / "model.safetensors")
    tokenizer.save_pretrained(out_dir / "tokenizer")
    if spm_model is not None:
        (out_dir / "tokenizer" / "spm.model").write_bytes(spm_model)
    atomic_write_json(out_dir / "config.json", {"t5": model.t5.config.to_dict(), "hdrec": meta})


def task_best_dir(checkpoint, task):
    """best_<task>/ in a run's folder: the model at `task`'s own best validation, where pretrain.py keeps one (a
    multi-task run whose task peaked at another validation than the top-level model)."""
    return Path(checkpoint) / f"best_{task}"


def copy_checkpoint(src, dst):
    """The files save_checkpoint writes in `src`, copied to a new folder `dst` (built beside it, then renamed)."""
    src, dst = Path(src), Path(dst)
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shutil.copy2(src / "model.safetensors", tmp / "model.safetensors")
    shutil.copy2(src / "config.json", tmp / "config.json")
    shutil.copytree(src / "tokenizer", tmp / "tokenizer")
    shutil.rmtree(dst, ignore_errors=True)
    tmp.rename(dst)


def load_checkpoint(ckpt_dir, device="cpu"):
    ckpt_dir = Path(ckpt_dir)
    if not (ckpt_dir / "model.safetensors").exists():
        raise UserError(f"{ckpt_dir}: no model.safetensors; train one with pretrain.py --checkpoint {ckpt_dir}")
    config = read_json(ckpt_dir / "config.json")
    if not isinstance(config, dict) or not isinstance(config.get("hdrec"), dict) or "t5" not in config:
        raise UserError(f"{ckpt_dir / 'config.json'}: not an HDRec checkpoint config (needs 't5' and 'hdrec')")
    meta = config["hdrec"]
    try:
        tokenizer = AutoTokenizer.from_pretrained(ckpt_dir / "tokenizer")
    except (OSError, ValueError) as e:
        raise UserError(f"{ckpt_dir / 'tokenizer'}: cannot load the checkpoint's tokenizer "
                        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    t5_config = T5Config.from_dict(config["t5"])
    t5 = T5ForConditionalGeneration(t5_config)
    model = HDRec(t5, meta["task_num"], meta["prompt_num"])
    try:
        load_model(model, str(ckpt_dir / "model.safetensors"), device=str(device))
    except Exception as e:           # a damaged file: safetensors' own error types vary between versions
        raise UserError(f"{ckpt_dir / 'model.safetensors'}: cannot read the weights ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}); the file is damaged or from another model") from None
    return model.to(device).eval(), tokenizer, meta


# ---------------------------------------------------------------------------------------------------- constraints

class ItemTrie:
    """Prefix trie over the token sequences of item ids (each ending in eos)."""

    def __init__(self, item_token_seqs):
        self.children = {}   # prefix tuple -> set of next tokens
        self.count = {}      # prefix tuple -> number of items below it
        self.paths = {}      # item -> its full token tuple
        for item, seq in item_token_seqs.items():
            seq = tuple(seq)
            self.paths[item] = seq
            for k in range(len(seq) + 1):
                self.count[seq[:k]] = self.count.get(seq[:k], 0) + 1
                if k < len(seq):
                    self.children.setdefault(seq[:k], set()).add(seq[k])

    def banned_children(self, items):
        """prefix -> {next token: number of `items` below it}, for the items the trie knows."""
        banned = {}
        for item in set(items):
            seq = self.paths.get(item)
            if seq is None:
                continue
            for k in range(len(seq)):
                below = banned.setdefault(seq[:k], {})
                below[seq[k]] = below.get(seq[k], 0) + 1
        return banned

    def closed(self, prefix, banned):
        """Children of `prefix` below which every item is banned (banned: from banned_children)."""
        below = banned.get(prefix) if banned else None
        return [t for t, n in below.items() if n >= self.count[prefix + (t,)]] if below else []

    def allowed(self, prefix, banned=None):
        """Next tokens after `prefix` that still lead to an item outside `banned`."""
        prefix = tuple(prefix)
        closed = set(self.closed(prefix, banned))
        return [t for t in self.children.get(prefix, ()) if t not in closed]


class TrieConstraint(LogitsProcessor):
    """Beam search over item ids only: at each step, tokens that do not continue a valid item id of the trie (or
    continue only into items banned for that row's user) get -inf. Row r of the expanded batch belongs to user
    r // num_beams. The mask is built once per distinct prefix of the step (all beams share the empty prefix at the
    first step), and the next-token index tensor of each prefix is cached."""

    def __init__(self, trie, banned_per_user, num_beams, eos_id, start_len=1):
        self.trie, self.banned, self.num_beams, self.eos, self.start = trie, banned_per_user, num_beams, eos_id, start_len
        self.cache = {}

    def children(self, prefix, device):
        tokens = self.cache.get(prefix)
        if tokens is None:
            tokens = self.cache[prefix] = torch.tensor(sorted(self.trie.children.get(prefix, ())), dtype=torch.long,
                                                       device=device)
        return tokens

    def __call__(self, input_ids, scores):
        prefixes = [tuple(row) for row in input_ids[:, self.start:].tolist()]
        distinct = {}
        row_prefix = torch.tensor([distinct.setdefault(p, len(distinct)) for p in prefixes], device=scores.device)
        blocked = torch.ones(len(distinct), scores.shape[1], dtype=torch.bool, device=scores.device)
        for prefix, k in distinct.items():
            blocked[k, self.children(prefix, scores.device)] = False
        eos_scores = scores[:, self.eos].clone()
        out = scores.masked_fill_(blocked[row_prefix], float("-inf"))   # in place: generate hands us a fresh tensor
        rows, closed_tokens, dead = [], [], []
        for r, prefix in enumerate(prefixes):
            closed = self.trie.closed(prefix, self.banned[r // self.num_beams]) if self.banned else []
            rows += [r] * len(closed)
            closed_tokens += closed
            if len(closed) == len(self.trie.children.get(prefix, ())):
                dead.append(r)     # no unbanned item below: the beam ends here and will be a miss
        if rows:
            out[rows, closed_tokens] = float("-inf")
        if dead:
            out[dead, self.eos] = eos_scores[dead]
        return out
