"""``graphopt`` command line: optimize, verify, passes, inspect. The only module that prints."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import signal
import sys
import traceback
from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from graphopt import api, io
from graphopt import progress as progress_display
from graphopt.errors import GraphoptError, Interrupted, UnverifiedError, UsageError
from graphopt.metrics import OutputError, Tolerance
from graphopt.pipeline import format_pipeline, parse_pipeline, read_pipeline_arg
from graphopt.registry import all_passes, describe, presets
from graphopt.verify import time_limit

DEFAULT_MODEL = "digits_cnn.onnx"

# Piped output (logs, CI, tests) gets a wide fixed width instead of rich's 80-column fallback,
# which would truncate the per-pass table.
out = Console(highlight=False, width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else 160)


def default_model() -> Path:
    return Path(str(resources.files("graphopt.models") / DEFAULT_MODEL))


def default_pipeline() -> str:
    from graphopt.passes import DEFAULT_PIPELINE

    return DEFAULT_PIPELINE


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    _written.clear()
    restore_logging = _log_to_stderr(args.debug)
    try:
        with time_limit(getattr(args, "ort_timeout", 0) or None):
            return args.run(args)
    except KeyboardInterrupt:
        done = f"{', '.join(map(str, _written))} was written completely" if _written else "no output was written"
        err.print(f"graphopt: interrupted; {done}", markup=False, soft_wrap=True)
        return Interrupted.exit_code
    except GraphoptError as e:
        if args.debug:
            traceback.print_exc()
        err.print(f"graphopt: error: {e}", markup=False, soft_wrap=True)
        return e.exit_code
    except Exception as e:  # a bug: say so in one line, the traceback only with --debug
        if args.debug:
            traceback.print_exc()
        err.print(f"graphopt: internal error: {type(e).__name__}: {' '.join(str(e).split())[:300]} (rerun with --debug)", markup=False, soft_wrap=True)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)
        restore_logging()


class _OneLine(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"graphopt: {record.levelname.lower()}: {' '.join(record.getMessage().split())}"


def _log_to_stderr(debug: bool) -> Callable[[], None]:
    """graphopt's warnings as one ``graphopt: warning: ...`` line each; other libraries' log records and
    Python warnings (onnx_ir's failed shape inference, numpy overflows) only with ``--debug``, which
    also shows graphopt's debug records with their tracebacks. Returns the undo."""
    handler = logging.StreamHandler(sys.stderr)
    if debug:
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    else:
        handler.setFormatter(_OneLine())
        handler.addFilter(lambda record: record.name == "graphopt" or record.name.startswith("graphopt."))
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if debug else logging.WARNING)
    logging.captureWarnings(True)

    def undo() -> None:
        logging.captureWarnings(False)
        root.removeHandler(handler)
        root.setLevel(level)

    return undo


