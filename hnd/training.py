"""The training loop shared by every method: run folder, checkpoints, exact resume, DDP.

A run folder holds ``config.yaml`` (the resolved config), ``metrics.jsonl`` (one JSON line per
epoch), ``last.pt`` and ``best.pt`` (hnd checkpoints with the optimizer, scheduler, epoch,
best value, config and library versions, written atomically) and, at the end,
``result.json`` (test accuracy of the best checkpoint). ``resume=True`` continues from
``last.pt``: every random draw is seeded per epoch (and per image for augmentation), so a
run killed at any point and resumed ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler
from tqdm import tqdm

import hnd
from hnd.checkpoints import read_file, save_checkpoint
from hnd.config import (TrainConfig, apply_overrides, check_saved_run, config_from_dict, dump_config, layered_overrides,
                        method_spec, read_config_file)
from hnd.data import ImageDataset, collate, holdout_split, train_transform, worth_keeping
from hnd.distributed import Dist, all_reduce_sum, barrier, broadcast_flag, setup, sync_batchnorm, teardown
from hnd.errors import HndError
from hnd.files import read_json, write_text
from hnd.image_folders import check_layout
from hnd.registry import ModelSpec
from hnd.evaluation import Accuracy, default_workers, eval_loader, evaluate, evaluate_checkpoint, head_error
from hnd.methods import FROZEN_TAIL_METHODS, Task, build_task, check_input_size, make_optimizer, stage_of
from hnd.precision import AMP_DTYPES, check_amp, keep_fp32_layers, resolve_amp
from hnd.teacher_outputs import CachedViews, TeacherOutputs, cache_key, cached_teacher_outputs, \
    compute_teacher_outputs
from hnd.teachers import split_teacher

# Keys a resumed run may change: they do not alter what is computed.
RESUMABLE_CHANGES = ("epochs", "num_workers", "device", "teacher_cache")


def read_metrics(run: str | os.PathLike) -> list[dict]:
    """The per-epoch lines of a run's ``metrics.jsonl``."""
    path = Path(run) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _last_checkpoint(out: Path) -> dict:
    path = out / "last.pt"
    if not path.is_file():
        raise HndError(f"nothing to resume in {out}: no last.pt there; start the run without --resume")
    ckpt = read_file(path)
    if not isinstance(ckpt, dict) or ckpt.get("format") != "hnd" or "optimizer" not in ckpt:
        raise HndError(f"{path} is not a resumable hnd training checkpoint")
    return ckpt


def resume_config(out: str | os.PathLike, spec: ModelSpec, method: str,
                  config_file: str | os.PathLike | None = None, assignments: list[str] = ()) -> TrainConfig:
    """The config of the run in ``out``, with overrides that do not change the computation
    (``epochs`` to extend a run, ``num_workers``, ``device``); anything else is an error."""
    spec = method_spec(spec, method)
    doc = _last_checkpoint(Path(out))["config"]
    check_saved_run(doc, spec, method, str(out))
    saved = config_from_dict(doc, spec)
    overrides = {k: v for k, v in layered_overrides(config_file, assignments).items() if k not in ("model", "method")}
    config = apply_overrides(saved, overrides)
    changed = [k for k, v in config.to_dict().items() if v != saved.to_dict()[k] and k not in RESUMABLE_CHANGES]
    if changed:
        raise HndError(f"--resume continues the saved config; it cannot change {', '.join(changed)} "
                       f"(only {', '.join(RESUMABLE_CHANGES)})")
    return config


@dataclass
class _Loop:
    """Everything one epoch needs."""

    task: Task
    forward: torch.nn.Module  # task.trained, DDP-wrapped in distributed runs
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    device: torch.device
    dist: Dist
    amp: str  # the run's autocast setting, resolved for the device (never "auto")
    channels_last: bool
    progress: bool

    @property
    def amp_dtype(self) -> torch.dtype | None:
        return AMP_DTYPES[self.amp]


