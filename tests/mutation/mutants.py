"""The curated one-line bugs that the test suite must catch (tests/mutation/run.py applies them one at a time).

Each mutant replaces one exact piece of text, which must occur exactly once in its file (tests/test_mutants.py checks
that every mutant still applies, so a refactoring that moves the code updates its mutants too), and names the tests
that should turn red. Whoever adds a feature adds its mutants here: the bug a hurried contributor would make, one
line each, in the science (losses, paths, samplers, metrics) and in the wiring (flags, the loop, resume).
"""
from dataclasses import dataclass
from typing import Tuple


@dataclass(frozen=True)
class Mutant:
    name: str
    file: str                 # repository-relative path
    old: str                  # exact text, once in the file
    new: str
    tests: Tuple[str, ...]    # pytest files or node ids that must fail
    bug: str                  # what the change breaks, in words


def apply(mutant: Mutant, text: str) -> str:
    """`text` with the mutant's change; ValueError if its `old` text is not in it exactly once."""
    count = text.count(mutant.old)
    if count != 1:
        raise ValueError(f"mutant {mutant.name}: its text occurs {count} times in {mutant.file}, not once: "
                         f"{mutant.old!r}")
    if mutant.new == mutant.old:
        raise ValueError(f"mutant {mutant.name} changes nothing")
    return text.replace(mutant.old, mutant.new)


LOSSES = ("tests/test_losses.py",)
LOOP = ("tests/test_loop.py",)
WIRING = ("tests/test_wiring.py",)
TRANSPORT = ("tests/test_transport.py", "tests/test_losses.py")
SAMPLING = ("tests/test_sampling.py",)
EVALUATOR = ("tests/test_evaluator.py",)

