"""One training loop for every method, and for pretraining the base.

    for step in 1..steps:
        loss = mean over grad_accum micro-batches of cross_entropy(model(x), y)   (answer tokens only
               on a task, every token when pretraining)
        clip the gradient norm; AdamW step with lr(step) = warmup, then cosine decay to min_lr
        every eval_every steps: validation loss / accuracy; remember the best trainable weights

A method may act on every step (AdaLoRA's rank budget) or swap the optimizer (paged AdamW, LoRA+)
through its config's `callbacks()` / `optimizer()` hooks (attach.py); a user may add callbacks too.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .data import Task, collate, get_batch


@dataclass
class TrainConfig:
    steps: int = 300  # optimizer steps
    batch_size: int = 32  # sequences per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 1e-3  # peak learning rate
    weight_decay: float = 0.0  # AdamW decoupled decay, on matrices only (not biases, norms, vectors)
    warmup_steps: int = 20  # linear warmup from 0 to lr
    min_lr_ratio: float = 0.1  # cosine decay ends at lr * min_lr_ratio
    grad_clip: float = 1.0  # max global gradient norm (0: no clipping)
    eval_every: int = 100  # evaluate on validation data every this many steps (and at the end)
    eval_examples: int = 256  # validation examples (or batches x batch_size tokens windows) per eval
    keep_best: bool = True  # restore the trainable weights with the best validation loss at the end
    seed: int = 0  # seeds batches, dropout and new parameters: same seed, same run (on the CPU)
    device: str = "auto"  # "auto": cuda when available, else cpu
    progress: bool = True  # tqdm bar
    out_dir: str | None = None  # if set, the best adapter is saved there (save_adapter)


@dataclass
class TrainState:
    """What callbacks see."""
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    config: TrainConfig
    step: int = 0
    loss: torch.Tensor | float = float("nan")  # the last step's training loss, a 0-dim tensor on the model's
    # device: float(state.loss) when a callback needs the number (each such read waits for the GPU)
    history: list = field(default_factory=list)


class Callback:
    """Override what you need; every hook receives the TrainState."""
    def on_train_start(self, state): ...
    def on_before_optimizer_step(self, state): ...  # the gradients of every micro-batch are in p.grad, not yet
    # clipped: a callback may read them or add a regularizer's gradient (AdaLoRA's), which clipping then sees
    def on_step_end(self, state): ...  # after the optimizer step, before the next batch
    def on_eval(self, state, metrics): ...
    def on_train_end(self, state): ...


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of the peak lr at optimizer step `step` (1-based): linear warmup, then cosine."""
    if step <= cfg.warmup_steps:
        return step / max(1, cfg.warmup_steps)
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * cosine


