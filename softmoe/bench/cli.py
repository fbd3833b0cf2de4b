"""``python -m softmoe.benchmark``: the arguments, the run of every section, the JSON."""

from __future__ import annotations

import argparse
import difflib
import json
import os
import sys
import tempfile
import time
from typing import Optional, Sequence

import torch

from ..harness.whole_files import replaced_whole
from ..runtime import cpu_has_native_bf16, tune_allocator
from . import __doc__ as PACKAGE_DOC
from .environment import machine_info, memory_method, release_freed_memory
from .layer import benchmark_compile, benchmark_layer, benchmark_layer_memory
from .model import benchmark_model, benchmark_model_bf16, benchmark_model_memory
from .profiling import profile_layer, profile_model_inference
from .report import evaluate_targets, format_report
from .shapes import LAYER_SHAPES, MODEL_SHAPES

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m softmoe.benchmark", description=PACKAGE_DOC.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="write the JSON results here (nothing is written without it)")
    parser.add_argument("--suite", choices=["gpu"], default=None,
                        help="gpu: every target of issue 18 as the trainer trains (bf16, fused AdamW, batch 256, "
                             "224 px, eager and compiled), each printed as met or NOT met (softmoe/bench/suite.py)")
    parser.add_argument("--suite-compile", default="inductor",
                        help="torch.compile backend of the suite's compiled cases; none: eager only")
    parser.add_argument("--suite-rounds", type=int, default=5, help="timed rounds of each suite comparison")
    parser.add_argument("--suite-budget-s", type=float, default=150.0,
                        help="seconds after which the suite compiles nothing more (the cases skipped are listed)")
    parser.add_argument("--tiny", action="store_true",
                        help="tiny layer and model, 1 round: checks the command in seconds (numbers mean nothing)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)")
    parser.add_argument("--layer-shapes", nargs="+", default=["vit_s16", "cpu_small"], choices=sorted(LAYER_SHAPES))
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=sorted(DTYPES))
    parser.add_argument("--bfloat16-shapes", nargs="+", default=None, choices=sorted(LAYER_SHAPES),
                        help="layer shapes also run under bf16 autocast (default: all where the device has native "
                             "bf16, else cpu_small only: emulated bf16 is many times slower)")
    parser.add_argument("--model-shape", default="vit_s16", choices=sorted(MODEL_SHAPES))
    parser.add_argument("--model-batch", type=int, default=32)
    parser.add_argument("--no-model", action="store_true", help="skip the whole-model section")
    parser.add_argument("--model-bf16", choices=["auto", "yes", "no"], default="auto",
                        help="also time the Soft MoE model under bf16 autocast, as trainer.precision=bf16 runs it "
                             "(auto: where the device has native bf16)")
    parser.add_argument("--optimizer", default="fused", choices=["fused", "foreach", "for_loop", "sgd"],
                        help="AdamW kernel, or sgd: plain SGD, no optimizer state (S/16's AdamW state is 6.9 GB)")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (slow to compile on CPU)")
    parser.add_argument("--profile", action="store_true",
                        help="add torch.profiler's kernel tables of the first layer shape's forward+backward, "
                             "per dtype, and of the reference-style loop's")
    parser.add_argument("--profile-model", action="store_true",
                        help="add where each model's inference time goes (changed MLPs, experts, routing, the rest)")
    parser.add_argument("--compile-shapes", nargs="+", default=["cpu_small"], choices=sorted(LAYER_SHAPES))
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds before the timed ones (layer sections)")
    parser.add_argument("--model-warmup", type=int, default=2,
                        help="untimed rounds before the timed ones in the model sections: two, because the first "
                             "training step's freed gradients leave holes its successor's forward fills, so the "
                             "heap still grows (pages faulted in afresh) in the second")
    parser.add_argument("--layer-rounds", type=int, default=7)
    parser.add_argument("--model-rounds", type=int, default=3)
    parser.add_argument("--inference-rounds", type=int, default=9,
                        help="rounds of the models' inference-only section (the inference targets): a round is "
                             "cheap beside a training step's, and single rounds scatter on a shared machine")
    parser.add_argument("--gemm-size", type=int, default=None, help="square GEMM of the rate probe")
    parser.add_argument("--copy-mib", type=int, default=None, help="size of the bandwidth probe's copy")
    args = parser.parse_args(argv)
    check_device(parser, args)
    check_out(parser, args.out)
    check_suite_compile(parser, args)
    # the values given, before --tiny and the device's defaults replace any: a bad one is named, not dropped
    for name in ("model_batch", "warmup", "model_warmup", "layer_rounds", "model_rounds", "inference_rounds",
                 "gemm_size", "copy_mib", "threads", "suite_rounds", "suite_budget_s"):
        minimum = 0 if name in ("warmup", "model_warmup", "suite_budget_s") else 1
        value = getattr(args, name)
        if value is not None and not value >= minimum:  # threads None: torch's own; nan is no number of seconds
            parser.error(f"--{name.replace('_', '-')} must be >= {minimum}, got {value}")
    cpus = os.cpu_count() or 1
    if args.threads is not None and args.threads > cpus:  # was: a segfault at 100000, with no message
        parser.error(f"--threads {args.threads}: more than this machine's {cpus} CPUs; threads beyond the cores take "
                     f"turns, which times the operating system (and some thousands abort the process)")
    cuda = args.device.startswith("cuda")
    if args.bfloat16_shapes is None:
        args.bfloat16_shapes = args.layer_shapes if cuda or cpu_has_native_bf16() else ["cpu_small"]
    native_bf16 = cuda or bool(cpu_has_native_bf16())
    wanted = args.model_bf16 == "yes" or (args.model_bf16 == "auto" and native_bf16)
    args.model_bf16 = "bfloat16" in args.dtypes and wanted
    if args.tiny:
        args.layer_shapes = args.bfloat16_shapes = args.compile_shapes = ["tiny"]
        args.model_shape = "tiny"
        args.model_batch, args.warmup, args.model_warmup, args.layer_rounds, args.model_rounds = 2, 1, 1, 1, 1
        args.inference_rounds = 1
        args.gemm_size, args.copy_mib = args.gemm_size or 128, args.copy_mib or 4
    args.gemm_size = args.gemm_size or (8192 if cuda else 2048)
    args.copy_mib = args.copy_mib or (1024 if cuda else 256)
    return args


