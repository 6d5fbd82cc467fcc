"""The embedded model's training recipe: a small Mamba1 trained at 512 tokens on language modelling mixed
with the synthetic passkey task at 64-512 tokens, written in the Hugging Face layout the runtime loads.

    python -m extend.train --tokenizer tokenizer.json --data TRAIN_SHARDS... --out models/NAME \
        --d-model 256 --n-layer 8 --steps 4000 --batch-size 64 --seed 0

Runs on CUDA with the mamba_ssm kernels (bf16 autocast, float32 master weights); on CPU for tests.
The weights are stored in bfloat16 (`model.safetensors`) with `config.json` (recording
`training_context_length`) and a copy of the tokenizer.

With `--state-dir DIR --time-limit SECONDS`, a run that reaches the time limit writes its whole training state
(weights, optimiser, every random generator, the early-stopping books, the losses so far) to DIR and exits with
status 75; the same command run again continues from it, exactly as if it had not stopped (a machine that runs
a command for at most a few minutes can train for longer). A finished run deletes the state.
"""

from __future__ import annotations

import argparse
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from runtime import MAMBA1, MambaLM, ModelConfig
from runtime.backend import select_backend
from runtime.checkpoint_writer import save_hf
from runtime.device_copy import to_device
from runtime.init_weights import init_weights
from runtime.tokenizer import Tokenizer

from .objectives import passkey_accuracy
from .passkey import make_batch, minimum_length, parse_templates
from .sources import parse_mixture, parse_sources
from .training_text import TrainingText

PASSKEY_MIN_LENGTH = 64
VALIDATION_FRACTION = 0.02  # of the token stream, held out for the early-stopping check's haystacks
VALIDATION_SAMPLES = 32  # passkey samples per early-stopping check, depths spread over 0-100%
STATE_FILE = "training-state.pt"  # in --state-dir
TIME_LIMIT_EXIT = 75  # EX_TEMPFAIL: the time limit stopped the run; the same command continues it
# flags that say where a run writes, logs or runs, not what it trains: a resumed run may change them
NOT_RECIPE = ("out", "state_dir", "time_limit", "log_every", "device", "backend")


class TimeLimitReached(Exception):
    """The run stopped at --time-limit, its state written to --state-dir."""


