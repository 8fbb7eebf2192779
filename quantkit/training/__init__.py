"""The machinery every quantkit trainer stands on: run folders, checkpoints, resume, progress, metrics, DDP.

    run = open_run(config.out_dir, resume, config.device, config.progress, config.batch_size)
    model = build(...).to(run.device); opt = ...
    start = 0
    if run.resume_from is not None:                       # the newest checkpoint that verifies
        load_weights(model, load_tensors(run.resume_from, run.device), str(run.resume_from))
        state = load_train_state(run.resume_from, run.device)
        opt.load_state_dict(state["optimizer"]); start = state["step"]
    run.prepare(start)                                    # folder, stale temporaries, metrics log cut to `start`
    bar = run.progress(config.steps, start, "train-mything")
    save = lambda: run.save(step, model.state_dict(), {"format": FORMAT, "version": 2, ...,
                                                       "train_config": config.recorded(run.out_dir)},
                            {"step": step, "optimizer": opt.state_dict()}, config.keep_checkpoints)
    step = start
    with run.checkpoint_on_interrupt(save):               # Ctrl-C saves, then re-raises
        while step < config.steps:
            idx = step_indices(config.seed, step, len(data), config.batch_size, run.rank, run.world)
            torch.manual_seed(step_seed(config.seed, step) + 1)   # this step's dropout / masks / noise
            ... one optimizer step at lr_at(config, step) ...
            step += 1
            if step % config.log_every == 0: run.metrics.append({"step": step, "loss": ...})
            bar.update(1, loss=...)
            if step % config.checkpoint_every == 0 or step == config.steps: save()

How a new trainer (a continuous-token generator, a feature encoder) plugs in:

1. Its config is a dataclass that also inherits :class:`RunConfig` (fields ``steps, batch_size, lr, betas,
   warmup_steps, min_lr_ratio, seed, out_dir, checkpoint_every, keep_checkpoints, log_every, device,
   progress``); ``__post_init__`` calls ``self._check_loop_fields()``; ``PATH_FIELDS`` names the fields that
   hold paths, so :meth:`RunConfig.recorded` stores them relative to the run folder.
2. Its checkpoint config.json carries its own ``format`` string (e.g. "quantkit-continuous-generator") and
   ``version``; its loader calls ``resolve_checkpoint(path, kind)`` (verifies the manifest) and
   ``read_config(ckpt, FORMAT, kind)`` (refuses another trainer's run folder), then ``load_tensors``.
3. The loop seeds step s from ``step_seed(seed, s)`` only, so resuming repeats an uninterrupted run bit for bit.

Files: :mod:`.config` (RunConfig, step seeds, the learning-rate schedule, recorded paths), :mod:`.checkpoints`
(atomic write, manifest, verification, loading), :mod:`.progress` (bar or plain lines), :mod:`.run` (the run
folder, metrics log, Ctrl-C, DDP set-up).
"""
from .checkpoints import (CheckpointError, atomic_write_text, checkpoint_problem, copy_checkpoint, is_run_folder,
                          list_checkpoints, load_tensors, load_train_state, load_weights, newest_good_checkpoint,
                          read_config, resolve_checkpoint, rewrite_config, verify_checkpoint, write_checkpoint)
from .config import RunConfig, lr_at, relative_to_run, resolve_recorded, step_indices, step_seed
from .progress import Progress, progress_enabled
from .run import (MetricsLog, TrainingRun, open_run, read_metrics, recorded_train_config, say, setup_distributed,
                  wrap_ddp)

__all__ = ["CheckpointError", "MetricsLog", "Progress", "RunConfig", "TrainingRun", "atomic_write_text",
           "checkpoint_problem", "copy_checkpoint", "is_run_folder", "list_checkpoints", "load_tensors",
           "load_train_state", "load_weights", "lr_at", "newest_good_checkpoint", "open_run", "progress_enabled",
           "read_config", "read_metrics", "recorded_train_config", "relative_to_run", "resolve_checkpoint", "resolve_recorded",
           "rewrite_config", "say", "setup_distributed", "step_indices", "step_seed", "verify_checkpoint",
           "wrap_ddp", "write_checkpoint"]