def check_device(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """--device names a device torch has here, and --suite gpu runs at full size on a GPU only."""
    try:
        device = torch.device(args.device)
    except RuntimeError:
        parser.error(f"--device must be a torch device (cpu, cuda, cuda:1, ...), got {args.device!r}")
    if device.type not in ("cpu", "cuda", "mps"):
        parser.error(f"--device {args.device}: the benchmark measures cpu, cuda or mps, not {device.type}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: torch sees no CUDA GPU here")
    if device.type == "mps" and not torch.backends.mps.is_available():
        parser.error(f"--device {args.device}: torch sees no MPS device (Apple's GPU) here")
    if args.suite == "gpu" and device.type != "cuda" and not args.tiny:
        # the full-size suite on a CPU would run for hours: batch 256 at 224 px, B/16's 3.7 B parameters
        parser.error(f"--suite gpu measures a CUDA GPU at full size, not --device {args.device}; add --tiny to check "
                     "the command on this device")


def check_out(parser: argparse.ArgumentParser, out: Optional[str]) -> None:
    """--out names a file that can be written (its missing folders are made): checked before minutes of measuring."""
    if out is None:
        return
    path = os.path.abspath(out)
    if os.path.isdir(path):
        parser.error(f"--out {out}: a directory; name the JSON file to write, e.g. {os.path.join(out, 'bench.json')}")
    if os.path.lexists(path) and not path.endswith(".json"):  # was: a checkpoint named by mistake became 7 KB of JSON
        parser.error(f"--out {out}: an existing file that is not a .json file, which this would replace; name a "
                     f".json file")
    folder = os.path.dirname(path)
    while not os.path.exists(folder):  # the nearest folder that exists, in which the rest would be made
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
        parser.error(f"--out {out}: cannot be written ({folder} is a file)")
    if not os.access(folder, os.W_OK | os.X_OK):
        parser.error(f"--out {out}: cannot be written ({folder} is not writable)")
    try:  # a folder that takes no files although access() allows it: /proc, or any folder for root on a read-only one
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".bench-probe-"):
            pass
    except OSError as error:
        parser.error(f"--out {out}: cannot be written ({folder} takes no new file: {error.strerror})")