def _lr(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


@dataclass
class EarlyStop:
    """Stops training once the task is learned: when held-out retrieval at the training length reaches
    `threshold` at `patience` consecutive checks, the learning rate falls linearly to 0 over `anneal_steps`
    and training ends: a stopping rule that does not depend on the step, which varies from seed to seed, at
    which retrieval is learned (the model card's recipe-runs/early-stop-screen says what it did)."""
    threshold: float
    patience: int
    anneal_steps: int
    passes: int = 0
    stop_step: int | None = None  # set when the threshold has held `patience` times
    anneal_from: float = 0.0  # the learning rate when annealing began

    def check(self, step: int, retrieved: float, lr: float) -> None:
        self.passes = self.passes + 1 if retrieved >= self.threshold else 0
        if self.stop_step is None and self.passes >= self.patience:
            self.stop_step, self.anneal_from = step + self.anneal_steps, lr

    def lr(self, step: int, scheduled: float) -> float:
        if self.stop_step is None:
            return scheduled
        return self.anneal_from * max(0, self.stop_step - step) / self.anneal_steps


def passkey_length_limit(step: int, args, shortest: int) -> int:
    """The longest passkey sample at `step`: from `shortest` + 64 up to the full training length over the
    first `curriculum` fraction of the steps, so copying is found across a short haystack first."""
    ramp = int(args.curriculum * args.steps)
    start = min(args.length + 1, shortest + 64)
    if step >= ramp:
        return args.length + 1
    return start + (args.length + 1 - start) * step // ramp


WEIGHT_DECAY = 0.1
SSM_PARAMETERS = (".A_log", ".D", ".dt_proj.bias")  # the SSM's decay spectrum, skip gain and Δ offset


def make_optimiser(model: MambaLM, lr: float, ssm_weight_decay: float) -> torch.optim.AdamW:
    """AdamW with weight decay WEIGHT_DECAY, and `ssm_weight_decay` on the SSM parameters (mamba_ssm exempts
    A_log and D). Their gradients are small, so the decay moves them: it shrinks A_log (|A| of the faster states
    towards 1) and pulls the Δ bias towards 0 (Δ towards softplus(0) = 0.69), which raises the smallest Δ: the
    longest memory a channel keeps, its input-dependent part aside, is set by this decay more than by the
    initial range (the model card has the measured effect)."""
    named = list(model.named_parameters())
    ssm = [p for name, p in named if name.endswith(SSM_PARAMETERS)]
    rest = [p for name, p in named if not name.endswith(SSM_PARAMETERS)]
    return torch.optim.AdamW([{"params": rest, "weight_decay": WEIGHT_DECAY},
                              {"params": ssm, "weight_decay": ssm_weight_decay}], lr=lr, betas=(0.9, 0.95))


def train(args) -> tuple[MambaLM, list[float]]:
    """Trains and saves; returns the model and the training loss of every step."""
    device = torch.device(args.device)
    tokenizer = Tokenizer(args.tokenizer)
    config = ModelConfig(arch=MAMBA1, d_model=args.d_model, n_layer=args.n_layer, vocab_size=tokenizer.vocab_size,
                         d_state=args.d_state, training_context_length=args.length)
    with torch.device(device):
        model = MambaLM(config, select_backend(args.backend, device))
    init_weights(model, args.seed, args.dt_min, args.dt_max)
    model.train()
    specs = parse_sources(args.data)
    generator = torch.Generator().manual_seed(args.seed)
    text = TrainingText.read(specs, parse_mixture(args.mixture, specs), tokenizer, generator, args.repeated_haystacks)
    templates = parse_templates(args.templates)
    early_stop = None
    if args.stop_at_retrieval:
        early_stop = EarlyStop(args.stop_at_retrieval, args.stop_patience, args.anneal_steps)
        # validation haystacks are never trained on
        text, validation = text.split(VALIDATION_FRACTION, torch.Generator().manual_seed(args.seed))
    print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters; {text.tokens / 1e6:.1f}M training "
          f"tokens ({', '.join(f'{n} {len(s) / 1e6:.1f}M' for n, s in text.streams.items())})")
    rng = random.Random(args.seed)

    optimiser = make_optimiser(model, args.lr, args.ssm_weight_decay)
    generators = {"text": text.generator, **({"validation": validation.generator} if early_stop else {})}
    state = TrainingState(args, model, optimiser, rng, generators, early_stop)
    first_step, losses_before = state.load() if state.path is not None and state.path.exists() else (0, [])
    half = args.batch_size // 2
    # some haystack in every sample, in every template
    shortest = max(PASSKEY_MIN_LENGTH, max(minimum_length(tokenizer, t) for t in templates) + 8)
    start = time.perf_counter()
    losses: list[torch.Tensor] = []
    for step in range(first_step, args.steps):
        lr = _lr(step, args.steps, args.lr, args.warmup)
        if early_stop is not None:
            if early_stop.stop_step is None and step >= args.warmup and step % args.check_every == 0:
                model.eval()
                retrieved, _ = passkey_accuracy(model, tokenizer, validation.haystack, args.length,
                                                VALIDATION_SAMPLES, None, seed=step, batch_size=VALIDATION_SAMPLES)
                model.train()
                early_stop.check(step, retrieved, lr)
                print(f"step {step:5d}  held-out retrieval {retrieved:.2f} at {args.length} tokens"
                      + (f": annealing to step {early_stop.stop_step}" if early_stop.stop_step else ""), flush=True)
            if step == early_stop.stop_step:
                break
            lr = early_stop.lr(step, lr)
        for group in optimiser.param_groups:
            group["lr"] = lr
        windows = to_device(text.windows(args.length + 1, half), device)  # (half, L+1)
        length = rng.randint(shortest, passkey_length_limit(step, args, shortest))
        passkey = make_batch(tokenizer, length, half, rng, text.haystack, [rng.random() for _ in range(half)],
                             templates)
        tokens, answer_mask = to_device(passkey.tokens, device), to_device(passkey.answer_mask, device)  # (half, L)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            text_loss = F.cross_entropy(model.logits(model.hidden_states_only(windows[:, :-1])).flatten(0, 1),
                                        windows[:, 1:].flatten())
            logits = model.logits(model.hidden_states_only(tokens[:, :-1]))  # (half, L-1, V)
            targets, answer = tokens[:, 1:], answer_mask[:, 1:]
            all_ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view_as(targets)
            # the answer tokens' mean, as a masked sum: indexing by the mask would wait for the device
            answer_ce = (all_ce * answer).sum() / answer.sum()
            passkey_loss = all_ce.mean() + args.answer_weight * answer_ce
        loss = text_loss + passkey_loss
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimiser.step()
        losses.append(loss.detach())  # read back at the end: a read each step would make the host wait for it
        last = step == args.steps - 1 or (early_stop is not None and step + 1 == early_stop.stop_step)
        if step % args.log_every == 0 or last:
            hits = ((logits.argmax(-1) != targets) & answer).sum(1) == 0
            print(f"step {step:5d}  lm {text_loss.item():.3f}  passkey answer ce {answer_ce.item():.3f}  "
                  f"retrieved {hits.float().mean().item():.2f} at {length} tokens  {time.perf_counter() - start:.0f}s",
                  flush=True)
        if not last and args.time_limit is not None and time.perf_counter() - start >= args.time_limit:
            state.save(step + 1, losses_before + _floats(losses))
            raise TimeLimitReached(f"stopped after step {step} at the time limit ({args.time_limit:g} s); the state "
                                   f"is in {state.path}: the same command continues from it")
    model.eval()
    save_hf(model, Path(args.tokenizer), tokenizer.eos_token_id, args.out)
    if state.path is not None:
        state.path.unlink(missing_ok=True)
    return model, losses_before + _floats(losses)