def train_one_epoch(loop: _Loop, loader: DataLoader, epoch: int) -> dict:
    """One pass over ``loader``; returns loss per image, top-1/top-5 (methods with logits),
    images seen by all processes and seconds."""
    task, world = loop.task, loop.dist.world_size
    task.train_mode()
    # DDP averages gradients over processes; a loss summed over the batch must then be scaled
    # by the world size so that the update equals the single-process one for the global batch.
    grad_scale = world if task.summed_loss else 1
    totals = [0.0, 0.0, 0.0, 0.0]  # loss * images, top-1 hits, top-5 hits, images
    start = time.perf_counter()
    bar = tqdm(loader, desc=f"epoch {epoch + 1}", leave=False, disable=not loop.progress, dynamic_ncols=True)
    for batch in bar:
        if batch is None:
            continue
        x, y = batch[0].to(loop.device, non_blocking=True), batch[1].to(loop.device, non_blocking=True)
        keys = batch[2] if len(batch) > 2 else None  # rows of the teacher-output cache (augment_views)
        if loop.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        loop.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(loop.device.type, dtype=loop.amp_dtype or torch.float32,
                            enabled=loop.amp_dtype is not None):
            loss, logits = task.loss(loop.forward, x, y, keys)
        loop.scaler.scale(loss * grad_scale).backward()
        loop.scaler.step(loop.optimizer)
        loop.scaler.update()
        value = loss.item()
        if not math.isfinite(value):
            raise HndError(f"the {task.method} loss became {value} in epoch {epoch + 1}; lower lr "
                           f"(now {loop.optimizer.param_groups[0]['lr']:g}) or check the teacher and data")
        totals[0] += value if task.summed_loss else value * len(y)
        totals[3] += len(y)
        if logits is not None:
            hits = logits.detach().topk(min(5, logits.shape[1]), dim=1).indices == y[:, None]
            totals[1] += hits[:, 0].sum().item()
            totals[2] += hits.any(dim=1).sum().item()
        bar.set_postfix(loss=f"{value / (len(y) if task.summed_loss else 1):.4g}")
    seconds = time.perf_counter() - start
    loss_sum, top1, top5, n = all_reduce_sum(totals, loop.device)
    stats = {"train_loss": loss_sum / max(n, 1), "images": int(n), "seconds": seconds,
             "images_per_s": n / seconds if seconds > 0 else 0.0}
    if task.gives_logits:
        stats.update(train_top1=100 * top1 / max(n, 1), train_top5=100 * top5 / max(n, 1))
    if task.method == "entropic" and task.stage == 1:
        (bits,) = all_reduce_sum([task.bits], loop.device)
        stats["train_bytes_estimate"] = bits / 8 / max(n, 1)  # the prior's rate of the noisy bottleneck
    if task.method == "entropic":
        stats["stage"] = task.stage
    return stats


def _versions() -> dict:
    return {"hnd": hnd.__version__, "torch": str(torch.__version__), "torchvision": str(torchvision.__version__)}


def _prepare_run_folder(out: Path, config: TrainConfig, resume: bool, dist: Dist) -> dict | None:
    """Check the run folder and return the checkpoint to resume. A new run never replaces one
    that has a checkpoint; a folder whose run died before its first checkpoint is reused."""
    if resume:
        return _last_checkpoint(out)
    if (out / "last.pt").exists():
        raise HndError(f"{out} already holds a run; continue it with --resume or choose another --out")
    barrier()  # every process has looked before the main process writes
    if dist.main:
        out.mkdir(parents=True, exist_ok=True)
        write_text(out / "config.yaml", dump_config(config))
        write_text(out / "metrics.jsonl", "")
    return None


def train_or_resume(config: TrainConfig, data: str | os.PathLike, out: str | os.PathLike, *,
                    progress: bool = True, processes: int = 1) -> dict:
    """Make ``out`` hold the finished run of ``config``: start it, continue it from ``last.pt``
    after an interruption, or return the saved result if it is done. A run of another config
    in ``out`` is an error, never overwritten. ``processes`` > 1 trains under torchrun on this
    machine (one process per GPU; gloo on CPU), e.g. a grid cell given several GPUs."""
    out = Path(out)
    if isinstance(processes, bool) or not isinstance(processes, int) or processes < 1:
        raise HndError(f"processes must be a positive integer, got {processes!r}")
    resume = (out / "last.pt").is_file()
    if resume:
        # written by TrainConfig.to_dict; rebuilt, so that keys added since then take their defaults
        saved = config_from_dict(_last_checkpoint(out)["config"]).to_dict()
        changed = [k for k, v in config.to_dict().items() if saved.get(k) != v and k not in RESUMABLE_CHANGES]
        if changed:
            raise HndError(f"{out} holds a run with other settings ({', '.join(changed)}); delete it or choose "
                           f"another folder")
        result_file = out / "result.json"
        if result_file.is_file() and saved["epochs"] == config.epochs:
            return read_json(result_file)
    if processes == 1:
        return fit(config, data, out, resume=resume, progress=progress)
    return _torchrun(config, data, out, resume, processes)


