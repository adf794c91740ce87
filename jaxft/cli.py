"""The `jaxft` command. Thin: parse arguments, call the library, turn known errors into exit code 2.

    jaxft train CONFIG.yaml [key.sub=value ...]
    jaxft eval CONFIG.yaml checkpoint=RUN_DIR [key.sub=value ...]
    jaxft export RUN_DIR OUT_DIR [--overwrite] [--adapter]
    jaxft generate MODEL_DIR|RUN_DIR --prompt "..." [--max-new-tokens --temperature --top-p --seed --chat]
    jaxft plan CONFIG.yaml [key.sub=value ...] [--devices N] [--analytic] [--json]
    jaxft data CONFIG.yaml [key.sub=value ...] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# Errors whose message names the culprit (key, file, row, step): printed after `error:`, exit code 2.
# OSError covers files that cannot be read or written (its message names the path).
USER_ERRORS = (ValueError, KeyError, OSError, ImportError)


# The config.json field that sizes a family's learned position table, and transformers' default for it. A batch
# longer than the table reads past it: non-finite losses, the step skipped. Rotary families have no table.
LEARNED_POSITIONS = {"gpt2": ("n_positions", 1024), "bert": ("max_position_embeddings", 512)}


def check_model(name_or_path: str, task: str | None = None, data=None) -> None:
    """A local (or packaged) model folder with a broken config.json or weight index, or of a model type
    (and task) jaxft has no module for, fails here naming the file, before `transformers` reads it; so does
    `data` (the `data:` section) padding every batch to a `data.max_length` longer than the model's learned
    position table (`LEARNED_POSITIONS`). Hub ids are left to the download."""
    from jaxft.hf.files import check_model_folder, read_json_object
    from jaxft.hf.load import resolve
    from jaxft.models import FAMILIES, get_family

    name = str(name_or_path)
    if not (name.startswith(("package:", ".", "/", "~")) or Path(name).expanduser().exists()):
        return
    try:
        folder = resolve(name)
    except TypeError as e:  # importlib: `package:os/x` names a module that is not a package
        raise FileNotFoundError(f"model {name}: {e}") from None
    check_model_folder(folder)
    hf = read_json_object(folder / "config.json", "model config")
    model_type = hf["model_type"]
    try:  # an unknown model_type fails whatever the task
        get_family(model_type, task or (next(iter(FAMILIES[model_type].modules)) if model_type in FAMILIES else ""))
    except ValueError as e:
        raise ValueError(f"{folder / 'config.json'}: {e}") from None
    field, default = LEARNED_POSITIONS.get(model_type, (None, None))
    positions = hf.get(field, default) if field else None
    if data is not None and data.padding == "max_length" and isinstance(positions, int) \
            and data.max_length > positions:
        raise ValueError(f"data.max_length={data.max_length} (data.padding=max_length) is longer than the model's "
                         f"{field}={positions} ({folder / 'config.json'}): every batch would be {data.max_length} "
                         f"tokens long, and {model_type} learns one embedding per position, so it would read past "
                         f"its position table; set data.max_length={positions} or less")


def local_model_folder(name_or_path: str) -> Path | None:
    """The folder of a local (or packaged) model, None for a Hub id (never downloaded here) or a missing one."""
    from jaxft.hf.load import resolve

    name = str(name_or_path)
    if name.startswith("package:"):
        try:
            return resolve(name)
        except (FileNotFoundError, TypeError):
            return None
    path = Path(name).expanduser()
    return path if path.is_dir() else None


def cmd_train(args) -> None:
    from jaxft.config import load_config
    from jaxft.train.loop import train

    cfg = load_config(args.config, args.overrides)
    check_model(cfg.model.name_or_path, cfg.model.task, cfg.data)
    summary = train(cfg)
    print(json.dumps(summary, indent=2, default=str))
    for split in ("eval", "test"):
        for name in ("accuracy", "perplexity"):
            if summary.get(split) and name in summary[split]:
                print(f"{split} {name}: {summary[split][name]:.4f}")


def cmd_eval(args) -> None:
    from jaxft import parallel
    from jaxft.config import ConfigError, load_config
    from jaxft.train.run import restore_model, run_tokenizer, setup_logging
    from jaxft.hf.load import resolve
    from jaxft.train.model import load_run_model
    from jaxft.train.step import Functional, make_eval_step
    from jaxft.objectives import make_task
    from jaxft.compilation import enable_persistent_cache

    enable_persistent_cache()
    run = [o.split("=", 1)[1] for o in args.overrides if o.startswith("checkpoint=")]
    overrides = [o for o in args.overrides if not o.startswith("checkpoint=")]
    if not run:
        raise ConfigError("jaxft eval needs checkpoint=RUN_DIR")
    cfg = load_config(args.config, overrides)
    check_model(cfg.model.name_or_path, cfg.model.task, cfg.data)
    parallel.initialize_from_config(cfg.mesh)
    setup_logging()
    mesh = parallel.make_mesh(cfg.mesh.model_dump())
    model, _, step = restore_model(run[0], cfg, mesh)
    tokenizer = run_tokenizer(run[0], cfg)
    task = make_task(cfg, tokenizer, Path(run[0]), resuming=True, splits=("validation", "test"))
    fn = Functional(model)
    # a preference objective's reference model (full fine-tuning): the base the run started from
    start = lambda: Functional(load_run_model(cfg, resolve(cfg.model.name_or_path), mesh).model)
    eval_step = make_eval_step(fn, getattr(task, "eval_loss", task.loss), task.frozen_model(start))  # no smoothing
    out = {"checkpoint_step": step}
    for split in task.splits:
        out[split] = task.evaluate(eval_step, fn.params, split, mesh)
    print(json.dumps(out, indent=2))


def cmd_export(args) -> None:
    from jaxft.data import chat_template
    from jaxft.hf.export import check_export_target, save_pretrained
    from jaxft.lora import merge, save_adapter
    from jaxft.train.run import restore_run, run_config, run_tokenizer, setup_logging

    out = Path(args.out_dir)
    check_export_target(out, args.overwrite, keep=(args.run_dir,))  # before anything is loaded
    setup_logging()
    cfg = run_config(args.run_dir)
    check_export_target(out, args.overwrite, keep=(args.run_dir, local_model_folder(cfg.model.name_or_path)))
    check_model(cfg.model.name_or_path, cfg.model.task)
    run = restore_run(args.run_dir, cfg)
    model, labels, step = run.model, run.labels, run.step
    if args.adapter and run.adapters is None:
        raise ValueError(f"--adapter: {args.run_dir} is a full fine-tuning run (model.lora.rank is not set); "
                         f"export it without --adapter")
    tokenizer = run_tokenizer(args.run_dir, cfg)
    template = chat_template(cfg)
    if template:  # export the chat template training used, so serving formats prompts the same way
        tokenizer.chat_template = template
    if args.adapter:  # staged as `save_pretrained` is: OUT is replaced as a whole, never written into
        import jax
        from contextlib import nullcontext

        from jaxft.hf.files import staged_folder

        with staged_folder(out) if jax.process_index() == 0 else nullcontext(out) as folder:
            save_adapter(model, run.adapters, folder, cfg.model.name_or_path, tokenizer=tokenizer)
        print(f"exported the LoRA adapter of step {step} of {args.run_dir} to {out} (peft format)")
        return
    if run.adapters is not None:
        merge(model, run.adapters)  # base + scale·A·B: a plain model transformers loads
    if cfg.tasks:  # a multi-task run: OUT_DIR/NAME per task (jaxft.objectives.multitask)
        from jaxft.objectives.multitask import export_tasks

        export_tasks(model, Path(args.run_dir), out, tokenizer=tokenizer)
        print(f"exported step {step} of {args.run_dir} to {out}/{{{','.join(t.name for t in cfg.tasks)}}}")
        return
    save_pretrained(model, out, tokenizer=tokenizer, id2label=labels.id2label if labels else None)
    print(f"exported step {step} of {args.run_dir} to {out}")


def cmd_generate(args) -> None:
    from jaxft.generate import generate_text
    from jaxft.train.run import run_config, setup_logging

    if not args.prompt:
        raise ValueError("--prompt is empty: give the text to continue (with --chat, the user's message)")
    if (Path(args.model_dir) / "config.yaml").exists():  # a run directory
        cfg = run_config(args.model_dir)
        if cfg.model.task != "causal-lm":
            raise ValueError(f"{args.model_dir} is a model.task={cfg.model.task} run (its config.yaml); jaxft "
                             f"generate continues text with a causal LM")
        check_model(cfg.model.name_or_path, cfg.model.task)
    else:
        check_model(args.model_dir, "causal-lm")
    setup_logging()
    from jaxft.compilation import enable_persistent_cache

    enable_persistent_cache()
    print(generate_text(args.model_dir, args.prompt, max_new_tokens=args.max_new_tokens,
                        temperature=args.temperature, top_p=args.top_p, seed=args.seed, chat=args.chat))


def cmd_plan(args) -> None:
    from jaxft.config import load_config
    from jaxft.plan import plan

    cfg = load_config(args.config, args.overrides)
    check_model(cfg.model.name_or_path, cfg.model.task, cfg.data)
    result = plan(cfg, devices=args.devices, compile=not args.analytic)
    print(json.dumps(result.to_json(), indent=2) if args.json else result.report())


def cmd_data(args) -> None:
    from transformers import AutoTokenizer

    from jaxft.config import load_config
    from jaxft.data.report import inspect_data, require_classification
    from jaxft.hf.load import resolve
    from jaxft.train.run import setup_logging

    cfg = load_config(args.config, args.overrides)
    require_classification(cfg)
    check_model(cfg.model.name_or_path, cfg.model.task)
    setup_logging()
    tokenizer = AutoTokenizer.from_pretrained(str(resolve(cfg.model.name_or_path)))  # no weights
    print(inspect_data(cfg, tokenizer, args.out or cfg.output_dir))


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} devices: give a positive number")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jaxft", description="Fine-tune HF transformers with JAX/Flax.")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="fine-tune (resumes if the run directory has a checkpoint)")
    t.add_argument("config")
    t.add_argument("overrides", nargs="*", help="key.sub=value")
    t.set_defaults(func=cmd_train)
    e = sub.add_parser("eval", help="evaluate the best (else latest) checkpoint of a run")
    e.add_argument("config")
    e.add_argument("overrides", nargs="*", help="checkpoint=RUN_DIR and key.sub=value")
    e.set_defaults(func=cmd_eval)
    x = sub.add_parser("export", help="run checkpoint → Hugging Face folder")
    x.add_argument("run_dir")
    x.add_argument("out_dir")
    x.add_argument("--overwrite", action="store_true", help="allow a non-empty OUT_DIR")
    x.add_argument("--adapter", action="store_true", help="LoRA runs: write a peft adapter folder instead of the "
                                                          "merged model")
    x.set_defaults(func=cmd_export)
    g = sub.add_parser("generate", help="continue a prompt with a causal LM (HF folder or run directory)")
    g.add_argument("model_dir")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=32)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--chat", action="store_true", help="render the prompt as a user turn of the chat template")
    g.set_defaults(func=cmd_generate)
    pl = sub.add_parser("plan", help="per-device memory of a training run, without allocating the model")
    pl.add_argument("config")
    pl.add_argument("overrides", nargs="*", help="key.sub=value (e.g. mesh.fsdp=64 model.remat=full)")
    pl.add_argument("--devices", type=_positive_int, help="plan for this many devices (default: the mesh's fixed axes, "
                                                "or this machine's devices when they fit)")
    pl.add_argument("--analytic", action="store_true", help="do not compile the step even if the mesh fits here")
    pl.add_argument("--json", action="store_true", help="print the plan as JSON")
    pl.set_defaults(func=cmd_plan)
    dt = sub.add_parser("data", help="the data pipeline alone: cleaning report, examples, token lengths")
    dt.add_argument("config")
    dt.add_argument("overrides", nargs="*", help="key.sub=value (e.g. data.clean.drop_leakage=false)")
    dt.add_argument("--out", help="folder for the report files and histogram (default: output_dir)")
    dt.set_defaults(func=cmd_data)
    bn = sub.add_parser("bench", help="side-by-side benchmarks against a plain PyTorch loop; writes BENCHMARKS.md")
    from jaxft.bench.cli import add_arguments, bench

    add_arguments(bn)
    bn.set_defaults(func=bench)
    return p


def entry() -> None:
    """The `jaxft` console command: restart with huge-page `malloc` where it applies (`jaxft.hostmem`), then
    `main`."""
    from jaxft.hostmem import restart_with_huge_pages

    restart_with_huge_pages()
    sys.exit(main())


def main(argv: list[str] | None = None) -> int:
    from jaxft.train.faults import DIVERGED_EXIT_CODE, PREEMPTED_EXIT_CODE, Diverged, Preempted

    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except Preempted as e:
        print(f"jaxft {args.command}: {e}", file=sys.stderr)
        return PREEMPTED_EXIT_CODE
    except Diverged as e:
        print(f"jaxft {args.command}: error: {e}", file=sys.stderr)
        return DIVERGED_EXIT_CODE
    except USER_ERRORS as e:
        print(f"jaxft {args.command}: error: {user_message(e)}", file=sys.stderr)
        return 2
    return 0


def user_message(e: BaseException) -> str:
    """The message of a user error. A `KeyError` that carries only a key (a lookup in a file's contents
    that found nothing) is said as such, with where the lookup failed, never as a bare `error: data`."""
    if not isinstance(e, KeyError):
        return str(e)
    msg = str(e.args[0]) if e.args else ""
    if msg and " " in msg.strip():  # a KeyError raised with a sentence (e.g. jaxft.hf.table)
        return msg
    import traceback

    frame = traceback.extract_tb(e.__traceback__)[-1] if e.__traceback__ else None
    where = f" (looked up in {frame.name}, {Path(frame.filename).name}:{frame.lineno})" if frame else ""
    return f"missing key {msg!r}{where}"


if __name__ == "__main__":
    entry()