def _floats(losses: list[torch.Tensor]) -> list[float]:
    return torch.stack(losses).tolist() if losses else []


@dataclass
class TrainingState:
    """Everything a run's next step depends on, written to and read from --state-dir (None: no state)."""
    args: argparse.Namespace
    model: MambaLM
    optimiser: torch.optim.Optimizer
    rng: random.Random  # the passkey samples' draws
    generators: dict[str, torch.Generator]  # the training text's draws, and the validation haystacks'
    early_stop: EarlyStop | None

    @property
    def path(self) -> Path | None:
        return None if self.args.state_dir is None else self.args.state_dir / STATE_FILE

    def save(self, next_step: int, losses: list[float]) -> None:
        assert self.path is not None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        written = self.path.with_suffix(".partial")  # renamed once whole: a run killed while writing loses nothing
        torch.save({"recipe": _recipe(self.args), "next_step": next_step, "losses": losses,
                    "model": self.model.state_dict(), "optimiser": self.optimiser.state_dict(),
                    "rng": self.rng.getstate(), "generators": {k: g.get_state() for k, g in self.generators.items()},
                    "early_stop": None if self.early_stop is None else vars(self.early_stop)}, written)
        written.replace(self.path)

    def load(self) -> tuple[int, list[float]]:
        """Restores the saved state; returns the step to run next and the losses of the steps before it."""
        assert self.path is not None
        # our own file (weights_only=False: it holds the generators' states)
        saved = torch.load(self.path, map_location=next(self.model.parameters()).device, weights_only=False)
        changed = {k: (v, saved["recipe"].get(k)) for k, v in _recipe(self.args).items() if saved["recipe"].get(k) != v}
        if changed:
            raise ValueError(f"{self.path} was written by a run with other flags: "
                             + ", ".join(f"--{k.replace('_', '-')} {old} (now {new})"
                                         for k, (new, old) in changed.items()))
        self.model.load_state_dict(saved["model"])
        self.optimiser.load_state_dict(saved["optimiser"])
        self.rng.setstate(saved["rng"])
        for name, generator in self.generators.items():
            generator.set_state(saved["generators"][name])
        if self.early_stop is not None:
            vars(self.early_stop).update(saved["early_stop"])
        print(f"resumed from {self.path} at step {saved['next_step']}", flush=True)
        return saved["next_step"], saved["losses"]