def default_optimizer(model, lr, weight_decay):
    """AdamW over the trainable parameters; decay only on matrices (nanoGPT's rule)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))


# ------------------------------------------------------------------------------ the data a loop sees
class TaskData:
    """Prompt -> answer examples: loss on the answer tokens, accuracy = exact match of every answer
    token under greedy decoding (computed in one teacher-forced pass: with argmax decoding, the
    answer is produced exactly when every answer position's argmax is its target)."""

    def __init__(self, task: Task, block_size: int, pad_id: int):
        self.task, self.block_size, self.pad_id = task, block_size, pad_id

    def batch(self, batch_size, generator):
        rows = torch.randint(len(self.task.train), (batch_size,), generator=generator).tolist()
        return collate([self.task.train[i] for i in rows], self.block_size, self.pad_id)

    @torch.no_grad()
    def evaluate(self, model, split, max_examples, batch_size, device):
        examples = getattr(self.task, split)[:max_examples]
        loss_sum, n_tokens, n_right, sums = 0.0, 0, 0, []
        for i in range(0, len(examples), batch_size):
            x, y = to_device(collate(examples[i:i + batch_size], self.block_size, self.pad_id), device)
            logits, _ = model(x)  # (B, T, V)
            answer = y != -100  # (B, T)
            right = (logits.argmax(-1) == y) | ~answer  # (B, T): every answer position right
            sums.append(torch.stack([F.cross_entropy(logits.float()[answer], y[answer], reduction="sum"),
                                     answer.sum(), right.all(dim=1).sum()]))  # loss, answer tokens, right rows
        for loss, n, right in torch.stack(sums).tolist() if sums else []:  # one host sync per evaluation
            loss_sum, n_tokens, n_right = loss_sum + loss, n_tokens + int(n), n_right + int(right)
        return {"loss": loss_sum / max(1, n_tokens), "accuracy": n_right / max(1, len(examples))}


class CorpusData:
    """Next-token prediction on the pretraining text: random windows of block_size tokens."""

    def __init__(self, train_tokens, val_tokens, block_size):
        self.train_tokens, self.val_tokens, self.block_size = train_tokens, val_tokens, block_size

    def batch(self, batch_size, generator):
        return get_batch(self.train_tokens, batch_size, self.block_size, generator)

    @torch.no_grad()
    def evaluate(self, model, split, max_examples, batch_size, device):
        tokens = self.val_tokens if split == "val" else self.train_tokens
        g = torch.Generator().manual_seed(1234)  # the same windows at every evaluation
        losses = []
        for _ in range(max(1, max_examples // batch_size)):
            x, y = to_device(get_batch(tokens, batch_size, self.block_size, g), device)
            losses.append(model(x, y)[1].float())
        losses = torch.stack(losses).tolist()  # one host sync per evaluation, not one per batch
        return {"loss": sum(losses) / len(losses)}


def to_device(batch, device):
    """(x, y) on `device`. To a GPU through pinned memory with non_blocking: a copy from ordinary (pageable) host
    memory would make Python wait for every kernel queued before it, a host sync per batch."""
    device = torch.device(device)  # callers pass "cpu" as well as torch.device("cpu")
    if device.type != "cuda":
        return tuple(t.to(device) for t in batch)
    return tuple(t.pin_memory().to(device, non_blocking=True) for t in batch)


# ------------------------------------------------------------------------------ measuring memory
class SavedTensorMeter:
    """Bytes of the activations autograd keeps for backward: every tensor saved by the forward pass,
    counted once per storage, parameters and buffers excluded (they are counted as weights)."""

    def __init__(self, model):
        self.param_storages = {t.untyped_storage().data_ptr()
                               for t in [*model.parameters(), *model.buffers()]}
        self.storages = {}

    def pack(self, t):
        s = t.untyped_storage()
        if s.data_ptr() not in self.param_storages:
            self.storages[s.data_ptr()] = s.nbytes()
        return t

    @property
    def bytes(self):
        return sum(self.storages.values())


def tensor_memory(model, optimizer):
    """Bytes held by weights (each storage once), gradients and optimizer state."""
    weights = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in model.parameters()}
    for b in model.buffers():
        weights[b.untyped_storage().data_ptr()] = b.untyped_storage().nbytes()
    grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    opt = sum(v.numel() * v.element_size() for st in optimizer.state.values() for v in st.values()
              if torch.is_tensor(v))
    return {"weights": sum(weights.values()), "grads": grads, "optimizer": opt}


# ------------------------------------------------------------------------------ the loop
def train(model, data, cfg: TrainConfig, callbacks=(), optimizer=None):
    """Train the model's trainable parameters on `data` (a Task, or a CorpusData / TaskData).
    Returns the metrics record (printed as one line when cfg.progress): parameters, memory, speed,
    validation loss, and on a task the test loss and accuracy of the best weights."""
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if cfg.device == "auto" else cfg.device))
    if isinstance(data, Task):
        data = TaskData(data, model.config.block_size, pad_id=model.config.vocab_size - 1)
    torch.manual_seed(cfg.seed)
    model.to(device).train()
    method_config = getattr(model, "minilora_config", None)
    if optimizer is None and method_config is not None:
        optimizer = method_config.optimizer(model, cfg.lr, cfg.weight_decay)
    if optimizer is None:
        optimizer = default_optimizer(model, cfg.lr, cfg.weight_decay)
    for g in optimizer.param_groups:
        g.setdefault("initial_lr", g["lr"])
    if method_config is not None:
        callbacks = [*method_config.callbacks(model), *callbacks]
    state = TrainState(model, optimizer, cfg)
    gen = torch.Generator().manual_seed(cfg.seed)
    use_amp = device.type == "cuda"
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    meter = SavedTensorMeter(model)
    best_loss, best_state, tokens, t_steps = float("inf"), None, 0, 0.0
    for cb in callbacks:
        cb.on_train_start(state)

    # No host sync inside a step: the loss stays a tensor and the clock is read (after a sync) only around the
    # evaluations, so on a GPU Python queues the next step's kernels while the last ones run.
    t0 = _clock(device)
    bar = tqdm(range(1, cfg.steps + 1), disable=not cfg.progress, desc="train", leave=False)
    for step in bar:
        state.step = step
        for g in optimizer.param_groups:
            g["lr"] = g["initial_lr"] * lr_factor(step, cfg)
        loss_value = 0.0
        for _ in range(cfg.grad_accum):
            x, y = to_device(data.batch(cfg.batch_size, gen), device)
            # on the first step, count the activations autograd keeps for backward
            saving = (torch.autograd.graph.saved_tensors_hooks(meter.pack, lambda t: t) if step == 1
                      else contextlib.nullcontext())
            with saving, torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
                loss = model(x, y)[1]  # the logits (B, T, V) are dropped at once: no backward needs them
            (loss / cfg.grad_accum).backward()
            loss_value += loss.detach().double() / cfg.grad_accum
            tokens += x.numel()
        for cb in callbacks:
            cb.on_before_optimizer_step(state)
        if cfg.grad_clip > 0:  # the list is made anew: a callback may replace parameters (AdaLoRA's shrink)
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.grad_clip)
        optimizer.step()
        if step == 1:
            memory = tensor_memory(model, optimizer)  # grads and optimizer state exist now
        optimizer.zero_grad(set_to_none=True)
        state.loss = loss_value
        if cfg.progress and (step % 10 == 0 or step == cfg.steps):  # reading the loss waits for the GPU
            bar.set_postfix(loss=f"{float(loss_value):.3f}")
        for cb in callbacks:
            cb.on_step_end(state)

        if step % cfg.eval_every == 0 or step == cfg.steps:
            t_steps += _clock(device) - t0  # training time: the steps since the last evaluation
            metrics = _evaluate(model, data, "val", cfg, device)
            state.history.append({"step": step, "train_loss": float(loss_value), **metrics})
            for cb in callbacks:
                cb.on_eval(state, metrics)
            if best_state is not None and any(p.shape != best_state[n].shape for n, p in model.named_parameters()
                                              if n in best_state):
                best_loss = float("inf")  # a method reshaped its weights (AdaLoRA's shrink): older bests no longer fit
            if metrics["loss"] < best_loss:
                best_loss = metrics["loss"]
                best_state = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
                if cfg.out_dir and method_config is not None:
                    from .attach import save_adapter
                    save_adapter(model, cfg.out_dir)
            t0 = _clock(device)
    for cb in callbacks:
        cb.on_train_end(state)
    if cfg.keep_best and best_state is not None:
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in best_state:
                    p.copy_(best_state[n])

    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_total = model.num_params() if hasattr(model, "num_params") else sum(p.numel() for p in model.parameters())
    record = {
        "trainable_params": n_train,
        "total_params": n_total,
        "trainable_pct": 100.0 * n_train / n_total,
        "memory_mb": {k: v / 2**20 for k, v in {**memory, "activations": meter.bytes}.items()},
        "s_per_step": t_steps / cfg.steps,
        "tokens_per_s": tokens / t_steps,
        "device": str(device),
        "steps": cfg.steps,
        "history": state.history,
    }
    record["peak_memory_mb"] = (torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda"
                                else sum(record["memory_mb"].values()))
    record["val"] = _evaluate(model, data, "val", cfg, device)
    if isinstance(data, TaskData):
        record["test"] = _evaluate(model, data, "test", cfg, device, max_examples=len(data.task.test))
    if cfg.progress:
        print(summary(record))
    return record


