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
    p.set_defaults(func=cmd_train)

    p = verbs.add_parser("data", help="inspect a recipe's data before training",
                         description="Inspect a recipe's data before training.")
    data_verbs = p.add_subparsers(title="data verbs", metavar="DATA_VERB")
    q = data_verbs.add_parser("preview", help="rendered examples with loss tokens marked, lengths, dropped rows",
                              description="Render the first training examples with the tokens that carry loss "
                                          "highlighted, a token-length histogram, and rows kept and dropped per reason.")
    _recipe_args(q)
    q.add_argument("--n", type=int, default=3, help="examples to show (default 3)")
    q.add_argument("--json", action="store_true", help="print the preview as JSON instead")
    q.set_defaults(func=cmd_data_preview)
    q.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks for input errors too")

    p = verbs.add_parser("ls", help="list shipped recipes and built-in models",
                         description="List shipped recipes and built-in models.")
    p.set_defaults(func=cmd_ls)
    for sub in verbs.choices.values():  # --debug works before or after the verb
        sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks for input errors too")
    return parser


def _recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="recipe YAML file")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="override recipe keys, e.g. train.max_steps=10")


def cmd_validate(args) -> None:
    from llmtune.recipe import load_recipe

    recipe, _ = load_recipe(args.recipe, args.overrides)
    if recipe.stages:
        stages = [recipe.stage_recipe(stage, stage.name) for stage in recipe.stages]
        print(f"{args.recipe}: ok (stages: {' -> '.join(f'{st.name} ({r.method.kind})' for st, r in zip(recipe.stages, stages))} "
              f"on {recipe.model.name})")
        return
    print(f"{args.recipe}: ok ({recipe.method.kind} with {recipe.adapter.kind} on {recipe.model.name})")


def cmd_train(args) -> None:
    from llmtune.launch import relaunch_if_needed
    from llmtune.recipe import load_recipe

    recipe, recipe_dir = load_recipe(args.recipe, args.overrides)
    if relaunch_if_needed(recipe, args):
        return
    from llmtune.pipeline import run_recipe

    print(run_recipe(recipe, recipe_dir, resume=args.resume).run.path)


def cmd_data_preview(args) -> None:
    from llmtune.data import prepare_data
    from llmtune.data.preview import preview, print_preview
    from llmtune.models.load import load_tokenizer, resolve_model_path
    from llmtune.recipe import load_recipe

    recipe, recipe_dir = load_recipe(args.recipe, args.overrides)
    tokenizer = load_tokenizer(recipe.model, resolve_model_path(recipe.model.name))
    cfg = recipe.data.model_copy(update={"packing": False})  # show examples whole, as they are masked
    data = prepare_data(cfg, recipe_dir, tokenizer, recipe.train.seed)
    print_preview(preview(data, tokenizer, args.n, cfg.max_length), args.json)


def cmd_ls(args) -> None:
    from llmtune.models.builtin import BUILTIN_MODELS

    print("built-in models:")
    for name, spec in BUILTIN_MODELS.items():
        print(f"  {name:28s} {spec.description}")
    recipes = sorted((PROJECT_ROOT / "recipes").glob("**/*.yaml"))
    if recipes:
        print("recipes:")
        for path in recipes:
            print(f"  {path.relative_to(PROJECT_ROOT)}")


if __name__ == "__main__":
    sys.exit(main())
