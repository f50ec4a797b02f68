"""Config -> ordered stages -> run them (skipping finished ones, resuming the interrupted one) -> report."""

from __future__ import annotations

import json

import jax
from etils import epath

from mobiledistill import checkpoint as ckpt
from mobiledistill import config as config_lib
from mobiledistill import perf, sharding, workdir_lock
from mobiledistill.data import InMemoryCorpus, corpus_from_config, load_tokenizer, trained_tokenizer
from mobiledistill.data.sources import concatenated
from mobiledistill.data.errors import DataError
from mobiledistill.models import count_params
from mobiledistill.optim import trainable_mask
from mobiledistill.report import write_report
from mobiledistill.strategies import build_stages
from mobiledistill.train import RunContext, SigtermFlag, abstract_model, run_stage


def models(c):
    return config_lib.model_config(c.teacher, c.dtype), config_lib.model_config(c.student, c.dtype)


def plan(c, num_devices: int | None = None):
    """(teacher config, student config, stages) after validation; vocab sizes as configured."""
    teacher, student = models(c)
    config_lib.validate(c, teacher, student, num_devices)
    return teacher, student, build_stages(c, teacher, student)


def _source_config(src: str, text_field: str) -> dict:
    kind, _, rest = src.partition(":")
    if kind in ("embedded", "news"):
        return {"kind": kind}
    if kind == "tfds":
        name, _, split = rest.partition(":")
        return {"kind": "tfds", "name": name, "split": split or "train", "text_key": text_field}
    if kind == "files":
        return {"kind": "text", "paths": rest}
    if kind in ("jsonl", "csv"):
        return {"kind": kind, "paths": rest, "text_key": text_field}  # record_files' name for it
    raise config_lib.ConfigError(f"data.source={src!r}; valid: 'embedded', 'news', 'tfds:<name>[:<split>]', "
                                 f"'files:<glob>', 'jsonl:<glob>', 'csv:<glob>', or several joined by '+'")


def source_corpus(c):
    """The corpus of `c.data.source`: one source, or several joined by '+' (their documents concatenated)."""
    return concatenated([corpus_from_config(_source_config(s, c.data.text_field))
                         for s in c.data.source.split("+")])


def split_heldout(corpus, every: int):
    """Deterministic document split: every `every`-th document is held out for evaluation."""
    docs = [corpus[i] for i in range(len(corpus))]
    heldout = [d for i, d in enumerate(docs) if i % every == every - 1]
    train = [d for i, d in enumerate(docs) if i % every != every - 1]
    if not heldout or not train:
        raise DataError(f"corpus {corpus.name} has {len(docs)} documents: too few to hold out every {every}-th")
    return InMemoryCorpus(corpus.name + ":train", train), InMemoryCorpus(corpus.name + ":heldout", heldout)


def tokenizer_for(c, workdir: epath.Path, train_corpus):
    if c.data.vocab == "train":
        return trained_tokenizer(train_corpus.texts(), str(workdir / "tokenizer"), corpus_name=train_corpus.name,
                                 vocab_size=c.data.vocab_size)
    return load_tokenizer(c.data.vocab)


def with_vocab(cfg, vocab_size: int):
    """Model config whose vocab matches the tokenizer's (a trained vocab may come out smaller than requested)."""
    if cfg.vocab_size == vocab_size:
        return cfg
    return cfg.replace(vocab_size=vocab_size)


def teacher_name(c) -> str:
    """The teacher's preset, or its 'hf:<dir>' checkpoint (whose config.json is then the architecture)."""
    return c.teacher.source if c.teacher.source.startswith("hf:") else c.teacher.preset


def describe(c, teacher, student, stages, num_devices: int) -> str:
    """The dry-run plan: stages, parameter counts, FLOPs per step and a per-device memory estimate."""
    t_params = count_params(abstract_model(teacher)[1])
    s_params = count_params(abstract_model(student)[1])
    seq = c.data.max_seq_length
    preds = c.data.max_predictions_per_seq
    fsdp = c.mesh.fsdp
    micro = c.train.global_batch // c.train.accumulation_steps // num_devices
    out = [f"strategy {c.strategy}: {len(stages)} stages on {num_devices} devices (mesh data="
           f"{num_devices // fsdp} x fsdp={fsdp}), global batch {c.train.global_batch} x seq {seq}, "
           f"{c.train.accumulation_steps} micro-batch(es) of {micro} per device",
           f"teacher {teacher_name(c)}: {t_params:,} parameters with MLM/NSP heads "
           f"({count_params(abstract_model(teacher)[1]['encoder']):,} backbone)",
           f"student {c.student.preset}: {s_params:,} parameters with MLM/NSP heads "
           f"({count_params(abstract_model(student)[1]['encoder']):,} backbone)", "",
           f"{'stage':10s} {'steps':>8s} {'trains':8s} {'layers':>6s} {'trainable':>12s} {'TFLOP/step':>11s} "
           f"{'(teacher)':>10s} {'GiB/device':>10s}  losses"]
    total_flops = 0.0
    for stage in stages:
        cfg = teacher if stage.trains == "teacher" else student
        abstract = abstract_model(cfg)[1]
        mask = trainable_mask(abstract, stage.optimizer.lr_scales, stage.optimizer.default_lr_scale)
        trainable = sum(int(x.size) for x, m in zip(jax.tree.leaves(abstract), jax.tree.leaves(mask)) if m)
        online_teacher = stage.teacher_from and not stage.teacher_top_k  # an offline one was run before the stage
        sf, tf = perf.stage_flops(stage, cfg, teacher if online_teacher else None, seq, preds)
        per_step = (sf + tf) * c.train.global_batch
        total_flops += per_step * stage.steps
        mem = perf.memory_estimate(stage, cfg, teacher, count_params(abstract), trainable,
                                   t_params if stage.teacher_from else 0, micro, seq, fsdp)
        out.append(f"{stage.name:10s} {stage.steps:8d} {stage.trains:8s} {stage.num_layers or len(cfg.plan):6d} "
                   f"{trainable:12,d} {per_step / 1e12:11.1f} {tf * c.train.global_batch / 1e12:10.1f} "
                   f"{mem['total']:10.2f}  " + ", ".join(stage.losses)
                   + (f" (offline teacher: its top {stage.teacher_top_k} MLM logits stored for "
                      f"{stage.teacher_topk_epochs:g} epoch(s))" if stage.teacher_top_k else ""))
    out.append(f"\ntotal {total_flops / 1e18:.1f} EFLOP; memory = f32 parameters + gradients and LAMB moments "
               f"of trainable ones + teacher parameters + activations (estimate)")
    return "\n".join(out)