def _clock(device) -> float:
    """perf_counter once the device has done all queued work (CUDA runs asynchronously to Python)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def summary(record) -> str:
    line = (f"trainable {record['trainable_params']:,} ({record['trainable_pct']:.2f}%) | "
            f"memory {record['peak_memory_mb']:.1f} MB | {record['s_per_step'] * 1000:.0f} ms/step | "
            f"{record['tokens_per_s']:,.0f} tok/s | val loss {record['val']['loss']:.3f}")
    if "test" in record:
        line += f" | test loss {record['test']['loss']:.3f} acc {100 * record['test']['accuracy']:.1f}%"
    return line


def evaluate(model, task: Task, split="test", max_examples=None, batch_size=32):
    """Answer loss and greedy exact-match accuracy of `model` on a task split (no training)."""
    device = next(model.parameters()).device
    data = TaskData(task, model.config.block_size, pad_id=model.config.vocab_size - 1)
    cfg = TrainConfig(batch_size=batch_size)
    return _evaluate(model, data, split, cfg, device, max_examples or len(getattr(task, split)))


def _evaluate(model, data, split, cfg, device, max_examples=None):
    was_training = model.training
    model.eval()
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
        out = data.evaluate(model, split, max_examples or cfg.eval_examples, cfg.batch_size, device)
    model.train(was_training)
    return out
