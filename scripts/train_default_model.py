"""Train the model that ships with pp-engine (`models/default/`), on one CPU thread.

A ~5.8M-parameter Llama trained from scratch on the Python standard library's own source, with
a byte-level BPE tokenizer trained on the same files, saved as a Hugging Face checkpoint:

    python scripts/train_default_model.py                 # ~50 min training budget, then save
    python scripts/train_default_model.py --max-steps N   # a fixed schedule (exact reproduction)

Corpus (written down here and in the model card): every `*.py` file under this interpreter's
`sysconfig.get_paths()["stdlib"]`, in sorted path order, except files inside a directory named
`test`, `tests`, `idlelib`, `lib2to3` or `site-packages`, and files over 200 KB. A file is held
out for evaluation when the first 8 hex digits of the SHA-256 of its relative path (POSIX
form), read as an integer, are below 2% of 16**8; the tokenizer and the model see only the
other files.

Training: AdamW, linear warmup then cosine decay to 10% of the peak learning rate, sequences
of 256 tokens cut at seeded random offsets from the training files packed as
`<s> file </s> <s> file </s> ...`, bfloat16 autocast with float32 master weights, one torch
thread. Without `--max-steps`, the step count is calibrated from the speed of the first
steps (all inside the warmup, so the trajectory is the same as a run given that count) to fit
`--max-minutes`; the budget also stops a run that turns out slower, cleanly. The model card
(`README.md` in the output folder) records the step count and the command that reproduces it.

Evaluation: mean next-token loss (nats) and perplexity on the held-out files, of the shipped
bfloat16 weights run in float32, against a unigram model (training-split token counts, add-one
smoothing) scored on the same target tokens.
"""

from __future__ import annotations

import os