def _recipe(args: argparse.Namespace) -> dict[str, str]:
    """The flags that make the run what it is, as text."""
    return {k: str(v) for k, v in vars(args).items() if k not in NOT_RECIPE}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m extend.train", description=__doc__.splitlines()[0])
    p.add_argument("--tokenizer", required=True, type=Path)
    p.add_argument("--data", nargs="+", required=True,
                   help="text sources (extend.sources): files or folders, NAME=PATH[@train|@eval], filler")
    p.add_argument("--mixture", help="weight per source, e.g. books=3,docs=1 (default 1 each): a language-model "
                                     "window or passkey haystack comes from a source chosen by weight (the filler "
                                     "gives haystacks only)")
    p.add_argument("--templates", default="line", help="passkey templates trained on (comma-separated, or all)")
    p.add_argument("--repeated-haystacks", type=float, default=0.0,
                   help="fraction of the text haystacks that cycle a short span of their source (0-1)")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--n-layer", type=int, default=8)
    p.add_argument("--d-state", type=int, default=16)
    p.add_argument("--length", type=int, default=512, help="training context length")
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--batch-size", type=int, default=64, help="half language modelling, half passkey")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--answer-weight", type=float, default=3.0, help="extra weight of the passkey answer tokens")
    p.add_argument("--curriculum", type=float, default=0.3,
                   help="fraction of the steps over which the longest passkey sample grows to --length (0: none)")
    p.add_argument("--ssm-weight-decay", type=float, default=WEIGHT_DECAY,
                   help="AdamW weight decay of A_log, D and the Δ bias (the other weights: 0.1)")
    p.add_argument("--dt-min", type=float, default=0.001, help="smallest initial Δ (longest initial memory)")
    p.add_argument("--dt-max", type=float, default=0.1, help="largest initial Δ")
    p.add_argument("--stop-at-retrieval", type=float, default=0.0,
                   help="end training once held-out passkey retrieval at --length reaches this fraction "
                        "(0: train all --steps)")
    p.add_argument("--stop-patience", type=int, default=2, help="consecutive checks the threshold must hold")
    p.add_argument("--check-every", type=int, default=100, help="steps between early-stopping checks")
    p.add_argument("--anneal-steps", type=int, default=200,
                   help="after early stopping, steps over which the learning rate falls linearly to 0")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backend", default="auto")
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--state-dir", type=Path,
                   help="where a run stopped by --time-limit writes its training state, and a run continues from it")
    p.add_argument("--time-limit", type=float,
                   help="seconds after which the run writes its state to --state-dir and exits with status "
                        f"{TIME_LIMIT_EXIT}, to be continued by the same command")
    args = p.parse_args(argv)
    if args.time_limit is not None and (args.state_dir is None or args.time_limit < 0):
        p.error(f"--time-limit {args.time_limit} needs --state-dir and must not be negative")
    if not 0 <= args.stop_at_retrieval <= 1 or args.stop_patience < 1 or args.anneal_steps < 1:
        p.error(f"--stop-at-retrieval {args.stop_at_retrieval} must lie in [0, 1], --stop-patience "
                f"{args.stop_patience} and --anneal-steps {args.anneal_steps} must be at least 1")
    if not 0 < args.dt_min <= args.dt_max:
        p.error(f"--dt-min {args.dt_min} and --dt-max {args.dt_max}: need 0 < dt-min <= dt-max")
    if not 0 <= args.repeated_haystacks <= 1:
        p.error(f"--repeated-haystacks {args.repeated_haystacks} must lie in [0, 1]")
    return args


if __name__ == "__main__":
    try:
        train(parse_args())
    except TimeLimitReached as stopped:
        print(stopped, flush=True)
        raise SystemExit(TIME_LIMIT_EXIT) from None
