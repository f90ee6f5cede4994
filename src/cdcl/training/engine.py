"""The one training engine for every method: loaders, EMA teacher, AMP, clipping, validation, checkpoints.

Re-running the same command on a run folder resumes from ``last.pt``: batches, augmentations and anchor
sampling are seeded by the iteration, and the CPU random state (dropout) is restored from the checkpoint, so on
CPU in deterministic mode a resumed run ends with the same weights as an uninterrupted one (the CUDA random
state is not saved: a GPU resume is not exact). Under ``torchrun`` the student is wrapped in
DistributedDataParallel (the EMA teacher stays outside it); without a launcher it is one plain process.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import time
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from cdcl import __version__
from cdcl.checkpoint import lean_payload, load_checkpoint, save_checkpoint
from cdcl.config import Config, config_from_dict, dump_config
from cdcl.data import load_dataset, require_masks
from cdcl.data.loaders import LabeledSet, UnlabeledSet, stream_loader
from cdcl.data.splits import read_split_file
from cdcl.data.stain import StainNormalizer, fit_reference
from cdcl.errors import CdclError, squashed
from cdcl.inference.window import foreground_of, sliding_window_probability, windows_per_batch
from cdcl.instances.postprocess import PostprocessParams, instances_from_maps, tune_params
from cdcl.instances.sizes import nucleus_diameter
from cdcl.io import complete_lines, ensure_writable_dir, remove_leftover_temporaries, write_text_atomic
from cdcl.methods import build_method
from cdcl.methods.losses import ema_alpha
from cdcl.metrics import aji
from cdcl.models import build_model
from cdcl.runtime import amp_dtype, resolve_device, seed_everything
from cdcl.viz import plot_training_curves
from cdcl.vocab import OPTIMIZERS, SCHEDULES, spoken

log = logging.getLogger(__name__)

RUN_FILES = ("last.pt", "best.pt", "metrics.jsonl", "config.yaml", "curves.png")  # what a run folder holds


@dataclass
class Splits:
    labeled: list
    unlabeled: list
    val: list


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device_name: str) -> DistInfo:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); otherwise a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        cuda = device_name != "cpu" and torch.cuda.is_available()
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def config_folder(key: str, value: str, hint: str) -> Path:
    """The folder a config value names, resolved against the current directory (an empty value would silently
    mean the current directory); CdclError naming the key when it is unset or not an existing folder."""
    if not value:
        raise CdclError(f"config key '{key}' is not set ({hint})")
    path = Path(value).expanduser().resolve()
    if not path.is_dir():
        raise CdclError(f"config key '{key}': {'not a folder' if path.exists() else 'folder not found'} ({hint})", path)
    return path


def extra_unlabeled(folder: str) -> list:
    """Every image of ``data.unlabeled_root`` as an unlabeled item, named ``unlabeled:<stem>``: the lab's own tiles
    beside labels from another dataset, which a split of one dataset cannot list."""
    if not folder:
        return []
    root = config_folder("data.unlabeled_root", folder, "a folder holding images/, e.g. written by `cdcl tiles`")
    items = load_dataset(root, "folder")
    return [replace(it, name=f"unlabeled:{it.name}", mask=None) for it in items]


def load_splits(config: Config, needs_unlabeled: bool) -> Splits:
    """Items named by the split folder; the labeled list must be non-empty, every labeled item annotated, and no
    validation item cut from an image trained on."""
    d = config.data
    root = config_folder("data.root", d.root, "the dataset folder")
    split_dir = config_folder("data.split_dir", d.split_dir, "write one with `cdcl split`")
    dataset = load_dataset(root, d.format)

    def read(name: str, required: bool) -> list:
        path = split_dir / name
        if not path.is_file():
            if required:
                raise CdclError("split file not found", path)
            return []
        return dataset.subset(read_split_file(path, dataset))

    labeled = read("labeled.txt", True)
    if not labeled:
        raise CdclError("labeled split is empty: nothing to train on", split_dir / "labeled.txt")
    for name, items in (("labeled.txt", labeled), ("val.txt", read("val.txt", False))):
        require_masks(items, split_dir / name)
    unlabeled = read("unlabeled.txt", False) + extra_unlabeled(d.unlabeled_root)
    if needs_unlabeled and not unlabeled:
        raise CdclError(
            f"method '{config.method.name}' needs unlabeled items but the list is empty", split_dir / "unlabeled.txt"
        )
    val = read("val.txt", False)
    seen = {it.image_path for it in labeled + unlabeled}
    leaked = sorted(it.name for it in val if it.image_path in seen)
    if leaked:
        raise CdclError(
            f"item '{leaked[0]}' is also trained on (its image is in labeled.txt or unlabeled.txt; "
            f"{len(leaked)} such): validation needs images the model has not seen",
            split_dir / "val.txt",
        )
    return Splits(labeled, unlabeled, val)


def lr_factor(step: int, config: Config) -> float:
    """Linear warm-up, then poly (power 0.9), cosine or constant decay over the run."""
    o, total = config.optim, config.train.iterations
    if o.warmup_iters > 0 and step < o.warmup_iters:
        return (step + 1) / o.warmup_iters
    progress = min(1.0, step / max(1, total))
    if o.schedule == "poly":
        return (1.0 - progress) ** 0.9
    if o.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if o.schedule == "constant":
        return 1.0
    raise CdclError(f"optim.schedule must be {spoken(SCHEDULES)}")


def build_optimizer(model: nn.Module, config: Config) -> torch.optim.Optimizer:
    o = config.optim
    params = [p for p in model.parameters() if p.requires_grad]
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay, nesterov=True)
    if o.name == "adamw":
        return torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay)
    raise CdclError(f"optim.name must be {spoken(OPTIMIZERS, quote=chr(39))}")


@torch.no_grad()
def update_ema(teacher: nn.Module, student: nn.Module, step: int, decay: float) -> None:
    """teacher = alpha * teacher + (1 - alpha) * student for parameters and float buffers (BN statistics)."""
    alpha = ema_alpha(step, decay)
    t_params = [p for p in teacher.parameters()] + [b for b in teacher.buffers() if b.dtype.is_floating_point]
    s_params = [p for p in student.parameters()] + [b for b in student.buffers() if b.dtype.is_floating_point]
    torch._foreach_mul_(t_params, alpha)
    torch._foreach_add_(t_params, s_params, alpha=1.0 - alpha)
    for tb, sb in zip(teacher.buffers(), student.buffers()):
        if not tb.dtype.is_floating_point:
            tb.copy_(sb)


def stain_reference(config: Config, labeled: list) -> StainNormalizer | None:
    """The stain normalisation of ``data.stain_norm``, its reference fitted on the labeled images (None: off)."""
    method = config.data.stain_norm
    if method == "none":
        return None
    where = Path(config.data.split_dir).expanduser().resolve() / "labeled.txt"
    return fit_reference(method, (it.image for it in labeled), where)


@torch.no_grad()
def predict_probabilities(
    model: nn.Module, items: list, config: Config, device: torch.device, stain: StainNormalizer | None = None
) -> list[np.ndarray]:
    """Whole-image prediction maps by sliding window (val images are never tile-cropped), stain-normalised as the
    training images are."""
    was_training = model.training
    model.eval()
    i = config.infer
    batch_size = windows_per_batch(None, i.batch_size, device)
    probs = [
        sliding_window_probability(
            model,
            it.image,
            window=i.window,
            overlap=i.overlap,
            batch_size=batch_size,
            device=device,
            amp=config.train.amp and device.type == "cuda",
            stain=stain,
        )
        for it in items
    ]
    model.train(was_training)
    return probs


def pooled_dice(probs: list[np.ndarray], items: list) -> float:
    inter = total = 0
    for prob, item in zip(probs, items):
        pred, gt = foreground_of(prob) > 0.5, item.instances > 0
        inter += int(np.count_nonzero(pred & gt))
        total += int(pred.sum() + gt.sum())
    return 1.0 if total == 0 else 2.0 * inter / total


def all_finite(model: nn.Module) -> bool:
    """Parameters and float buffers alike: a NaN batch-norm statistic makes every prediction NaN too."""
    values = [t.detach().float().abs().sum() for t in model.state_dict().values() if t.is_floating_point()]
    return bool(torch.stack(values).isfinite().all())


class Trainer:
    """Owns the run folder, the models and the loop. ``fit()`` trains (or resumes) to the configured length."""

    def __init__(self, config: Config, out_dir: str | Path, progress: bool | None = None) -> None:
        self.config, self.out = config, Path(out_dir)
        self.dist = init_distributed(config.train.device)
        device = resolve_device(config.train.device)
        if device.type == "cuda" and self.dist.enabled:
            device = torch.device("cuda", self.dist.local_rank)
            torch.cuda.set_device(device)
        self.device = device
        self.progress = progress
        seed_everything(config.train.seed, config.train.deterministic)
        if self.dist.main:
            ensure_writable_dir(self.out)
        self.method = build_method(config.method, config.model.instances)
        self.splits = load_splits(config, self.method.uses_unlabeled)
        # the training nuclei's typical diameter (px at data.mpp): what `--mpp auto` compares predicted nuclei to
        self.nucleus_diameter = nucleus_diameter(it.instances for it in self.splits.labeled)
        self.stain = stain_reference(config, self.splits.labeled)
        self.student = build_model(config.model).to(device)
        self.teacher = copy.deepcopy(self.student).requires_grad_(False)
        self.optimizer = build_optimizer(self.student, config)
        self.amp = amp_dtype(device) if config.train.amp else None
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp == torch.float16)
        self.step, self.best, self.best_step, self.skipped = 0, -1.0, -1, 0
        self.postprocess: dict | None = None
        self.predicted_diameter: float | None = None  # the same, of the nuclei its weights predict on val
        self.complete = False

    # ---- checkpoints -------------------------------------------------------------------------------
    def _payload(self) -> dict[str, Any]:
        cfg = self.config
        return {
            "cdcl_version": __version__,
            "config": cfg.to_dict(),
            "step": self.step,
            "complete": self.complete,
            "predict_with": "teacher" if cfg.train.eval_model == "ema" else "student",
            "weights": {"student": self.student.state_dict(), "teacher": self.teacher.state_dict()},
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "method_state": self.method.state_dict(),
            "rng": {"torch": torch.get_rng_state()},
            "best": {self.config.train.select_by: self.best, "step": self.best_step},
            "skipped": self.skipped,
            "postprocess": self.postprocess,
            "mpp": cfg.data.mpp,
            "nucleus_diameter": self.nucleus_diameter,
            "predicted_nucleus_diameter": self.predicted_diameter,
            "stain": None if self.stain is None else self.stain.to_dict(),
        }

    def save(self, name: str) -> None:
        """``last.pt``: the full training state; ``best.pt``: only what prediction needs (lean_payload)."""
        if not self.dist.main:
            return
        if not (all_finite(self.student) and all_finite(self.teacher)):
            raise CdclError(f"refusing to save {name}: weights are not finite (earlier checkpoints kept)", self.out)
        payload = self._payload()
        save_checkpoint(self.out / name, lean_payload(payload) if name == "best.pt" else payload)

    def resume(self) -> None:
        """Continue from last.pt when the run folder has one; refuse a checkpoint of another model."""
        path = self.out / "last.pt"
        if self.dist.main:
            for name in RUN_FILES:
                remove_leftover_temporaries(self.out / name)
        if not path.exists():
            return
        payload = load_checkpoint(path)
        try:  # through config_from_dict, so a file from before a model key existed compares with its old value
            stored = config_from_dict(payload["config"]).to_dict()["model"]
        except (KeyError, CdclError):
            stored = None
        if stored != self.config.to_dict()["model"]:
            raise CdclError(
                "run folder holds a checkpoint of a different model configuration; use a new --out "
                "or the original config",
                path,
            )
        try:
            self.student.load_state_dict(payload["weights"]["student"])
            self.teacher.load_state_dict(payload["weights"]["teacher"])
            self.optimizer.load_state_dict(payload["optimizer"])
            self.scaler.load_state_dict(payload["scaler"])
            self.method.load_state_dict(payload["method_state"])
            torch.set_rng_state(payload["rng"]["torch"])
        except (KeyError, RuntimeError, ValueError) as exc:
            raise CdclError(f"cannot resume: checkpoint does not match this run ({squashed(exc, 160)})", path) from None
        self.step, self.skipped = payload["step"], payload.get("skipped", 0)
        by = self.config.train.select_by
        self.best, self.best_step = (
            payload["best"].get(by, -1.0),
            payload["best"]["step"] if by in payload["best"] else -1,
        )
        self.postprocess, self.complete = payload.get("postprocess"), payload.get("complete", False)
        self.predicted_diameter = payload.get("predicted_nucleus_diameter")
        log.info("resuming %s at iteration %d", self.out, self.step)

    # ---- logging -------------------------------------------------------------------------------------
    def _metrics_path(self) -> Path:
        return self.out / "metrics.jsonl"

    def _records(self) -> list[dict]:
        path = self._metrics_path()
        if not path.exists():
            return []
        return [json.loads(line) for line in complete_lines(path.read_text()).splitlines() if line.strip()]

    def _trim_metrics(self) -> None:
        """Drop records written after the checkpoint we resume from, so the log matches the weights."""
        if self.dist.main and self._metrics_path().exists():
            kept = [r for r in self._records() if r.get("iteration", 0) <= self.step]
            write_text_atomic(self._metrics_path(), "".join(json.dumps(r) + "\n" for r in kept))

    def _log(self, record: dict) -> None:
        if self.dist.main:
            with open(self._metrics_path(), "a") as fh:
                fh.write(json.dumps(record) + "\n")

    # ---- loop ------------------------------------------------------------------------------------------
    def _loaders(self):
        d, seed = self.config.data, self.config.train.seed
        kw = {
            "start_batch": self.step,
            "num_workers": d.num_workers,
            "rank": self.dist.rank,
            "world_size": self.dist.world_size,
        }
        lab = stream_loader(
            LabeledSet(self.splits.labeled, self.config.augment, self.config.model.instances, self.stain),
            d.batch_size,
            seed=seed,
            **kw,
        )
        unl = None
        if self.method.uses_unlabeled:
            unl = stream_loader(
                UnlabeledSet(self.splits.unlabeled, self.config.augment, self.method.strong_views, self.stain),
                d.unlabeled_batch_size,
                seed=seed + 1,
                **kw,
            )
        return lab, unl

    def validate(self) -> dict[str, float] | None:
        """Pooled Dice of the validation images, and their mean AJI with the default post-processing when the
        checkpoint is chosen by AJI (the instances are what a user gets; Dice peaks before the borders settle)."""
        if not self.splits.val or not self.dist.main:
            return None
        model = self.eval_net
        probs = predict_probabilities(model, self.splits.val, self.config, self.device, self.stain)
        scores = {"dice": pooled_dice(probs, self.splits.val)}
        if self.config.train.select_by == "aji":
            labels = [instances_from_maps(p, PostprocessParams()) for p in probs]
            scores["aji"] = float(np.mean([aji(it.instances, lab)["aji"] for it, lab in zip(self.splits.val, labels)]))
        return scores

    def fit(self) -> dict[str, Any]:
        cfg = self.config
        self.resume()
        if self.complete and self.step >= cfg.train.iterations:
            log.info("run already complete (%d iterations): %s", self.step, self.out / "best.pt")
            return self.summary()
        self._trim_metrics()
        if self.dist.main:
            write_text_atomic(self.out / "config.yaml", dump_config(cfg))
        student = self.student
        if self.dist.enabled:
            student = nn.parallel.DistributedDataParallel(self.student, find_unused_parameters=True)
        lab_iter, unl_iter = self._loaders()
        sums: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), device=self.device))
        counts: dict[str, int] = defaultdict(int)  # terms that start after warm-up are averaged over their own steps
        n_images, t0, n_steps = 0, time.perf_counter(), 0
        self.student.train()
        # closed (its line ended) before any error propagates, so the error is stderr's own last line
        with tqdm(
            total=cfg.train.iterations,
            initial=self.step,
            desc=f"train {cfg.method.name}",
            unit="it",
            disable=not self.dist.main if self.progress is None else not (self.progress and self.dist.main),
            dynamic_ncols=True,
        ) as bar:
            while self.step < cfg.train.iterations:
                labeled = {k: v.to(self.device, non_blocking=True) for k, v in next(lab_iter).items()}
                unlabeled = None
                if unl_iter is not None:
                    unlabeled = {k: v.to(self.device, non_blocking=True) for k, v in next(unl_iter).items()}
                lr = cfg.optim.lr * lr_factor(self.step, cfg)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                before = self._state_before_step() if cfg.train.on_nonfinite == "skip" else None
                with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
                    terms = self.method.losses(student, self.teacher, labeled, unlabeled, self.step)
                if self._finite_everywhere(terms["total"]):
                    self.optimizer.zero_grad(set_to_none=True)
                    self.scaler.scale(terms["total"]).backward()
                    if cfg.optim.grad_clip > 0:
                        self.scaler.unscale_(self.optimizer)
                        torch.nn.utils.clip_grad_norm_(self.student.parameters(), cfg.optim.grad_clip)
                    self.scaler.step(self.optimizer)
                    self.scaler.update()
                    update_ema(self.teacher, self.student, self.step, cfg.method.ema_decay)
                    self.step += 1
                    n_steps += 1
                    n_images += labeled["image"].shape[0] + (0 if unlabeled is None else unlabeled["weak"].shape[0])
                    for k, v in terms.items():
                        sums[k] = sums[k] + v.detach().float()
                        counts[k] += 1
                else:
                    self._nonfinite(terms, before)  # counts the step, as a resumed run does
                bar.update(1)
                if (self.step % cfg.train.log_every == 0 or self.step == cfg.train.iterations) and n_steps:
                    elapsed = time.perf_counter() - t0
                    record = {
                        "iteration": self.step,
                        "lr": lr,
                        "images_per_s": n_images / max(elapsed, 1e-9),
                        "s_per_iter": elapsed / n_steps,
                    }
                    record.update(
                        {(k if k.startswith("stat/") else f"loss/{k}"): float(v) / counts[k] for k, v in sums.items()}
                    )
                    bar.set_postfix(loss=f"{record['loss/total']:.3f}")
                    self._log(record)
                    sums.clear()
                    counts.clear()
                    n_images, n_steps, t0 = 0, 0, time.perf_counter()
                if self.step % cfg.train.val_every == 0 or self.step == cfg.train.iterations:
                    self._validate_and_save()
        if self.dist.enabled:
            dist.barrier()
        self._finish()
        return self.summary()

    def _finite_everywhere(self, loss: torch.Tensor) -> bool:
        """Whether the loss is finite on every process: one process skipping a step its peers take would leave
        their gradient all-reduces waiting for it forever."""
        finite = torch.isfinite(loss.detach()).to(torch.int32)
        if self.dist.enabled:
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        return bool(finite)

    def _state_before_step(self) -> tuple[list[torch.Tensor], dict[str, Any]]:
        """What a forward pass changes besides the weights: batch-norm statistics and the method's state (CDCL's
        memory bank). Kept so that a skipped step leaves no trace: a NaN input poisons both before the loss shows it."""
        return [b.detach().clone() for b in self.student.buffers()], self.method.state_dict()

    def _nonfinite(
        self, terms: dict[str, torch.Tensor], before: tuple[list[torch.Tensor], dict[str, Any]] | None
    ) -> None:
        values = ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in terms.items() if not k.startswith("stat/"))
        self.skipped += 1
        where = f"iteration {self.step + 1}"
        if self.config.train.on_nonfinite == "stop" or self.skipped > self.config.train.max_skipped:
            raise CdclError(
                f"non-finite loss at {where} ({values}); stopped, last good checkpoint kept "
                f"(train.on_nonfinite=skip skips such steps)",
                self.out,
            )
        log.warning("skipping %s: non-finite loss (%s); %d skipped so far", where, values, self.skipped)
        buffers, method_state = before
        with torch.no_grad():
            for buffer, saved in zip(self.student.buffers(), buffers):
                buffer.copy_(saved)
        self.method.load_state_dict(method_state)
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1

    def _validate_and_save(self) -> None:
        scores = self.validate()
        if self.dist.main:
            if scores is not None:
                self._log({"iteration": self.step, **{f"val/{k}": v for k, v in scores.items()}})
                if scores[self.config.train.select_by] > self.best:
                    self.best, self.best_step = scores[self.config.train.select_by], self.step
                    self.save("best.pt")
            self.save("last.pt")
            plot_training_curves(self._records(), self.out / "curves.png")
        if self.dist.enabled:
            dist.barrier()

    def _finish(self) -> None:
        """Tune instance thresholds on val for the best weights (stored in best.pt) and for the final ones (stored in
        last.pt, which predicts with them): each checkpoint carries the thresholds of the weights it predicts with."""
        if not self.dist.main:
            return
        best_path = self.out / "best.pt"
        if not best_path.exists():  # no validation split: the final weights are the best we know
            self.save("best.pt")
        if self.config.train.tune_postprocess and self.splits.val:
            best = load_checkpoint(best_path)
            model = copy.deepcopy(self.teacher)
            model.load_state_dict(best["weights"][best["predict_with"]])
            best["postprocess"], score, best["predicted_nucleus_diameter"] = self._tune(model)
            self._log({"iteration": self.step, "val/aji_tuned": score})
            best["complete"] = True
            save_checkpoint(best_path, lean_payload(best))
            self.postprocess, self.predicted_diameter = best["postprocess"], best["predicted_nucleus_diameter"]
            if self.best_step != self.step:  # else the final weights are the best ones
                self.postprocess, score, self.predicted_diameter = self._tune(self.eval_net)
            self._log({"iteration": self.step, "val/aji_tuned_last": score})
        self.complete = True
        self.save("last.pt")
        plot_training_curves(self._records(), self.out / "curves.png")

    @property
    def eval_net(self) -> nn.Module:
        """The weights validated, tuned for and predicted with (``train.eval_model``)."""
        return self.teacher if self.config.train.eval_model == "ema" else self.student

    def _tune(self, model: nn.Module) -> tuple[dict, float, float | None]:
        """Post-processing settings with the best mean AJI on the validation images for ``model``, that AJI, and
        the size of the nuclei ``model`` then finds there: what `--mpp auto` compares with (the model's own
        nuclei at the training resolution, so its bias cancels)."""
        probs = predict_probabilities(model, self.splits.val, self.config, self.device, self.stain)
        params, score = tune_params(probs, [it.instances for it in self.splits.val])
        return params.to_dict(), score, nucleus_diameter(instances_from_maps(p, params) for p in probs)

    def summary(self) -> dict[str, Any]:
        return {
            "out": str(self.out),
            "iterations": self.step,
            f"best_val_{self.config.train.select_by}": self.best,
            "best_step": self.best_step,
            "skipped_steps": self.skipped,
            "postprocess": self.postprocess,
        }


def train(config: Config, out_dir: str | Path, progress: bool | None = None) -> dict[str, Any]:
    """Train (or resume) one run; returns a summary dict."""
    return Trainer(config, out_dir, progress).fit()
