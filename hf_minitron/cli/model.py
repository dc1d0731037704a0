"""Commands on one model's weights: importance, prune, params."""

from __future__ import annotations

from ..importance import ImportanceConfig
from ..prune import PruneConfig, PruneTarget
from ..schema import add_flags, given
from .args import add_data, add_model, add_output, data_source, model_args


def add_commands(sub) -> None:
    p = sub.add_parser("importance", help="score heads, neurons, channels and layers on calibration data",
                       description="Forward passes only. Scores are written once and reused for every prune target.")
    add_model(p)
    add_data(p)
    add_flags(p, ImportanceConfig, "importance", title="importance (recipe section importance:)")
    add_output(p, "the scores (importance.safetensors + importance.json)")
    p.set_defaults(func=run_importance)

    p = sub.add_parser("prune", help="prune the teacher to a target shape using cached importance scores",
                       description="Writes a folder that loads with AutoModelForCausalLM.from_pretrained.")
    add_model(p)
    p.add_argument("--importance", required=True, help="scores folder written by `hf-minitron importance`")
    add_flags(p, PruneTarget, "target", title="target shape (recipe: members.N.shape)")
    add_flags(p, PruneConfig, "prune", title="pruning (recipe section prune:)")
    add_output(p, "the pruned model")
    p.set_defaults(func=run_prune)

    p = sub.add_parser("params", help="exact parameter count of a target shape, from the config alone")
    add_model(p)
    add_flags(p, PruneTarget, "target", title="target shape (recipe: members.N.shape)")
    p.set_defaults(func=run_params)


def run_importance(args) -> None:
    from ..importance import check_output
    from ..importance import run_importance as run

    check_output(args.out, args.overwrite)
    config = ImportanceConfig(**given(args, "importance", ImportanceConfig))
    teacher = model_args(args)
    source = teacher.resolve()
    model, tokenizer = teacher.load(source)
    run(model, tokenizer, data_source(args), config, args.out, {"teacher": source.as_dict()})
    print(f"importance scores written to {args.out}")


def run_prune(args) -> None:
    from ..models import load_config
    from ..prune import check_output, student_config
    from ..prune import run_prune as run

    check_output(args.out, args.overwrite)
    target = PruneTarget(**given(args, "target", PruneTarget))
    config = PruneConfig(**given(args, "prune", PruneConfig))
    teacher = model_args(args)
    source = teacher.resolve()
    student_config(load_config(source, teacher.trust_remote_code), target)  # impossible targets fail before loading
    model, tokenizer = teacher.load(source)
    out = run(model, tokenizer, args.importance, target, config, args.out,
              {"teacher": source.as_dict(), "importance": str(args.importance)})
    print(f"pruned model ({out.record['parameters']:,} parameters, teacher {model.num_parameters():,}) "
          f"written to {args.out}")


def run_params(args) -> None:
    from ..archs import count_parameters
    from ..models import load_config
    from ..prune import parameter_count

    teacher = model_args(args)
    config = load_config(teacher.resolve(), teacher.trust_remote_code)
    print(f"teacher: {count_parameters(config):,}")
    print(f"target:  {parameter_count(config, PruneTarget(**given(args, 'target', PruneTarget))):,}")