def finished_run(config: TrainConfig, folder: str | os.PathLike, data: str | os.PathLike) -> dict:
    """The result of the finished run of ``config`` in ``folder``, trained elsewhere (e.g. a
    teacher shipped with the project), with its best checkpoint tested again on ``data``'s test
    split: checked here, not trusted."""
    folder = Path(folder)
    if not (folder / "result.json").is_file() or not (folder / "best.pt").is_file():
        raise HndError(f"{folder} holds no finished run (result.json and best.pt)")
    saved = read_config_file(folder / "config.yaml")
    mine = config.to_dict()
    changed = [k for k, v in mine.items() if k not in RESUMABLE_CHANGES and saved.get(k, v) != v]
    if changed:
        raise HndError(f"the run in {folder} was trained with other settings ({', '.join(changed)}) than asked")
    result = read_json(folder / "result.json")
    tested = evaluate_checkpoint(None, config.method, folder / "best.pt", data, student_only=True,
                                 batch_size=config.eval_batch_size, num_workers=config.num_workers)
    return {**result, "trained_test": result["test"], "test": tested["student"], "checkpoint": str(folder / "best.pt")}


def _torchrun(config: TrainConfig, data: str | os.PathLike, out: Path, resume: bool, processes: int) -> dict:
    """Run ``hnd train`` under ``torchrun --standalone`` with ``processes`` workers; its result."""
    out.mkdir(parents=True, exist_ok=True)
    launch = out / "launch.yaml"  # the whole config: the workers resolve exactly this one
    write_text(launch, dump_config(config))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes),
               "-m", "hnd", "train", str(config.spec), "--method", config.method, "--config", str(launch),
               "--data", str(data), "--out", str(out), "--no-progress"] + (["--resume"] if resume else [])
    log = out / "torchrun.log"  # the workers' output, kept across resumptions
    with open(log, "a") as f:
        rc = subprocess.run(command, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("hnd: error:")]
        raise HndError(f"training under torchrun ({processes} processes) failed: "
                       f"{(errors or lines or [f'exit code {rc}'])[-1]} (all of it in {log})")
    return read_json(out / "result.json")


def fit(config: TrainConfig, data: str | os.PathLike, out: str | os.PathLike, *, resume: bool = False,
        progress: bool = True) -> dict:
    """Train ``config.model`` with ``config.method`` on ``data`` into run folder ``out``; returns
    the run's result (test accuracy of the best checkpoint). Works in one process or under
    torchrun (DDP: gloo on CPU, NCCL on CUDA)."""
    dist, device = setup(config.device)
    try:
        return _fit(config, Path(data), Path(out), resume, progress, dist, device)
    finally:
        teardown()


