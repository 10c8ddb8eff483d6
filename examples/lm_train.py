"""Train a small causal LM with fused_xent's loss and with the model's own, side by side.

A byte-level BPE tokenizer (32k tokens by default) is trained with ``tokenizers`` on the
Python standard library's own ``.py`` files, which ship with every Python installation; a
Llama-style model (or ``--family qwen2 | mistral | gemma2``) is built from a config with
random weights and trained twice from the same initialisation on the same batches: once
with ``fused_xent.integrations.transformers.patch_model`` (the loss without the logits),
once with ``model(..., labels=...).loss``. The script prints the peak memory and step time
of both side by side, evaluates perplexity forward-only, and writes ``loss_curve.png`` and
``results.json`` into ``--out``.

CPU (a few minutes):   python examples/lm_train.py
GPU:                   python examples/lm_train.py --device cuda --amp bf16 --steps 300 \\
                           --batch-size 16 --seq-len 1024 --hidden 768 --layers 6 --heads 12

Peak memory is the device allocator's peak above what was allocated before the measured
steps (CUDA), or on CPU the growth of the process's peak resident set (Linux), a rougher figure.
On CPU the fused loss runs fused_xent's chunked torch path, which holds up to its chunk budget
(256 MiB) of logits at once: the small CPU default shows equal losses, not a memory saving.
The GPU run (Triton kernels) is the measurement; ``benchmarks/bench_hf.py`` times it.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import sysconfig
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fused_xent.integrations.transformers import patch_model  # noqa: E402

VARIANTS = ("fused", "own")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="lm_train_out", help="folder for the tokenizer, token cache, PNG and JSON")
    p.add_argument("--device", default="cpu")
    p.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none", help="autocast dtype (weights stay fp32)")
    p.add_argument("--family", choices=["llama", "qwen2", "mistral", "gemma2"], default="llama")
    p.add_argument("--vocab-size", type=int, default=32768)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--eval-batches", type=int, default=2)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    args = p.parse_args(argv)
    for name in ("steps", "eval_batches", "batch_size", "seq_len", "hidden", "layers", "heads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.vocab_size < 512:  # the byte-level BPE starts from 256 bytes plus its specials
        p.error(f"--vocab-size must be at least 512 (a byte-level BPE), got {args.vocab_size}")
    return args


def stdlib_sources() -> list[Path]:
    """The standard library's ``.py`` files, tests and third-party packages left out."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "idle_test"}
    return sorted(p for p in root.glob("**/*.py") if not skip & set(p.relative_to(root).parts))