MUTANTS = [
    # ---------------------------------------------------------------- losses (erw/losses.py)
    Mutant("velocity-target-sign", "erw/losses.py", "loss = F.mse_loss(pred.float(), target.float())",
           "loss = F.mse_loss(pred.float(), -target.float())", LOSSES, "Phase-2 velocity target with the wrong sign"),
    Mutant("velocity-loss-sum", "erw/losses.py", "loss = F.mse_loss(pred.float(), target.float())",
           "loss = F.mse_loss(pred.float(), target.float(), reduction='sum')", LOSSES,
           "velocity loss summed instead of averaged"),
    Mutant("lambda-not-applied", "erw/losses.py", "loss = loss + lam * align", "loss = loss + align", LOSSES,
           "alignment term without lambda(s)"),
    Mutant("lambda-decay-rate", "erw/losses.py", "return proj_coeff * 2.0 ** (-step / proj_half_life)",
           "return proj_coeff * math.exp(-step / proj_half_life)", LOSSES, "lambda decays with e, not 2, per half-life"),
    Mutant("lambda-constant-ignores-coeff", "erw/losses.py", "        return proj_coeff\n",
           "        return 1.0\n", LOSSES + ("tests/test_train.py",), "--proj-decay none ignores --proj-coeff"),
    Mutant("ntxent-one-direction", "erw/losses.py", "return 0.5 * (loss_hy + loss_yh)", "return loss_hy", LOSSES,
           "NT-Xent not symmetric"),
    Mutant("ntxent-temperature-ignored", "erw/losses.py",
           'logits_hy = torch.einsum("itd,jtd->tij", h, y_all) / temperature',
           'logits_hy = torch.einsum("itd,jtd->tij", h, y_all)', LOSSES, "NT-Xent h->y logits without 1/tau"),
    Mutant("ntxent-autocast-left-on", "erw/losses.py", "with torch.autocast(h.device.type, enabled=False):",
           "with torch.autocast(h.device.type, enabled=torch.is_autocast_enabled(h.device.type)):", LOSSES,
           "NT-Xent logits in half precision under autocast"),
    Mutant("ntxent-wrong-positive-rank", "erw/losses.py", "target = (torch.arange(B, device=h.device) + rank * B)",
           "target = (torch.arange(B, device=h.device))", LOSSES, "NT-Xent positives of rank 0 on every process"),
    Mutant("ntxent-gather-no-grad", "erw/losses.py", "h_all = gather_rows(h, differentiable=True)",
           "h_all = gather_rows(h, differentiable=False)", LOSSES,
           "NT-Xent: other processes' loss sends no gradient to this process's rows"),
    Mutant("gather-grad-not-summed", "erw/losses.py", "        dist.all_reduce(grad)\n", "", LOSSES,
           "all-gather backward drops the other ranks' gradients"),
    # (1 / (1 + sigma) would be an equivalent mutant: sigma and 1 / sigma have the same log-normal law.)
    Mutant("lognormal-linear-mapping", "erw/losses.py", "return sigma / (1 + sigma)", "return sigma / (2 + sigma)",
           LOSSES, "lognormal times mapped wrongly on the linear path"),
    Mutant("label-drop-inverted", "erw/losses.py", "< self.class_dropout_prob).long()",
           ">= self.class_dropout_prob).long()", LOSSES, "labels dropped with probability 1 - cfg_prob"),
    Mutant("phase1-noisy-time", "erw/losses.py", "model(latents, torch.zeros(n, device=latents.device), labels",
           "model(latents, torch.ones(n, device=latents.device), labels", LOSSES, "Phase 1 at t = 1, not t = 0"),
    Mutant("cosine-loss-half-precision", "erw/losses.py",
           "(F.normalize(h.float(), dim=-1) * F.normalize(y.float(), dim=-1))",
           "(F.normalize(h, dim=-1) * F.normalize(y, dim=-1))", LOSSES, "REPA's cosine loss in the inputs' bf16/fp16"),
    # ---------------------------------------------------------------- transport (erw/transport.py)
    Mutant("interpolant-swapped", "erw/transport.py", "return alpha * x + sigma * noise, d_alpha * x + d_sigma * noise",
           "return sigma * x + alpha * noise, d_alpha * x + d_sigma * noise", TRANSPORT, "x_t mixes data and noise the "
           "wrong way round"),
    Mutant("cosine-derivative-sign", "erw/transport.py", "return -0.5 * math.pi * torch.sin(0.5 * math.pi * t), 0.5",
           "return 0.5 * math.pi * torch.sin(0.5 * math.pi * t), 0.5", TRANSPORT, "cosine path: d alpha / dt sign"),
    Mutant("score-sign", "erw/transport.py", "return (d_alpha * x_t - alpha * v) / (sigma",
           "return (alpha * v - d_alpha * x_t) / (sigma", TRANSPORT + SAMPLING, "velocity -> score with the wrong sign"),
    # ---------------------------------------------------------------- samplers (erw/samplers.py)
    Mutant("sde-no-noise", "erw/samplers.py", "x = x + torch.sqrt(2.0 * w * abs(dt)) * standard_normal(",
           "x = x + 0.0 * standard_normal(", SAMPLING, "Euler-Maruyama without its noise term"),
    Mutant("sde-drift-sign", "erw/samplers.py", "drift = v - w * path.velocity_to_score(v, x, t_scalar)",
           "drift = v + w * path.velocity_to_score(v, x, t_scalar)", SAMPLING, "SDE drift adds the score term"),
    Mutant("sde-last-t", "erw/samplers.py", "SDE_LAST_T = 0.04", "SDE_LAST_T = 0.0", SAMPLING,
           "SDE time grid does not stop at REPA's 0.04"),
    Mutant("heun-corrects-last-step", "erw/samplers.py", "if heun and i < num_steps - 1:", "if heun:", SAMPLING,
           "Heun calls the model at t = 0"),
    Mutant("cfg-formula", "erw/samplers.py", "v = v_uncond + self.cfg_scale * (v_cond - v_uncond)",
           "v = v_cond + self.cfg_scale * (v_cond - v_uncond)", SAMPLING, "classifier-free guidance from the wrong base"),
    Mutant("cfg-interval-ignored", "erw/samplers.py",
           "return self.cfg_scale > 1.0 and self.guidance_low <= t <= self.guidance_high",
           "return self.cfg_scale > 1.0", SAMPLING, "guidance outside --guidance-low/high"),
    Mutant("sampler-reads-device-time", "erw/samplers.py", "guided = self.guided_at(t)",
           "guided = self.guided_at(float(x.new_full((), t)))", SAMPLING,
           "every sampling step reads the time back from the device (a host sync per step on a GPU)"),
    # ---------------------------------------------------------------- the loop (erw/trainer.py)
    Mutant("ema-weight-swapped", "erw/trainer.py", "torch._foreach_lerp_(ema_params, model_params, 1.0 - decay)",
           "torch._foreach_lerp_(ema_params, model_params, decay)", LOOP, "EMA update weight decay for 1 - decay"),
    Mutant("ema-decay-not-passed", "erw/trainer.py", 'update_ema(ema, acc.unwrap_model(model), cfg["ema_decay"])',
           'update_ema(ema, acc.unwrap_model(model), 0.9999)', LOOP, "--ema-decay ignored"),
    Mutant("epochs-same-order", "erw/trainer.py", "manual_seed(derive_seed(self.seed, epoch))",
           "manual_seed(derive_seed(self.seed, 0))", LOOP, "every epoch shuffled with the same seed"),
    Mutant("resume-restarts-epoch", "erw/trainer.py", "yield from self.epoch_indices(epoch)[offset:].tolist()",
           "yield from self.epoch_indices(epoch).tolist()", LOOP, "a resume mid-epoch restarts the epoch"),
    Mutant("shards-overlap", "erw/trainer.py", "return perm[self.rank::self.world_size]",
           "return perm[0::self.world_size]", LOOP + ("tests/test_training_paths.py",),
           "every process reads the same shard"),
    Mutant("accumulation-loss-not-divided", "erw/trainer.py", "precision.scaler.scale(loss / accumulation).backward()",
           "precision.scaler.scale(loss).backward()", LOOP, "gradient accumulation sums instead of averaging"),
    Mutant("accumulation-same-rows", "erw/trainer.py",
           "rng = BatchRandom(acc.process_index, acc.num_processes, accumulated, accumulation)",
           "rng = BatchRandom(acc.process_index, acc.num_processes)", LOOP,
           "every micro-batch of a step draws the same noise rows"),
    Mutant("seed-per-micro-batch-constant", "erw/trainer.py", 'torch.manual_seed(derive_seed(cfg["seed"], step))',
           'torch.manual_seed(derive_seed(cfg["seed"], 0))', LOOP + ("tests/test_train.py",),
           "every step draws the same noise"),
    Mutant("clip-before-unscale", "erw/trainer.py",
           "                        precision.scaler.unscale_(optimizer)\n"
           "                        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg[\"max_grad_norm\"])\n",
           "                        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg[\"max_grad_norm\"])\n"
           "                        precision.scaler.unscale_(optimizer)\n", LOOP, "fp16: clipping in loss-scaled units"),
    Mutant("clip-norm-ignored", "erw/trainer.py", 'clip_grad_norm_(model.parameters(), cfg["max_grad_norm"])',
           'clip_grad_norm_(model.parameters(), 1.0)', LOOP, "--max-grad-norm ignored"),
    Mutant("host-read-every-step", "erw/trainer.py", "        scaler = self.precision.scaler\n        if scaler.is",
           "        scaler = self.precision.scaler\n        float(applied)\n        if scaler.is", LOOP,
           "a host read of a device value in every optimizer step"),
    Mutant("logs-last-micro-batch", "erw/trainer.py",
           "logs = scaled if accumulated == 0 else {k: logs[k] + v for k, v in scaled.items()}",
           "logs = micro_logs", LOOP, "logged loss is the last micro-batch's, not the step's"),
    Mutant("skip-check-inverted", "erw/trainer.py", "applied = torch.isfinite(grad_norm)",
           "applied = torch.isfinite(grad_norm) | True", ("tests/test_trainer.py",),
           "updates from non-finite gradients are applied"),
    Mutant("compile-nothing", "erw/trainer.py", "    for block in model.blocks:\n        block.compile()\n",
           "    for block in model.blocks:\n        pass\n", ("tests/test_training_paths.py",),
           "--compile compiles no SiT block"),
    Mutant("resume-on-other-process-count-loses-place", "erw/trainer.py",
           "consumed = micro_batch * old_world * old_local", "consumed = micro_batch * old_local",
           ("tests/test_train.py::test_phase2_on_two_processes_and_resumed_across_process_counts_trains_what_one_"
            "process_trains",), "a resume on another process count continues at another place of the data stream"),
    Mutant("ntxent-local-negatives", "erw/losses.py", "y_all = gather_rows(y, differentiable=False)", "y_all = y",
           ("tests/test_train.py::test_phase2_on_two_processes_and_resumed_across_process_counts_trains_what_one_"
            "process_trains",), "NT-Xent's negatives from this process's images only"),
    Mutant("resume-restarts-data", "erw/trainer.py", 'micro_batch = position["micro_batch"]', "micro_batch = 0",
           ("tests/test_train_warmup.py", "tests/test_train.py"), "a resume reads the data stream from its start"),
    # ---------------------------------------------------------------- resume policy (erw/config.py)
    Mutant("resume-accepts-training-keys", "erw/config.py",
           "(run_control if option.run_control else training)[name] = (stored[name], new)",
           "run_control[name] = (stored[name], new)", WIRING, "a resume silently accepts changed training settings"),
    Mutant("batch-size-is-run-control", "erw/config.py",
           'Option("batch_size", _int, 256, "global batch size (all processes and accumulation steps)", minimum=1)',
           'Option("batch_size", _int, 256, "global batch size (all processes and accumulation steps)", minimum=1, '
           'run_control=True)', WIRING, "a resume accepts another batch size unasked"),
    # ---------------------------------------------------------------- entry points
    Mutant("train-no-label-dropout", "train.py", 'class_dropout_prob=config["cfg_prob"])',
           "class_dropout_prob=0.0)", WIRING, "train.py never trains the null class, so CFG breaks"),
    Mutant("train-warmup-layers-ignored", "train.py", 'config["warmup_layers"], expected_depth',
           "0, expected_depth", WIRING, "--warmup-layers parsed but 0 passed to the warm start"),
    Mutant("train-warmup-weights-ignored", "train.py", 'config["warmup_ckpt"], config["warmup_weights"]',
           'config["warmup_ckpt"], "model"', WIRING, "--warmup-weights ema loads the raw weights"),
    Mutant("train-half-life-ignored", "train.py", 'proj_half_life=config["proj_half_life"]',
           "proj_half_life=50000.0", WIRING, "--proj-half-life ignored"),
    Mutant("train-weighting-ignored", "train.py", 'weighting=config["weighting"]', 'weighting="uniform"', WIRING,
           "--weighting ignored"),
    Mutant("train-path-ignored", "train.py", 'path=get_path(config["path_type"])', 'path=get_path("linear")', WIRING,
           "--path-type ignored"),
    Mutant("train-temperature-ignored", "train.py", 'ntxent_temp=config["ntxent_temp"], path',
           "ntxent_temp=0.1, path", WIRING, "--ntxent-temp ignored in Phase 2"),
    Mutant("warmup-align-loss-fixed", "train_warmup.py", 'align=run.config["align_loss"]', 'align="ntxent"', WIRING,
           "--align-loss ignored in Phase 1"),
    Mutant("warmup-no-label-dropout", "train_warmup.py", 'class_dropout_prob=run.config["cfg_prob"])',
           "class_dropout_prob=0.0)", WIRING, "Phase 1 ignores --cfg-prob"),
    Mutant("model-args-encoder-depth", "erw/experiment.py",
           '"encoder_depth": config["warmup_depth"] if warmup else config["encoder_depth"]',
           '"encoder_depth": config["warmup_depth"]', WIRING, "Phase 2's projector sits after the warmed blocks always"),
    Mutant("model-args-qk-norm", "erw/experiment.py", '"qk_norm": config["qk_norm"]', '"qk_norm": False', WIRING,
           "--qk-norm ignored"),
    # ---------------------------------------------------------------- warm start (erw/warm_start.py)
    Mutant("warm-start-ignores-offset", "erw/warm_start.py",
           'new_key = f"blocks.{start_layer + int(match.group(1))}.{match.group(2)}"',
           'new_key = f"blocks.{int(match.group(1))}.{match.group(2)}"', ("tests/test_train.py",),
           "warmed blocks always land at 0..k-1"),
    Mutant("warm-start-skips-projectors", "erw/warm_start.py",
           'TRANSFERRED_PREFIXES = ("x_embedder.", "t_embedder.", "y_embedder.", "pos_embed", "projectors.")',
           'TRANSFERRED_PREFIXES = ("x_embedder.", "t_embedder.", "y_embedder.", "pos_embed")',
           ("tests/test_train.py",), "the Phase-1 projector is not loaded"),
    # ---------------------------------------------------------------- model (models/sit.py)
    Mutant("projector-off-by-one", "models/sit.py", "if return_projections and i + 1 == self.encoder_depth:",
           "if return_projections and i == self.encoder_depth:", ("tests/test_sit.py",),
           "--encoder-depth d reads block d+1's output"),
    # ---------------------------------------------------------------- data (erw/data.py, models/vae.py)
    Mutant("latent-without-std", "erw/data.py", "return vae_to_model_latents(mean + std * eps)",
           "return vae_to_model_latents(mean)", ("tests/test_data.py",), "the posterior is never sampled"),
    Mutant("latent-scale", "models/vae.py", "    return z_vae * SD_VAE_SCALE + SD_VAE_SHIFT",
           "    return z_vae + SD_VAE_SHIFT", ("tests/test_vae.py", "tests/test_data.py"), "latents not scaled by 0.18215"),
    Mutant("pixels-rounded", "models/vae.py", "torch.clamp(255.0 * ((x + 1.0) / 2.0), 0, 255).to(torch.uint8)",
           "torch.clamp(255.0 * ((x + 1.0) / 2.0), 0, 255).round().to(torch.uint8)",
           ("tests/test_vae.py", "tests/test_sample_ddp.py"), "REPA's truncated pixels rounded instead"),
    Mutant("batch-random-rows", "erw/batch_random.py", "return full[start:start + per_micro_batch][self.rank::self.world_size]",
           "return full[start:start + per_micro_batch][:shape[0]]", LOSSES, "every process draws rank 0's noise"),
    Mutant("dataset-wrong-label", "erw/data.py", "torch.tensor(self.labels[index])", "torch.tensor(self.labels[0])",
           ("tests/test_data.py",), "every item carries the first item's label"),
    Mutant("teacher-not-normalised", "models/encoders.py", "    x = (x - mean) / std\n", "",
           ("tests/test_encoders.py",), "teacher images without ImageNet normalisation"),
    # (tokens[:, 1:] for tokens[:, num_prefix_tokens:] would be an equivalent mutant: every teacher we build, DINOv2
    # included, has exactly one prefix token, the CLS.)
    Mutant("autocast-off", "erw/precision.py", "enabled=self.dtype is not None)", "enabled=False)",
           ("tests/test_training_paths.py",), "--mixed-precision bf16/fp16 computes in float32"),
    # ---------------------------------------------------------------- resume state and checkpoints (erw/trainer.py)
    Mutant("resume-drops-optimizer", "erw/trainer.py", '        optimizer.load_state_dict(ckpt["opt"])\n', "",
           ("tests/test_train_warmup.py", "tests/test_train.py"), "a resume restarts AdamW's moments"),
    Mutant("resume-drops-loss-scale", "erw/trainer.py", '        self.precision.load_state_dict(ckpt.get("scaler"))\n',
           "", ("tests/test_training_paths.py",), "a resume restarts fp16's loss scale"),
    Mutant("checkpoint-ema-is-model", "erw/trainer.py", '                "ema": ema_state,', '                "ema": model_state,',
           LOOP, "checkpoints store the raw weights as the EMA"),
    Mutant("metrics-drop-the-resumed-step", "erw/trainer.py", 'if record.get("step", 0) <= step:',
           'if record.get("step", 0) < step:', ("tests/test_trainer.py",),
           "a resume drops the record of the step it resumes from"),
    Mutant("phase1-builds-every-block", "models/sit.py", "num_built = encoder_depth if truncated else depth",
           "num_built = depth", ("tests/test_train_warmup.py",), "Phase 1 builds (and pays for) every block"),
    # ---------------------------------------------------------------- analysis (evaluations/cknna.py)
    Mutant("cknna-neighbour-includes-self", "evaluations/cknna.py", "        sims[rows, rows + start] = -math.inf\n", "",
           ("tests/test_cknna.py",), "CKNNA's k nearest neighbours include the point itself"),
    Mutant("training-fid-seed", "evaluations/training_fid.py", 'global_seed=config["seed"]', "global_seed=0",
           ("tests/test_training_fid.py",), "in-training FID samples ignore the run's --seed"),
    Mutant("training-fid-ignores-file-statistics", "evaluations/training_fid.py",
           "stats = evaluator.read_statistics(path)", "stats = None", ("tests/test_training_fid.py",),
           "in-training FID against the reference images, not ADM's stored statistics"),
    Mutant("training-fid-guided-by-default", "evaluations/training_fid.py", 'cfg_scale=config["cfg_scale"]',
           'cfg_scale=max(config["cfg_scale"], 1.5)', ("tests/test_training_fid.py",),
           "in-training FID guided although --cfg-scale is 1"),
    Mutant("training-fid-is-splits", "evaluations/training_fid.py", "min(evaluator.IS_SPLIT_SIZE, self.num_samples)",
           "min(evaluator.IS_SPLIT_SIZE, self.num_samples // 2)", ("tests/test_training_fid.py",),
           "in-training IS over splits of half the samples"),
    Mutant("forward-features-off-by-one", "models/sit.py", "            if i + 1 in layers:\n",
           "            if i + 2 in layers:\n", ("tests/test_sit.py",), "CKNNA's layer L reads block L + 1's output"),
    # ---------------------------------------------------------------- the paper presets (configs/)
    Mutant("preset-half-life", "configs/table1_2_sit_xl2_erw.yaml", "proj_half_life: 50000", "proj_half_life: 5000",
           ("tests/test_configs.py",), "the paper preset's lambda halves every 5K steps"),
    Mutant("preset-phase1-link", "configs/table4_sit_b2_erw.yaml",
           "warmup_ckpt: exps/sit-b2-erw-warmup/checkpoints/last.pt",
           "warmup_ckpt: exps/sit-xl2-erw-warmup/checkpoints/last.pt", ("tests/test_configs.py",),
           "table 4's Phase 2 starts from another config's Phase 1"),
    Mutant("preset-repa-depth", "configs/table4_sit_b2_repa.yaml", "encoder_depth: 4 ", "encoder_depth: 8 ",
           ("tests/test_configs.py",), "SiT-B/2 REPA aligns at XL's depth"),
    # ---------------------------------------------------------------- generation (erw/generation.py)
    Mutant("sample-seed-ignores-index", "erw/generation.py",
           "return (_splitmix64(global_seed) + index * _SEED_INDEX_MULTIPLIER) % 2 ** 32",
           "return _splitmix64(global_seed) % 2 ** 32", ("tests/test_sampling.py", "tests/test_sample_ddp.py"),
           "every sample starts from the same noise"),
    Mutant("generation-labels-shifted", "erw/generation.py", "noise.to(device), labels.to(device), num_steps",
           "noise.to(device), labels.roll(1).to(device), num_steps",
           ("tests/test_demo.py::test_the_demos_samples_show_their_class",),
           "samples generated for another class than the one they are filed under"),
    # ---------------------------------------------------------------- evaluator (evaluations/)
    Mutant("fid-trace-factor", "evaluations/evaluator.py", "np.trace(sigma2) - 2 * np.trace(covmean))",
           "np.trace(sigma2) - np.trace(covmean))", EVALUATOR, "FID without the factor 2 of tr sqrt(S1 S2)"),
    Mutant("fid-biased-covariance", "evaluations/evaluator.py", "np.cov(activations, rowvar=False)",
           "np.cov(activations, rowvar=False, bias=True)", EVALUATOR, "covariance not ADM's unbiased one"),
    Mutant("is-marginal-per-sample", "evaluations/evaluator.py",
           "kl = part * (np.log(part) - np.log(np.expand_dims(np.mean(part, 0), 0)))",
           "kl = part * (np.log(part) - np.log(np.expand_dims(np.mean(part, 1), 1)))", EVALUATOR,
           "IS against each sample's own mean, not the marginal"),
    Mutant("pr-strict-radius", "evaluations/evaluator.py",
           "sample_in[col:col + batch_size] |= (dist <= ref_radii", "sample_in[col:col + batch_size] |= (dist < ref_radii",
           EVALUATOR, "precision: '<' instead of ADM's '<='"),
    Mutant("training-fid-against-itself", "evaluations/training_fid.py",
           '"fid": evaluator.frechet_distance(*stats["pool"], *self.reference_stats["pool"])',
           '"fid": evaluator.frechet_distance(*stats["pool"], *stats["pool"])', ("tests/test_training_fid.py",),
           "in-training FID of the samples against themselves"),
    Mutant("training-fid-sfid-on-pool", "evaluations/training_fid.py",
           '"sfid": evaluator.frechet_distance(*stats["spatial"], *self.reference_stats["spatial"])',
           '"sfid": evaluator.frechet_distance(*stats["pool"], *self.reference_stats["pool"])',
           ("tests/test_training_fid.py",), "in-training sFID computed on the pool features"),
    # ---------------------------------------------------------------- the GPU suite (bench/) and its checks
    Mutant("suite-writes-only-after-parts", "bench/gpu_suite.py",
           'isolation="spawn" if spawn else "fork")\n            results.write()\n',
           'isolation="spawn" if spawn else "fork")\n', ("tests/test_gpu_suite.py::test_every_part_before_and_after_a_failure_is_kept",),
           "the results file is not rewritten before a part starts (a kill then loses which part was running)"),
    Mutant("part-deadline-kills-at-once", "bench/part_runner.py",
           "        _signal_group(pid, signal.SIGINT)\n        ended = wait(time.monotonic() + grace_s)",
           "        _signal_group(pid, signal.SIGKILL)\n        ended = wait(time.monotonic() + grace_s)", ("tests/test_gpu_suite.py::test_every_part_before_and_after_a_failure_is_kept",),
           "a part past its deadline is killed without SIGINT (pytest writes no XML, nothing is kept)"),
    Mutant("suite-budget-not-enforced", "bench/gpu_suite.py", "limit = min(part.limit(args.rehearse), left - GRACE_S)",
           "limit = part.limit(args.rehearse)", ("tests/test_gpu_suite.py::test_the_budget_bounds_the_suite_and_skips_what_no_longer_fits",), "a running part is not stopped at the budget's end"),
    Mutant("suite-spawn-never", "bench/gpu_suite.py",
           'if args.isolation == "spawn" or (args.isolation == "auto" and part_runner.cuda_driver_loaded()):',
           'if args.isolation == "spawn":', ("tests/test_gpu_suite.py::test_a_suite_that_loaded_the_cuda_driver_spawns_its_parts",),
           "parts forked after the suite loaded the CUDA driver (none of them could use CUDA)"),
    Mutant("fid-estimate-rate-from-all-batches", "bench/gpu_parts.py",
           "per_sample = sum(batch_seconds[1:]) / sum(batch_sizes[1:])",
           "per_sample = sum(batch_seconds) / sum(batch_sizes)", ("tests/test_gpu_suite.py::test_the_fid_estimate_leaves_the_first_batchs_one_off_cost_out_of_the_rate",),
           "the first batch's one-off costs multiplied into the 10K-sample FID estimate"),
    Mutant("resume-check-ignores-skips", "tests/test_gpu.py", "allowed = 3 * noise + 2 * skips * update",
           "allowed = 3 * noise", ("tests/test_gpu_suite.py::test_resume_check_allows_a_gradscaler_skip_and_catches_a_lost_state",), "the GPU resume check fails a run that skipped one fp16 update more"),
    Mutant("resume-restores-cuda-rng", "erw/trainer.py", 'torch.set_rng_state(ckpt["rng"]["torch"])',
           'torch.set_rng_state(ckpt["rng"]["torch"]); torch.cuda.is_available() and '
           'torch.cuda.set_rng_state_all(ckpt["rng"].get("cuda", []))',
           ("tests/test_trainer.py::test_a_checkpoint_from_a_machine_with_more_gpus_resumes_here",),
           "resume restores one CUDA generator per GPU of the saving machine (IndexError on fewer GPUs)"),
]