def check_suite_compile(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """--suite-compile names a torch.compile backend (or none): a typo fails every compiled case, after minutes of
    measuring the others."""
    problem = compile_backend_problem(args.suite_compile) if args.suite and args.suite_compile != "none" else None
    if problem:
        parser.error(f"--suite-compile {problem}, or none (eager only)")


def compile_backend_problem(backend: str) -> Optional[str]:
    """Why ``backend`` is not a torch.compile backend, for an option's one line, or None."""
    if backend in ("inductor", "eager", "aot_eager", "cudagraphs"):
        return None  # the common ones, without importing dynamo
    from torch._dynamo import list_backends

    backends = list_backends(exclude_tags=())
    if backend in backends:
        return None
    close = difflib.get_close_matches(backend, backends, n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return (f"{backend}: not a torch.compile backend{hint}; use inductor (the default), eager, aot_eager, another "
            "of torch._dynamo.list_backends()")


def run(args: argparse.Namespace, argv: Sequence[str]) -> dict:
    device = torch.device(args.device)
    # as every command does at start-up: the "default environment" the targets speak of
    tuned = tune_allocator()
    results = {"command": " ".join(["python -m softmoe.benchmark", *argv]), "machine": machine_info(device),
               "config": vars(args)}
    results["allocator"] = {"tune_allocator_applied": tuned, "summary": (
        "default environment = softmoe.tune_allocator() at start-up (no environment variables)" if tuned
        else "glibc not in use: allocator left as it is")}
    started = time.perf_counter()
    results["layer"] = [
        row
        for name in args.layer_shapes
        for row in benchmark_layer(LAYER_SHAPES[name], [DTYPES[d] for d in args.dtypes
                                                        if d == "float32" or name in args.bfloat16_shapes],
                                   args, device)
    ]
    first_shape = LAYER_SHAPES[args.layer_shapes[0]]
    if args.profile:
        results["profile"] = [profile_layer(first_shape, device, DTYPES[d]) for d in args.dtypes
                              if d == "float32" or first_shape.name in args.bfloat16_shapes]
        results["profile"].append(profile_layer(first_shape, device, impl="reference_loop"))
    model_shape = MODEL_SHAPES[args.model_shape]
    release_freed_memory()  # the layer section's heap, before the model section's 16 GB
    results["model"] = {"skipped": "--no-model"} if args.no_model else benchmark_model(model_shape, args, device)
    release_freed_memory()
    if args.model_bf16 and not args.no_model:
        results["model_bf16"] = benchmark_model_bf16(model_shape, args, device)
        release_freed_memory()
    if args.profile_model:
        results["model_profile"] = profile_model_inference(model_shape, args.model_batch, device)
    results["compile"] = {"skipped": "pass --compile"}
    if args.compile:
        results["compile"] = [row for name in args.compile_shapes
                              for row in benchmark_compile(LAYER_SHAPES[name], args, device)]
    # memory last: the host probe changes how glibc allocates, which would slow the timings
    results["memory_method"] = memory_method(device)
    results["layer_memory"] = [row for name in args.layer_shapes
                               for row in benchmark_layer_memory(LAYER_SHAPES[name], device)]
    results["model_memory"] = {"skipped": "--no-model"} if args.no_model else \
        benchmark_model_memory(model_shape, args, device)
    results["machine"]["load_average_at_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    results["targets"] = evaluate_targets(results, args.layer_shapes[0])
    if args.tiny:  # the sizes mean nothing: values only, no verdicts
        for target in results["targets"].values():
            target["met"] = None
    results["wall_s"] = time.perf_counter() - started
    return results


def main(argv: Optional[Sequence[str]] = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    command = " ".join(["python -m softmoe.benchmark", *argv])
    if args.threads:  # both paths: the suite ran on torch's default threads whatever --threads said
        torch.set_num_threads(args.threads)
    if args.suite:
        from .suite import run_suite
        from .suite_report import format_suite

        results = run_suite(args, command, progress=_suite_progress(args.out))
        print(format_suite(results))
    else:
        results = run(args, argv)
        print(format_report(results))
    if args.out:
        _write_json(args.out, results)
        print(f"\nwrote {args.out}")
    return results


def _write_json(path: str, results: dict) -> None:
    """Written whole (:func:`replaced_whole`): a process killed mid-write leaves the previous file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with replaced_whole(path) as temporary, open(temporary, "w") as f:
        json.dump(results, f, indent=1)


def _suite_progress(out: Optional[str]):
    """After each suite section: its lines on stderr, and the results so far in ``out`` (``"partial": true``)."""
    from .suite_report import section_lines

    def progress(key: str, figures: dict, results: dict) -> None:
        print("\n".join(f"[suite] {line}" for line in section_lines(key, figures)), file=sys.stderr, flush=True)
        if out:
            _write_json(out, {**results, "partial": True})

    return progress