def build_tokenizer(files: list[Path], vocab_size: int, path: Path):
    """A byte-level BPE with ``vocab_size`` tokens trained on ``files``, cached at ``path``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if path.exists():
        tok = Tokenizer.from_file(str(path))
        if tok.get_vocab_size() == vocab_size:
            return tok
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((f.read_text(encoding="utf-8", errors="replace") for f in files), trainer)
    if tok.get_vocab_size() < vocab_size:
        raise RuntimeError(f"the text yields only {tok.get_vocab_size()} BPE tokens, fewer than {vocab_size}")
    tok.save(str(path))
    return tok


def token_stream(tok, files: list[Path], path: Path) -> torch.Tensor:
    """Every file encoded and joined by ``<|endoftext|>``, (n,) int64, cached at ``path``."""
    if path.exists():
        return torch.load(path)
    eot = tok.token_to_id("<|endoftext|>")
    texts = [f.read_text(encoding="utf-8", errors="replace") for f in files]
    ids = [i for enc in tok.encode_batch(texts) for i in [*enc.ids, eot]]
    stream = torch.tensor(ids, dtype=torch.int64)
    torch.save(stream, path)
    return stream


def build_model(args, vocab_size: int):
    import transformers

    configs = {
        "llama": transformers.LlamaConfig,
        "qwen2": transformers.Qwen2Config,
        "mistral": transformers.MistralConfig,
        "gemma2": transformers.Gemma2Config,
    }
    config = configs[args.family](
        vocab_size=vocab_size,
        hidden_size=args.hidden,
        intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        head_dim=args.hidden // args.heads,
        max_position_embeddings=args.seq_len,
        tie_word_embeddings=False,
        use_cache=False,
    )
    torch.manual_seed(args.seed)
    extra = {"attn_implementation": "eager"} if args.family == "gemma2" else {}
    return transformers.AutoModelForCausalLM.from_config(config, **extra).to(args.device)


def windows(stream: torch.Tensor, batch_size: int, seq_len: int, generator: torch.Generator) -> torch.Tensor:
    """``batch_size`` random windows of ``seq_len`` tokens, (B, T) int64."""
    starts = torch.randint(0, stream.numel() - seq_len, (batch_size,), generator=generator)
    return torch.stack([stream[s : s + seq_len] for s in starts.tolist()])


class PeakMemory:
    """Peak bytes allocated above the level at :meth:`reset`: CUDA allocator statistics, or
    on Linux CPUs the peak resident set (``VmHWM``, reset through ``/proc/self/clear_refs``)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            Path("/proc/self/clear_refs").write_text("5")
            self.base = _proc_status_kib("VmRSS") * 1024

    def peak_mib(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            return (torch.cuda.max_memory_allocated() - self.base) / 2**20
        return (_proc_status_kib("VmHWM") * 1024 - self.base) / 2**20


def _proc_status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def train(variant: str, args, train_ids: torch.Tensor, eval_ids: torch.Tensor, vocab_size: int) -> dict:
    """Train one model with ``variant``'s loss; returns the loss curve, timings and memory."""
    device = torch.device(args.device)
    model = build_model(args, vocab_size)
    if variant == "fused":
        patch_model(model)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1, fused=device.type == "cuda")
    warmup = max(1, args.steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps))
    )
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)
    autocast = (lambda: torch.autocast(device.type, dtype=amp)) if amp else nullcontext
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    gen = torch.Generator().manual_seed(args.seed)
    memory = PeakMemory(device)
    losses, step_s = [], []
    model.train()
    for step in tqdm(range(args.steps), desc=f"{variant:>5} loss", unit="step"):
        ids = windows(train_ids, args.batch_size, args.seq_len, gen).to(device)
        if step == 1:  # the first step allocates the optimizer state; measure the steady state
            memory.reset()
        t0 = time.perf_counter()
        with autocast():
            loss = model(input_ids=ids, labels=ids).loss
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        sched.step()
        losses.append(loss.item())  # syncs, so the step time below is complete
        step_s.append(time.perf_counter() - t0)
    peak = memory.peak_mib() if args.steps > 1 else float("nan")

    model.eval()
    gen = torch.Generator().manual_seed(args.seed + 1)
    memory.reset()
    with torch.no_grad(), autocast():  # forward-only: the fused path forms no logits
        eval_losses = [
            model(input_ids=ids, labels=ids).loss.item()
            for ids in (
                windows(eval_ids, args.batch_size, args.seq_len, gen).to(device) for _ in range(args.eval_batches)
            )
        ]
    return {
        "variant": variant,
        "losses": losses,
        "step_ms": 1e3 * statistics.median(step_s[1:] or step_s),
        "peak_train_mib": peak,
        "peak_eval_mib": memory.peak_mib(),
        "eval_loss": statistics.fmean(eval_losses),
        "eval_ppl": math.exp(statistics.fmean(eval_losses)),
    }


def plot(results: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in results:
        label = f"{r['variant']} (peak {r['peak_train_mib']:.0f} MiB, {r['step_ms']:.0f} ms/step)"
        ax.plot(
            range(1, len(r["losses"]) + 1),
            r["losses"],
            label=label,
            lw=1.2,
            ls="-" if r["variant"] == "fused" else "--",
        )
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (nats / token)")
    ax.set_title(title, fontsize=9)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    files = stdlib_sources()
    t0 = time.perf_counter()
    tok = build_tokenizer(files, args.vocab_size, out / f"tokenizer-{args.vocab_size}.json")
    stream = token_stream(tok, files, out / f"tokens-{args.vocab_size}.pt")
    split = int(0.95 * stream.numel())
    print(
        f"tokenizer: {tok.get_vocab_size()} BPE tokens from {len(files)} stdlib files, "
        f"{stream.numel():,} tokens ({time.perf_counter() - t0:.0f} s)"
    )
    results = [train(v, args, stream[:split], stream[split:], tok.get_vocab_size()) for v in args.variants]

    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    title = (
        f"{args.family} d={args.hidden} L={args.layers}, V={tok.get_vocab_size()}, "
        f"B={args.batch_size} T={args.seq_len}, amp={args.amp}, {device}"
    )
    plot(results, out / "loss_curve.png", title)
    record = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "device": device,
        "torch": torch.__version__,
        "command": " ".join([sys.executable, *sys.argv]),
        "args": vars(args),
        "results": results,
    }
    (out / "results.json").write_text(json.dumps(record, indent=1))

    rows = [
        ("peak memory, train step (MiB)", "peak_train_mib", "{:.1f}"),
        ("peak memory, eval forward (MiB)", "peak_eval_mib", "{:.1f}"),
        ("step time, median (ms)", "step_ms", "{:.1f}"),
        ("final training loss", None, "{:.4f}"),
        ("eval perplexity", "eval_ppl", "{:.2f}"),
    ]
    print(f"\n{title}\n{'':32s}" + "".join(f"{r['variant']:>12s}" for r in results))
    for name, key, fmt in rows:
        vals = [fmt.format(r[key] if key else r["losses"][-1]) for r in results]
        print(f"{name:32s}" + "".join(f"{v:>12s}" for v in vals))
    print(f"wrote {out / 'loss_curve.png'} and {out / 'results.json'}")
    return results


if __name__ == "__main__":
    main()