# Before tokenizers (Rayon) starts its thread pool: one core is all this script may use.
os.environ.setdefault("RAYON_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import hashlib
import json
import math
import platform
import shutil
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "models" / "default"

EXCLUDED_DIRS = frozenset({"test", "tests", "idlelib", "lib2to3", "site-packages"})
MAX_FILE_BYTES = 200_000
HOLDOUT_FRACTION = 0.02

UNK, BOS, EOS = "<unk>", "<s>", "</s>"
CHAT_MARKERS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = [UNK, BOS, EOS, *CHAT_MARKERS]  # ids 0..5, in this order
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
SAMPLE_PROMPTS = ("def fibonacci(n):", "class Stack:\n    def __init__(self):",
                  "import os\n\ndef main():")


# ---- corpus -----------------------------------------------------------------------------------
def is_held_out(rel_path: str) -> bool:
    """Whether the file at `rel_path` (POSIX, relative to the stdlib root) is an eval file."""
    digest = int(hashlib.sha256(rel_path.encode("utf-8")).hexdigest()[:8], 16)
    return digest < HOLDOUT_FRACTION * 16**8


def select_corpus(stdlib_dir: Path) -> list[Path]:
    """The corpus files under `stdlib_dir`, in sorted order (see the module docstring)."""
    files = []
    for path in sorted(stdlib_dir.rglob("*.py")):
        rel = path.relative_to(stdlib_dir)
        if EXCLUDED_DIRS.intersection(rel.parts[:-1]) or not path.is_file():
            continue
        if path.stat().st_size > MAX_FILE_BYTES:
            continue
        files.append(path)
    return files


@dataclass
class Corpus:
    """The corpus split into training and held-out texts (relative path -> text)."""

    root: Path
    train: dict[str, str]
    held_out: dict[str, str]
    skipped: list[str]  # files that are not valid UTF-8


def load_corpus(stdlib_dir: Path) -> Corpus:
    train, held_out, skipped = {}, {}, []
    for path in select_corpus(stdlib_dir):
        rel = path.relative_to(stdlib_dir).as_posix()
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            skipped.append(rel)
            continue
        (held_out if is_held_out(rel) else train)[rel] = text
    return Corpus(stdlib_dir, train, held_out, skipped)


# ---- tokenizer --------------------------------------------------------------------------------
def train_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE (spaces and newlines kept exactly; every byte has a token, so no <unk>),
    with `<s>` prepended to every encoding by the post-processor."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)])
    return tok


def save_tokenizer(tok, out_dir: Path, max_length: int) -> None:
    """tokenizer.json plus a tokenizer_config.json that AutoTokenizer and models.Tokenizer read."""
    tok.save(str(out_dir / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": UNK,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_length,
        "chat_template": CHAT_TEMPLATE,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def pack(tok, texts: list[str]) -> torch.Tensor:
    """`<s> text </s>` for each text, concatenated: one int64 token stream."""
    bos, eos = tok.token_to_id(BOS), tok.token_to_id(EOS)
    stream: list[int] = []
    for enc in tok.encode_batch(texts, add_special_tokens=False):
        stream.append(bos)
        stream.extend(enc.ids)
        stream.append(eos)
    return torch.tensor(stream, dtype=torch.long)


# ---- model ------------------------------------------------------------------------------------
def model_config(args: argparse.Namespace, vocab_size: int, bos_id: int, eos_id: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=args.hidden_size,
        num_hidden_layers=args.num_layers, num_attention_heads=args.num_heads,
        num_key_value_heads=args.num_kv_heads, head_dim=args.hidden_size // args.num_heads,
        intermediate_size=args.intermediate_size, max_position_embeddings=1024,
        rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True,
        bos_token_id=bos_id, eos_token_id=eos_id, attention_bias=False, mlp_bias=False)


def lr_at(step: int, total_steps: int, args: argparse.Namespace) -> float:
    """Linear warmup to --lr over --warmup-steps, then cosine decay to 10% at total_steps."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    progress = min(1.0, (step - args.warmup_steps) / max(1, total_steps - args.warmup_steps))
    return args.lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def next_token_loss(model, inputs: torch.Tensor, targets: torch.Tensor,
                    reduction: str = "mean") -> torch.Tensor:
    logits = model(input_ids=inputs).logits.float()  # [batch, seq, vocab]
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction=reduction)


def eval_windows(stream: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-overlapping windows: every stream token after the first is a target exactly once
    (a window's first token is predicted without context, as in training)."""
    n = (len(stream) - 1) // seq_len
    inputs = stream[: n * seq_len].view(n, seq_len)
    targets = stream[1: n * seq_len + 1].view(n, seq_len)
    return inputs, targets


@torch.no_grad()
def held_out_loss(model, inputs: torch.Tensor, targets: torch.Tensor, batch_size: int,
                  autocast: bool) -> float:
    """Mean next-token loss (nats) over all the windows."""
    model.eval()
    total = 0.0
    for i in range(0, len(inputs), batch_size):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = next_token_loss(model, inputs[i:i + batch_size], targets[i:i + batch_size],
                                   reduction="sum")
        total += loss.item()
    model.train()
    return total / targets.numel()


def unigram_loss(train_stream: torch.Tensor, targets: torch.Tensor, vocab_size: int) -> float:
    """Held-out loss of add-one-smoothed unigram frequencies from the training stream."""
    counts = torch.bincount(train_stream, minlength=vocab_size).double() + 1.0
    log_p = counts.log() - counts.sum().log()
    return float(-log_p[targets.flatten()].mean())


# ---- training ---------------------------------------------------------------------------------
def train(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t_start = time.time()

    stdlib_dir = Path(sysconfig.get_paths()["stdlib"])
    corpus = load_corpus(stdlib_dir)
    train_texts, held_texts = list(corpus.train.values()), list(corpus.held_out.values())
    log(f"corpus: {stdlib_dir}: {len(train_texts)} training files "
        f"({sum(map(len, train_texts)):,} chars), {len(held_texts)} held-out files "
        f"({sum(map(len, held_texts)):,} chars), {len(corpus.skipped)} not UTF-8")

    tok = train_tokenizer(train_texts, args.vocab_size)
    vocab_size = tok.get_vocab_size(with_added_tokens=True)
    bos_id, eos_id = tok.token_to_id(BOS), tok.token_to_id(EOS)
    train_stream, held_stream = pack(tok, train_texts), pack(tok, held_texts)
    held_bytes = sum(len(t.encode("utf-8")) for t in held_texts)
    log(f"tokenizer: {vocab_size} tokens; training stream {len(train_stream):,} tokens, "
        f"held-out {len(held_stream):,} tokens ({held_bytes / len(held_stream):.2f} bytes/token)"
        f" [{time.time() - t_start:.0f}s]")

    from transformers import LlamaForCausalLM

    config = model_config(args, vocab_size, bos_id, eos_id)
    model = LlamaForCausalLM(config)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: {n_params:,} parameters")

    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95), eps=1e-8)

    held_inputs, held_targets = eval_windows(held_stream, args.seq_len)
    probe = slice(0, min(len(held_inputs), args.probe_windows))  # the periodic quick eval
    data_gen = torch.Generator().manual_seed(args.seed)
    max_start = len(train_stream) - args.seq_len - 1
    offsets = torch.arange(args.seq_len + 1)

    budget_s = args.max_minutes * 60.0
    total_steps = args.max_steps
    calibrate_from, calibrate_to = 5, min(50, args.warmup_steps)
    log(f"training: batch {args.batch_size} x {args.seq_len} tokens, peak lr {args.lr}, "
        f"warmup {args.warmup_steps}, steps {total_steps or 'calibrated'}, "
        f"budget {args.max_minutes} min, {torch.get_num_threads()} thread(s)")

    history: list[tuple[int, float, float | None]] = []  # (step, train loss, probe loss)
    t_train = time.time()
    t_calib = t_train
    window_loss, window_n, step = 0.0, 0, 0
    stop_reason = "completed the schedule"
    while total_steps is None or step < total_steps:
        elapsed = time.time() - t_train
        if elapsed > budget_s:
            stop_reason = f"stopped by the {args.max_minutes}-minute budget"
            break
        if total_steps is None and step == calibrate_from:
            t_calib = time.time()
        if total_steps is None and step == calibrate_to:
            per_step = (time.time() - t_calib) / (calibrate_to - calibrate_from)
            # 7% margin for the periodic probes and for a shared core slowing down.
            total_steps = max(step + 1, int(0.93 * (budget_s - elapsed) / per_step) + step)
            log(f"calibrated: {per_step:.2f} s/step -> {total_steps} steps")

        lr = lr_at(step, total_steps or 10**9, args)
        for group in optimizer.param_groups:
            group["lr"] = lr
        starts = torch.randint(0, max_start + 1, (args.batch_size,), generator=data_gen)
        batch = train_stream[starts[:, None] + offsets]  # [batch, seq_len + 1]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = next_token_loss(model, batch[:, :-1], batch[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        window_loss += loss.item()
        window_n += 1

        if step % args.log_every == 0 or step == total_steps:
            probe_loss = None
            if step % args.eval_every == 0 or step == total_steps:
                probe_loss = held_out_loss(model, held_inputs[probe], held_targets[probe],
                                           args.batch_size, autocast=True)
            mean = window_loss / window_n
            history.append((step, mean, probe_loss))
            took = time.time() - t_train
            tokens = step * args.batch_size * args.seq_len
            probe_text = "" if probe_loss is None else f" held-out(probe) {probe_loss:.3f}"
            log(f"step {step}/{total_steps or '?'} loss {mean:.3f}{probe_text} lr {lr:.2e} "
                f"{tokens / took:.0f} tok/s {took / 60:.1f} min")
            window_loss, window_n = 0.0, 0
    train_seconds = time.time() - t_train
    tokens_seen = step * args.batch_size * args.seq_len
    log(f"training {stop_reason} at step {step} ({tokens_seen:,} tokens, "
        f"{train_seconds / 60:.1f} min)")

    # The shipped weights are bfloat16; score exactly those, computing in float32.
    model = model.to(torch.bfloat16).to(torch.float32)
    model.eval()
    model_loss = held_out_loss(model, held_inputs, held_targets, args.batch_size, autocast=False)
    base_loss = unigram_loss(train_stream, held_targets, vocab_size)
    log(f"held-out: model loss {model_loss:.4f} (ppl {math.exp(model_loss):.2f}), "
        f"unigram loss {base_loss:.4f} (ppl {math.exp(base_loss):.2f}) "
        f"on {held_targets.numel():,} tokens")

    samples = greedy_samples(model, tok, args.sample_tokens)
    for prompt, text in samples:
        log(f"sample: {prompt!r} -> {text!r}")

    results = {
        "args": vars(args),
        "stdlib_dir": str(stdlib_dir),
        "n_train_files": len(train_texts),
        "n_held_files": len(held_texts),
        "held_files": sorted(corpus.held_out),
        "skipped": corpus.skipped,
        "train_chars": sum(map(len, train_texts)),
        "train_tokens": len(train_stream),
        "held_tokens": held_targets.numel(),
        "held_bytes_per_token": held_bytes / len(held_stream),
        "vocab_size": vocab_size,
        "n_params": n_params,
        "steps": step,
        "planned_steps": total_steps,
        "stop_reason": stop_reason,
        "tokens_seen": tokens_seen,
        "train_seconds": train_seconds,
        "total_seconds": time.time() - t_start,
        "model_loss": model_loss,
        "unigram_loss": base_loss,
        "history": history,
        "samples": samples,
    }
    save(args.out, model, tok, config, results)
    log(f"saved to {args.out} [{(time.time() - t_start) / 60:.1f} min in all]")


@torch.no_grad()
def greedy_samples(model, tok, max_new_tokens: int) -> list[tuple[str, str]]:
    """Greedy continuations (transformers' generate, float32) of SAMPLE_PROMPTS."""
    samples = []
    for prompt in SAMPLE_PROMPTS:
        ids = torch.tensor([tok.encode(prompt).ids])
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                             attention_mask=torch.ones_like(ids))
        samples.append((prompt, tok.decode(out[0, ids.shape[1]:].tolist(),
                                           skip_special_tokens=True)))
    return samples


def save(out: Path, model, tok, config, results: dict) -> None:
    """Write the checkpoint to `out` (replacing it): config, bf16 safetensors, generation
    config, tokenizer, model card."""
    from transformers import GenerationConfig

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model = model.to(torch.bfloat16)
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
        pad_token_id=config.eos_token_id)
    model.save_pretrained(str(tmp), safe_serialization=True)
    save_tokenizer(tok, tmp, config.max_position_embeddings)
    (tmp / "README.md").write_text(model_card(results, config))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def model_card(r: dict, config) -> str:
    a = r["args"]
    steps = r["steps"]
    command = "python scripts/train_default_model.py"
    if a["max_steps"] is None:
        # The budget only stops a slower machine early; leave it room to finish the schedule.
        reproduce = f"{command} --max-steps {steps} --max-minutes {3 * a['max_minutes']:g}"
    else:
        reproduce = " ".join([command, *sys.argv[1:]])
    history_rows = "\n".join(
        f"| {s} | {loss:.3f} | {'' if p is None else f'{p:.3f}'} |"
        for s, loss, p in r["history"]
        if s % max(a["eval_every"], 1) == 0 or s == r["history"][-1][0])
    samples = "\n\n".join(
        f"Prompt `{prompt!r}` -> greedy continuation:\n\n```python\n{prompt}{text}\n```"
        for prompt, text in r["samples"])
    ml, ul = r["model_loss"], r["unigram_loss"]
    theta = (getattr(config, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
    excluded = ", ".join(f"`{d}`" for d in sorted(EXCLUDED_DIRS))
    held_files = ", ".join(f"`{f}`" for f in r["held_files"])
    skipped = (f"; {len(r['skipped'])} files that are not UTF-8 were skipped"
               if r["skipped"] else "")
    run_command = " ".join([command, *sys.argv[1:]])
    calibrated = (f", which calibrated {steps:,} steps to its time budget; `--max-steps {steps}`"
                  " fixes that schedule" if a["max_steps"] is None else "")
    passes = r["tokens_seen"] / r["train_tokens"]
    python = platform.python_version()
    return f"""---
library_name: transformers
pipeline_tag: text-generation
tags: [llama, code, python, tiny, pp-engine]
---

# pp-engine default model

A tiny Llama-architecture language model of Python source, trained from scratch on the Python
standard library. It is the model `pp-engine` uses when none is named (`LLM()`,
`pp-engine generate "def fibonacci(n):"`, `pp-engine serve`). It loads in `transformers`
(`AutoModelForCausalLM`, `AutoTokenizer`).

**Intended use:** demos and tests of the engine: small enough to load in a second and to run on
one CPU core, trained enough that greedy continuations of Python look like Python
(indentation, `def`, `return`, `self`). **Not** for real code completion: its code is
usually wrong, it does not follow instructions, and its chat template is only a format (the
model saw no conversations).

## Architecture

`LlamaForCausalLM`: {config.num_hidden_layers} layers, hidden size {config.hidden_size},
{config.num_attention_heads} attention heads of dimension {config.head_dim},
{config.num_key_value_heads} key/value heads (grouped-query attention), SwiGLU MLP of
{config.intermediate_size}, RMSNorm (eps {config.rms_norm_eps}), RoPE (theta {theta:g}),
max_position_embeddings {config.max_position_embeddings}, tied input/output embeddings,
vocabulary {r["vocab_size"]}. **{r["n_params"]:,} parameters**, stored in bfloat16
(`model.safetensors`). Trained with sequences of {a["seq_len"]} tokens, so longer contexts are
out of distribution.

## Tokenizer

Byte-level BPE (`tokenizers`) trained on the training split below, {r["vocab_size"]} tokens:
`<unk>`=0 (never produced: every byte has a token), `<s>`=1 (BOS, added to every encoding by
the post-processor), `</s>`=2 (EOS, ends a file), `<|system|>`, `<|user|>`, `<|assistant|>`
(chat markers), then 256 byte tokens and the merges. Spaces and newlines round-trip exactly
(ByteLevel pre-tokenizer and decoder, `add_prefix_space=False`). On the held-out files a token
is {r["held_bytes_per_token"]:.2f} bytes on average. Chat template:

```jinja
{CHAT_TEMPLATE}
```

## Training data

The `*.py` files of the Python {python} standard library
(`sysconfig.get_paths()["stdlib"]`), sorted by path, excluding files inside directories named
{excluded} and files over {MAX_FILE_BYTES:,} bytes.
A file is held out for evaluation when the first 8 hex digits of the SHA-256 of its relative
path, as an integer, are below {HOLDOUT_FRACTION:.0%} of 16^8: {r["n_held_files"]} held-out
files, {r["n_train_files"]} training files ({r["train_chars"]:,} characters,
{r["train_tokens"]:,} tokens with the `<s>`/`</s>` around each file){skipped}.
Held-out files: {held_files}.

The corpus is the CPython standard library (Python Software Foundation License).

## Training

- From scratch, seed {a["seed"]}; AdamW (betas 0.9/0.95, weight decay {a["weight_decay"]} on
  matrices), peak learning rate {a["lr"]}, {a["warmup_steps"]} warmup steps then cosine decay
  to 10%, gradient clipping {a["grad_clip"]}, batch {a["batch_size"]} sequences x
  {a["seq_len"]} tokens cut at seeded random offsets from the packed training files,
  bfloat16 autocast with float32 master weights.
- **{steps:,} steps, {r["tokens_seen"]:,} tokens** (about {passes:.1f}
  passes over the training split), {r["train_seconds"] / 60:.1f} minutes of training
  ({r["total_seconds"] / 60:.1f} minutes in all, with the tokenizer and evaluation); training
  {r["stop_reason"]}.
- Hardware: {cpu_name()} CPU, **one thread**
  (`torch.set_num_threads({a["threads"]})`), torch {torch.__version__}, Python
  {python}.

| step | training loss | held-out loss (first {a["probe_windows"]} windows) |
|---|---|---|
{history_rows}

## Evaluation

Held-out files, packed as in training and cut into non-overlapping windows of
{a["seq_len"]} tokens; mean next-token cross-entropy over {r["held_tokens"]:,} target tokens,
of the shipped bfloat16 weights computed in float32:

| model | loss (nats/token) | perplexity |
|---|---|---|
| this model | {ml:.4f} | {math.exp(ml):.2f} |
| unigram baseline (training-split counts, add-one) | {ul:.4f} | {math.exp(ul):.2f} |

That is {ml / math.log(2) / r["held_bytes_per_token"]:.3f} bits per byte of held-out source
for the model.

## Samples

Greedy, {a["sample_tokens"]} new tokens, `transformers` `generate` in float32:

{samples}

## Limitations

Tiny and trained on 10 MB of one codebase for under an hour on one CPU core: it completes
syntax and common idioms of the standard library, repeats itself, invents names, and writes
code that rarely runs. No conversations, instructions or natural-language text beyond
docstrings and comments were in the data. Context past {a["seq_len"]} tokens was never
trained.

## Reproduce

From the repository root, with Python {python} (the corpus is this
interpreter's standard library), torch {torch.__version__}:

    {reproduce}

(`--max-minutes` stops training early on a machine too slow to finish the steps in time.)

The run that produced this checkpoint was `{run_command}`{calibrated}.
Data order and initialization are seeded, so on the same CPU and library versions the run is
repeatable; other hardware gives slightly different weights.
"""


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="checkpoint folder to write")
    p.add_argument("--max-minutes", type=float, default=50.0,
                   help="wall-clock budget of the training loop; it then evaluates and saves")
    p.add_argument("--max-steps", type=int, default=None,
                   help="optimizer steps (default: as many as fit in --max-minutes)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--num-layers", type=int, default=6)
    p.add_argument("--num-heads", type=int, default=4)
    p.add_argument("--num-kv-heads", type=int, default=2)
    p.add_argument("--intermediate-size", type=int, default=768)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup-steps", type=int, default=200)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--probe-windows", type=int, default=32,
                   help="held-out windows scored at each periodic evaluation")
    p.add_argument("--sample-tokens", type=int, default=48)
    return p.parse_args(argv)


if __name__ == "__main__":
    train(parse_args())
