"""`llmtune <verb>`: parse arguments, call the library, map errors to exit codes.

Exit codes: 0 success, 2 the user's input is wrong (message, no traceback unless --debug), 1 anything else.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path

from llmtune.errors import UserError

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not getattr(args, "func", None):
        build_parser().print_help()
        return 2
    try:
        args.func(args)
        return 0
    except UserError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"error: {exc}", file=sys.stderr)
        return 2
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

    p = verbs.add_parser("validate", help="check a recipe and report every problem at once",
                         description="Check a recipe (with overrides) and report every problem at once.")
    _recipe_args(p)
    p.set_defaults(func=cmd_validate)

    p = verbs.add_parser("train", help="run a recipe: train, then evaluate and export as it says",
                         description="Run every stage the recipe names; prints the run directory.")
    _recipe_args(p)
    p.add_argument("--resume", action="store_true",
                   help="continue train.output_dir (default: the newest run of this recipe) from its newest complete checkpoint")
    _launch_args(p)
    p.set_defaults(func=cmd_train)

    p = verbs.add_parser("plan", help="estimate per-GPU memory of a recipe before launching it",
                         description="Estimate per-GPU memory (parameters, gradients, optimizer states, activations) "
                                     "from the model config alone (empty weights, nothing downloaded but the config), "
                                     "under the recipe's method, precision, batch shape and launch (DDP, ZeRO stage, FSDP).")
    _recipe_args(p)
    p.add_argument("--accelerate-config", metavar="NAME|PATH",
                   help="plan for this launch (default: the recipe's launch.accelerate_config)")
    p.add_argument("--num-processes", type=int, metavar="N", help="processes (GPUs) in the launch; default: the config's")
    p.add_argument("--gpu-memory", type=float, metavar="GB",
                   help="memory of one GPU to check against; default: the visible GPUs' (none on a CPU machine)")
    p.add_argument("--device", choices=["cuda", "cpu"], default=None,
                   help="plan for GPUs or for the CPU (the loss path differs); default: cuda when a GPU is visible, else cpu")
    p.add_argument("--json", action="store_true", help="print the estimate as JSON")
    p.set_defaults(func=cmd_plan)

    p = verbs.add_parser("ls", help="list shipped recipes and built-in models",
                         description="List shipped recipes and built-in models.")
    p.set_defaults(func=cmd_ls)
    for sub in verbs.choices.values():  # --debug works before or after the verb
        sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks for input errors too")
    return parser


def _launch_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("launch (multi-GPU / multi-node through `accelerate launch`; flags win over the recipe's launch section)")
    g.add_argument("--accelerate-config", metavar="NAME|PATH",
                   help="accelerate config file, or a shipped one: " + ", ".join(_shipped_config_names()))
    g.add_argument("--num-processes", type=int, metavar="N", help="processes in all (default: one per visible GPU, on every machine)")
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
    from llmtune.pipeline import run_recipe
    from llmtune.runs import is_main_process

    run = run_recipe(recipe, recipe_dir, resume=args.resume).run
    if is_main_process():  # one line for scripts, not one per rank
        print(run.path)


def cmd_plan(args) -> None:
    import json

    from llmtune.launch import launch_options
    from llmtune.plan import estimate_memory, format_plan, visible_gpu_memory
    from llmtune.recipe import load_recipe

    recipe, recipe_dir = load_recipe(args.recipe, args.overrides)
    plan = estimate_memory(recipe, launch_options(recipe, args, recipe_dir), device=args.device)
    gpu_memory = args.gpu_memory * 1e9 if args.gpu_memory else visible_gpu_memory()
    print(json.dumps(plan.as_dict(gpu_memory), indent=2) if args.json else format_plan(plan, gpu_memory))


def cmd_ls(args) -> None:
    from llmtune.models.builtin import BUILTIN_MODELS

    print("built-in models:")
    for name, spec in BUILTIN_MODELS.items():
        print(f"  {name:28s} {spec.description}")
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


if __name__ == "__main__":
    sys.exit(main())
