"""`llmtune <verb>`: parse arguments, call the library, map errors to exit codes.

Exit codes: 0 success, 2 the user's input is wrong (message, no traceback unless --debug), 3 the run
finished but missed an evaluation gate (eval.gates), 1 anything else.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path

from llmtune.errors import GateFailed, UserError, tell_the_launching_process

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not getattr(args, "func", None):
        build_parser().print_help()
        return 2
    try:
        return args.func(args) or 0  # a verb may return 1 for a failure it has already reported
    except UserError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"error: {exc}", file=sys.stderr)
        tell_the_launching_process(exc)
        return 2
    except GateFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        tell_the_launching_process(exc)
        return 3
    except KeyboardInterrupt:
        print("interrupted; resume with --resume", file=sys.stderr)
        return 130
    except Exception:
        traceback.print_exc()
        return 1


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = build_parser()
    # key=value overrides may also follow options (`train r.yaml --resume train.max_steps=5`).
    args, extra = parser.parse_known_args(argv)
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmtune", description="Fine-tune and align LLMs from one YAML recipe.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for input errors too")
    verbs = parser.add_subparsers(title="verbs", metavar="VERB")

    p = verbs.add_parser(
        "validate",
        help="check a recipe and report every problem at once",
        description="Check a recipe (with overrides) and report every problem at once.",
    )
    _recipe_args(p)
    p.set_defaults(func=cmd_validate)

    p = verbs.add_parser(
        "train",
        help="run a recipe: train, then evaluate and export as it says",
        description="Run every stage the recipe names; prints the run directory.",
    )
    _recipe_args(p)
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue train.output_dir (default: the newest run of this recipe) from its newest complete checkpoint",
    )
    _launch_args(p)
    p.set_defaults(func=cmd_train)

    p = verbs.add_parser(
        "data", help="inspect a recipe's data before training", description="Inspect a recipe's data before training."
    )
    data_verbs = p.add_subparsers(title="data verbs", metavar="DATA_VERB")
    q = data_verbs.add_parser(
        "preview",
        help="rendered examples with loss tokens marked, lengths, dropped rows",
        description="Render the first training examples with the tokens that carry loss "
        "highlighted, a token-length histogram, and rows kept and dropped per reason.",
    )
    _recipe_args(q)
    q.add_argument("--n", type=int, default=3, help="examples to show (default 3)")
    q.add_argument("--json", action="store_true", help="print the preview as JSON instead")
    q.set_defaults(func=cmd_data_preview)
    q.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks for input errors too")

    p = verbs.add_parser(
        "export",
        help="export a run or model as merged, bitsandbytes or GGUF, verified",
        description="Write a deployable artifact (model card, report.md, summary.json included), reload it "
        "with plain transformers and measure what the export cost against the model it came "
        "from: perplexity change, top-1 next-token agreement, logit differences.",
    )
    p.add_argument("source", metavar="RUN_DIR_OR_MODEL", help="a run directory, a model directory or a built-in model name")
    p.add_argument(
        "--format",
        dest="formats",
        action="append",
        required=True,
        metavar="FORMAT",
        help="merged, bnb-8bit, bnb-4bit, gguf-f16, gguf-q8_0 or gguf-q4_0; repeat for several, or 'all'",
    )
    p.add_argument("--output", help="export directory (one format only); default RUN_DIR/export/FORMAT, or exports/NAME-FORMAT")
    p.set_defaults(func=cmd_export)

    p = verbs.add_parser(
        "plan",
        help="estimate per-GPU memory of a recipe before launching it",
        description="Estimate per-GPU memory (parameters, gradients, optimizer states, activations) "
        "from the model config alone (empty weights, nothing downloaded but the config), "
        "under the recipe's method, precision, batch shape and launch (DDP, ZeRO stage, FSDP).",
    )
    _recipe_args(p)
    p.add_argument(
        "--accelerate-config", metavar="NAME|PATH", help="plan for this launch (default: the recipe's launch.accelerate_config)"
    )
    p.add_argument("--num-processes", type=int, metavar="N", help="processes (GPUs) in the launch; default: the config's")
    p.add_argument(
        "--gpu-memory",
        type=float,
        metavar="GB",
        help="memory of one GPU to check against; default: the visible GPUs' (none on a CPU machine)",
    )
    p.add_argument(
        "--device",
        choices=["cuda", "cpu"],
        default=None,
        help="plan for GPUs or for the CPU (the loss path differs); default: cuda when a GPU is visible, else cpu",
    )
    p.add_argument("--json", action="store_true", help="print the estimate as JSON")
    p.set_defaults(func=cmd_plan)

    p = verbs.add_parser(
        "ls", help="list shipped recipes and built-in models", description="List shipped recipes and built-in models."
    )
    p.set_defaults(func=cmd_ls)

    p = verbs.add_parser(
        "eval",
        help="run lm-evaluation-harness suites on any model, or compare two results",
        description="Evaluate a model (built-in name, local folder, hub id or llmtune run directory) on "
        "eval suites through lm-evaluation-harness; or compare two results with --compare.",
    )
    p.add_argument("recipe", nargs="?", help="recipe YAML: its model.name and eval section (suites, tasks, limit, include_paths)")
    p.add_argument(
        "--model", help="model to evaluate: built-in name, local folder (model or PEFT adapter), hub id, or run directory"
    )
    p.add_argument(
        "--suite",
        action="append",
        default=[],
        metavar="NAME|FILE",
        help="suite name under eval/suites/ or a suite YAML file (repeatable)",
    )
    p.add_argument("--tasks", help="comma-separated lm_eval task names, every metric reported")
    p.add_argument("--limit", type=int, help="score at most N rows of each task")
    p.add_argument(
        "--include-path",
        action="append",
        default=[],
        metavar="DIR",
        help="folder of task YAML files in lm_eval's format (repeatable)",
    )
    p.add_argument("--output", metavar="DIR", help="folder for the results (default runs/eval-<model>-<timestamp>)")
    p.add_argument("--batch-size", default="auto", help="lm_eval batch size (default auto: lm_eval's search on GPUs, 8 on CPUs)")
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="weight precision (default auto: bf16 on capable GPUs, fp32 elsewhere)",
    )
    p.add_argument(
        "--compare",
        nargs=2,
        metavar=("RUN_A", "RUN_B"),
        help="print the differences between two results (run or eval folders); evaluates nothing",
    )
    p.set_defaults(func=cmd_eval)

    for sub in verbs.choices.values():  # --debug works before or after the verb
        sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks for input errors too")
    return parser


def _launch_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "launch (multi-GPU / multi-node through `accelerate launch`; flags win over the recipe's launch section)"
    )
    g.add_argument(
        "--accelerate-config",
        metavar="NAME|PATH",
        help="accelerate config file, or a shipped one: " + ", ".join(_shipped_config_names()),
    )
    g.add_argument(
        "--num-processes", type=int, metavar="N", help="processes in all (default: one per visible GPU, on every machine)"
    )
    g.add_argument("--num-machines", type=int, metavar="M", help="machines in a multi-node run")
    g.add_argument("--machine-rank", type=int, metavar="R", help="this machine's rank, 0 .. M-1")
    g.add_argument("--main-process-ip", metavar="IP", help="address of the rank-0 machine")
    g.add_argument("--main-process-port", type=int, metavar="PORT", help="port on the rank-0 machine (default 29500)")


def _shipped_config_names() -> list[str]:
    return sorted(p.stem for p in (PROJECT_ROOT / "accelerate_configs").glob("*.yaml"))


def _recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="recipe YAML file")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="override recipe keys, e.g. train.max_steps=10")


def cmd_validate(args) -> None:
    from llmtune.recipe import load_recipe

    recipe, _ = load_recipe(args.recipe, args.overrides)
    if recipe.stages:  # loading checked each stage's own recipe (recipe/rules.py, stages_fit_together)
        kinds = " -> ".join(f"{stage.name} ({(stage.method or recipe.method).kind})" for stage in recipe.stages)
        print(f"{args.recipe}: ok (stages: {kinds} on {recipe.model.name})")
        return
    print(f"{args.recipe}: ok ({recipe.method.kind} with {recipe.adapter.kind} on {recipe.model.name})")


def cmd_train(args) -> None:
    from llmtune.launch import agree_on_run_dir, inside_launcher, launch_options, relaunch_if_needed
    from llmtune.recipe import load_recipe

    recipe, recipe_dir = load_recipe(args.recipe, args.overrides)
    if not inside_launcher():
        from llmtune.plan import warn_if_it_will_not_fit

        warn_if_it_will_not_fit(recipe, launch_options(recipe, args, recipe_dir))
    if relaunch_if_needed(recipe, args, recipe_dir):
        return
    agreed = agree_on_run_dir(recipe, args.resume)
    if agreed:  # the user's own multi-process launch: every rank writes where rank 0 chose
        recipe, recipe_dir = load_recipe(args.recipe, [*args.overrides, f"train.output_dir={agreed}"])
    from llmtune.distributed import is_main_process
    from llmtune.pipeline import run_recipe

    run = run_recipe(recipe, recipe_dir, resume=args.resume).run
    if is_main_process():  # one line for scripts, not one per rank
        print(run.path)
    _end_launched_rank()


def _end_launched_rank() -> None:
    """End a launched rank after a successful train without the interpreter's teardown (after success
    only: a rank that failed must not be cut short here).

    On CPU (gloo, DeepSpeed's shm collectives) a finished rank aborted now and then while the
    interpreter tore itself down, after every Python frame had returned and even with the process
    group destroyed first ("terminate called without an active exception", SIGABRT from a C++
    destructor; pytorch/pytorch#190489 is the gloo half of it). The launcher then killed rank 0
    mid-evaluation and the whole run failed: 2 of 5 runs of the ZeRO-3 test under pytest on a 2-core
    machine. So: close the group, run the Python exit hooks (trackers, loggers) while everything is
    alive, flush, and leave with os._exit, which skips the C++ destructors.
    """
    import atexit
    import logging

    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    dist.destroy_process_group()
    atexit._run_exitfuncs()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def cmd_plan(args) -> None:
    import json

    from llmtune.launch import launch_options
    from llmtune.plan import estimate_memory, format_plan, visible_gpu_memory
    from llmtune.recipe import load_recipe

    recipe, recipe_dir = load_recipe(args.recipe, args.overrides)
    plan = estimate_memory(recipe, launch_options(recipe, args, recipe_dir), device=args.device)
    gpu_memory = args.gpu_memory * 1e9 if args.gpu_memory else visible_gpu_memory()
    print(json.dumps(plan.as_dict(gpu_memory), indent=2) if args.json else format_plan(plan, gpu_memory))


def cmd_data_preview(args) -> None:
    from llmtune.data import prepare_data
    from llmtune.data.preview import preview, print_preview
    from llmtune.methods import method_of
    from llmtune.models.load import load_tokenizer, resolve_model_path
    from llmtune.recipe import load_recipe

    recipe, recipe_dir = load_recipe(args.recipe, args.overrides)
    tokenizer = load_tokenizer(recipe.model, resolve_model_path(recipe.model.name))
    cfg = recipe.data.model_copy(update={"packing": False})  # show examples whole, as they are masked
    data = prepare_data(cfg, recipe_dir, tokenizer, recipe.train.seed, method_of(recipe).EXAMPLES)
    print_preview(preview(data, tokenizer, args.n, cfg.max_length), args.json)


def cmd_export(args) -> int:
    from llmtune.export.formats import FORMATS, export_model

    formats = list(dict.fromkeys(f for spec in args.formats for f in (FORMATS if spec == "all" else spec.split(","))))
    if args.output and len(formats) > 1:
        raise UserError("--output: names one directory, so give one --format with it (or leave --output out)")
    failed, reference = [], {}
    for fmt in formats:
        record = export_model(args.source, fmt, args.output, reference_cache=reference)
        cost = record["cost"]
        print(
            f"[llmtune] {fmt}: {record['path']}  {record['bytes'] / 1e6:.1f} MB, perplexity {cost['perplexity_change']:+.2%}, "
            f"top-1 agreement {cost['top1_agreement']:.1%}, "
            f"{'verified' if record['ok'] else 'VERIFICATION FAILED (see report.md)'}"
        )
        if not record["ok"]:
            failed.append(fmt)
    if failed:
        print(
            f"error: export verification failed for {', '.join(failed)}; see report.md in each export directory", file=sys.stderr
        )
        return 1
    return 0


def cmd_ls(args) -> None:
    from llmtune.models.builtin import BUILTIN_MODELS

    print("built-in models:")
    for name, spec in BUILTIN_MODELS.items():
        print(f"  {name:28s} {spec.description}")
    from llmtune.evaluation.suites import list_suites

    suites = list_suites()
    if suites:
        print("eval suites:")
        for path in suites:
            print(f"  {path.stem:28s} {path.relative_to(PROJECT_ROOT)}")
    configs = _shipped_config_names()
    if configs:
        print("accelerate configs (--accelerate-config NAME):")
        for name in configs:
            print(f"  {name}")
    recipes = sorted((PROJECT_ROOT / "recipes").glob("**/*.yaml"))
    if recipes:
        print("recipes:")
        for path in recipes:
            print(f"  {path.relative_to(PROJECT_ROOT)}")


def cmd_eval(args) -> None:
    if args.compare:
        from llmtune.evaluation.reports import compare, print_comparison

        print_comparison(*args.compare, compare(*args.compare))
        return
    from llmtune.evaluation.standalone import run_eval

    model, suites, tasks = args.model, args.suite, args.tasks.split(",") if args.tasks else []
    limit, include_paths, batch_size, dtype = args.limit, args.include_path, args.batch_size, args.dtype
    if args.recipe:  # the recipe fills in what the command line leaves out
        from llmtune.recipe import load_recipe

        recipe, recipe_dir = load_recipe(args.recipe, [])
        model = model or recipe.model.name
        suites = suites or [str(recipe_dir / s) if (recipe_dir / s).is_file() else s for s in recipe.eval.suites]
        tasks = tasks or list(recipe.eval.tasks)
        limit = limit or recipe.eval.limit
        include_paths = include_paths or [str(recipe_dir / p) for p in recipe.eval.include_paths]
        dtype = recipe.model.dtype if dtype == "auto" else dtype
    if not model:
        raise UserError("llmtune eval: give --model PATH_OR_ID (or a recipe), or --compare RUN_A RUN_B")
    if batch_size != "auto" and not str(batch_size).isdigit():
        raise UserError(f"--batch-size: {batch_size!r} is neither a number nor auto")
    summary = run_eval(model, suites, tasks, limit, include_paths, args.output, batch_size, dtype)
    print(summary["output_dir"])


if __name__ == "__main__":
    sys.exit(main())