_written: list[Path] = []
"""Files the current command has saved (an interrupt after saving must not claim nothing was)."""


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors are one line and exit 2 (argparse's own code for them)."""

    def error(self, message: str) -> Any:
        err.print(f"graphopt: error: {message} (see {self.prog} --help)", markup=False, soft_wrap=True)
        raise SystemExit(UsageError.exit_code)


def _parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    common.add_argument("--debug", action="store_true", help="print tracebacks")
    parser = _Parser(prog="graphopt", description="Verified ONNX graph optimizer.", parents=[common])
    parser.set_defaults(run=lambda a: (parser.print_help(), 0)[1], debug=False)
    sub = parser.add_subparsers(title="commands", parser_class=_Parser)

    data = _Parser(add_help=False)
    data.add_argument("--inputs", metavar="NPZ", help="inputs keyed by input name (extra leading axis = several samples; 'labels' key = task labels)")
    data.add_argument("--input-shape", action="append", default=[], metavar="SPEC", help="NAME:1x3x224x224 or DIM=VALUE for dynamic dimensions (repeatable)")
    data.add_argument("--samples", type=int, default=2, help="generated input samples (default 2)")
    data.add_argument("--seed", type=int, default=0, help="seed for generated inputs")
    data.add_argument("--json", action="store_true", help="print JSON instead of tables")
    data.add_argument("--ort-timeout", type=float, default=600.0, metavar="S", help="stop any single onnxruntime run after S seconds (default 600; 0 = never)")

    opt = sub.add_parser("optimize", parents=[common, data], help="run a pipeline, verifying every pass")
    opt.add_argument("model", nargs="?", help=f"input model (default: the bundled {DEFAULT_MODEL})")
    opt.add_argument("-o", "--output", help="output model (default: ./<name>.opt.onnx)")
    opt.add_argument("-p", "--pipeline", help="pipeline text or @file (default: the default pipeline)")
    opt.add_argument("--calibration", metavar="NPZ", help="data for data-aware passes (default: the verification inputs)")
    opt.add_argument("--tolerance", metavar="SPEC", help="default budget of lossy passes, e.g. sqnr=30,cosine=0.999,max-abs=1e-3,max-rel=0.01; "
                     "accuracy-drop=0.5 (points of task accuracy, needs 'labels' in --inputs) replaces the passes' own output budgets")
    opt.add_argument("--on-violation", choices=["fail", "rollback"], default="fail", help="stop (default) or undo a pass that breaks its budget")
    opt.add_argument("--no-verify", action="store_true", help="skip onnxruntime verification (a warning is printed and stamped in the model)")
    opt.add_argument("--no-deploy-check", action="store_true", help="verify at ORT_DISABLE_ALL only")
    opt.add_argument("--allow-unverified", action="store_true", help="exit 0 even when some outputs could not be checked")
    opt.add_argument("--keep-partial", action="store_true", help="on failure, save the model as it was before the failing pass")
    opt.add_argument("--report", metavar="JSON", help="write the per-pass report as JSON")
    opt.add_argument("-q", "--quiet", action="store_true", help="no table, no progress")
    opt.set_defaults(run=_optimize)

    ver = sub.add_parser("verify", parents=[common, data], help="compare two models on the same inputs")
    ver.add_argument("reference")
    ver.add_argument("candidate")
    ver.set_defaults(run=_verify)

    ps = sub.add_parser("passes", parents=[common], help="list passes, their options and presets")
    ps.add_argument("--json", action="store_true")
    ps.set_defaults(run=_passes)

    ins = sub.add_parser("inspect", parents=[common], help="opsets, signature, op histogram, parameters")
    ins.add_argument("model")
    ins.add_argument("--json", action="store_true")
    ins.set_defaults(run=_inspect)
    return parser


def parse_tolerance(spec: str | None) -> Tolerance | None:
    if not spec:
        return None
    keys = {"max-abs": "max_abs", "max-rel": "max_rel", "sqnr": "min_sqnr_db", "cosine": "min_cosine", "accuracy-drop": "max_accuracy_drop"}
    values = {}
    for part in spec.split(","):
        key, _, value = part.partition("=")
        if key.strip() not in keys:
            raise UsageError(f"bad --tolerance key '{key.strip()}'; use {', '.join(keys)}")
        try:
            values[keys[key.strip()]] = float(value)
        except ValueError:
            raise UsageError(f"bad --tolerance value '{value}' for '{key.strip()}'") from None
    return Tolerance(**values)


def _optimize(args: argparse.Namespace) -> int:
    model_path = Path(args.model) if args.model else default_model()
    output = Path(args.output) if args.output else Path.cwd() / (model_path.name.removesuffix(".onnx") + ".opt.onnx")
    if io.same_file(model_path, output):
        raise UsageError(f"output '{output}' is the input model: choose another path")
    io.check_output_path(output)
    pipeline = parse_pipeline(read_pipeline_arg(args.pipeline) if args.pipeline else default_pipeline())
    if args.no_verify:
        err.print("[yellow]graphopt: warning: verification is off (--no-verify); nothing proves the output matches the input[/]")
    model = io.load(model_path)  # before the inputs/calibration files, so model errors come first
    show = not (args.quiet or args.json)
    display = progress_display.show(err) if show and err.is_terminal else contextlib.nullcontext(None)
    try:
        with display as status:
            result, report = api.optimize(
                model,
                pipeline,
                inputs=args.inputs,
                input_shape=args.input_shape,
                samples=args.samples,
                seed=args.seed,
                calibration=args.calibration,
                on_violation=args.on_violation,
                tolerance=parse_tolerance(args.tolerance),
                verify=not args.no_verify,
                deploy_check=not args.no_deploy_check,
                keep_partial=args.keep_partial,
                progress=(lambda name: status.update(f"running [bold]{name}[/] and verifying it")) if status else None,
            )
    except GraphoptError as e:
        partial = getattr(e, "partial", None)
        if args.keep_partial and partial is not None:
            _written.extend(io.save(partial, output, protect=(model_path,)))
            err.print(f"graphopt: kept the model from before the failing pass in {output}")
        raise
    report.model = str(model_path)
    written = io.save(result, output, protect=(model_path,))
    _written.extend(written)
    if args.report:
        report.write_json(args.report)
    if args.json:
        print(json.dumps(report.to_json(), indent=2, default=str))
    elif not args.quiet:
        out.print(report_table(report))
        s = report.summary()
        out.print(
            f"wrote {', '.join(str(p) for p in written)}: {s['nodes'][0]} -> {s['nodes'][1]} nodes, "
            f"{_bytes(s['bytes'][0])} -> {_bytes(s['bytes'][1])} ({s['bytes_ratio']:.3f}x), "
            + ("verified" if report.verified else "[bold red]NOT fully verified[/]")
        )
    unverified = [r for r in report.records if r.verdict == "unverified"]
    if report.verification not in ("on", "off") or unverified:
        why = report.verification if report.verification not in ("on", "off") else unverified[0].unverified
        if not args.allow_unverified:
            raise UnverifiedError(f"output written, but not fully verified: {why} (pass --allow-unverified to accept)")
        err.print(f"graphopt: warning: unverified: {why}", markup=False)
    return 0


def report_table(report: Any) -> Table:
    t = Table(title=f"graphopt: {report.model}", title_justify="left")
    with_accuracy = any(r.accuracy for r in report.records)
    columns = ("pass", "nodes", "params", "bytes", "s", "max abs", "max rel", "SQNR dB", "cosine", "deploy max abs", *(("accuracy",) if with_accuracy else ()), "verdict")
    for col in columns:
        t.add_column(col, justify="left" if col in ("pass", "verdict") else "right", no_wrap=True)
    for r in report.records:
        j = r.to_json()
        dep = j["deploy"] or {}
        name = r.name + (f" #{r.iteration}" if r.iteration else "")
        style = {"ok": "green", "unchanged": "dim", "rolled-back": "yellow", "unverified": "red", "violation": "red"}.get(r.verdict, "")
        t.add_row(
            name,
            _arrow(r.before.nodes, r.after.nodes, str),
            _arrow(r.before.params, r.after.params, _count),
            _arrow(r.before.bytes, r.after.bytes, _bytes),
            f"{r.seconds + r.verify_seconds:.2f}",
            _num(j["max_abs_error"], j["bit_exact"], r.modified),
            _num(j["max_rel_error"], j["bit_exact"], r.modified),
            "inf" if j["bit_exact"] else _num(j["sqnr_db"], False, r.modified, ".1f"),
            _num(j["cosine"], j["bit_exact"], r.modified, ".6f", zero="1"),
            _num(dep.get("max_abs_error"), dep.get("bit_exact"), r.modified and bool(dep)),
            *((f"{r.accuracy[0]:.4f} → {r.accuracy[1]:.4f}" if r.accuracy else "-",) if with_accuracy else ()),
            f"[{style}]{r.verdict}[/]" if style else r.verdict,
        )
    return t


def _arrow(a: int, b: int, fmt: Any) -> str:
    return fmt(a) if a == b else f"{fmt(a)} → {fmt(b)}"


def _num(x: float | None, bit_exact: bool | None, present: bool, spec: str = ".2e", zero: str = "0") -> str:
    if not present:
        return "-"
    if bit_exact:
        return zero
    return "n/a" if x is None else format(x, spec)


def _count(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k" if n >= 1e4 else str(n)


def _bytes(n: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def _verify(args: argparse.Namespace) -> int:
    result = api.verify(args.reference, args.candidate, inputs=args.inputs, input_shape=args.input_shape, samples=args.samples, seed=args.seed)
    if args.json:
        from graphopt.report import figures

        print(json.dumps({level: [{"output": e.output, **figures([e])} for e in errs] for level, errs in result.items()}, indent=2))
        return 0
    t = Table(title=f"{args.candidate} vs {args.reference}", title_justify="left")
    for col in ("output", "level", "max abs", "max rel", "SQNR dB", "cosine", "note"):
        t.add_column(col, justify="left" if col in ("output", "level", "note") else "right")
    for level, errors in result.items():
        for e in errors:
            t.add_row(e.output, level, *_error_cells(e), e.mismatch)
    out.print(t)
    return 0


def _error_cells(e: OutputError) -> list[str]:
    if e.max_abs == 0 and not e.mismatch:
        return ["0", "0", "inf", "1"]
    return [f"{e.max_abs:.3e}", f"{e.max_rel:.3e}", f"{e.sqnr_db:.1f}", f"{e.cosine:.6f}"]


def _passes(args: argparse.Namespace) -> int:
    passes = all_passes()
    if args.json:
        doc = {
            name: {"summary": cls.summary(), "lossless": cls.lossless, "options": [o.__dict__ for o in describe(cls)]}
            for name, cls in passes.items()
        }
        print(json.dumps({"passes": doc, "presets": presets()}, indent=2, default=str))
        return 0
    t = Table(title="passes", title_justify="left", show_lines=True)
    for col in ("pass", "kind", "description", "options (name: type = default)"):
        t.add_column(col)
    budget = {"budget-max-abs", "budget-min-sqnr", "budget-min-cosine", "budget-max-accuracy-drop"}
    for name, cls in passes.items():
        opts = "\n".join(f"{o.name}: {o.type} = {_fmt_default(o.default)}  [dim]{o.doc}[/]" for o in describe(cls) if o.name not in budget)
        kind = "lossless" if cls.lossless else f"lossy ({cls.tolerance}{', own change' if cls.stepwise else ''})"
        t.add_row(name, kind, cls.summary(), opts or "-")
    out.print(t)
    out.print("Every pass also takes budget-max-abs, budget-min-sqnr, budget-min-cosine and budget-max-accuracy-drop (points of task accuracy "
              "against the 'labels' of --inputs; it replaces the pass's default budget), overriding its verification budget.")
    for name, text in presets().items():
        out.print(f"preset [bold]{name}[/] = {format_pipeline(parse_pipeline(text))}")
    return 0


def _fmt_default(value: Any) -> str:
    return "true" if value is True else "false" if value is False else "none" if value is None else str(value)


def _inspect(args: argparse.Namespace) -> int:
    from graphopt.inspect import summarize

    info = summarize(io.load(args.model, check=False))
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    out.print(f"[bold]{args.model}[/]  ir_version {info['ir_version']}  producer {info['producer']}")
    out.print("opsets: " + ", ".join(f"{d or 'ai.onnx'} {v}" for d, v in info["opsets"].items()))
    sig = Table(title="signature", title_justify="left")
    for col in ("", "name", "dtype", "shape"):
        sig.add_column(col)
    for kind in ("inputs", "outputs"):
        for v in info[kind]:
            sig.add_row(kind[:-1], v["name"], v["dtype"], v["shape"])
    out.print(sig)
    ops = Table(title=f"{info['nodes']} nodes", title_justify="left")
    ops.add_column("op")
    ops.add_column("count", justify="right")
    for op, n in info["ops"].items():
        ops.add_row(op, str(n))
    out.print(ops)
    dt = Table(title=f"{_count(info['params'])} parameters, {_bytes(info['param_bytes'])}", title_justify="left")
    for col in ("dtype", "tensors", "elements", "bytes"):
        dt.add_column(col, justify="left" if col == "dtype" else "right")
    for dtype, d in info["dtypes"].items():
        dt.add_row(dtype, str(d["tensors"]), _count(d["elements"]), _bytes(d["bytes"]))
    out.print(dt)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
