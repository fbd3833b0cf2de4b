r"""Speed and memory of the Soft MoE layer and model, each measured against what it should cost.

    python -m softmoe.benchmark --threads 1 --layer-shapes vit_s16 --profile \
        --out experiments/throughput/results_zen5.json    # a recorded run (experiments/throughput/README.md)
    python -m softmoe.benchmark --tiny                      # seconds: proves the command works; writes nothing
    python -m softmoe.benchmark --suite gpu --out results_gpu_suite.json   # issue 18's GPU targets, met / NOT met

Nothing is written unless ``--out`` is given. No environment variables are needed: like every command
of the project, the benchmark calls ``softmoe.tune_allocator()`` at start-up, and that is the "default
environment" it reports (``machine.env`` in the JSON records any variables that were set).

In one run, on one machine, it measures side by side:

* ``layer``: the Soft MoE layer's forward and forward+backward, per compute dtype, against
  - the same layer written the reference implementation's way (a Python loop over an ``nn.ModuleList``
    of timm ``Mlp`` experts, :mod:`.reference`);
  - its attainable time: the 15 bare matmuls it must compute (5 forward, 10 backward) at its own shapes,
    into preallocated outputs (:mod:`.floors`), and the bandwidth roofline of its expert weights;
  - itself under glibc's own allocator settings and under the environment variables' (float32);
  - itself casting its weights to bf16 at every call, as after each optimizer step (bf16);
  - the machine's GEMM rate per dtype, copy bandwidth, and a bare batched GEMM at the experts' shape;
* ``layer_memory``: peak memory of forward+backward against params + grads + saved activations;
* ``model``: Soft MoE ViT against the dense timm ViT of the same width and depth: inference,
  forward+backward and a full AdamW training step, as ratios, with the optimizer's share;
* ``compile``: eager against ``torch.compile`` (``--compile``; compiling is slow on CPU);
* ``profile``: torch.profiler's kernel table of the layer's forward+backward per dtype (``--profile``);
* ``model_profile``: where each model's inference time goes (``--profile-model``).

Every time is the median over rounds. A round runs every case of a comparison once, in an order that
rotates from round to round, and ratios are medians of per-round ratios, so cases compared with each
other share whatever else the machine is doing. On CUDA the same command reports images/s and the
fraction of the measured bf16 matmul rate the layer reaches.

Modules: :mod:`.shapes` (shapes, FLOP and byte models), :mod:`.reference` (the reference-style loop),
:mod:`.timing` (side-by-side rounds), :mod:`.environment` (machine, allocator, memory probes),
:mod:`.floors` (rates and the attainable matmuls), :mod:`.layer` and :mod:`.model` (the sections),
:mod:`.profiling`, :mod:`.report` (targets and the printed report), :mod:`.cli`; the GPU suite
(``--suite gpu``: :mod:`.suite`, :mod:`.suite_report`, :mod:`.step_floor`, the floor of a training step); and
:mod:`.fresh_process` (the allocator as a user's fresh process gets it).
"""