def run(c, workdir: str, *, allow_config_change: bool = False) -> dict:
    """Runs (or resumes) the whole pipeline in `workdir` as its one writer; returns the stage summaries.

    A workdir that already holds this experiment finished (every stage's done.json, the report) is only read, so
    it takes no lock: it is never refused because another process holds the workdir (SPEC §12)."""
    done = finished(c, epath.Path(workdir))
    if done is not None:
        return done
    with workdir_lock.hold(workdir):
        return _run(c, workdir, allow_config_change=allow_config_change)


def finished(c, workdir: epath.Path, quiet: bool = False) -> dict | None:
    """The stage summaries when `workdir` holds this experiment finished (reads only), else None."""
    _, _, stages = plan(c)
    done = {s.name: ckpt.stage_done(workdir / s.name) for s in stages}
    if not (all(done.values()) and (workdir / "report.md").exists() and ckpt.fingerprint_matches(workdir,
                                                                                                     c.to_dict())):
        return None
    if not quiet:
        print(f"nothing to do: all {len(stages)} stages in {workdir} are finished; report: {workdir / 'report.md'}")
    return done


def _run(c, workdir: str, *, allow_config_change: bool = False) -> dict:
    workdir = epath.Path(workdir)
    teacher, student, stages = plan(c)
    done = finished(c, workdir)  # finished by another process while this one waited
    if done is not None:
        return done
    ckpt.check_fingerprint(workdir, c.to_dict(), allow_config_change)

    corpus = source_corpus(c)
    train_corpus, heldout_corpus = split_heldout(corpus, c.data.heldout_every)
    tok = tokenizer_for(c, workdir, train_corpus)
    teacher, student = with_vocab(teacher, tok.vocab_size), with_vocab(student, tok.vocab_size)
    mesh = sharding.make_mesh(c.mesh.data, c.mesh.fsdp)
    peak, peak_source = perf.peak_flops_per_device()
    print(f"{len(stages)} stages, {jax.device_count()} device(s) ({jax.devices()[0].device_kind}), peak "
          f"{peak / 1e9:.1f} GFLOP/s per device ({peak_source}); vocab {tok.vocab_size} tokens; "
          f"{len(train_corpus)} training / {len(heldout_corpus)} held-out documents", flush=True)
    summaries = {}
    with SigtermFlag() as flag:
        ctx = RunContext(workdir, c, mesh, teacher, student, tok, train_corpus, heldout_corpus, peak, flag)
        for i, stage in enumerate(stages):
            done = ckpt.stage_done(workdir / stage.name)
            if done is not None:
                print(f"[{i + 1}/{len(stages)} {stage.name}] finished earlier: skipped", flush=True)
                summaries[stage.name] = done
                continue
            summaries[stage.name] = run_stage(ctx, stage, i, len(stages))
    if jax.process_index() == 0:
        comparison = [(label, name) for label, name in (("teacher", "teacher"),
                                                        ("teacher, adapted MLM head", "teacher_head"),
                                                        ("distilled student", "pd"),
                                                        ("distilled student (AKT)", "akt"),
                                                        ("student from scratch", "scratch")) if name in summaries]
        resized = lambda sec: " (resized)" if any(sec.get(k) is not None for k in config_lib.MODEL_FIELDS
                                                 if k not in ("dtype", "vocab_size")) else ""
        header = (f"# mobiledistill report: {c.strategy}\n\nteacher `{teacher_name(c)}`"
                  f"{'' if c.teacher.source.startswith('hf:') else resized(c.teacher)} "
                  f"({count_params(abstract_model(teacher)[1]):,} parameters), student `{c.student.preset}`"
                  f"{resized(c.student)} "
                  f"({count_params(abstract_model(student)[1]):,} parameters), data `{c.data.source}`, "
                  f"global batch {c.train.global_batch} x seq {c.data.max_seq_length}.")
        path = write_report(workdir, stages, summaries, header, comparison)
        ckpt.write_text_atomic(workdir / "summary.json", json.dumps(summaries, indent=2, default=str))
        print(f"report: {path}")
        for label, name in comparison:
            acc = summaries[name].get("eval_mlm_accuracy")
            if acc is not None:
                print(f"  held-out MLM accuracy, {label}: {100 * acc:.2f}%")
    return summaries

