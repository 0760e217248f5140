"""``emokernels generate``: emotion-elicited generation (stage 01) into a resumable JSONL.

    emokernels generate --model smollm2-135m --split train --limit 2 --out runs/gen.jsonl

One reply per (skeleton, valence, emotion) of the split; rows are appended per batch and keys
already in ``--out`` are skipped, so a killed run resumes (see ``emokernels.data.generate``).
"""
from __future__ import annotations

import argparse
import time

from . import options as opt

DEFAULT_MAX_NEW_TOKENS = 48  # generate.DEFAULT_DECODING (checked equal in tests; kept here so --help needs no torch)
PAPER_MAX_NEW_TOKENS = 100  # generate.PAPER_STAGE01_DECODING
EMOTION_MODES = ("prompt", "neutral")  # generate.EMOTION_MODES


def register(subparsers) -> None:
    p = subparsers.add_parser("generate", help="emotion-elicited generation (stage 01), resumable JSONL",
                              description=__doc__, formatter_class=opt.HelpFormatter)
    opt.add_model(p)
    opt.add_split(p, "train")
    opt.add_emotions(p)
    p.add_argument("--valences", type=opt.valences_arg, default=None,
                   help="comma list of positive, neutral, negative (default: all three)")
    opt.add_limit(p, "train")
    opt.add_out(p, "file", help="output JSONL (appended to; resumable)")
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                   help="skip keys already in --out, or start over")
    p.add_argument("--mode", choices=EMOTION_MODES, default="prompt", help="emotion system prompt, or the neutral prompt")
    opt.add_batch_size(p, 8)
    opt.add_max_new_tokens(p, None, help=f"tokens per reply (default: {DEFAULT_MAX_NEW_TOKENS}; "
                                         f"{PAPER_MAX_NEW_TOKENS} with --paper-decoding)")
    p.add_argument("--paper-decoding", action="store_true",
                   help="the paper's stage-01 decoding (no penalties, 100 tokens) instead of the shared default")
    p.add_argument("--preset", default="strong", help="system-prompt preset: strong | paper | a template with {emotion}")
    opt.add_dtype(p, "bf16")
    opt.add_progress(p)
    p.set_defaults(func=_main)


def _main(args) -> int:
    from ..models.loader import model_source
    from ..data.generate import PAPER_STAGE01_DECODING, decoding_settings, generate_rows
    from ..data.labels import EMOTIONS, VALENCES
    from ..data.prompts import PromptConfig
    from ..data.sev import iter_units, load_split

    model_source(args.model)
    out = opt.check_out_file(args.out)
    opt.check_limit(args.split, args.limit)
    prompt = PromptConfig(preset=args.preset)
    prompt.system("anger")  # validates the preset before the model loads
    decoding = decoding_settings(PAPER_STAGE01_DECODING if args.paper_decoding else None, args.max_new_tokens)
    skeletons = load_split(args.split, args.limit)
    units = list(iter_units(skeletons, args.emotions or EMOTIONS, args.valences or VALENCES))

    from ..models.loader import load

    t0 = time.perf_counter()
    model, tok = load(args.model, dtype=args.dtype)
    t_load = time.perf_counter() - t0
    t0 = time.perf_counter()
    rows = generate_rows(model, tok, units, out, emotion_mode=args.mode, prompt=prompt, batch_size=args.batch_size,
                         decoding=decoding, resume=args.resume, progress=not args.no_progress, model_name=args.model,
                         extra={"split": str(args.split), "dtype": opt.resolved_dtype_name(args.dtype)})
    print(f"model load {t_load:.1f} s, generation {time.perf_counter() - t0:.1f} s")
    opt.wrote(out, f"{len(rows)} rows")
    return 0