def _fit(config: TrainConfig, data: Path, out: Path, resume: bool, progress: bool, dist: Dist,
         device: torch.device) -> dict:
    amp = resolve_amp(config.amp, device)  # auto: bf16 where it is faster (GPU, CPU with AMX)
    check_amp(amp, device)
    layout = check_layout(data)
    if config.selection == "holdout":
        train_samples, select_samples = holdout_split(layout.samples["train"], config.holdout_per_class)
    else:  # the original protocol: select on val, report val
        train_samples, select_samples = layout.samples["train"], layout.samples["val"]
    torch.manual_seed(config.seed)  # fresh heads, autoencoders and replaced classifiers
    task = build_task(config, len(layout.classes))
    check_input_size(task, config.spec.input_size)
    saved = _prepare_run_folder(out, config, resume, dist)
    place_task(task, config, device)
    if config.sync_bn and dist.enabled:
        sync_batchnorm(task.trained if task.method != "entropic" else task.model, device)  # entropic: both stages
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
    start_epoch, best_top1, best_epoch = 0, float("-inf"), 0
    if saved is not None:
        task.model.load_state_dict(saved["state_dict"])
        scaler.load_state_dict(saved["scaler"])
        start_epoch, best_top1, best_epoch = saved["epoch"], saved["best_top1"], saved["best_epoch"]
        if dist.main:  # drop lines of epochs after the checkpoint (they will be redone)
            kept = [m for m in read_metrics(out) if m["epoch"] <= start_epoch]
            write_text(out / "metrics.jsonl", "".join(json.dumps(m) + "\n" for m in kept))
    stage = stage_of(config, start_epoch)
    task.enter_stage(stage)
    optimizer, scheduler = make_optimizer(config, task.trained, stage)
    if saved is not None and saved.get("stage", 1) == stage:  # a new stage starts with a new optimizer
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
    forward = _wrap(task, dist, device)
    workers = default_workers(config.num_workers)
    train_set = ImageDataset(train_samples, train_transform(config.spec, config.transforms, config.resize_size,
                                                            config.decoder),
                             augment=True, seed=config.seed, skip_bad_images=config.skip_bad_images,
                             decoder=config.decoder, views=config.augment_views)
    task.cache = _teacher_cache(config, task, train_set, workers, device)
    if task.cache is not None:  # the views' pixels come from the cache too: no image is decoded again
        train_set = CachedViews(task.cache, [label for _, label in train_samples], config.augment_views,
                                config.decoder, mean=config.spec.teacher.mean, std=config.spec.teacher.std)
    sampler = DistributedSampler(train_set, num_replicas=dist.world_size, rank=dist.rank, shuffle=True,
                                 seed=config.seed)
    pin = device.type == "cuda"
    train_loader = DataLoader(train_set, batch_size=config.batch_size, sampler=sampler, num_workers=workers,
                              collate_fn=collate, pin_memory=pin)
    evaluation = config.eval_transform()
    select_loader = eval_loader(_eval_set(config, select_samples, evaluation), config.eval_batch_size, workers, dist,
                                pin)
    test_loader = eval_loader(_eval_set(config, layout.samples["val"], evaluation), config.eval_batch_size, workers,
                              dist, pin)  # the test split: the dataset's val/
    loop = _Loop(task, forward, optimizer, scaler, device, dist, amp, config.channels_last,
                 progress and dist.main)
    coded = "coded " if task.method == "entropic" else ""
    extra = {"method": config.method, "config": config.to_dict(), "classes": layout.classes,
             "versions": _versions()}

    epochs = tqdm(range(start_epoch, config.epochs), desc=f"{config.method} {config.model}", initial=start_epoch,
                  total=config.epochs, disable=not loop.progress, dynamic_ncols=True)
    for epoch in epochs:
        if patience_spent(config, epoch, best_epoch):
            break
        torch.manual_seed(config.seed * 1_000_003 + epoch)  # dropout and anything else random
        sampler.set_epoch(epoch)
        train_set.set_epoch(epoch)
        if stage_of(config, epoch) != task.stage:  # entropic: stage 2 starts with its own optimizer
            task.enter_stage(stage_of(config, epoch))
            optimizer, scheduler = make_optimizer(config, task.trained, task.stage)
            loop.optimizer, loop.forward = optimizer, _wrap(task, dist, device)
        lr = optimizer.param_groups[0]["lr"]
        stats = train_one_epoch(loop, train_loader, epoch)
        task.end_epoch()
        select = evaluate(task.model, select_loader, device, amp_dtype=loop.amp_dtype,
                          channels_last=loop.channels_last, progress=loop.progress, desc=f"{coded}select")
        scheduler.step()
        improved = broadcast_flag(select.top1 > best_top1, device)
        if improved:
            best_top1, best_epoch = select.top1, epoch + 1
        line = {"epoch": epoch + 1, "lr": lr, **stats, "select_top1": select.top1, "select_top5": select.top5,
                "select_loss": select.loss, "best_epoch": best_epoch}
        if select.bytes_per_image is not None:
            line["select_bytes_per_image"] = select.bytes_per_image
        if config.test_every_epoch or epoch < config.test_first_epochs:  # a curve on the test split; never selects
            line["test_top1"] = evaluate(task.model, test_loader, device, amp_dtype=loop.amp_dtype,
                                         channels_last=loop.channels_last, desc="test").top1
        if dist.main:
            state = {"epoch": epoch + 1, "stage": task.stage, "best_top1": best_top1, "best_epoch": best_epoch,
                     "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                     "scaler": scaler.state_dict(), **extra}
            if improved:  # the weights to evaluate and deploy; resuming needs only last.pt
                model_state = {k: v for k, v in state.items() if k not in ("optimizer", "scheduler", "scaler")}
                save_checkpoint(out / "best.pt", config.spec, task.model, part=task.part, **model_state)
            with open(out / "metrics.jsonl", "a") as f:  # before last.pt, so that no line is ever lost
                f.write(json.dumps(line) + "\n")
                f.flush()
                os.fsync(f.fileno())
            save_checkpoint(out / "last.pt", config.spec, task.model, part=task.part, **state)
        epochs.set_postfix(select_top1=f"{select.top1:.2f}")
        barrier()

    return _final_test(config, task, out, dist, device, loop, test_loader)


def place_task(task: Task, config: TrainConfig, device: torch.device) -> None:
    """Move the task's models to ``device`` in the config's memory format and precision; the
    teacher too, which fills a teacher cache and measures head errors."""
    for module in (task.model, task.reference, task.teacher):
        if module is not None:
            module.to(device)
            if config.channels_last:
                module.to(memory_format=torch.channels_last)
            keep_fp32_layers(module, device, config.amp)


def patience_spent(config: TrainConfig, epoch: int, best_epoch: int) -> bool:
    """The stopping rule, before 0-based ``epoch``: ``patience`` epochs in a row without a new
    best selection top-1 (counted from stage 2's start in entropic runs)."""
    if not config.patience or stage_of(config, epoch) != stage_of(config, config.epochs - 1):
        return False
    start = config.stage1_epochs if config.method == "entropic" else 0
    return epoch - max(best_epoch, start) >= config.patience


def _eval_set(config: TrainConfig, samples: list, evaluation) -> ImageDataset:
    """An evaluation split, decoded once and kept in memory when small (it is read every epoch)."""
    return ImageDataset(samples, evaluation, skip_bad_images=config.skip_bad_images, decoder=config.decoder,
                        keep=worth_keeping(len(samples), config.spec.input_size))


def _teacher_cache(config: TrainConfig, task: Task, train_set: ImageDataset, workers: int,
                   device: torch.device) -> TeacherOutputs | None:
    """The frozen teacher's outputs for every training view, from ``config.teacher_cache``
    (computed there by the first run that needs them); None without a cache or a teacher."""
    if not config.teacher_cache or task.teacher is None:
        return None
    spec = config.spec
    key = cache_key(config, train_set.samples, train_set.transform, config.augment_views,
                    f"{spec.split_point}/{spec.head_transform_input}")

    def compute() -> TeacherOutputs:
        head, tail = split_teacher(spec.teacher, task.teacher, spec.split_point,
                                   transform_input=spec.head_transform_input)
        pixels = train_transform(spec, config.transforms, config.resize_size, config.decoder, normalize=False)
        views = ImageDataset(train_set.samples, pixels, augment=True, decoder=config.decoder,
                             views=config.augment_views)
        dropped = spec.head_transform_input is False and getattr(task.teacher, "transform_input", False)
        return compute_teacher_outputs(head, tail, views, config.eval_batch_size, workers, device,
                                       mean=spec.teacher.mean, std=spec.teacher.std,
                                       channels_last=config.channels_last, teacher=task.teacher if dropped else None)

    return cached_teacher_outputs(config.teacher_cache, key, compute)


def _wrap(task: Task, dist: Dist, device: torch.device) -> torch.nn.Module:
    """The module whose forward training calls: ``task.trained``, DDP-wrapped when distributed."""
    if not dist.enabled:
        return task.trained
    return DistributedDataParallel(task.trained, device_ids=[device.index] if device.type == "cuda" else None)


def _final_test(config, task, out, dist, device, loop, test_loader) -> dict:
    """Evaluate the best checkpoint on val (the test set) and write ``result.json``."""
    best = read_file(out / "best.pt")
    task.model.load_state_dict(best["state_dict"])
    test: Accuracy = evaluate(task.model, test_loader, device, amp_dtype=loop.amp_dtype,
                              channels_last=loop.channels_last, progress=loop.progress, desc="test")
    result = {"model": config.model, "method": config.method, "epochs": config.epochs,
              "epochs_run": len(read_metrics(out)), "best_epoch": best["best_epoch"],
              "select_top1": best["best_top1"], "selection": config.selection,
              "test": test.to_dict(), "checkpoint": str(out / "best.pt"), "amp": loop.amp}
    if task.method in FROZEN_TAIL_METHODS:  # the teacher head's output variance its head misses
        spec = config.spec
        teacher_head, _ = split_teacher(spec.teacher, task.teacher, spec.split_point,
                                        transform_input=spec.head_transform_input)
        result["head_error"] = head_error(task.model.head, teacher_head, test_loader, device, spec.head_output_shape[0],
                                          channels_last=loop.channels_last)
    if dist.main:
        write_text(out / "result.json", json.dumps(result, indent=1) + "\n")
    barrier()
    return result
