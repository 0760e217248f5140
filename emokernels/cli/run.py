"""``emokernels run``: the command line of :mod:`emokernels.pipeline` (its parser imports no torch).

The whole workflow on one model, resumable, into one report folder; see ``pipeline.py`` for the
eight stages. Every setting is checked before the model loads.
"""
from __future__ import annotations

from pathlib import Path

from . import options as opt

# pipeline.STAGES (checked equal in tests; here so that --help needs no torch)
STAGES = ("generate", "judge", "directions", "components", "influence", "circuits", "select", "compare")


def register(subparsers) -> None:
    from ..judge.base import SECOND as SECOND_JUDGE

    p = subparsers.add_parser("run", help="the whole workflow on one model, into a report folder",
                              description=_description(), formatter_class=opt.HelpFormatter)
    opt.add_model(p, required=False, default="smollm2-135m")
    opt.add_out(p, "dir", required=False, help="report folder (default: runs/<model>)")
    opt.add_limit(p, "train", flag="--train-limit", default=8, help="train skeletons (x3 valences x6 emotions); 160 = all")
    opt.add_limit(p, "test", flag="--test-limit", default=8, help="test skeletons for the comparison; 160 = all")
    opt.add_limit(p, "train", flag="--select-limit", default=2, help="train skeletons for the α / strength selection")
    opt.add_judge(p, help="the judge of the train replies and the first reading of the comparison")
    opt.add_judge(p, "--select-judge", default=None,
                  help="the judge that picks the strengths on the train split (default: --second-judge, else --judge)")
    opt.add_judge(p, "--second-judge", default=SECOND_JUDGE, extra_choices=("none",),
                  help="a different judge: every condition is also reported under it, with the agreement")
    p.add_argument("--source", default="auto", choices=["auto", "prompt", "text"],
                   help="directions for steering: paper's prompt readout, emotional text, or auto")
    p.add_argument("--circuit-source", default="auto", choices=["auto", "prompt", "text"],
                   help="circuit components from the paper's prompt readout or from emotional text (auto: as --source)")
    p.add_argument("--preset", default="strong", help="emotion prompt preset: strong | paper | a template with {emotion}")
    opt.add_dtype(p, "auto")
    opt.add_backend(p)
    opt.add_batch_size(p, 16)
    opt.add_max_new_tokens(p, 40)
    p.add_argument("--budget", type=opt.positive_int, default=None, metavar="K",
                   help="circuit size K (default: the paper's 560 scaled to the model)")
    p.add_argument("--texts-per-emotion", type=opt.positive_int, default=5, metavar="N",
                   help="emotional reference texts per emotion (text source)")
    p.add_argument("--accepted-only", action="store_true", help="directions from judge-accepted rows only (the paper)")
    p.add_argument("--max-degenerate", type=opt.finite_float, default=0.3,
                   help="selection rejects settings with more degenerate outputs")
    p.add_argument("--stop-after", default=None, choices=STAGES, help="stop after this stage")
    p.add_argument("--restart-from", default=None, choices=STAGES,
                   help="redo this stage and every later one (their outputs are deleted), e.g. after changing a setting")
    p.add_argument("--seed", type=int, default=0, help="torch seed")
    p.set_defaults(func=_main)


def _description() -> str:
    """pipeline.py's docstring, read from the file (importing pipeline would import torch)."""
    import ast

    try:
        return ast.get_docstring(ast.parse(Path(__file__).with_name("pipeline.py").read_text(encoding="utf-8"))) or ""
    except OSError:
        return __doc__


def _main(args) -> int:
    if args.second_judge not in (None, "none") and args.second_judge == args.judge:
        raise ValueError("--second-judge must differ from --judge (or be 'none')")
    from ..models.loader import model_source

    model_source(args.model)
    for flag, split, limit in (("--train-limit", "train", args.train_limit), ("--test-limit", "test", args.test_limit),
                               ("--select-limit", "train", args.select_limit)):
        opt.check_limit(split, limit, flag)
    if args.out is None:
        args.out = str(Path("runs") / args.model.replace("/", "_"))
    opt.check_out_dir(args.out)
    from ..data.prompts import PromptConfig

    PromptConfig(preset=args.preset).system("anger")  # validates the preset before the model loads
    args.dtype = opt.resolved_dtype_name(args.dtype)  # recorded resolved: "auto" must not hide a change

    import torch

    from ..io import exclusive_output
    from ..pipeline import Run

    torch.manual_seed(args.seed)
    with exclusive_output(Path(args.out) / "state.json", what=f"the run folder {args.out}"):  # one `run` per folder
        rc = Run(args).run()
    report = Path(args.out) / "report.md"
    opt.wrote(report if report.exists() else args.out, "the run's report; artifacts beside it")
    return rc
